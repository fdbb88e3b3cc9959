"""The shipped coloured-shapes testbed: the evaluator, what the model draws, and an erasure end to end.

The numbers asserted are floors well below what the recipe measured (README, checkpoints/manifest.json),
on fewer images, so that the test is about behaviour and not about sampling luck.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interventions.modalities.text_to_image.pipeline import CHECKPOINTS, TESTBED_FILE, load_pipeline
from interventions.testbeds.shapes import COLOURS, SHAPES, caption, colour_of, render
from recipes.cli import main as cli

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("shapes-diffusion")


def test_checkpoint_is_small_and_listed():
    path = CHECKPOINTS / TESTBED_FILE
    assert path.stat().st_size < 25e6
    entry = {a["path"]: a for a in json.loads((CHECKPOINTS / "manifest.json").read_text())["artefacts"]}[TESTBED_FILE]
    assert entry["recipe"] == "recipes/train/train_shapes.py" and entry["evaluation"]["colour"] >= 0.8


def test_evaluator_names_rendered_images(pipe):
    images, colours, shapes = render(torch.Generator().manual_seed(123), 300)
    got_c, got_s = pipe.meta["evaluator"](images)
    assert torch.equal(got_c, colours)
    assert (got_s == shapes).float().mean() >= 0.97
    assert colour_of(torch.zeros(2, 3, 16, 16)).tolist() == [-1, -1]     # nothing drawn: no colour


def test_testbed_draws_the_asked_colour_and_shape(pipe):
    prompts = [caption(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]
    n = 6
    images = pipe.generate([p for p in prompts for _ in range(n)], [5_000_000 + k for k in range(n)] * len(prompts))
    colours, shapes = pipe.meta["evaluator"](images)
    want_c = torch.tensor([c for c in range(len(COLOURS)) for _ in range(len(SHAPES) * n)])
    want_s = torch.tensor([s for _ in range(len(COLOURS)) for s in range(len(SHAPES)) for _ in range(n)])
    assert (colours == want_c).float().mean() >= 0.85
    assert (shapes == want_s).float().mean() >= 0.75


def test_erase_red_end_to_end_with_apply(tmp_path):
    spec = (ROOT / "recipes" / "erase" / "erase_red.yaml").read_text().replace("images: 32", "images: 6")
    spec = spec.replace("attack: {prompts: 3, steps: 40}", "attack: {prompts: 1, steps: 8}\nsteps: 15")
    (tmp_path / "erase.yaml").write_text(spec)
    out = tmp_path / "run"
    assert cli(["run", str(tmp_path / "erase.yaml"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["erased_before"] >= 0.8 and s["erased_after"] <= 0.1
    assert s["other_colours_kept"] >= 0.9 and s["other_shapes_kept"] >= 0.9
    assert all(r <= 18 for r in report["rank"].values())     # 3 templates x 6 tokens from the colour on
    assert (out / "grid.png").stat().st_size > 0 and (out / "delta.safetensors").is_file()
    applied_out = tmp_path / "apply"
    assert cli(["apply", "--model", "shapes-diffusion", "--delta", str(out / "delta.safetensors"),
                "--prompt", "a red circle", "--prompt", "a green square", "--images", "4",
                "--out", str(applied_out)]) == 0
    rep = json.loads((applied_out / "report.json").read_text())
    assert rep["after"]["a red circle"]["red"] <= rep["before"]["a red circle"]["red"] - 0.5
    assert rep["after"]["a green square"]["green"] >= rep["before"]["a green square"]["green"] - 0.25


def test_apply_refuses_a_delta_for_another_model(tmp_path, capsys):
    from editors.delta import Delta
    from support.diffusion import tiny_sd

    other = tiny_sd(0)
    name = next(n for n, _ in other.named_parameters() if n.endswith("attn2.to_k.weight"))
    w = dict(other.named_parameters())[name]
    delta = Delta.from_factors(other, {name: (torch.ones(w.shape[0], 1), torch.ones(1, w.shape[1]))},
                               method="uce", base_model=other.name)
    path = delta.save(tmp_path / "foreign.safetensors")
    assert cli(["apply", "--model", "shapes-diffusion", "--delta", str(path), "--prompt", "a red circle",
                "--images", "1"]) == 2
    assert "tiny-sd-0" in capsys.readouterr().err


def test_trace_cli_on_testbed(tmp_path, capsys):
    spec = tmp_path / "trace.yaml"
    spec.write_text("kind: trace\nmodality: text-to-image\nmodel: shapes-diffusion\nprompts:\n"
                    "  - {prompt: a red circle, subject: red, counterfactual_subject: blue}\n"
                    "sites: [text_hidden, cross_attention]\nimages: 4\nsteps: 10\nattn_window: 7\nseed: 3000000\n")
    out = tmp_path / "run"
    assert cli(["run", str(spec), "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    p = result["prompts"][0]
    assert p["clean_prob"] >= 0.75 and p["corrupted_prob"] <= 0.25
    # the clean prompt in all 7 cross-attention layers is the clean run, image for image
    assert result["grids"]["cross_attention"]["values"][0] == [[p["clean_prob"]]]
    hidden = torch.tensor(result["grids"]["text_hidden"]["values"][0])
    assert hidden.shape == (2, 8)
    # what recipes/text-to-image/trace_shapes.yaml found: the colour token's own state brings red back, at either
    # layer; the tokens after it (which also saw "blue" through the causal mask) do not
    assert hidden[:, 2].min() >= 0.75 and hidden[:, 3:].max() <= 0.25
    assert {"heatmap.png", "result.json", "result.safetensors", "spec.yaml"} <= {f.name for f in out.iterdir()}
    assert "cross_attention: best" in capsys.readouterr().out


def test_daam_on_the_testbed_maps_the_colour_word_onto_the_object(tmp_path):
    """`lesion run` of a DAAM spec: the colour word's map overlaps the object far more than "a" does
    (the shape word's map outlines the object; README, kind: daam)."""
    spec = (ROOT / "recipes" / "text-to-image" / "daam_shapes.yaml").read_text().replace("images: 16", "images: 4")
    (tmp_path / "daam.yaml").write_text(spec)
    assert cli(["run", str(tmp_path / "daam.yaml"), "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    m = report["mean_iou"]
    assert m["colour_word"] >= 0.4 and m["colour_word"] > m["shape_word"] > m["other_words"]
    assert (tmp_path / "run" / "daam.png").stat().st_size > 0 and (tmp_path / "run" / "maps.safetensors").is_file()
