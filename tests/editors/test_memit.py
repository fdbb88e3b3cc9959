"""MEMIT on tiny seeded models: its normal equation, exact targets when λ = 0, and no side effects."""

from __future__ import annotations

import pytest
import torch

from editors.delta import applied
from editors.methods.memit import MemitHyperparameters, compute_memit, layer_update, outputs_at
from editors.methods.rome import EditRequest
from support.models import make_model

REQUESTS = [EditRequest("{} is located in the city of", "the eiffel tower", "rome", "paris"),
            EditRequest("{} is located in the city of", "big ben", "paris", "london"),
            EditRequest("{} is in", "the colosseum", "london", "rome")]


def test_layer_update_solves_the_normal_equation():
    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(16, 3, generator=g), torch.randn(8, 3, generator=g)
    X = torch.randn(16, 40, generator=g)
    C = X @ X.T / 40
    u, v = layer_update(K, R, C, 2.0)
    dW = (u @ v).double()
    assert torch.allclose(dW @ (2.0 * C.double() + K.double() @ K.double().T), R.double() @ K.double().T, atol=1e-4)
    u, v = layer_update(K, R, torch.eye(16), 1e-6)
    assert torch.allclose(u @ v @ K, R, atol=1e-4)          # λ → 0, n ≤ d: the keys map exactly


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memit_reaches_its_targets_and_leaves_the_model_unchanged(tokenizer, family):
    model = make_model(family, len(tokenizer))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    d_key = 128 if family == "gpt2" else 64
    C = {l: torch.eye(d_key) for l in (1, 2)}
    # λ → 0 with C = I: each layer maps the plain prompts' keys exactly, so the last one closes the gap
    hp = MemitHyperparameters(layers=(1, 2), v_steps=15, context_templates=(), mom2_update_weight=1e-6)
    delta, details = compute_memit(model, tokenizer, REQUESTS, hp, base_model="tiny", C=C)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert len(delta.names) == 2
    for name in delta.names:
        assert torch.linalg.matrix_rank(delta.difference(name)) <= len(REQUESTS)
    before = outputs_at(model, tokenizer, 2, REQUESTS)
    with applied(model, delta):
        after = outputs_at(model, tokenizer, 2, REQUESTS)
    assert not torch.allclose(before, details["z"], atol=1e-2)
    assert torch.allclose(after, details["z"], atol=1e-3)


def test_bad_memit_hyperparameters():
    with pytest.raises(ValueError, match="`layers`"):
        MemitHyperparameters(layers=(3, 2))
    with pytest.raises(ValueError, match="`layers`"):
        compute_memit(make_model("llama", 37), None, REQUESTS, MemitHyperparameters(layers=(1, 9)), base_model="x",
                      C={1: torch.eye(64), 9: torch.eye(64)})
