"""Sequential editing on a tiny model: a run equals computing its batches by hand, one after another;
its stacked delta reproduces it; the curves are measured as configured; bad input is one error line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from editors.delta import applied, apply, load_delta, revert, unapplied
from editors.editor import compute_edit, edit_request, hyperparameters, key_statistics
from editors.methods.emmet import compute_emmet
from editors.methods.memit import compute_memit
from editors.methods.rome import compute_rome, context_templates
from editors.methods.ultraedit import compute_ultraedit
from editors.sequential import GENERATION_METRICS, ScaleProbe, evenly_spaced
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


def spec_for(folder, method: str, batch_size: int | None, generation: bool = False, **extra):
    """Generation-based measurements are off except where a test checks them (they triple a tiny run's time)."""
    where = {"layer": 1} if method in ("rome", "r-rome", "emmet") else {"layers": [1, 2]}
    hp = {"lr": 2.0} if method == "ultraedit" else {"v_steps": 6, "context_templates": [[3, 2]]}
    body = {"kind": "edit", "model": str(folder / "tiny"), "method": method, **where, "requests": REQUESTS,
            "corpus": [str(folder / "corpus.txt")], "mom2_tokens": 500, "hyperparameters": hp, **extra}
    if batch_size is not None:
        body["sequential"] = {"batch_size": batch_size, "heldout": str(folder / "heldout.json"),
                              "text": str(folder / "text.txt"), "fluency_prompts": 2, "sample": 3,
                              "generation": generation}
    return parse_spec(body)


def by_hand(spec, model, tokenizer, size: int):
    """Each batch computed by the editors directly on the model with the earlier batches' own deltas
    applied (plain `apply`, one delta per batch): the definition of sequential editing."""
    hp = hyperparameters(spec)
    ultra = spec.method == "ultraedit"
    C = {} if ultra else key_statistics(spec, model, tokenizer, spec.edit_layers)
    templates = [] if ultra else context_templates(model, tokenizer, hp.context_templates, hp.seed)
    requests = [edit_request(r) for r in spec.requests]
    deltas, previous = [], {}
    try:
        for i in range(0, len(requests), size):
            part = requests[i:i + size]
            if spec.method == "emmet":
                delta, _ = compute_emmet(model, tokenizer, part, hp, base_model="t", C=C[1], templates=templates)
            elif ultra:
                delta, info = compute_ultraedit(model, tokenizer, part, hp, base_model="t", sums=previous)
                previous = info["sums"]
            elif spec.method in ("memit", "alphaedit", "encore"):
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


@pytest.mark.parametrize("method,size", [("r-rome", 1), ("emmet", 2), ("memit", 2), ("alphaedit", 2), ("encore", 2),
                                         ("ultraedit", 2)])
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
    keys = sum(len(tokenizer(r.target_new, add_special_tokens=False)["input_ids"]) for r in spec.requests)
    # one column per request (UltraEdit: per answer token), stacked over the batches
    assert set(ranks.values()) == {keys if method == "ultraedit" else 5}


def test_sequential_run_writes_curves_that_its_delta_reproduces(folder, tokenizer, capsys):
    spec = folder / "seq.yaml"
    spec.write_text(json.dumps(spec_for(folder, "alphaedit", 2, True).model_dump(mode="json", exclude_none=True)))
    assert main(["run", str(spec), "--out", str(folder / "out")]) == 0
    printed = capsys.readouterr().out
    assert "after 5 edits" in printed and "| heldout_accuracy |" in printed
    curves = json.loads((folder / "out" / "curves.json").read_text())["rows"]
    assert [r["edits"] for r in curves] == [0, 2, 4, 5]
    assert (folder / "out" / "curves.png").stat().st_size > 10_000
    delta = load_delta(folder / "out" / "delta.safetensors")
    model = make_model("llama", len(tokenizer))
    probe = ScaleProbe.from_spec(spec_for(folder, "alphaedit", 2, True))
    requests = spec_for(folder, "alphaedit", 2).requests
    assert probe.measure(model, tokenizer, list(requests))["perplexity"] == pytest.approx(curves[0]["perplexity"])
    with applied(model, delta):
        again = probe.measure(model, tokenizer, list(requests), unedited=lambda: unapplied(model, delta))
    assert set(GENERATION_METRICS) <= set(again)
    for key, value in again.items():
        assert value == pytest.approx(curves[-1][key], rel=1e-6, abs=1e-9), key
    assert delta.meta["metrics"]["efficacy"] == curves[-1]["efficacy"]
    base = dict(make_model("llama", len(tokenizer)).named_parameters())
    by_hand = max(float(delta.difference(n).norm() / base[n].detach().norm()) for n in delta.names)
    assert curves[0]["delta_norm"] == 0.0 and curves[-1]["delta_norm"] == pytest.approx(by_hand, rel=1e-5)
    from recipes.studies import edit_curves

    capsys.readouterr()
    assert edit_curves.main([str(folder / "out"), "--out", str(folder / "c.png"), "--norms"]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    norms = table["delta_norms"]["alphaedit"]
    assert sorted(norms) == delta.names and max(norms.values()) == pytest.approx(by_hand, rel=1e-5)
    assert (folder / "c.png").is_file()
    assert edit_curves.main([str(folder / "out"), "--norms"]) == 0          # no --out: the table, no figure
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == table
    assert sorted(p.name for p in folder.glob("*.png")) == ["c.png"]


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
    assert set(data["chosen"]) == {"memit", "alphaedit", "encore"}
    from recipes.studies import tune_lifelong

    assert tune_lifelong.main(["--model", str(folder / "tiny"), "--facts", str(facts), "--requests", "10", "--batch",
                               "2", "--layers", "1", "2", "--lr", "1", "2", "--ridge", "1", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["requests"] == 3 and data["split"] == "tune" and len(data["rows"]) == 3          # unedited + 2
    assert data["chosen"] in [r["candidate"] for r in data["rows"][1:]]
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


@pytest.mark.parametrize("method,size", [("alphaedit", 2), ("r-rome", 1), ("ultraedit", 2)])
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
    other = again.model_copy(update={"method": "rome" if method == "r-rome" else "memit"})
    with pytest.raises(SpecError, match="sequential.resume"):
        run_sequential(other, model, tokenizer, folder / "wrong", compute_edit)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tokenizer):
    """An r-ROME run (batches of 1) stopped after its 2nd edit: its staging folder, spec and model."""
    from editors.sequential import run_sequential

    root = tmp_path_factory.mktemp("interrupted")
    (root / "tiny").mkdir()
    model = make_model("llama", len(tokenizer))
    for name, text in (("corpus.txt", CORPUS), ("heldout.json", json.dumps(HELDOUT)), ("text.txt", CORPUS[:300])):
        (root / name).write_text(text)
    spec = spec_for(root, "r-rome", 1)

    def stopped(spec, model, tokenizer, on_batch, resume):
        def then_stop(done, editor):
            on_batch(done, editor)
            if done >= 2:
                raise Stop
        return compute_edit(spec, model, tokenizer, on_batch=then_stop, resume=resume)

    with pytest.raises(Stop):
        run_sequential(spec, model, tokenizer, root / "partial", stopped)
    other = spec.model_copy(update={"requests": spec.requests[1:]})
    run_sequential(other, model, tokenizer, root / "foreign", compute_edit)
    return root, spec, model


def _reseal(state: dict) -> dict:
    from editors.delta import integrity_hash

    state.pop("integrity_sha256", None)
    return {**state, "integrity_sha256": integrity_hash(state)}


def _state_change(**change):
    def damage(folder):
        state = json.loads((folder / "checkpoint.json").read_text())
        (folder / "checkpoint.json").write_text(json.dumps(_reseal({**state, **change})))
    return damage


def _file(name: str, data):
    def damage(folder):
        path = folder / name
        content = data(folder) if callable(data) else data
        path.unlink()
        if content == "fifo":
            os.mkfifo(path)
        else:
            path.write_bytes(content)
    return damage


def _foreign_delta(folder):
    (folder / "checkpoint.safetensors").write_bytes((folder.parent / "foreign" / "delta.safetensors").read_bytes())


def _foreign_delta_resealed(folder):
    _foreign_delta(folder)
    from editors.delta import load_delta

    _state_change(delta=load_delta(folder / "checkpoint.safetensors").id)(folder)


def _flip(name: str, at: float):
    def damage(folder):
        data = bytearray((folder / name).read_bytes())
        data[int(len(data) * at)] ^= 0xFF
        (folder / name).write_bytes(bytes(data))
    return damage


def _keys_of_another_layer(folder):
    from safetensors.torch import save_file

    from editors.delta import content_hash

    keys = {"previous.3": torch.eye(4)}
    save_file(keys, str(folder / "checkpoint_keys.safetensors"))
    _state_change(keys=content_hash(keys))(folder)


RESUME_DAMAGE = {
    "a foreign delta": _foreign_delta,
    "a foreign delta, the state resealed to it": _foreign_delta_resealed,
    "edits 99 of 5": _state_change(edits=99),
    "edits -1": _state_change(edits=-1),
    "edits 0": _state_change(edits=0),
    "edits between batches' counts": _state_change(edits=3),
    "edits as text": _state_change(edits="2"),
    "edits edited, not resealed": lambda f: (f / "checkpoint.json").write_text(
        (f / "checkpoint.json").read_text().replace('"edits": 2', '"edits": 1', 1)),
    "no rows": _state_change(rows=[]),
    "a field missing": lambda f: (f / "checkpoint.json").write_text(json.dumps(
        {k: v for k, v in json.loads((f / "checkpoint.json").read_text()).items() if k != "details"})),
    "another spec, resealed": _state_change(spec={"kind": "edit"}),
    "state not JSON": _file("checkpoint.json", b"{not json"),
    "state a list": _file("checkpoint.json", b"[1, 2]"),
    "state not UTF-8": _file("checkpoint.json", b"\xff\xfe\x00garbage"),
    "state nested 100000 deep": _file("checkpoint.json", b"[" * 100000 + b"]" * 100000),
    "state with NaN": _file("checkpoint.json", b'{"edits": NaN}'),
    "state a pipe": _file("checkpoint.json", "fifo"),
    "state empty": _file("checkpoint.json", b""),
    "delta truncated": _file("checkpoint.safetensors", lambda f: (f / "checkpoint.safetensors").read_bytes()[:300]),
    "delta byte flipped": _flip("checkpoint.safetensors", 0.9),
    "delta missing": lambda f: (f / "checkpoint.safetensors").unlink(),
    "keys truncated": _file("checkpoint_keys.safetensors", lambda f: (f / "checkpoint_keys.safetensors")
                            .read_bytes()[:5]),
    "keys random bytes": _file("checkpoint_keys.safetensors", bytes(range(256)) * 4),
    "keys of a layer outside the spec, resealed": _keys_of_another_layer,
    "keys missing": lambda f: (f / "checkpoint_keys.safetensors").unlink(),
    "the folder is a file": lambda f: (shutil.rmtree(f), f.write_text("x")),
}


@pytest.mark.parametrize("damage", sorted(RESUME_DAMAGE))
def test_resume_refuses_a_checkpoint_that_is_not_this_runs(interrupted, tmp_path, tokenizer, damage):
    """Finding 2 of the doors issue: a damaged, edited or foreign checkpoint is one `sequential.resume`
    error before anything runs; the model keeps its weights and no output folder appears."""
    from editors.sequential import run_sequential

    root, spec, model = interrupted
    folder = tmp_path / "partial"
    shutil.copytree(root / "partial", folder)
    shutil.copytree(root / "foreign", tmp_path / "foreign")
    RESUME_DAMAGE[damage](folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = spec.model_copy(update={"sequential": spec.sequential.model_copy(update={"resume": str(folder)})})
    with pytest.raises(SpecError) as err:
        run_sequential(again, model, tokenizer, tmp_path / "out", compute_edit)
    assert str(err.value).startswith("`sequential.resume`") and "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "out").exists()


def test_the_undamaged_checkpoint_resumes(interrupted, tmp_path, tokenizer):
    """The control for the damage cases: the same copy, undamaged, resumes to the end."""
    from editors.sequential import run_sequential

    root, spec, model = interrupted
    shutil.copytree(root / "partial", tmp_path / "partial")
    again = spec.model_copy(update={"sequential": spec.sequential.model_copy(
        update={"resume": str(tmp_path / "partial")})})
    report = run_sequential(again, model, tokenizer, tmp_path / "out", compute_edit)
    assert report["rows"][-1]["edits"] == len(spec.requests)
