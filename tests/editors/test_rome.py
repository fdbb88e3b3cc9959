"""ROME on tiny seeded models: the closed form's defining equation, rank one, and no side effects."""

from __future__ import annotations

import pytest
import torch

from editors.delta import applied
from editors.methods.rome import EditRequest, RomeHyperparameters, compute_rome, weight_name
from editors.stats import second_moment, second_moments
from support.models import make_model

REQUEST = EditRequest("{} is located in the city of", "the eiffel tower", "rome", "paris")
CORPUS = ["the eiffel tower is located in paris", "the colosseum is in rome and was built by people",
          "big ben is in london which is the capital of england", "the statue of liberty is in new york",
          "paris is the capital of france", "rome is the capital of italy"] * 6
HP = RomeHyperparameters(layer=1, v_steps=25, context_templates=((3, 4),), mom2_tokens=10_000)
PLAIN = RomeHyperparameters(layer=1, v_steps=25, context_templates=(), mom2_tokens=10_000)


def prob(model, tokenizer, text, target):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return float(model(ids).logits[0, -1].softmax(-1)[tokenizer.convert_tokens_to_ids(target)])


@pytest.fixture(scope="module", params=[("llama", "r-rome"), ("gpt2", "r-rome"), ("llama", "rome")],
                ids=["llama-r-rome", "gpt2-r-rome", "llama-rome"])
def edit(request, tokenizer, tmp_path_factory):
    family, method = request.param
    model = make_model(family, len(tokenizer))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    C = second_moment(model, tokenizer, HP.layer, CORPUS, max_tokens=HP.mom2_tokens,
                      cache_dir=tmp_path_factory.mktemp("stats"))
    delta, details = compute_rome(model, tokenizer, REQUEST, HP, base_model="tiny", C=C, method=method)
    return family, model, delta, details, weights, flags, C


def test_computing_leaves_the_model_unchanged(edit):
    _, model, _, _, weights, flags, _ = edit
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_edited_layer_maps_its_key_to_v_star(edit):
    """r-ROME maps k* (the templates' mean key) to v*; ROME as published maps the plain prompt's key
    there instead, and sends k* elsewhere: r-ROME's point."""
    family, model, delta, details, _, _, _ = edit
    name = weight_name(model, HP.layer)
    with applied(model, delta):
        W = dict(model.named_parameters())[name].detach()
        W = W.T if family == "gpt2" else W
        key = details["k_star"] if delta.meta["method"] == "r-rome" else details["k_plain"]
        out, at_k_star = W @ key, W @ details["k_star"]
    # float32 factors; ROME's Λ is large where the plain key is far from k*
    assert torch.allclose(out, details["v_star"], rtol=1e-4, atol=1e-4 if delta.meta["method"] == "r-rome" else 2e-3)
    if delta.meta["method"] == "rome":
        assert not torch.allclose(at_k_star, details["v_star"], rtol=1e-2, atol=1e-2)


def test_key_agreement_by_hand(edit):
    """`key_agreement` = (C⁻¹k*)ᵀk_plain / (C⁻¹k*)ᵀk*, computed here with C's ridge as `rank_one_update`
    adds it; the Delta records it; 1 when the plain prompt is the only template (k* is its key)."""
    family, model, delta, details, _, _, C = edit
    C = C.double()
    C = C + HP.mom2_ridge * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=C.dtype)
    left = torch.linalg.solve(C, details["k_star"].double())
    want = float(left @ details["k_plain"].double() / (left @ details["k_star"].double()))
    assert details["key_agreement"] == pytest.approx(want, rel=1e-4)
    assert delta.meta["metrics"]["key_agreement"] == details["key_agreement"] != pytest.approx(1.0, abs=1e-3)


def test_r_rome_uses_the_optimisations_key(tokenizer):
    """The key in r-ROME's update is the mean of the keys at exactly the positions where v*'s
    optimisation added δ: each template's row at its subject-last token (read by a plain hook on the
    projection's input during the optimisation's first forward)."""
    from editors.methods.rome import compute_targets, context_templates, request_keys

    model = make_model("llama", len(tokenizer))
    templates = context_templates(model, tokenizer, HP.context_templates, HP.seed)
    keys = []
    proj = model.model.layers[HP.layer].mlp.down_proj
    handle = proj.register_forward_pre_hook(lambda m, a: keys.append(a[0].detach().clone()))
    try:
        compute_targets(model, tokenizer, HP.layer, [REQUEST], templates, RomeHyperparameters(layer=HP.layer, v_steps=1),
                        fast=False)
    finally:
        handle.remove()
    positions = [i for _, i in request_keys(tokenizer, REQUEST, templates)]
    used = torch.stack([keys[0][row, at] for row, at in enumerate(positions)]).mean(0)
    _, details = compute_rome(model, tokenizer, REQUEST, HP, base_model="tiny", C=torch.eye(proj.in_features),
                              method="r-rome", templates=templates)
    assert len(templates) == 5 and torch.allclose(details["k_star"], used, atol=1e-6)


def test_update_is_rank_one(edit):
    _, model, delta, _, _, _, _ = edit
    (name,) = delta.names
    u, v = delta.factors[name]
    assert u.shape[1] == v.shape[0] == 1
    assert torch.linalg.matrix_rank(delta.difference(name)) == 1


def test_edited_forward_outputs_v_star_at_the_subject(edit, tokenizer):
    """With only the plain template, k* is the prompt's own key: in a real forward of the edited
    model, the MLP output at the subject's last token is v*, and p(new target) rises.
    (Other positions' MLP outputs change too, by Λ (C⁻¹k*)ᵀk, so p(new) is not v*'s exactly.)"""
    family, model, _, _, _, _, C = edit
    delta, details = compute_rome(model, tokenizer, REQUEST, PLAIN, base_model="tiny", C=C, method="r-rome")
    assert details["templates"] == ["{}"]
    text = "the eiffel tower is located in the city of"
    block = (model.transformer.h if family == "gpt2" else model.model.layers)[PLAIN.layer]
    seen = {}
    handle = block.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out[0, 2].detach().clone()))
    try:
        before = prob(model, tokenizer, text, "rome")
        with applied(model, delta):
            after = prob(model, tokenizer, text, "rome")
    finally:
        handle.remove()
    assert torch.allclose(seen["h"], details["v_star"], atol=1e-4)
    assert details["history"][-1]["nll"] < details["history"][0]["nll"] and after > before


def test_second_moment_equals_plain_computation_and_is_cached(tokenizer, tmp_path, monkeypatch):
    import editors.stats as stats

    model = make_model("llama", len(tokenizer))
    C = second_moment(model, tokenizer, 2, CORPUS, max_tokens=10_000, cache_dir=tmp_path)
    keys = []
    handle = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: keys.append(a[0][0]))
    with torch.no_grad():
        for text in CORPUS:
            model(torch.tensor([tokenizer(text)["input_ids"]]))
    handle.remove()
    k = torch.cat(keys).double()
    assert torch.allclose(C, (k.T @ k / k.shape[0]).float(), atol=1e-5)
    together = second_moments(model, tokenizer, [0, 2], CORPUS, max_tokens=10_000, cache_dir=tmp_path / "two")
    assert torch.allclose(together[2], C, atol=1e-6)          # one pass for several layers: same matrices
    monkeypatch.setattr(stats, "collect_keys_moment", lambda *a, **kw: pytest.fail("recomputed"))
    assert torch.equal(second_moment(model, tokenizer, 2, CORPUS, max_tokens=10_000, cache_dir=tmp_path), C)
    assert torch.equal(second_moments(model, tokenizer, [0, 2], CORPUS, max_tokens=10_000,
                                      cache_dir=tmp_path / "two")[0], together[0])


def test_bad_requests_and_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="`prompt`"):
        EditRequest("no slot here", "x", "y")
    with pytest.raises(ValueError, match="`v_lr` must be a number greater than 0"):
        RomeHyperparameters(layer=1, v_lr=0)
    with pytest.raises(ValueError, match="`v_steps`"):
        RomeHyperparameters(layer=1, v_steps=0)
