"""The batched editors on tiny seeded models: the fast v* path against the plain one, batches against
requests one at a time, EMMET's equalities, AlphaEdit's null space."""

from __future__ import annotations

import pytest
import torch

from editors.methods.emmet import EmmetHyperparameters, compute_emmet, equality_update
from editors.methods.memit import AlphaEditHyperparameters, compute_memit, null_space_projector, projected_update
from editors.methods.rome import (
    EditRequest,
    RomeHyperparameters,
    compute_keys,
    compute_rome,
    compute_targets,
    context_templates,
    weight_matrix,
)
from editors.stats import second_moments
from support.models import FAMILIES, make_model

REQUESTS = [EditRequest("{} is located in the city of", "the eiffel tower", "rome", "paris"),
            EditRequest("{} is located in the city of", "big ben", "paris", "london"),
            EditRequest("{} is in", "the colosseum", "london big", "rome")]
CORPUS = ["the eiffel tower is located in paris", "the colosseum is in rome and was built by people",
          "big ben is in london which is the capital of england", "the statue of liberty is in new york",
          "paris is the capital of france", "rome is the capital of italy"] * 6
HP = RomeHyperparameters(layer=2, v_steps=12, context_templates=((3, 3),))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", ["mlp_output", "block_output"])
def test_fast_targets_equal_the_plain_path(tokenizer, family, site):
    """Replaying the layers below the edit and projecting to the vocabulary only where a loss reads
    it gives the plain whole-model optimisation's targets, losses and history."""
    model = make_model(family, len(tokenizer))
    templates = context_templates(model, tokenizer, HP.context_templates, HP.seed)
    fast, fast_info = compute_targets(model, tokenizer, HP.layer, REQUESTS[:1], templates, HP, site, fast=True)
    plain, plain_info = compute_targets(model, tokenizer, HP.layer, REQUESTS[:1], templates, HP, site, fast=False)
    assert torch.allclose(fast, plain, rtol=1e-4, atol=1e-4)
    assert len(fast_info["history"]) == len(plain_info["history"]) > 1
    for a, b in zip(fast_info["history"], plain_info["history"]):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-4, abs=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(type(layer).__name__ != "_Replay" for layer in model.modules())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_batch_of_requests_equals_each_alone(tokenizer, family):
    """All requests optimised together (one δ row each, padded rows, per-row early stop and clamp)
    give each request's own targets; keys likewise."""
    model = make_model(family, len(tokenizer))
    templates = context_templates(model, tokenizer, HP.context_templates, HP.seed)
    together, info = compute_targets(model, tokenizer, HP.layer, REQUESTS, templates, HP)
    alone = torch.cat([compute_targets(model, tokenizer, HP.layer, [r], templates, HP)[0] for r in REQUESTS])
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-4)
    keys = compute_keys(model, tokenizer, HP.layer, REQUESTS, templates, batch=4)
    each = torch.cat([compute_keys(model, tokenizer, HP.layer, [r], templates) for r in REQUESTS])
    assert torch.allclose(keys, each, atol=1e-5)
    assert len(info["final_nll"]) == 3


def test_emmet_closed_form_meets_its_equalities_and_is_r_rome_for_one_request():
    g = torch.Generator().manual_seed(0)
    W, K, V = torch.randn(8, 16, generator=g), torch.randn(16, 3, generator=g), torch.randn(8, 3, generator=g)
    X = torch.randn(16, 40, generator=g)
    C = X @ X.T / 40
    lam, right = equality_update(W, C, K, V)
    assert torch.allclose((W + lam @ right) @ K, V, atol=1e-4)                # (W + ΔW) K = V
    # the minimum-norm (in C) solution: ΔW = Λ (C⁻¹K)ᵀ, so ΔW C lies in the span of Kᵀ
    dW = (lam @ right).double()
    proj = K.double() @ torch.linalg.pinv(K.double())
    assert torch.allclose(dW @ C.double() @ proj, dW @ C.double(), atol=1e-4)
    from editors.methods.rome import rank_one_update
    one = equality_update(W, C, K[:, :1], V[:, :1])
    ref = rank_one_update(W, C, K[:, 0], V[:, 0])
    assert torch.allclose(one[0] @ one[1], ref[0] @ ref[1], atol=1e-5)


def test_emmet_edit_maps_each_key_to_its_target(tokenizer, tmp_path):
    model = make_model("llama", len(tokenizer))
    C = second_moments(model, tokenizer, [HP.layer], CORPUS, max_tokens=10_000, cache_dir=tmp_path)[HP.layer]
    hp = EmmetHyperparameters(layer=HP.layer, v_steps=12, context_templates=((3, 3),), equality_ridge=0.0, mom2_ridge=0.0)
    delta, details = compute_emmet(model, tokenizer, REQUESTS, hp, base_model="tiny", C=C)
    (name,) = delta.names
    W = weight_matrix(model, HP.layer) + delta.difference(name)
    assert torch.allclose(W @ details["K"].T, details["V"].T, rtol=1e-3, atol=1e-3)
    assert delta.factors[name][0].shape[1] == 3


def test_alphaedit_update_vanishes_on_the_preserved_keys(tokenizer, tmp_path):
    """ΔW = ΔW P: the part of ΔW outside the null space is zero to float precision, and on the
    preserved keys themselves ΔW is bounded by the eigenvalues the projector drops."""
    g = torch.Generator().manual_seed(0)
    K0 = torch.randn(16, 6, generator=g) @ torch.randn(6, 200, generator=g)          # keys in a 6-dim subspace
    C = K0 @ K0.T / 200 + 1e-4 * torch.eye(16)
    P, kept = null_space_projector(C, 1e-2)
    assert kept == 10
    K, R = torch.randn(16, 3, generator=g), torch.randn(8, 3, generator=g)
    u, v = projected_update(K, R, P, torch.zeros(16, 16), l2=1.0)
    dW = (u @ v).double()
    assert torch.allclose(dW @ (torch.eye(16, dtype=torch.float64) - P), torch.zeros_like(dW), atol=1e-6)
    assert (dW @ K0.double()).norm() / (dW.norm() * K0.double().norm()) < 1e-5
    # on the real editor: each layer's update annihilates C's large-eigenvalue directions
    model = make_model("llama", len(tokenizer))
    Cs = second_moments(model, tokenizer, [1, 2], CORPUS, max_tokens=10_000, cache_dir=tmp_path)
    hp = AlphaEditHyperparameters(layers=(1, 2), v_steps=8, context_templates=((3, 3),), nullspace_threshold=0.05)
    delta, details = compute_memit(model, tokenizer, REQUESTS, hp, base_model="tiny", C=Cs)
    for row in details["layers"]:
        P, kept = null_space_projector(Cs[row["layer"]], 0.05)
        assert row["null_space_dims"] == kept and 0 < kept < P.shape[0]
        name = f"model.layers.{row['layer']}.mlp.down_proj.weight"
        dW = delta.difference(name).double()
        assert (dW @ (torch.eye(P.shape[0], dtype=torch.float64) - P)).abs().max() < 1e-5 * dW.abs().max()
    assert set(details["keys_outer"]) == {1, 2}


def test_rome_methods_and_new_hyperparameters_are_checked():
    with pytest.raises(ValueError, match="`method`"):
        compute_rome(None, None, REQUESTS[0], HP, base_model="x", method="rome2")
    with pytest.raises(ValueError, match="`equality_ridge`"):
        EmmetHyperparameters(layer=1, equality_ridge=-1)
    with pytest.raises(ValueError, match="`l2`"):
        AlphaEditHyperparameters(layers=(1, 2), l2=0)
