"""Feature dictionaries: training recovers planted directions, SAELens reads what Lesion writes (and
the other way), feature edits inside pyvene equal a plain-hook reference, a no-op edit is bit-identical,
and the loss-recovered figures equal a hand computation."""

from __future__ import annotations

import json

import pytest
import torch

from interventions.core.errors import SpecError
from interventions.engine.pv import build_graph
from interventions.features.dictionary import Dictionary, Where, load_dictionary
from interventions.features.splice import (
    FeatureEdit,
    add_to_features,
    component,
    patch_features,
    set_features,
    spliced_losses,
    zero_features,
)
from interventions.features.training import fit, train_dictionary
from support.models import random_dictionary
from support.reference import hooks, module

PROMPTS = ["the eiffel tower is located in the city of paris", "the colosseum is in rome which is the capital of italy"]


def planted(n: int, d: int, active: int, rows: int, g: torch.Generator):
    """Rows that are sparse non-negative sums of `n` unit directions (plus an offset), and the directions."""
    directions = torch.randn(n, d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    codes = torch.zeros(rows, n)
    index = torch.stack([torch.randperm(n, generator=g)[:active] for _ in range(rows)])
    codes.scatter_(1, index, torch.rand(rows, active, generator=g) * 1.5 + 0.5)
    return codes @ directions + 0.3, directions


@pytest.mark.parametrize("architecture,l1,lr", [("topk", 0.0, 3e-3), ("standard", 0.3, 1e-3)])
def test_training_recovers_planted_sparse_directions(architecture, l1, lr):
    data, directions = planted(48, 32, 3, 20000, torch.Generator().manual_seed(0))
    d, state = fit((data for _ in range(6)), 32, features=96, architecture=architecture, k=3, l1=l1, lr=lr,
                   batch_tokens=256, dead_after=20000, log=None)
    with torch.no_grad():
        found = directions @ (d.W_dec / d.W_dec.norm(dim=1, keepdim=True)).T
    assert float(found.max(1).values.min()) >= 0.95           # every planted direction has a feature
    assert state["tokens"] == 6 * 20000 // 256 * 256


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_saelens_loads_what_lesion_saves_with_the_same_encode_and_decode(tmp_path, architecture):
    import sae_lens
    d = random_dictionary(architecture)
    d.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    x = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), d.encode(x), atol=1e-6)
        assert torch.allclose(theirs.decode(d.encode(x)), d.decode(d.encode(x)), atol=1e-6)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    back = load_dictionary(tmp_path / "sae")
    assert back.where == d.where and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                            d.state_dict().values()))


def test_lesion_loads_a_dictionary_saelens_saved(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name="blocks.2.hook_mlp_out", model_name="tiny"))
    theirs = StandardSAE(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    theirs.save_model(str(tmp_path / "theirs"))
    ours = load_dictionary(tmp_path / "theirs")
    assert ours.where == Where("mlp_output", 2, "tiny")
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-6)


def by_hand(d: Dictionary, x: torch.Tensor, change) -> torch.Tensor:
    """The documented formulas, written out: encode, change, decode both, add the error back."""
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    if d.architecture == "topk":
        values, index = pre.topk(d.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, index, values.relu())
    else:
        f = pre.relu()
    error = x - (f @ d.W_dec + d.b_dec)
    return (change(f) @ d.W_dec + d.b_dec) + error


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("op", ["zero", "clamp", "add"])
def test_a_feature_edit_in_pyvene_equals_the_plain_hook_reference(tiny_llama, architecture, op):
    model, tokenizer = tiny_llama
    d = random_dictionary(architecture)
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    features = [1, 5, 9]
    change = {"zero": zero_features(features), "clamp": set_features(features, 2.0),
              "add": add_to_features(features, torch.tensor([1.0, -0.5, 3.0]))}[op]
    graph = build_graph(model, [(component(model, d), FeatureEdit(d, change))])
    positions = [2, 3, 4]
    with torch.no_grad():
        _, out = graph(base={"input_ids": ids}, unit_locations={"base": [[positions]]})

        def edit(x):
            x[:, positions] = by_hand(d, x[:, positions], lambda f: change(f, None))

        with hooks([(module(model, "llama", "block_output", 1), edit, False)]):
            expected = model(ids).logits
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert not torch.allclose(out.logits, model(ids).logits, atol=1e-3)


def test_a_no_op_feature_edit_is_bit_identical_to_the_unpatched_model(tiny_llama):
    model, tokenizer = tiny_llama
    d = random_dictionary("topk")
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    same = [lambda f, s: f, zero_features([]), patch_features([0, 3])]        # the source is the base itself
    with torch.no_grad():
        plain = model(ids).logits
        for change in same:
            graph = build_graph(model, [(component(model, d), FeatureEdit(d, change))])
            at = [[list(range(ids.shape[1]))]]
            if getattr(change, "needs_source", False):
                _, out = graph(base={"input_ids": ids}, sources=[{"input_ids": ids}],
                               unit_locations={"sources->base": (at, at)})
            else:
                _, out = graph(base={"input_ids": ids}, unit_locations={"base": at})
            assert torch.equal(out.logits, plain)


def test_patching_a_feature_from_a_source_run_equals_the_hook_reference(tiny_llama):
    model, tokenizer = tiny_llama
    d = random_dictionary("standard")
    base, source = (torch.tensor([tokenizer(p)["input_ids"][:8]]) for p in PROMPTS)
    with torch.no_grad():
        states = {}
        with hooks([(module(model, "llama", "block_output", 1), lambda x: states.setdefault("s", x.clone()), False)]):
            model(source)
        graph = build_graph(model, [(component(model, d), FeatureEdit(d, patch_features([2, 7])))])
        at = [[[3, 5]]]
        _, out = graph(base={"input_ids": base}, sources=[{"input_ids": source}], unit_locations={"sources->base": (at, at)})
        source_f = d.encode(states["s"][:, [3, 5]])

        def edit(x):
            def change(f):
                f = f.clone()
                f[..., [2, 7]] = source_f[..., [2, 7]]
                return f
            x[:, [3, 5]] = by_hand(d, x[:, [3, 5]], change)

        with hooks([(module(model, "llama", "block_output", 1), edit, False)]):
            expected = model(base).logits
    assert torch.allclose(out.logits, expected, atol=1e-5)


def test_spliced_losses_equal_a_hand_computation(tiny_llama):
    model, tokenizer = tiny_llama
    d = random_dictionary("topk")
    got = spliced_losses(d, model, tokenizer, PROMPTS)
    totals, count = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}, 0
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            for name, replace in (("clean", None), ("spliced", d), ("zero", "zero")):
                def edit(x, replace=replace):
                    x[:, 1:] = torch.zeros_like(x[:, 1:]) if replace == "zero" else replace(x[:, 1:])
                with hooks([] if replace is None else [(module(model, "llama", "block_output", 1), edit, False)]):
                    logits = model(ids).logits[0, :-1]
                totals[name] += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert got == pytest.approx({k: v / count for k, v in totals.items()}, rel=1e-5)


def test_train_dictionary_on_a_model_reports_its_quality(tiny_llama):
    model, tokenizer = tiny_llama
    texts = [" ".join(PROMPTS)] * 40
    d, report = train_dictionary(model, tokenizer, texts, Where("block_output", 1, "tiny"), features=64,
                                 architecture="topk", k=4, batch_tokens=64, buffer_tokens=256, epochs=3, log=None)
    assert d.where.layer == 1 and report["l0"] <= 4 and report["explained_variance"] > 0.5
    gap = report["ce_zero_ablated"] - report["ce_clean"]
    if report["loss_recovered"] is None:                    # zero-ablating the site costs this random model nothing
        assert gap < 2e-3
    else:
        recovered = (report["ce_zero_ablated"] - report["ce_spliced"]) / gap
        assert report["loss_recovered"] == pytest.approx(recovered, rel=0.01, abs=0.01)
    assert report["heldout_texts"] == 4 and report["train_tokens"] > 0
    assert {p.requires_grad for p in model.parameters()} == {True}


@pytest.mark.parametrize("damage", ["no config", "config not JSON", "architecture gated", "d_in huge",
                                    "k zero", "normalised", "weights cut", "a tensor missing", "nan weights",
                                    "sealed weights edited"])
def test_a_damaged_dictionary_folder_is_one_error(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    d = random_dictionary("topk")
    folder = d.save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = folder / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    {"no config": lambda: (folder / "cfg.json").unlink(),
     "config not JSON": lambda: (folder / "cfg.json").write_text("{"),
     "architecture gated": lambda: (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"})),
     "d_in huge": lambda: (folder / "cfg.json").write_text(json.dumps({**cfg, "d_in": 10**9})),
     "k zero": lambda: (folder / "cfg.json").write_text(json.dumps({**cfg, "k": 0})),
     "normalised": lambda: (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"})),
     "weights cut": lambda: weights.write_bytes(weights.read_bytes()[:100]),
     "a tensor missing": lambda: save_file({k: v for k, v in tensors.items() if k != "b_enc"}, str(weights)),
     "nan weights": lambda: save_file({**tensors, "b_enc": tensors["b_enc"] * float("nan")}, str(weights)),
     "sealed weights edited": lambda: weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")}[damage]()
    with pytest.raises(SpecError) as err:
        load_dictionary(folder)
    assert str(err.value).startswith("`dictionary`") and "\n" not in str(err.value)


def test_detection_scores_equal_a_hand_count():
    from interventions.features.describe import detection_scores

    acts = torch.tensor([[0.0, 2.0], [1.5, 0.0], [0.7, 0.1], [0.0, 0.0], [2.0, 3.0], [0.0, 0.4]])
    labels = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 0], [1, 1], [0, 0]], dtype=torch.bool)
    s = detection_scores(acts, labels)
    # unit 0 fires on examples 1, 2, 4: all three hold concept 0 (of 3) -> P 1, R 1; concept 1 (0, 4): 1 of 3 fired
    # unit 1 fires on 0, 2, 4, 5: concept 0 holds at 2, 4 -> P 2/4, R 2/3; concept 1 at 0, 4 -> P 2/4, R 2/2
    expected_p = torch.tensor([[1.0, 1 / 3], [0.5, 0.5]], dtype=torch.float64)
    expected_r = torch.tensor([[1.0, 0.5], [2 / 3, 1.0]], dtype=torch.float64)
    assert torch.allclose(s["precision"], expected_p) and torch.allclose(s["recall"], expected_r)
    assert torch.allclose(s["f1"], 2 * expected_p * expected_r / (expected_p + expected_r))


def test_iou_equals_a_hand_count():
    from interventions.features.describe import iou_scores

    acts = torch.tensor([[0.9], [0.2], [0.8], [0.0], [0.6]])           # five positions, one unit
    masks = torch.tensor([[1], [1], [0], [0], [1]], dtype=torch.bool)
    # above 0.5: positions 0, 2, 4; mask: 0, 1, 4 -> intersection {0, 4} = 2, union {0, 1, 2, 4} = 4
    assert float(iou_scores(acts, masks, 0.5)[0, 0]) == 0.5


def test_a_dense_unit_gets_its_threshold_and_sign_on_the_fit_split_and_its_f1_on_the_test_split():
    from interventions.features.describe import best_units

    g = torch.Generator().manual_seed(0)
    labels = torch.rand(400, 1, generator=g) < 0.3
    neuron = torch.where(labels[:, 0], -2.0, 1.0) + 0.1 * torch.randn(400, generator=g)   # negatively tuned
    acts = torch.stack([torch.randn(400, generator=g), neuron], 1)
    fit, test = torch.arange(0, 200), torch.arange(200, 400)
    (best,) = best_units(acts, labels, fit, test, dense=True)
    assert best["unit"] == 1 and best["sign"] == -1 and best["f1"] == 1.0


def test_kind_features_reports_top_features_per_token_as_plain_hooks_compute_them(tiny_folder, tokenizer, capsys):
    from interventions import parse_spec
    from interventions.features.readout import run_features
    from recipes.cli import main
    from support.models import make_model

    model = make_model("llama", len(tokenizer))
    d = random_dictionary("topk")
    d.save(tiny_folder / "sae")
    words = ["paris", "rome", "london"]
    examples = [{"prompt": f"the {w} tower is in the city of {w}", "concepts": [w]} for w in words for _ in range(2)]
    examples += [{"prompt": "the statue of liberty is in new york"}] * 2
    spec = parse_spec({"kind": "features", "model": str(tiny_folder / "tiny"), "dictionary": str(tiny_folder / "sae"),
                       "examples": examples, "top": 3, "describe": 4})
    report = run_features(spec, model, tokenizer)
    ids = torch.tensor([tokenizer(examples[0]["prompt"])["input_ids"]])
    with torch.no_grad():
        seen = {}
        with hooks([(module(model, "llama", "block_output", 1), lambda x: seen.setdefault("x", x.clone()), False)]):
            model(ids)
        f = d.encode(seen["x"][0])
    for p, cell in enumerate(report["tokens"][0]):
        values, index = f[p].topk(3)
        assert [u for u, _ in cell["top"]] == [int(i) for v, i in zip(values, index) if v > 0]
    assert [c["concept"] for c in report["concepts"]] == sorted(words) and len(report["features"]) == 4
    assert set(report["concepts"][0]) >= {"feature", "features", "neuron", "probe"}
    assert all(0 <= row[k]["f1"] <= 1 for row in report["concepts"] for k in ("feature", "features", "neuron", "probe"))
    (tiny_folder / "features.yaml").write_text(json.dumps(spec.model_dump(mode="json", exclude_none=True)))
    assert main(["run", str(tiny_folder / "features.yaml"), "--out", str(tiny_folder / "out")]) == 0
    assert json.loads((tiny_folder / "out" / "report.json").read_text())["concepts"] == report["concepts"]
    assert (tiny_folder / "out" / "table.md").read_text().startswith("| concept | examples | best feature")
    from interventions.lenses.steering import load_vector

    vector = load_vector(tiny_folder / "out" / "feature_paris.safetensors")      # a feature, as a steering vector
    best = report["concepts"][1]["feature"]
    assert vector.site == "block_output" and vector.layers == [1] and vector.meta["feature"] == best["unit"]
    assert torch.allclose(vector.vectors[1], d.W_dec[best["unit"]].detach() * best["mean_active"])


def test_a_concept_split_over_features_is_found_as_their_union():
    from interventions.features.describe import best_union

    labels = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)[:, None]
    acts = torch.zeros(10, 3)
    acts[[0, 1, 2], 0] = 1.0                      # "red"
    acts[[3, 4, 5], 1] = 2.0                      # "ruby": the same concept, another word
    acts[[0, 6, 7], 2] = 1.0                      # noise
    everything = torch.arange(10)
    (found,) = best_union(acts, labels, everything, everything)
    # alone, the first gives P 1, R 1/2 (F1 2/3); with the second, P 1 and R 1: nothing more helps
    assert sorted(found["units"]) == [0, 1] and found["f1"] == 1.0


def test_the_scoped_hook_edits_as_the_pyvene_node_does_and_leaves_no_hook(tiny_llama):
    from interventions.features.splice import features_edited

    model, tokenizer = tiny_llama
    d = random_dictionary("standard")
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    layer = module(model, "llama", "block_output", 1)
    graph = build_graph(model, [(component(model, d), FeatureEdit(d, zero_features([2, 4])))])
    with torch.no_grad():
        _, out = graph(base={"input_ids": ids}, unit_locations={"base": [[list(range(ids.shape[1]))]]})
        with features_edited(layer, d, zero_features([2, 4])):
            hooked = model(ids).logits
        plain = model(ids).logits
    assert torch.allclose(hooked, out.logits, atol=1e-6) and not torch.allclose(hooked, plain, atol=1e-3)
    assert not layer._forward_hooks


def test_the_probe_column_finds_a_linearly_separable_concept():
    from interventions.features.readout import probe_scores

    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    states = [torch.randn(5, 16, generator=g) for _ in range(120)]
    labels = torch.tensor([[bool(float(s[1:].mean(0) @ direction) > 0)] for s in states])
    (found,) = probe_scores(states, labels, torch.arange(0, 80), torch.arange(80, 120))
    assert found["f1"] >= 0.9 and set(found) == {"precision", "recall", "f1"}


def test_a_dictionary_stored_in_float16_loads_in_lesion_and_saelens(tmp_path):
    import sae_lens

    d = random_dictionary("topk")
    d.save(tmp_path / "half", dtype="float16")
    back = load_dictionary(tmp_path / "half")
    for name, p in d.state_dict().items():
        assert torch.equal(back.state_dict()[name], p.half().float())
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "half"))
    assert theirs.cfg.dtype == "float16" and theirs.cfg.d_sae == 64
    assert (tmp_path / "half" / "sae_weights.safetensors").stat().st_size < 0.6 * (d.d_in * d.d_sae * 2 * 4)
