"""The Delta format: save/load, exact apply and revert, stacking, and refusals that leave the model untouched."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from editors.delta import Delta, DeltaError, applied, applied_deltas, apply, load_delta, relative_norms, revert
from support.models import make_model

DOWN = "model.layers.1.mlp.down_proj.weight"
UP = "model.layers.2.mlp.up_proj.weight"


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def rank_one(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    out, inp = dict(model.named_parameters())[name].shape
    return torch.randn(out, 1, generator=g) * 0.1, torch.randn(1, inp, generator=g)


@pytest.fixture()
def model(tokenizer):
    return make_model("llama", len(tokenizer))


def delta_for(model, *names, seed=0, method="test"):
    return Delta.from_factors(model, {n: rank_one(model, n, seed + i) for i, n in enumerate(names)},
                              method=method, base_model="tiny-llama", hyperparameters={"seed": seed})


def test_apply_adds_u_v_and_revert_is_bit_exact(model):
    base = snapshot(model)
    delta = delta_for(model, DOWN)
    u, v = delta.factors[DOWN]
    apply(model, delta)
    assert torch.allclose(model.state_dict()[DOWN], base[DOWN] + u @ v)
    assert not same(model, base)
    revert(model, delta)
    assert same(model, base) and applied_deltas(model) == []


def test_save_load_apply_equals_in_memory(model, tmp_path):
    delta = delta_for(model, DOWN, UP).with_metrics({"efficacy": 1.0})
    path = delta.save(tmp_path / "edit.safetensors")
    assert path.stat().st_size < 16_000          # rank-one factors, not dense matrices
    loaded = load_delta(path)
    assert loaded.id == delta.id and loaded.meta["metrics"] == {"efficacy": 1.0}
    assert loaded.meta["fingerprints"][DOWN]["shape"] == [32, 64]
    apply(model, delta)
    in_memory = snapshot(model)
    revert(model)
    apply(model, loaded)
    assert same(model, in_memory)
    revert(model)


def test_stacked_deltas_revert_in_any_order(model):
    base = snapshot(model)
    a, b, c = delta_for(model, DOWN, seed=1), delta_for(model, DOWN, UP, seed=2), delta_for(model, UP, seed=3)
    apply(model, b, c)
    only_bc = snapshot(model)
    revert(model)
    apply(model, a, b, c)
    revert(model, a)                  # out of order: the first one applied
    assert same(model, only_bc)       # exactly as if `a` had never been applied
    revert(model, c, b)
    assert same(model, base)


def test_applied_context_reverts_on_error(model, tokenizer):
    base = snapshot(model)
    ids = torch.tensor([[3, 4, 5, 6]])
    before = model(ids).logits
    with pytest.raises(RuntimeError):
        with applied(model, delta_for(model, DOWN)):
            assert not torch.equal(model(ids).logits, before)
            raise RuntimeError("boom")
    assert same(model, base) and torch.equal(model(ids).logits, before)


def test_wrong_base_is_refused_and_model_untouched(model, tokenizer):
    other = make_model("llama", len(tokenizer))
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    delta = delta_for(other, UP, DOWN)
    base = snapshot(model)
    with pytest.raises(DeltaError, match=r"model.layers.1.mlp.down_proj.weight.*sha256.*tiny-llama"):
        apply(model, delta)
    assert same(model, base) and applied_deltas(model) == []


def test_shape_and_name_mismatches_are_refused(model, tokenizer):
    gpt2 = make_model("gpt2", len(tokenizer))
    delta = Delta.from_factors(gpt2, {"transformer.h.0.mlp.c_proj.weight": (torch.ones(128, 1), torch.ones(1, 32))},
                               method="test", base_model="tiny-gpt2")
    with pytest.raises(DeltaError, match="does not have"):
        apply(model, delta)
    with pytest.raises(DeltaError, match="do not give the parameter's shape"):
        Delta.from_factors(model, {DOWN: (torch.ones(32, 1), torch.ones(1, 63))}, method="t", base_model="x")


def test_applying_twice_is_refused(model):
    delta = delta_for(model, DOWN)
    apply(model, delta)
    try:
        with pytest.raises(DeltaError, match="already applied"):
            apply(model, delta)
    finally:
        revert(model)


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "missing"])
def test_damaged_files_are_refused(model, tmp_path, damage):
    path = delta_for(model, DOWN).save(tmp_path / "edit.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "foreign":
        save_file({"w": torch.ones(2)}, str(path))
    else:
        path = tmp_path / "nope.safetensors"
    with pytest.raises(DeltaError, match="`delta`"):
        load_delta(path)


def test_save_is_atomic(model, tmp_path, monkeypatch):
    import safetensors.torch as mod  # interventions.core.atomic, the one atomic writer, calls its save_file

    target = tmp_path / "edit.safetensors"
    old = delta_for(model, DOWN, seed=5).save(target)
    before = old.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", crash)
    with pytest.raises(OSError):
        delta_for(model, DOWN, seed=6).save(target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]


def test_relative_norms_are_the_change_over_the_base_weight(model):
    """‖ΔW‖/‖W₀‖ by hand, the same whether the delta is applied or not, and W₀ stays the base value
    while another delta sits on the same weight."""
    base = snapshot(model)
    a, b = delta_for(model, DOWN, UP, seed=1), delta_for(model, DOWN, seed=2)
    want = {n: float((a.difference(n)).norm() / base[n].norm()) for n in (DOWN, UP)}
    assert relative_norms(model, a) == pytest.approx(want, rel=1e-6)
    apply(model, b, a)
    assert relative_norms(model, a) == pytest.approx(want, rel=1e-6)
    u, v = b.factors[DOWN]
    assert relative_norms(model, b)[DOWN] == pytest.approx(float((u @ v).norm() / base[DOWN].norm()), rel=1e-6)
    revert(model)
