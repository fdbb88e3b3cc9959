"""`kind: edit` and `kind: apply` end to end on a tiny model saved as a local folder, and the metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from editors.delta import load_delta
from editors.editor import hyperparameters
from editors.evaluate import ngram_entropy, prefers, target_logprobs
from interventions import SpecError, parse_spec
from recipes.cli import main
from support.models import make_model

REQUEST = {"prompt": "{} is located in the city of", "subject": "the eiffel tower", "target_new": "rome",
           "target_true": "paris", "paraphrases": ["where is the eiffel tower in"],
           "neighbours": ["the colosseum is located in the city of"]}
REQUEST2 = dict(REQUEST, subject="big ben", target_new="paris", target_true="london", paraphrases=[],
                neighbours=[])


@pytest.fixture()
def folder(tiny_folder):
    tmp_path = tiny_folder
    (tmp_path / "corpus.txt").write_text("the eiffel tower is in paris\n\nthe colosseum is in rome\n\n"
                                         "big ben is in london which is the capital of england\n\n" * 20)
    return tmp_path


def test_edit_then_apply_end_to_end(folder, capsys):
    spec = folder / "edit.yaml"
    spec.write_text(json.dumps({"kind": "edit", "model": str(folder / "tiny"), "layer": 1,
                                "requests": [REQUEST, REQUEST2], "corpus": [str(folder / "corpus.txt")],
                                "hyperparameters": {"v_steps": 10}, "mom2_tokens": 500}))
    before = {k: v.clone() for k, v in make_model("llama", 37).state_dict().items()}
    assert main(["run", str(spec), "--out", str(folder / "out")]) == 0
    table = capsys.readouterr().out
    assert "| efficacy |" in table and "| fluency |" in table
    delta = load_delta(folder / "out" / "delta.safetensors")
    (name,) = delta.names
    assert name == "model.layers.1.mlp.down_proj.weight"
    assert delta.factors[name][0].shape[1] == 2                  # two requests: rank two
    assert set(delta.meta["metrics"]) >= {"efficacy", "paraphrase", "neighbourhood", "fluency"}
    assert delta.meta["spec"]["requests"][1]["subject"] == "big ben"
    report = json.loads((folder / "out" / "metrics.json").read_text())
    assert report["after"]["per_request"][0]["p_new"] > report["before"]["per_request"][0]["p_new"]
    assert main(["apply", "--model", str(folder / "tiny"), "--delta", str(folder / "out" / "delta.safetensors"),
                 "--prompt", "the eiffel tower is located in the city of", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "base:" in out and "edited:" in out
    assert all(torch.equal(v, before[k]) for k, v in make_model("llama", 37).state_dict().items())


def test_apply_refuses_a_delta_for_another_model(folder, capsys, tokenizer):
    from editors.delta import Delta

    other = make_model("gpt2", len(tokenizer))
    path = Delta.from_factors(other, {"transformer.h.0.mlp.c_proj.weight": (torch.ones(128, 1), torch.ones(1, 32))},
                              method="test", base_model="tiny-gpt2").save(folder / "gpt2.safetensors")
    assert main(["apply", "--model", str(folder / "tiny"), "--delta", str(path), "--prompt", "big ben"]) == 2
    err = capsys.readouterr().err
    assert "does not have" in err and "tiny-gpt2" in err and "Traceback" not in err


def test_memit_spec_end_to_end(folder, capsys):
    spec = folder / "memit.yaml"
    spec.write_text(json.dumps({"kind": "edit", "method": "memit", "model": str(folder / "tiny"), "layers": [1, 2],
                                "requests": [REQUEST, REQUEST2], "corpus": [str(folder / "corpus.txt")],
                                "hyperparameters": {"v_steps": 8}, "mom2_tokens": 500}))
    assert main(["run", str(spec), "--out", str(folder / "memit")]) == 0
    assert "memit edit of 2 fact(s) at layers [1, 2]" in capsys.readouterr().out
    delta = load_delta(folder / "memit" / "delta.safetensors")
    assert delta.names == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    assert delta.meta["method"] == "memit" and delta.meta["hyperparameters"]["layers"] == [1, 2]


def test_validate_and_eval_edits_on_edit_specs(folder, capsys):
    """`validate` counts an edit spec's requests; `eval-edits` reports n/a where a request has no
    paraphrases or neighbours instead of failing."""
    spec = folder / "edit.yaml"
    spec.write_text(json.dumps({"kind": "edit", "model": str(folder / "tiny"), "layer": 1, "requests": [REQUEST2],
                                "corpus": [str(folder / "corpus.txt")], "hyperparameters": {"v_steps": 5},
                                "mom2_tokens": 500}))
    assert main(["validate", str(spec)]) == 0
    assert "ok: edit spec (language), 1 request(s)" in capsys.readouterr().out
    assert main(["eval-edits", str(spec), "--json", str(folder / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "| paraphrase | n/a | n/a |" in out and "| efficacy |" in out
    summary = json.loads((folder / "eval.json").read_text())["summary"]
    assert summary["after"]["paraphrase"] is None and summary["after"]["efficacy"] in (0.0, 1.0)


def test_edit_spec_errors():
    with pytest.raises(SpecError, match="`method: memit` takes `layers"):
        parse_spec({"kind": "edit", "method": "memit", "layer": 1, "requests": [REQUEST]})
    with pytest.raises(SpecError, match="`method: rome` takes `layer"):
        parse_spec({"kind": "edit", "requests": [REQUEST]})
    with pytest.raises(SpecError, match=r"`requests\[0\].prompt`"):
        parse_spec({"kind": "edit", "layer": 1, "requests": [dict(REQUEST, prompt="no slot")]})
    # hyperparameters are typed per method, so a typo or a bad value is refused when the spec is read
    with pytest.raises(SpecError, match=r"`hyperparameters`.*'v_stepz'.*did you mean 'v_steps'"):
        parse_spec({"kind": "edit", "layer": 1, "requests": [REQUEST], "hyperparameters": {"v_stepz": 3}})
    with pytest.raises(SpecError, match=r"`hyperparameters`.*`v_lr` must be a number greater than 0"):
        parse_spec({"kind": "edit", "layer": 1, "requests": [REQUEST], "hyperparameters": {"v_lr": -1}})
    with pytest.raises(SpecError, match=r"'mom2_update_weight' for `method: rome`"):
        parse_spec({"kind": "edit", "layer": 1, "requests": [REQUEST], "hyperparameters": {"mom2_update_weight": 1}})
    spec = parse_spec({"kind": "edit", "layer": 1, "requests": [REQUEST], "hyperparameters": {"v_steps": 3}})
    assert hyperparameters(spec).v_steps == 3


def test_target_logprobs_equal_a_hand_computation(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = ["the eiffel tower is in", "big ben is located in the city of"]
    got = target_logprobs(model, tokenizer, prompts, "new york")
    for prompt, value in zip(prompts, got):
        ids = tokenizer(prompt)["input_ids"]
        a, b = tokenizer.convert_tokens_to_ids(["new", "york"])
        with torch.no_grad():
            lp1 = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)[a]
            lp2 = model(torch.tensor([ids + [a]])).logits[0, -1].log_softmax(-1)[b]
        assert value == pytest.approx(float(lp1 + lp2) / 2, abs=1e-5)
    assert prefers(model, tokenizer, prompts, "new york", "new york") == [False, False]


def test_ngram_entropy_by_hand():
    # bigrams: (a,b)×3, (b,a)×2 -> H2 = 0.97095; trigrams: (a,b,a)×2, (b,a,b)×2 -> H3 = 1
    want = (2 / 3 * -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4)) + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b a b") == pytest.approx(want)
    assert ngram_entropy("x x x x x") == 0.0


def test_best_span_by_hand():
    from editors.locate import best_span

    effect = torch.tensor([0.1, 0.5, 0.2, 0.6, 0.0])
    assert best_span(effect, 1) == (3,)
    assert best_span(effect, 2) == (2, 3)                # 0.8 beats 0.6, 0.7, 0.6
    assert best_span(effect, 3) == (1, 2, 3)             # 1.3
    assert best_span(effect, 9) == (0, 1, 2, 3, 4)       # clipped to the model


def test_locate_equals_the_mean_of_per_request_traces(tiny_llama):
    """The located effect is the mean over requests of each request's own MLP trace at its last
    subject token (the trace engine itself is checked cell by cell against plain hooks in test_engine)."""
    from editors.locate import locate_layers, trace_spec
    from interventions.engine.execute import run
    from interventions.spec import LocateSpec

    model, tokenizer = tiny_llama
    spec = parse_spec({"kind": "edit", "layer": "auto", "requests": [REQUEST, REQUEST2]})
    how = LocateSpec(window=3, samples=3, sigma=0.5)    # the default σ pools all requests' subjects
    found = locate_layers(model, tokenizer, spec.requests, how, model_name="tiny")
    per = [run(trace_spec([r], how, model_name="tiny"), model, tokenizer, progress=False).indirect_effect("mlp")[0, :, 0]
           for r in spec.requests]
    want = torch.stack(per).mean(0)
    assert found.effect == pytest.approx(want.tolist(), abs=1e-6)
    assert found.layer == int(torch.argmax(want)) and len(found.layers) == min(how.span, len(want))
    assert found.result.prompts[0]["answer"] == "paris"


def test_layer_auto_end_to_end(folder, capsys, monkeypatch):
    """`layer: auto` traces, edits the layer it picked, saves the trace, and records it in the delta;
    `--checkpoint` ships the delta with a manifest entry whose hash matches."""
    import recipes.train.manifest

    monkeypatch.setattr(recipes.train.manifest, "CHECKPOINTS", folder / "ckpt")
    spec = folder / "auto.yaml"
    spec.write_text(json.dumps({"kind": "edit", "model": str(folder / "tiny"), "layer": "auto",
                                "locate": {"window": 1, "samples": 2}, "requests": [REQUEST],
                                "corpus": [str(folder / "corpus.txt")], "hyperparameters": {"v_steps": 5},
                                "mom2_tokens": 500}))
    assert main(["run", str(spec), "--out", str(folder / "auto"), "--checkpoint", "tiny_auto"]) == 0
    out = capsys.readouterr().out
    assert "(auto: from the MLP trace at subject_last" in out and "shipped checkpoints/tiny_auto.safetensors" in out
    delta = load_delta(folder / "auto" / "delta.safetensors")
    located = delta.meta["located"]
    layer = max(range(len(located["effect"])), key=located["effect"].__getitem__)
    assert located["layer"] == layer and delta.names == [f"model.layers.{layer}.mlp.down_proj.weight"]
    assert delta.meta["spec"]["layer"] == layer
    assert (folder / "auto" / "locate" / "heatmap.png").is_file()
    report = json.loads((folder / "auto" / "metrics.json").read_text())
    assert report["layers"] == [layer] and report["located"]["position"] == "subject_last"
    (entry,) = json.loads((folder / "ckpt" / "manifest.json").read_text())["artefacts"]
    shipped = folder / "ckpt" / "tiny_auto.safetensors"
    assert entry["sha256"] == recipes.train.manifest.sha256(shipped) and entry["layers"] == [layer]
    assert entry["recipe"] == str(spec) and entry["command"].startswith("lesion run")
    assert shipped.read_bytes() == (folder / "auto" / "delta.safetensors").read_bytes()
    assert main(["run", str(spec), "--out", str(folder / "x"), "--checkpoint", "../up"]) == 2
    assert "`checkpoint name`" in capsys.readouterr().err


def test_layers_auto_validation():
    spec = parse_spec({"kind": "edit", "method": "memit", "layers": "auto", "locate": {"span": 2},
                       "requests": [REQUEST]})
    assert spec.layers == "auto" and spec.locate.span == 2
    with pytest.raises(SpecError, match="`layer`"):
        parse_spec({"kind": "edit", "layer": "top", "requests": [REQUEST]})
    with pytest.raises(SpecError, match="`locate.position`"):
        parse_spec({"kind": "edit", "layer": "auto", "locate": {"position": "last"}, "requests": [REQUEST]})
    with pytest.raises(SpecError, match="non-negative"):
        parse_spec({"kind": "edit", "layer": -1, "requests": [REQUEST]})


def test_bench_edit_runs_and_leaves_the_model_alone(folder, capsys):
    """The benchmark command on a tiny model: every measure present, numbers sane (no timing asserted)."""
    spec = folder / "bench.yaml"
    spec.write_text(json.dumps({"kind": "edit", "model": str(folder / "tiny"), "layer": 1,
                                "requests": [REQUEST, REQUEST2], "corpus": [str(folder / "corpus.txt")],
                                "hyperparameters": {"v_steps": 3}, "mom2_tokens": 500}))
    argv = ["bench-edit", "--spec", str(spec), "--rome", "2", "--batch", "2", "--memit-layers", "1", "2",
            "--repeats", "1", "--new-tokens", "3", "--json", str(folder / "bench.json")]
    before = {k: v.clone() for k, v in make_model("llama", 37).state_dict().items()}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "edited / base" in out and "| alphaedit | [1, 2] |" in out
    figures = json.loads(out.strip().splitlines()[-1])                  # the last line: one JSON object
    for key in ("rome_s_per_edit", "r_rome_s_per_edit", "emmet_batch2_s", "memit_batch2_s", "alphaedit_batch2_s",
                "encore_batch2_s", "ultraedit_batch2_s", "memit_peak_bytes", "generation_ratio",
                *(f"{m}_s_per_edit" for m in ("emmet", "memit", "alphaedit", "encore", "ultraedit"))):
        assert figures[key] > 0, key
    report = json.loads((folder / "bench.json").read_text())
    assert report["methods"]["rome"]["edits"] == 2 and len(report["methods"]["r-rome"]["seconds"]) == 2
    assert report["methods"]["emmet"]["requests"] == 2
    assert report["statistics_cached"] == {"1": False, "2": False}
    assert report["delta_bytes"]["rome_rank1"] < report["delta_bytes"]["memit_2_requests"]
    assert report["generation"]["ratio"] > 0
    assert all(torch.equal(v, before[k]) for k, v in make_model("llama", 37).state_dict().items())
    assert main(argv[:3] + ["--methods", "memit", "ultraedit", "--batch", "2", "--memit-layers", "1", "--repeats", "1",
                            "--new-tokens", "2", "--json", str(folder / "bench.json")]) == 0
    assert json.loads((folder / "bench.json").read_text())["statistics_cached"] == {"1": True}
    spec.write_text(json.dumps({"kind": "edit", "model": str(folder / "tiny"), "method": "memit", "layers": [1],
                                "requests": [REQUEST]}))
    assert main(["bench-edit", "--spec", str(spec)]) == 2
    assert "`--spec`" in capsys.readouterr().err
