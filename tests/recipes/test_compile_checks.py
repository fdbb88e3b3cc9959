"""`lesion validate --compile` checks every kind of spec against its loaded model, without a forward pass
and without writing a weight: an edit at layer 1,000,000 is refused, a delta for another base is refused,
an unknown word is refused, and a good spec prints `ok`."""

from __future__ import annotations

import json

import pytest
import torch

from editors.delta import Delta
from interventions.lenses.steering import SteeringVector
from recipes.cli import main
from support.models import make_model

REQUEST = {"prompt": "{} is located in the city of", "subject": "the eiffel tower", "target_new": "rome",
           "target_true": "paris"}


@pytest.fixture()
def folder(tiny_folder):
    return tiny_folder


def compile_(folder, data: dict, capsys) -> tuple[int, str]:
    path = folder / "spec.yaml"
    path.write_text(json.dumps(data))
    code = main(["validate", str(path), "--compile"])
    captured = capsys.readouterr()
    return code, (captured.out if code == 0 else captured.err).strip().splitlines()[-1]   # after the load bar


@pytest.mark.parametrize("change, needle", [
    ({"layer": 1_000_000}, "`layer`: got 1000000; expected a layer from 0 to 3 (the model has 4)"),
    ({"method": "memit", "layer": None, "layers": [1, 99]}, "`layers[1]`: got 99"),
    ({"requests": [dict(REQUEST, target_new="zebra")]}, "`requests[0].target_new`: got 'zebra'"),
    ({"corpus": ["missing.txt"]}, "`corpus[0]`: got 'missing.txt'; expected an existing file"),
])
def test_edit_specs_are_checked_against_the_model(folder, capsys, change, needle):
    data = {"kind": "edit", "model": str(folder / "tiny"), "layer": 1, "requests": [REQUEST], **change}
    data = {k: v for k, v in data.items() if v is not None}
    code, message = compile_(folder, data, capsys)
    assert code == 2 and needle in message and "\n" not in message, message


def test_a_good_edit_spec_compiles(folder, capsys):
    code, message = compile_(folder, {"kind": "edit", "model": str(folder / "tiny"), "layer": 2,
                                      "requests": [REQUEST]}, capsys)
    assert code == 0 and message == f"ok: edit spec (language), 1 request(s), rome at layer 2 of 4 in {folder}/tiny"


def test_steer_layers_are_checked(folder, capsys):
    data = {"kind": "steer", "model": str(folder / "tiny"), "layers": [1, 4], "prompts": ["the eiffel tower"],
            "pairs": [{"positive": "paris", "negative": "rome"}], "lexicon": ["paris"]}
    code, message = compile_(folder, data, capsys)
    assert code == 2 and "`layers[1]`: got 4; expected a layer from 0 to 3" in message, message


def test_apply_deltas_and_vectors_are_checked_and_no_weight_changes(folder, tokenizer, capsys):
    from safetensors.torch import load_file

    name = "model.layers.1.mlp.down_proj.weight"
    same = make_model("llama", len(tokenizer))
    out, inp = dict(same.named_parameters())[name].shape
    Delta.from_factors(same, {name: (torch.ones(out, 1), torch.ones(1, inp))}, method="rome",
                       base_model="tiny").save(folder / "fits.safetensors")
    other = make_model("llama", len(tokenizer))
    with torch.no_grad():
        dict(other.named_parameters())[name].add_(1.0)      # another base: its fingerprint differs
    Delta.from_factors(other, {name: (torch.ones(out, 1), torch.ones(1, inp))}, method="rome",
                       base_model="other").save(folder / "foreign.safetensors")
    SteeringVector({1: torch.zeros(48)}, {"format_version": 1, "layers": [1], "site": "block_output",
                                          "model": "wide"}).save(folder / "wide.safetensors")
    weights = load_file(folder / "tiny" / "model.safetensors")
    base = {"kind": "apply", "model": str(folder / "tiny"), "prompts": ["the eiffel tower is in"]}
    code, message = compile_(folder, {**base, "deltas": [str(folder / "fits.safetensors")]}, capsys)
    assert code == 0 and message.startswith("ok: apply spec (language), 1 delta(s) fit"), message
    code, message = compile_(folder, {**base, "deltas": [str(folder / "foreign.safetensors")]}, capsys)
    assert code == 2 and "sha256" in message and "'other'" in message, message
    code, message = compile_(folder, {**base, "steer": str(folder / "wide.safetensors")}, capsys)
    assert code == 2 and "48 dims" in message, message
    after = load_file(folder / "tiny" / "model.safetensors")
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_erase_concepts_must_be_in_the_testbed_vocabulary(tmp_path, capsys):
    code, message = compile_(tmp_path, {"kind": "erase", "concepts": [{"concept": "purple"}]}, capsys)
    assert code == 2 and "`concepts[0].concept`: got 'purple'" in message, message
    code, message = compile_(tmp_path, {"kind": "erase", "edit": "text_encoder", "layer": 9,
                                        "concepts": [{"concept": "red"}]}, capsys)
    assert code == 2 and "`layer`: got 9; expected a layer from 0 to 1" in message, message
    code, message = compile_(tmp_path, {"kind": "erase", "concepts": [{"concept": "red", "guide": "blue"}],
                                        "preserve": ["green"]}, capsys)
    assert code == 0 and message == "ok: erase spec (text-to-image), 1 concept(s) in shapes-diffusion", message


def test_a_language_spec_naming_a_text_to_image_model_is_refused_at_load(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, message = compile_(tmp_path, {"kind": "trace", "model": "shapes-diffusion",
                                         "prompts": [{"prompt": "a red circle", "subject": "red"}]}, capsys)
    assert code == 2 and message.startswith("error: `model`: got 'shapes-diffusion'") and "\n" not in message
