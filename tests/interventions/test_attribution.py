"""Attribution patching against finite differences of plain-hook runs, and against exact patching
where the first-order approximation must hold (small perturbations)."""

from __future__ import annotations

import pytest
import torch

from interventions import SpecError, compile_spec, parse_spec, run
from support import reference as ref
from support.models import make_model

EIFFEL = {"prompt": "the eiffel tower is located in the city of", "subject": "eiffel tower"}
COLOSSEUM = {"prompt": "the colosseum is in the city of", "subject": "colosseum"}
PATCH = {"base": "the eiffel tower is located in the city of", "source": "the colosseum tower is located in the city of"}


def states(model, family, batch, site, layer, *, noise=None, subject=(), replace=None):
    """The state of `site` at `layer` ([rows, T, d]) and last-position logits, optionally with noise on
    the subject embeddings and the state replaced by `replace` (a function of the state)."""
    kept = {}
    pairs = []
    if noise is not None:
        def add_noise(t):
            t[:, list(subject)] += noise.to(t.dtype)
        pairs.append((ref.module(model, family, "embed"), add_noise, False))

    def grab(t):
        if replace is not None:
            t.copy_(replace(t))
        kept["s"] = t.clone()
    pairs.append((ref.module(model, family, site, layer), grab, site in ref.PRE))
    with ref.hooks(pairs), torch.no_grad():
        logits = model(batch).logits[:, -1]
    return kept["s"], logits


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("site,grid", [("block_output", "hidden"), ("mlp_output", "mlp"),
                                       ("attention_output", "attention")])
def test_trace_attribution_equals_finite_differences(tokenizer, family, site, grid, float64_norms):
    """Each window-1 cell's attribution term is the directional derivative of the corrupted run's
    probability along (clean − corrupted) at that state: checked by central differences, in float64,
    with no autograd."""
    model = make_model(family, len(tokenizer)).double()
    spec = parse_spec({"kind": "trace", "model": "tiny", "prompts": [EIFFEL], "samples": 2, "seed": 3,
                       "sites": [grid], "window": 1, "method": "attribution"})
    result = run(spec, model, tokenizer)
    plan = compile_spec(spec.model_copy(update={"method": "exact"}), model, tokenizer)
    ids = tokenizer(EIFFEL["prompt"])["input_ids"]
    subject = list(plan.prompts[0].base.subject)
    noise = plan.noise[0].double()
    batch = torch.tensor([ids] * noise.shape[0])
    answer = result.prompts[0]["answer_id"]
    corrupted = result.prompts[0]["corrupted_prob"]
    eps = 1e-4
    for layer in (0, 2, 3):
        clean, _ = states(model, family, torch.tensor([ids]), site, layer)
        base, logits = states(model, family, batch, site, layer, noise=noise, subject=subject)
        assert corrupted == pytest.approx(float(logits.softmax(-1)[:, answer].mean()), abs=1e-9)
        for pos in range(len(ids)):
            delta = torch.zeros_like(base)
            delta[:, pos] = clean[0, pos] - base[:, pos]

            def p(t):
                _, out = states(model, family, batch, site, layer, noise=noise, subject=subject,
                                replace=lambda s, t=t: base + t * delta)
                return out.softmax(-1)[:, answer].mean()

            derivative = float((p(eps) - p(-eps)) / (2 * eps))
            got = float(result.grids[grid].values[0, layer, pos]) - corrupted
            assert got == pytest.approx(derivative, abs=1e-6), (layer, pos)


@pytest.mark.parametrize("metric", ["prob", "logit_diff"])
def test_patch_attribution_equals_finite_differences(tokenizer, metric, float64_norms):
    model = make_model("llama", len(tokenizer)).double()
    spec = parse_spec({"kind": "patch", "model": "tiny", "prompts": [PATCH], "sites": ["block_output", "mlp_key"],
                       "metric": metric, "method": "attribution"})
    result = run(spec, model, tokenizer)
    base_ids = torch.tensor([tokenizer(PATCH["base"])["input_ids"]])
    source_ids = torch.tensor([tokenizer(PATCH["source"])["input_ids"]])
    record = result.prompts[0]
    t_id, c_id = record["answer_id"], record["counterfactual_id"]

    def m(logits):
        return logits.softmax(-1)[:, t_id] if metric == "prob" else logits[:, t_id] - logits[:, c_id]

    eps = 1e-4
    for site in ("block_output", "mlp_key"):
        for layer in (1, 3):
            src, _ = states(model, "llama", source_ids, site, layer)
            base, logits = states(model, "llama", base_ids, site, layer)
            assert record["base_metric"] == pytest.approx(float(m(logits)), abs=1e-9)
            for pos in range(base.shape[1]):
                delta = torch.zeros_like(base)
                delta[:, pos] = src[:, pos] - base[:, pos]
                plus = m(states(model, "llama", base_ids, site, layer, replace=lambda s: base + eps * delta)[1])
                minus = m(states(model, "llama", base_ids, site, layer, replace=lambda s: base - eps * delta)[1])
                derivative = float((plus - minus) / (2 * eps))
                got = float(result.grids[site].values[0, layer, pos]) - record["base_metric"]
                assert got == pytest.approx(derivative, abs=1e-6), (site, layer, pos)


def test_attribution_approaches_exact_for_small_corruptions(tiny_llama):
    """Where the first-order expansion holds, attribution ≈ exact patching on every cell of
    single-layer grids, on several prompts at once. The error shrinks quadratically with the noise:
    about 20%, 6% and 0.7% of the largest effect at 0.1, 0.01 and 0.001 σ on this model."""
    model, tokenizer = tiny_llama
    data = {"kind": "trace", "model": "tiny", "prompts": [EIFFEL, COLOSSEUM], "samples": 2, "seed": 1,
            "window": 1, "noise": 0.001}
    exact = run(parse_spec(data), model, tokenizer)
    approx = run(parse_spec(dict(data, method="attribution")), model, tokenizer)
    assert approx.meta["method"] == "attribution"
    for name in ("hidden", "mlp", "attention"):
        e, a = exact.indirect_effect(name), approx.indirect_effect(name)
        mask = ~torch.isnan(e)
        scale = float(e[mask].abs().max())
        assert scale > 0
        assert float((e[mask] - a[mask]).abs().max()) < 0.02 * scale, name
        assert torch.equal(torch.isnan(a), ~mask)


def test_window_attribution_is_the_sum_of_its_layers(tiny_llama):
    """A window's first-order term is the sum of its layers' terms (AtP's multi-layer approximation;
    it counts the paths between restored layers once per layer, see interventions/engine/attribution.py)."""
    model, tokenizer = tiny_llama
    data = {"kind": "trace", "model": "tiny", "prompts": [EIFFEL], "samples": 2, "sites": ["mlp"],
            "method": "attribution"}
    one = run(parse_spec(dict(data, window=1)), model, tokenizer).indirect_effect("mlp")[0]
    three = run(parse_spec(dict(data, window=3)), model, tokenizer).indirect_effect("mlp")[0]
    n = one.shape[0]
    for layer in range(n):
        members = [l for l in (layer - 1, layer, layer + 1) if 0 <= l < n]
        torch.testing.assert_close(three[layer], one[members].sum(0), atol=1e-6, rtol=1e-5)


def test_attribution_leaves_the_model_alone(tiny_llama):
    model, tokenizer = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    run(parse_spec({"kind": "trace", "model": "tiny", "prompts": [EIFFEL], "samples": 2,
                    "method": "attribution"}), model, tokenizer)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_attribution_refuses_kl():
    with pytest.raises(SpecError, match="cannot estimate `metric: kl`"):
        parse_spec({"kind": "patch", "prompts": [PATCH], "metric": "kl", "method": "attribution"})
    with pytest.raises(SpecError, match="`method`"):
        parse_spec({"kind": "patch", "prompts": [PATCH], "method": "approx"})


def test_pearson_by_hand_and_lesion_compare(tiny_llama, tmp_path, capsys):
    from interventions.core.metrics import top_overlap
    from interventions.engine.compare import pearson
    from recipes.cli import main

    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    # centred [−1.5, −0.5, 0.5, 1.5, ...] against [1, −1, −1, 1]: covariance 0 -> r = 0
    assert pearson(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, -1.0, -1.0, 1.0])) == pytest.approx(0.0)
    # the 2 largest of [5, 1, 4, 0] are cells 0 and 2; of [5, 4, 0, 1] cells 0 and 1: one shared of 2
    assert top_overlap(torch.tensor([5.0, 1.0, 4.0, 0.0]), torch.tensor([5.0, 4.0, 0.0, 1.0]), 2) == 0.5
    assert top_overlap(x, 2 * x + 1, 5) == 1.0

    model, tokenizer = tiny_llama
    data = {"kind": "trace", "model": "tiny", "prompts": [EIFFEL], "samples": 2, "window": 1}
    exact = run(parse_spec(data), model, tokenizer)
    approx = run(parse_spec(dict(data, method="attribution")), model, tokenizer)
    exact.save(tmp_path / "exact", heatmap=False)
    approx.save(tmp_path / "approx", heatmap=False)
    assert main(["compare", str(tmp_path / "exact"), str(tmp_path / "approx")]) == 0
    out = capsys.readouterr().out
    r = pearson(exact.indirect_effect("hidden"), approx.indirect_effect("hidden"))
    e, a = exact.indirect_effect("hidden").flatten(), approx.indirect_effect("hidden").flatten()
    keep = ~(e.isnan() | a.isnan())
    top = lambda v: set(torch.argsort(v[keep], descending=True)[:10].tolist())      # noqa: E731
    overlap = len(top(e) & top(a)) / 10                          # the 10 largest cells of each, by hand
    assert f"| hidden | {r:.3f} | {overlap:.1f} |" in out
    assert main(["compare", str(tmp_path / "exact"), str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_path_integrated_embedding_terms_add_up_to_the_whole_effect(tokenizer, family):
    """`steps: k` on the embeddings is integrated gradients along the straight line from the base to the
    source embeddings, so its per-position terms add up to m(source) − m(base) as k grows (completeness);
    `steps: 1` is plain attribution patching, and the error shrinks with k."""
    model = make_model(family, len(tokenizer))
    data = {"kind": "patch", "model": "tiny", "prompts": [PATCH], "sites": ["embed"], "method": "attribution"}
    errors = {}
    for k in (1, 4, 32):
        result = run(parse_spec(dict(data, steps=k)), model, tokenizer)
        record = result.prompts[0]
        terms = result.grids["embed"].values[0, 0] - record["base_metric"]
        whole = record["clean_prob"] - record["base_metric"]       # p(target) on the source run minus the base's
        errors[k] = abs(float(terms.nansum()) - whole) / abs(whole)
        assert result.meta["steps"] == k and result.meta["backward_passes"] == k
    default = run(parse_spec(data), model, tokenizer)
    torch.testing.assert_close(default.grids["embed"].values, run(parse_spec(dict(data, steps=1)), model,
                                                                  tokenizer).grids["embed"].values)
    assert errors[32] < 0.05 and errors[32] < errors[4] < errors[1], errors


def test_path_integrated_trace_moves_from_attribution_towards_exact(tiny_llama):
    """On a noise trace of the tiny model the hidden grid's correlation with exact patching rises with the
    number of steps (measured: see the README's attribution table for SmolLM2)."""
    model, tokenizer = tiny_llama
    data = {"kind": "trace", "model": "tiny", "prompts": [EIFFEL, COLOSSEUM], "samples": 3, "seed": 2,
            "sites": ["hidden"]}
    exact = run(parse_spec(data), model, tokenizer).indirect_effect("hidden")
    mask = ~torch.isnan(exact)

    def r(k):
        approx = run(parse_spec(dict(data, method="attribution", steps=k)), model, tokenizer).indirect_effect("hidden")
        return float(torch.corrcoef(torch.stack([exact[mask], approx[mask]]))[0, 1])

    assert r(8) > r(1)
    with pytest.raises(SpecError, match="`steps`"):
        parse_spec(dict(data, steps=4))
