"""Sequential editing on a tiny model: a run equals computing its batches by hand, one after another;
its stacked delta reproduces it; the curves are measured as configured; bad input is one error line."""

from __future__ import annotations

import json

import pytest
import torch

from editors.delta import applied, apply, load_delta, revert
from editors.editor import compute_edit, edit_request, hyperparameters, key_statistics
from editors.methods.emmet import compute_emmet
from editors.methods.memit import compute_memit
from editors.methods.rome import compute_rome, context_templates
from editors.sequential import ScaleProbe, evenly_spaced
from interventions import parse_spec
from interventions.core.errors import SpecError
from recipes.cli import main
from support.models import make_model

SUBJECTS = [("the eiffel tower", "rome", "paris"), ("big ben", "paris", "london"), ("the colosseum", "london", "rome"),
            ("the louvre", "rome", "paris"), ("the statue of liberty", "paris", "new york")]
REQUESTS = [{"prompt": "{} is located in the city of", "subject": s, "target_new": new, "target_true": true,
             "paraphrases": [f"where is {s} in"], "neighbours": ["the tower is located in the city of"]}
            for s, new, true in SUBJECTS]
CORPUS = ("the eiffel tower is in paris\n\nthe colosseum is in rome\n\n"
          "big ben is in london which is the capital of england\n\n" * 20)
HELDOUT = {"heldout_known": [{"prompt": "paris is the capital of", "answer": " france"},
                             {"prompt": "rome is the capital of", "answer": " italy"}]}


@pytest.fixture()
def folder(tiny_folder):
    (tiny_folder / "corpus.txt").write_text(CORPUS)
    (tiny_folder / "heldout.json").write_text(json.dumps(HELDOUT))
    (tiny_folder / "text.txt").write_text("the eiffel tower is in paris and the colosseum is in rome. " * 4)
    return tiny_folder


def spec_for(folder, method: str, batch_size: int | None, **extra):
    where = {"layer": 1} if method in ("rome", "r-rome", "emmet") else {"layers": [1, 2]}
    body = {"kind": "edit", "model": str(folder / "tiny"), "method": method, **where, "requests": REQUESTS,
            "corpus": [str(folder / "corpus.txt")], "mom2_tokens": 500,
            "hyperparameters": {"v_steps": 6, "context_templates": [[3, 2]]}, **extra}
    if batch_size is not None:
        body["sequential"] = {"batch_size": batch_size, "heldout": str(folder / "heldout.json"),
                              "text": str(folder / "text.txt"), "fluency_prompts": 2, "sample": 3}
    return parse_spec(body)


def by_hand(spec, model, tokenizer, size: int):
    """Each batch computed by the editors directly on the model with the earlier batches' own deltas
    applied (plain `apply`, one delta per batch): the definition of sequential editing."""
    hp = hyperparameters(spec)
    C = key_statistics(spec, model, tokenizer, spec.edit_layers)
    templates = context_templates(model, tokenizer, hp.context_templates, hp.seed)
    requests = [edit_request(r) for r in spec.requests]
    deltas, previous = [], {}
    try:
        for i in range(0, len(requests), size):
            part = requests[i:i + size]
            if spec.method == "emmet":
                delta, _ = compute_emmet(model, tokenizer, part, hp, base_model="t", C=C[1], templates=templates)
            elif spec.method in ("memit", "alphaedit"):
                delta, info = compute_memit(model, tokenizer, part, hp, base_model="t", C=C, templates=templates,
                                            previous=dict(previous))
                for layer, outer in info["keys_outer"].items():
                    previous[layer] = previous.get(layer, 0) + outer
            else:
                (one,) = part
                delta, _ = compute_rome(model, tokenizer, one, hp, base_model="t", C=C[1], method=spec.method,
                                        templates=templates)
            apply(model, delta)
            deltas.append(delta)
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        revert(model, *deltas)


@pytest.mark.parametrize("method,size", [("r-rome", 1), ("emmet", 2), ("memit", 2), ("alphaedit", 2)])
def test_a_sequential_run_equals_its_batches_by_hand_and_its_stacked_delta(folder, tokenizer, method, size):
    model = make_model("llama", len(tokenizer))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = spec_for(folder, method, size)
    seen = []
    delta, details = compute_edit(spec, model, tokenizer, on_batch=lambda done, editor: seen.append(done))
    assert seen == [1, 2, 3, 4, 5] if size == 1 else seen == [2, 4, 5]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())      # restored afterwards
    want = by_hand(spec, model, tokenizer, size)
    with applied(model, delta):
        got = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in delta.names:
        assert not torch.equal(got[name], base[name])
        # float32 weights differ by rounding (Σ of separate products vs one stacked product), which later
        # batches' optimisations carry on: equal relative to the change itself
        change = (want[name] - base[name]).norm()
        assert (got[name] - want[name]).norm() < 1e-3 * change, name
    ranks = {n: u.shape[1] for n, (u, _) in delta.factors.items()}
    assert set(ranks.values()) == {5}                      # one column per request, stacked over the batches


def test_sequential_run_writes_curves_that_its_delta_reproduces(folder, tokenizer, capsys):
    spec = folder / "seq.yaml"
    spec.write_text(json.dumps(spec_for(folder, "alphaedit", 2, ).model_dump(mode="json", exclude_none=True)))
    assert main(["run", str(spec), "--out", str(folder / "out")]) == 0
    printed = capsys.readouterr().out
    assert "after 5 edits" in printed and "| heldout_accuracy |" in printed
    curves = json.loads((folder / "out" / "curves.json").read_text())["rows"]
    assert [r["edits"] for r in curves] == [0, 2, 4, 5]
    assert (folder / "out" / "curves.png").stat().st_size > 10_000
    delta = load_delta(folder / "out" / "delta.safetensors")
    model = make_model("llama", len(tokenizer))
    probe = ScaleProbe.from_spec(spec_for(folder, "alphaedit", 2))
    requests = spec_for(folder, "alphaedit", 2).requests
    assert probe.measure(model, tokenizer, list(requests))["perplexity"] == pytest.approx(curves[0]["perplexity"])
    with applied(model, delta):
        again = probe.measure(model, tokenizer, list(requests))
    for key, value in again.items():
        assert value == pytest.approx(curves[-1][key], rel=1e-6, abs=1e-9), key
    assert delta.meta["metrics"]["efficacy"] == curves[-1]["efficacy"]
    base = dict(make_model("llama", len(tokenizer)).named_parameters())
    by_hand = max(float(delta.difference(n).norm() / base[n].detach().norm()) for n in delta.names)
    assert curves[0]["delta_norm"] == 0.0 and curves[-1]["delta_norm"] == pytest.approx(by_hand, rel=1e-5)
    from recipes.studies import edit_curves

    capsys.readouterr()
    assert edit_curves.main([str(folder / "out"), "--out", str(folder / "c.png"), "--norms"]) == 0
    norms = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["delta_norms"]["alphaedit"]
    assert sorted(norms) == delta.names and max(norms.values()) == pytest.approx(by_hand, rel=1e-5)


def test_measurements_match_a_plain_computation(folder, tokenizer):
    """Efficacy by one teacher-forced forward per prompt and target; top-1 by argmax; perplexity by
    exp of the mean NLL over the text's tokens."""
    model = make_model("llama", len(tokenizer))
    probe = ScaleProbe.from_spec(spec_for(folder, "alphaedit", 2))
    requests = list(spec_for(folder, "alphaedit", 2).requests)
    row = probe.measure(model, tokenizer, requests)

    def logp(prompt, target):
        ids = tokenizer(prompt)["input_ids"]
        tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = model(torch.tensor([ids + tgt])).logits[0].log_softmax(-1)
        return float(torch.stack([lp[len(ids) - 1 + j, t] for j, t in enumerate(tgt)]).mean())

    eff = [logp(r.prompt.replace("{}", r.subject), r.target_new) > logp(r.prompt.replace("{}", r.subject),
                                                                        r.target_true) for r in requests]
    assert row["efficacy"] == sum(eff) / len(eff)
    ids = tokenizer(probe.text)["input_ids"]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    nll = -lp.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    assert row["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
    hits = []
    for prompt, answer in probe.heldout:
        with torch.no_grad():
            top = int(model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1].argmax())
        hits.append(top == tokenizer(answer, add_special_tokens=False)["input_ids"][0])
    assert row["heldout_accuracy"] == sum(hits) / len(hits)
    assert evenly_spaced(list(range(10)), 3) == [0, 4, 9] and evenly_spaced([1, 2], 5) == [1, 2]


def test_sequential_spec_round_trips_and_bad_input_is_one_line(folder, capsys):
    import yaml

    spec = spec_for(folder, "emmet", 2)
    again = parse_spec(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True))))
    assert again == spec
    bad = folder / "bad.yaml"
    for body, field in [({"sequential": {"batch_size": 0}}, "sequential.batch_size"),
                        ({"method": "alphaedit"}, "layers"),
                        ({"hyperparameters": {"context_templates": [[0, 3]]}}, "context_templates"),
                        ({"hyperparameters": {"l2": 1.0}}, "l2"),
                        ({"sequential": {"heldout": str(folder / "text.txt")}}, "sequential.heldout"),
                        ({"method": "r-rome", "sequential": {"batch_size": 5}}, "sequential.batch_size")]:
        data = {"kind": "edit", "model": str(folder / "tiny"), "method": "emmet", "layer": 1, "requests": REQUESTS,
                **body}
        bad.write_text(json.dumps(data))
        code = main(["validate", "--compile", str(bad)])
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading")]
        assert code == 2 and len(err) == 1 and err[0].startswith("error:") and field in err[0], (body, err)


def test_tuning_reads_only_the_tuning_split_and_curves_tabulate(folder, tokenizer, capsys):
    """recipes/studies/tune_edit.py scores its candidates on tuning requests only (an evaluation request there
    would be edited and show up as efficacy); recipes/studies/edit_curves.py reads runs and tabulates."""
    from recipes.studies import edit_curves, tune_edit

    records = [{"requested_rewrite": {"prompt": r["prompt"], "subject": r["subject"],
                                      "target_new": {"str": r["target_new"]}, "target_true": {"str": r["target_true"]}},
                "paraphrase_prompts": r["paraphrases"], "neighborhood_prompts": r["neighbours"],
                "split": "tune" if i < 3 else "eval"} for i, r in enumerate(REQUESTS)]
    facts = folder / "facts.json"
    facts.write_text(json.dumps({"requests": records, **HELDOUT}))
    report = folder / "tune.json"
    assert tune_edit.main(["--model", str(folder / "tiny"), "--facts", str(facts), "--requests", "10",
                           "--layers", "1", "2", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["requests"] == 3 and data["split"] == "tune"
    assert {r["candidate"] for r in data["rows"]} >= {"unedited", "memit {'mom2_update_weight': 1500.0}"}
    assert set(data["chosen"]) == {"memit", "alphaedit"}
    run = folder / "run"
    run.mkdir()
    rows = [{"edits": n, "edit_seconds": n, **{k: 0.5 for k in ("efficacy", "paraphrase", "neighbourhood",
                                                                  "fluency", "heldout_accuracy", "perplexity")}}
            for n in (0, 10, 20)]
    (run / "curves.json").write_text(json.dumps({"method": "r-rome", "rows": rows}))
    capsys.readouterr()
    assert edit_curves.main([str(run), "--out", str(folder / "c.png"), "--at", "10", "100"]) == 0
    numbers = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert numbers["r-rome"]["10"]["efficacy"] == 0.5 and numbers["r-rome"]["100"] is None


class Stop(Exception):
    pass


@pytest.mark.parametrize("method,size", [("alphaedit", 2), ("r-rome", 1)])
def test_an_interrupted_run_resumes_from_its_checkpoint_as_if_never_stopped(folder, tokenizer, method, size):
    from editors.sequential import run_sequential

    model = make_model("llama", len(tokenizer))
    spec = spec_for(folder, method, size)
    whole = run_sequential(spec, model, tokenizer, folder / "whole", compute_edit)

    def stopped(spec, model, tokenizer, on_batch, resume):        # the process dies after the 2nd measurement
        def then_stop(done, editor):
            on_batch(done, editor)
            if done >= 2 * size:
                raise Stop
        return compute_edit(spec, model, tokenizer, on_batch=then_stop, resume=resume)

    with pytest.raises(Stop):
        run_sequential(spec, model, tokenizer, folder / "partial", stopped)
    assert json.loads((folder / "partial" / "checkpoint.json").read_text())["edits"] == 2 * size
    again = spec.model_copy(update={"sequential": spec.sequential.model_copy(update={"resume": str(folder / "partial")})})
    resumed = run_sequential(again, model, tokenizer, folder / "resumed", compute_edit)
    a, b = load_delta(folder / "whole" / whole["delta"]), load_delta(folder / "resumed" / resumed["delta"])
    assert a.names == b.names
    for x, y in zip(a.tensors().values(), b.tensors().values()):
        assert torch.equal(x, y)
    drop = ("edit_seconds", "measure_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed["rows"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in whole["rows"]]
    other = again.model_copy(update={"method": "memit" if method == "alphaedit" else "rome"})
    with pytest.raises(SpecError, match="sequential.resume"):
        run_sequential(other, model, tokenizer, folder / "wrong", compute_edit)
