"""`lesion train-dictionary` end to end on a tiny model: a SAELens folder that both Lesion and SAELens
load, a report that ends with one JSON line, and bad options refused before any work."""

from __future__ import annotations

import json

import pytest

from interventions.features.dictionary import load_dictionary
from recipes.cli import main
from support.doors import listing

TEXT = "the eiffel tower is located in the city of paris\n\nthe colosseum is in rome which is the capital of italy\n\n"


def test_train_dictionary_writes_a_folder_saelens_loads(tiny_folder, capsys):
    (tiny_folder / "text.txt").write_text(TEXT * 20)
    args = ["train-dictionary", "--model", str(tiny_folder / "tiny"), "--layer", "1", "--text",
            str(tiny_folder / "text.txt"), "--features", "64", "--k", "4", "--batch-tokens", "64",
            "--buffer-tokens", "256", "--epochs", "2", "--out", str(tiny_folder / "sae")]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["features"] == 64 and report["k"] == 4 and report["layer"] == 1 and report["l0"] <= 4
    d = load_dictionary(tiny_folder / "sae")
    assert d.where.layer == 1 and d.meta["report"]["train_tokens"] == report["train_tokens"]
    import sae_lens
    assert sae_lens.SAE.load_from_disk(str(tiny_folder / "sae")).cfg.d_sae == 64


@pytest.mark.parametrize("change,field", [(["--layer", "9"], "--layer"), (["--k", "65"], "--k"),
                                          (["--text", "missing.txt"], "--text[0]"), (["--out", "mine"], "--out"),
                                          (["--flag-renders", "3"], "--flag-renders")])
def test_bad_options_are_refused_before_training(tiny_folder, capsys, change, field):
    (tiny_folder / "text.txt").write_text(TEXT)
    (tiny_folder / "mine").mkdir()
    (tiny_folder / "mine" / "thesis.tex").write_text("mine")
    options = {"--model": str(tiny_folder / "tiny"), "--layer": "1", "--text": str(tiny_folder / "text.txt"),
               "--features": "64", "--out": str(tiny_folder / "sae")}
    options[change[0]] = change[1] if change[0] not in ("--text", "--out") else str(tiny_folder / change[1])
    before = listing(tiny_folder)
    assert main(["train-dictionary", *[x for kv in options.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: `{field}`") and "Traceback" not in "\n".join(err)
    assert listing(tiny_folder) == before
