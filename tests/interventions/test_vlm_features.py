"""Dictionaries on a vision-language model's image tokens, on a tiny seeded LLaVA: `kind: features` reads
the image tokens as plain hooks on the whole LLaVA forward compute them, the answer losses equal a hand
computation, and training reads exactly the image tokens of each image."""

from __future__ import annotations

import pytest
import torch

from interventions import parse_spec
from interventions.features.images import answer_losses, image_reader
from interventions.features.readout import run_features
from interventions.features.training import train_dictionary
from interventions.modalities.vision_language.llava import image_positions, image_prompt, load_image
from support import reference as ref
from support.models import make_vlm_pair, random_dictionary

PROMPT = " the capital of"
COUNTRIES = ["France", "Japan", "Italy"]


@pytest.fixture(scope="module")
def pair():
    return make_vlm_pair()


@torch.no_grad()
def states(vlm, tokenizer, image: str, layer: int, edit=None):
    """The layer-`layer` output at every position and the last position's logits, for `image` and `PROMPT`
    through the whole LLaVA forward; `edit(x, image positions)` may change the output in place."""
    ids = image_prompt(tokenizer, vlm, PROMPT)
    at = image_positions(ids, vlm)
    kept = {}

    def hook(x):
        if edit is not None:
            edit(x, at)
        kept["x"] = x[0].clone()

    with ref.hooks([(vlm.model.language_model.layers[layer], hook, False)]):
        out = vlm(input_ids=torch.tensor([ids]), pixel_values=load_image(image, vlm)[None])
    return kept["x"], at, out.logits[0, -1]


def test_kind_features_reads_the_image_tokens_as_plain_hooks_compute_them(pair, tmp_path):
    _, vlm, tokenizer = pair
    d = random_dictionary("topk")
    d.save(tmp_path / "sae")
    examples = [{"image": f"flag:{c}@{s}", "prompt": PROMPT, "concepts": [c]} for c in COUNTRIES for s in (1, 2)]
    spec = parse_spec({"kind": "features", "model": "tiny", "dictionary": str(tmp_path / "sae"), "examples": examples,
                       "top": 3, "describe": 3, "neurons": True})
    assert spec.modality == "vision-language" and spec.positions == "image"
    report = run_features(spec, vlm, tokenizer)
    for i, e in enumerate(examples):
        x, at, _ = states(vlm, tokenizer, e["image"], 1)
        assert [cell["token"] for cell in report["tokens"][i]] == [f"[image {k}]" for k in range(len(at))]
        f = d.encode(x[at])
        for p, cell in enumerate(report["tokens"][i]):
            values, index = f[p].topk(3)
            assert [u for u, _ in cell["top"]] == [int(j) for v, j in zip(values, index) if v > 0]
    assert [row["concept"] for row in report["concepts"]] == sorted(COUNTRIES)
    assert report["positions"] == "image"
    every = run_features(spec.model_copy(update={"positions": "all"}), vlm, tokenizer)
    assert len(every["tokens"][0]) == len(image_prompt(tokenizer, vlm, PROMPT))


def test_answer_losses_equal_a_hand_computation(pair):
    _, vlm, tokenizer = pair
    d = random_dictionary("standard")
    items = [("flag:France@3", " paris"), ("flag:Japan@4", " rome"), ("flag:Italy@5", " rome")]
    got = answer_losses(vlm, tokenizer, PROMPT, batch=2)(d, items)
    want = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    def splice(x, at):
        x[:, at] = d(x[:, at])

    def zero(x, at):
        x[:, at] = 0.0

    edits = {"clean": None, "spliced": splice, "zero": zero}
    for image, answer in items:
        target = torch.tensor([tokenizer(answer, add_special_tokens=False)["input_ids"][0]])
        for name, edit in edits.items():
            *_, logits = states(vlm, tokenizer, image, 1, edit)
            want[name] += float(torch.nn.functional.cross_entropy(logits[None].float(), target)) / len(items)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-4), name
    assert got["zero"] != pytest.approx(got["clean"], abs=1e-3)


def test_training_on_images_reads_each_image_at_its_image_tokens(pair):
    _, vlm, tokenizer = pair
    items = [(f"flag:{c}@{s}", " rome") for c in COUNTRIES for s in range(1, 5)]
    read = image_reader(vlm, tokenizer, PROMPT)
    got = read(items[:2])
    x, at, _ = states(vlm, tokenizer, items[0][0], 1)
    assert got[0][1] == at and len(at) == 4
    d, report = train_dictionary(vlm, tokenizer, items, random_dictionary("topk").where, heldout=0.25, features=16,
                                 k=2, batch_tokens=4, read=read, losses=answer_losses(vlm, tokenizer, PROMPT), log=None)
    assert report["train_tokens"] == 9 * 4 and report["heldout_tokens"] == 3 * 4
    assert 0 <= report["l0"] <= 2 and report["ce_clean"] > 0


def test_flag_patch_colours_and_dissection_by_hand():
    from recipes.studies.flag_iou import dissect, patch_colours

    image = torch.full((3, 32, 32), 0.5)                        # the grey background
    image[:, :, :16] = torch.tensor([0.85, 0.1, 0.1])[:, None, None]        # left half red
    image[:, 16:, 16:] = torch.tensor([0.1, 0.2, 0.7])[:, None, None]       # bottom right blue
    image[:, 14:16, 16:] = torch.tensor([0.95, 0.95, 0.95])[:, None, None]  # a white line: 2 of 16 rows of patch 1
    masks = patch_colours(image, 2, 0.1)                          # patches 0 1 / 2 3, colours in PALETTE order
    assert masks[:, 0].tolist() == [True, False, True, False]                 # red
    assert masks[:, 1].tolist() == [False, True, False, False]                # white: 12.5% of patch 1
    assert masks[:, 2].tolist() == [False, False, False, True]                # blue
    assert not masks[:, 3:].any()
    acts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]] * 2)   # unit 0: red; unit 1: not red
    red = torch.tensor([[True], [False], [True], [False]] * 2)
    row = dissect(acts, red, torch.arange(4), torch.arange(4, 8))[0]
    assert row["unit"] == 0 and row["iou"] == 1.0
