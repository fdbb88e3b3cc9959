"""A dictionary's features as grid rows (`features:` on trace and patch specs): every cell equals a
plain-hook reference that applies the dictionary by hand, a restore that changes no feature leaves the
model bit for bit, batched equals one row at a time, and attribution's feature terms are the derivative
of the metric along the feature's decoder row (central differences, float64)."""

from __future__ import annotations

import json

import pytest
import torch

from interventions import SpecError, dump_spec, parse_spec, run
from interventions.engine.pv import UnitRestore, build_graph
from support.models import make_model, random_dictionary
from support.reference import hooks, module

PATCHES = [{"base": "the colosseum is located in the city of", "source": "the eiffel tower is in the city of",
            "subject": "colosseum"},
           {"base": "big ben is in london", "source": "the colosseum is in rome"}]
FEATURES = [0, 3, 7, 12, 40]


def saved(tmp_path, architecture: str, layer: int = 1, **options) -> str:
    d = random_dictionary(architecture, layer=layer, **options)
    d.save(tmp_path / f"sae_{architecture}_{layer}")
    return str(tmp_path / f"sae_{architecture}_{layer}")


def patch_spec(folder: str, **extra):
    return parse_spec({"kind": "patch", "model": "tiny", "prompts": PATCHES, "sites": ["block_output"],
                       "layers": [1], "positions": ["all"], "features": {"dictionary": folder, "features": FEATURES},
                       **extra})


def state(model, ids: list[int], layer: int) -> torch.Tensor:
    kept = {}
    with torch.no_grad(), hooks([(module(model, "llama", "block_output", layer),
                                  lambda x: kept.setdefault("x", x.clone()), False)]):
        model(torch.tensor([ids]))
    return kept["x"][0]


def feature_moved(model, ids: list[int], layer: int, positions, step) -> torch.Tensor:
    """Last-position logits with ``x[p] += step(x[p])`` at `positions` of the layer's output."""
    def edit(x):
        x[:, list(positions)] = x[:, list(positions)] + step(x[:, list(positions)]).to(x.dtype)

    with torch.no_grad(), hooks([(module(model, "llama", "block_output", layer), edit, False)] if step else []):
        return model(torch.tensor([ids])).logits[0, -1]


def restore_by_hand(d, source_states: torch.Tensor, positions, unit: int):
    """The documented restore: ``x + (a_source[u] − a_base[u]) W_dec[u]``, with ``a`` computed from the
    dictionary's own formula (ReLU or TopK of ``(x − b_dec) W_enc + b_enc``)."""
    def acts(x):
        pre = (x - d.b_dec) @ d.W_enc + d.b_enc
        if d.architecture == "topk":
            values, index = pre.topk(d.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, index, values.relu())
        return pre.relu()

    def step(x):
        delta = acts(source_states[list(positions)])[..., unit] - acts(x.float())[..., unit]
        return delta[..., None] * d.W_dec[unit]
    return step


def metric(logits, name: str, target: int, counterfactual: int) -> float:
    if name == "prob":
        return float(logits.float().softmax(-1)[target])
    return float(logits[target] - logits[counterfactual])


@pytest.mark.parametrize("architecture,name", [("standard", "prob"), ("topk", "logit_diff")])
def test_a_feature_grid_equals_the_plain_hook_reference(tiny_llama, tmp_path, architecture, name):
    model, tokenizer = tiny_llama
    folder = saved(tmp_path, architecture)
    d = random_dictionary(architecture)
    result = run(patch_spec(folder, metric=name), model, tokenizer)
    grid = result.grids["features"]
    assert grid.axis == "feature" and grid.layers == FEATURES and grid.layer == 1 and grid.site == "block_output"
    moved = 0
    for i, p in enumerate(PATCHES):
        base, source = (tokenizer(p[k])["input_ids"] for k in ("base", "source"))
        record = result.prompts[i]
        target, counterfactual = record["answer_id"], record["counterfactual_id"]
        assert record["base_metric"] == pytest.approx(
            metric(feature_moved(model, base, 1, [], None), name, target, counterfactual), abs=1e-5)
        source_states = state(model, source, 1)
        for u, unit in enumerate(FEATURES):
            for pos in range(len(base)):
                with torch.no_grad():
                    want = metric(feature_moved(model, base, 1, [pos], restore_by_hand(d, source_states, [pos], unit)),
                                  name, target, counterfactual)
                assert float(grid.values[i, u, pos]) == pytest.approx(want, abs=1e-5), (i, unit, pos)
                moved += abs(want - record["base_metric"]) > 1e-3
    assert moved >= 5         # the reference is not the baseline everywhere: the comparison tests something
    saved_json = json.loads(json.dumps(result.to_dict()))
    assert saved_json["grids"]["features"]["axes"] == ["prompt", "feature", "position"]
    assert saved_json["grids"]["features"]["features"] == FEATURES and saved_json["grids"]["features"]["layer"] == 1


def test_a_feature_grid_in_a_noise_trace_equals_the_plain_hook_reference(tiny_llama, tmp_path):
    from interventions import compile_spec

    model, tokenizer = tiny_llama
    folder = saved(tmp_path, "standard", layer=2)
    d = random_dictionary("standard", layer=2)
    spec = parse_spec({"kind": "trace", "model": "tiny", "samples": 2, "seed": 4, "sites": ["hidden"], "layers": [2],
                       "prompts": [{"prompt": "the eiffel tower is located in the city of", "subject": "eiffel tower"}],
                       "features": {"dictionary": folder, "features": FEATURES[:3], "name": "sae"}})
    result = run(spec, model, tokenizer)
    plan = compile_spec(spec, model, tokenizer)
    ids = tokenizer(spec.prompts[0].prompt)["input_ids"]
    subject, noise = list(plan.prompts[0].base.subject), plan.noise[0]
    clean = state(model, ids, 2)
    answer = result.prompts[0]["answer_id"]
    for u, unit in enumerate(FEATURES[:3]):
        for pos in range(len(ids)):
            probs = []
            for v in range(2):
                def add_noise(t, v=v):
                    t[:, subject] += noise[v].to(t.dtype)

                step = restore_by_hand(d, clean, [pos], unit)

                def edit(x, step=step, pos=pos):
                    x[:, [pos]] = x[:, [pos]] + step(x[:, [pos]]).to(x.dtype)

                with torch.no_grad(), hooks([(module(model, "llama", "embed"), add_noise, False),
                                             (module(model, "llama", "block_output", 2), edit, False)]):
                    probs.append(float(model(torch.tensor([ids])).logits[0, -1].softmax(-1)[answer]))
            assert float(result.grids["sae"].values[0, u, pos]) == pytest.approx(sum(probs) / 2, abs=1e-5)


def test_a_restore_that_changes_no_feature_leaves_the_model_bit_for_bit(tiny_llama):
    model, tokenizer = tiny_llama
    d = random_dictionary("topk")
    ids = torch.tensor([tokenizer(PATCHES[0]["base"])["input_ids"]] * 3)
    with torch.no_grad():
        plain = model(ids).logits
        states = state(model, ids[0].tolist(), 1)
        graph = build_graph(model, [("model.layers[1].output", UnitRestore(d))])
        at = [[list(range(ids.shape[1]))] * 3]
        source = states[None].expand(3, -1, -1)      # the base run's own states: no feature changes
        _, out = graph(base={"input_ids": ids}, unit_locations={"base": at},
                       source_representations={graph.sorted_keys[0]: source}, subspaces=[[[3], [], [40]]])
    assert torch.equal(out.logits, plain)


def test_batched_feature_rows_equal_one_row_at_a_time(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    spec = patch_spec(saved(tmp_path, "topk"), metric="logit_diff")
    batched = run(spec, model, tokenizer).grids["features"].values
    single = run(spec, model, tokenizer, max_batch_rows=1, share_prefix=False, skip_layers=False).grids["features"].values
    assert torch.allclose(batched, single, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("how", ["restore", "zero"])
def test_feature_attribution_is_the_derivative_along_the_decoder_row(tokenizer, tmp_path, float64_norms, how):
    model = make_model("llama", len(tokenizer)).double()
    d = random_dictionary("standard").double()
    d.save(tmp_path / "sae")
    spec = patch_spec(str(tmp_path / "sae"), metric="logit_diff", method="attribution")
    spec = spec.model_copy(update={"features": spec.features.model_copy(update={"edit": how})})
    result = run(spec, model, tokenizer)
    eps = 1e-4
    for i, p in enumerate(PATCHES[:1]):
        base, source = (tokenizer(p[k])["input_ids"] for k in ("base", "source"))
        record = result.prompts[i]
        t, c = record["answer_id"], record["counterfactual_id"]
        source_states = state(model, source, 1)
        base_states = state(model, base, 1)
        for u, unit in enumerate(FEATURES):
            for pos in range(len(base)):
                x = base_states[[pos]][None]
                if how == "restore":
                    full = restore_by_hand(d, source_states, [pos], unit)(x)               # Δa_u W_dec[u]
                else:
                    full = -((x - d.b_dec) @ d.W_enc + d.b_enc).relu()[..., [unit]] * d.W_dec[unit]   # −a_u W_dec[u]
                plus = metric(feature_moved(model, base, 1, [pos], lambda x: eps * full), "logit_diff", t, c)
                minus = metric(feature_moved(model, base, 1, [pos], lambda x: -eps * full), "logit_diff", t, c)
                derivative = (plus - minus) / (2 * eps)
                got = float(result.grids["features"].values[i, u, pos]) - record["base_metric"]
                assert got == pytest.approx(derivative, abs=1e-6), (unit, pos)


def test_a_feature_grid_spec_round_trips_and_bad_ones_are_refused(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    folder = saved(tmp_path, "standard")
    spec = patch_spec(folder)
    assert parse_spec(__import__("yaml").safe_load(dump_spec(spec))) == spec
    bad = {"features": {"dictionary": folder, "features": [64]}}
    with pytest.raises(SpecError, match=r"`features\.features\[0\]`: got 64; expected a feature of the dictionary, in \[0, 63\]"):
        run(patch_spec(folder).model_copy(update={"features": parse_spec(
            {"kind": "patch", "prompts": PATCHES, **bad}).features}), model, tokenizer)
    for features, message in (({"dictionary": folder, "features": []}, "at least 1"),
                              ({"dictionary": folder, "features": [1, 1]}, "must not repeat"),
                              ({"dictionary": folder, "features": [-2]}, "at least 0"),
                              ({"dictionary": folder, "features": [1], "name": "block_output"}, "names a site grid")):
        with pytest.raises(SpecError, match=message):
            parse_spec({"kind": "patch", "prompts": PATCHES, "features": features})
    wide = random_dictionary("standard", d_in=48)
    wide.save(tmp_path / "wide")
    with pytest.raises(SpecError, match="`features.dictionary`: got 'd_in 48'; expected a dictionary of this model's width \\(32\\)"):
        run(patch_spec(str(tmp_path / "wide")), model, tokenizer)
    with pytest.raises(SpecError, match="features.dictionary"):
        run(patch_spec(str(tmp_path / "missing")), model, tokenizer)


def test_every_feature_by_attribution_equals_naming_them_all_and_the_study_chunks_exact_runs(tiny_folder, tokenizer,
                                                                                             monkeypatch):
    from recipes.studies import feature_attribution as study

    model = make_model("llama", len(tokenizer))
    folder = saved(tiny_folder, "topk")
    spec = patch_spec(folder, method="attribution", metric="logit_diff", positions=[1, -1])
    every = spec.model_copy(update={"features": spec.features.model_copy(update={"features": "all"})})
    named = spec.model_copy(update={"features": spec.features.model_copy(update={"features": tuple(range(64))})})
    assert torch.equal(run(every, model, tokenizer).grids["features"].values,
                       run(named, model, tokenizer).grids["features"].values)
    with pytest.raises(SpecError, match="`features.features: all` is for `method: attribution`"):
        parse_spec({**json.loads(json.dumps(every.model_dump(mode="json"))), "method": "exact"})
    monkeypatch.setattr(study, "MAX_GRID_FEATURES", 24)              # three exact runs: 24 + 24 + 16 features
    chunked, _ = study.exact_all(every, model, tokenizer, 64)
    whole = study.effects(run(named.model_copy(update={"method": "exact"}), model, tokenizer), "features")
    assert torch.allclose(chunked, whole, atol=1e-6, equal_nan=True)
    summary = study.compare(whole + 0.001 * torch.randn(whole.shape, generator=torch.Generator().manual_seed(0)),
                            whole, 5)
    assert summary["pearson_r"] > 0.99 and summary["top_overlap"] == 5


def test_a_row_of_several_features_restores_them_together(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    folder = saved(tmp_path, "standard")
    d = random_dictionary("standard")
    rows = [3, [3, 7], [0, 12, 40]]
    spec = patch_spec(folder, metric="logit_diff").model_copy(update={"features": parse_spec(
        {"kind": "patch", "prompts": PATCHES, "features": {"dictionary": folder, "features": rows}}).features})
    result = run(spec, model, tokenizer)
    assert json.loads(json.dumps(result.to_dict()))["grids"]["features"]["features"] == rows
    base, source = (tokenizer(PATCHES[0][k])["input_ids"] for k in ("base", "source"))
    record = result.prompts[0]
    source_states = state(model, source, 1)
    for r, row in enumerate(rows):
        units = row if isinstance(row, list) else [row]
        for pos in range(len(base)):
            steps = [restore_by_hand(d, source_states, [pos], u) for u in units]
            want = metric(feature_moved(model, base, 1, [pos], lambda x: sum(s(x) for s in steps)), "logit_diff",
                          record["answer_id"], record["counterfactual_id"])
            assert float(result.grids["features"].values[0, r, pos]) == pytest.approx(want, abs=1e-5), (row, pos)
    estimate = run(spec.model_copy(update={"method": "attribution"}), model, tokenizer).grids["features"].values
    singles = run(patch_spec(folder, metric="logit_diff", method="attribution"), model, tokenizer).grids["features"].values
    base_metric = torch.tensor([p["base_metric"] for p in result.prompts])[:, None]
    by_unit = {u: singles[:, FEATURES.index(u)] - base_metric for u in (3, 0, 12, 40)}
    assert torch.allclose(estimate[:, 2] - base_metric, by_unit[0] + by_unit[12] + by_unit[40], atol=1e-5, equal_nan=True)
    with pytest.raises(SpecError, match="must not repeat"):
        parse_spec({"kind": "patch", "prompts": PATCHES, "features": {"dictionary": folder, "features": [[3, 7], [7, 3]]}})
    with pytest.raises(SpecError, match="at least one feature"):
        parse_spec({"kind": "patch", "prompts": PATCHES, "features": {"dictionary": folder, "features": [[]]}})


@pytest.mark.parametrize("how,value", [("zero", None), ("clamp", 2.5), ("add", -1.5)])
def test_zeroing_clamping_and_adding_features_equal_the_plain_hook_reference(tiny_llama, tmp_path, how, value):
    model, tokenizer = tiny_llama
    folder = saved(tmp_path, "standard")
    d = random_dictionary("standard")
    site = {"dictionary": folder, "features": [3, [0, 12]], "edit": how, **({"value": value} if value is not None else {})}
    spec = parse_spec({"kind": "patch", "model": "tiny", "prompts": PATCHES[:1], "sites": ["block_output"],
                       "layers": [1], "metric": "logit_diff", "features": site})
    result = run(spec, model, tokenizer)
    base = tokenizer(PATCHES[0]["base"])["input_ids"]
    record = result.prompts[0]

    def acts(x):
        return ((x.float() - d.b_dec) @ d.W_enc + d.b_enc).relu()

    for r, units in enumerate([[3], [0, 12]]):
        for pos in range(len(base)):          # every position, those before the runs diverge included
            def step(x, units=units):
                a = acts(x)[..., units]
                target = {"zero": torch.zeros_like(a), "clamp": torch.full_like(a, 2.5 if value else 0),
                          "add": a + (value or 0)}[how]
                return (target - a) @ d.W_dec[units]
            want = metric(feature_moved(model, base, 1, [pos], step), "logit_diff", record["answer_id"],
                          record["counterfactual_id"])
            assert float(result.grids["features"].values[0, r, pos]) == pytest.approx(want, abs=1e-5), (units, pos)
    with pytest.raises(SpecError, match="`value` is given with `edit: clamp` or `add`"):
        parse_spec({"kind": "patch", "prompts": PATCHES, "features": {**site, "edit": "zero", "value": 1.0}})
