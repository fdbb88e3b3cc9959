"""The two testbeds with image towers worth looking into: the deep-tower flag VLM and the contrastive scenes CLIP."""

from __future__ import annotations

import json

import pytest
import torch

from interventions.core.paths import CHECKPOINTS
from interventions.modalities.vision_language.llava import VLM_TESTBEDS, image_prompt, load_vlm_testbed
from interventions.modalities.vision_language.tower import ImageToAnswer
from interventions.models.families import FLAGS_VLM_DEEP
from interventions.testbeds.flags import COUNTRIES, render
from recipes.train.train_flags import NAMING, top1

pytestmark = pytest.mark.real_model
MANIFEST = {a["path"]: a for a in json.loads((CHECKPOINTS / "manifest.json").read_text())["artefacts"]}


@pytest.fixture(scope="module")
def deep():
    return load_vlm_testbed(CHECKPOINTS / VLM_TESTBEDS[FLAGS_VLM_DEEP])


def test_deep_flag_testbed_has_its_tower_and_names_held_out_flags(deep):
    vlm, tokenizer, meta = deep
    assert len(vlm.model.vision_tower.encoder.layers) >= 6 and vlm.config.image_seq_length >= 16
    entry = MANIFEST[VLM_TESTBEDS[FLAGS_VLM_DEEP]]
    assert entry["evaluation"]["naming"] >= 0.9 and "--tower deep" in entry["command"]
    which = [i for i in range(len(COUNTRIES)) for _ in range(2)]
    pixels = render(which, torch.Generator().manual_seed(7_000_000))
    hits = top1(vlm, tokenizer, [image_prompt(tokenizer, vlm, NAMING)] * len(which), pixels,
                [COUNTRIES[i][0] for i in which])
    assert sum(hits) / len(hits) >= 0.9
    model = ImageToAnswer(vlm)
    ids = torch.tensor([image_prompt(tokenizer, vlm, NAMING)] * 2)
    with torch.no_grad():
        got = model(model.patch_embeddings(pixels[:2]), ids, torch.ones_like(ids)).logits[:, -1]
        want = vlm(input_ids=ids, pixel_values=pixels[:2]).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def scenes_clip():
    from interventions.modalities.contrastive.scenes_clip import load

    return load()


def test_contrastive_testbed_answers_new_scenes_zero_shot(scenes_clip):
    from interventions.modalities.contrastive.scenes_clip import FILE, zero_shot_accuracy

    model, tokenizer, meta = scenes_clip
    assert len(model.vision_model.encoder.layers) >= 6 and model.vision_model.embeddings.num_patches >= 36
    shipped = MANIFEST[FILE]["zero_shot"]
    assert min(shipped.values()) >= 0.85 and shipped == meta["zero_shot"]
    again = zero_shot_accuracy(model, tokenizer, 120, 5_000_000)          # scenes neither training nor the manifest drew
    for attribute in ("colour", "shape", "position"):
        assert again[attribute] >= shipped[attribute] - 0.1, (attribute, again)


def test_textspan_names_colour_and_shape_heads_that_ablation_confirms(scenes_clip):
    """The issue's goal on a smaller sample than the recipe's: the heads TextSpan names for colour, mean-ablated
    together, halve colour accuracy and cost shape at most 0.10; and the other way round."""
    from interventions import parse_spec
    from interventions.modalities.contrastive.heads import decompose_report

    model, tokenizer, _ = scenes_clip
    spec = parse_spec({"kind": "decompose", "images": ["scenes:random:600@11"],
                       "questions": ["scenes:colour", "scenes:shape"]})
    report, _ = decompose_report(spec, model, tokenizer)
    acc = {q: report["questions"][q]["accuracy"] for q in ("colour", "shape")}
    colour, shape = report["named_ablation"]["colour"], report["named_ablation"]["shape"]
    assert report["named_heads"]["colour"] and report["named_heads"]["shape"]
    assert colour["colour"] <= acc["colour"] / 2 and acc["shape"] - colour["shape"] <= 0.10, (acc, colour)
    assert shape["shape"] <= acc["shape"] / 2 and acc["colour"] - shape["colour"] <= 0.10, (acc, shape)
