"""Grids from a VLM's first vision layer through the projector into its language model (`ImageToAnswer`), on a tiny
seeded LLaVA with a 3-layer tower over 16 patches.

Expected values come from `LlavaForConditionalGeneration`'s own forward (``input_ids`` and ``pixel_values``) with
plain PyTorch hooks: noise added to the tower's patch embeddings, clean states copied into tower layers (at CLS
and patches) and language-model layers (at tokens).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from interventions import parse_spec, run
from interventions.core.conventions import noise_generator
from interventions.modalities.vision_language.llava import VisionSpec, image_positions, image_prompt
from interventions.modalities.vision_language.tower import ImageToAnswer
from interventions.testbeds.flags import COUNTRIES, render
from support import reference as ref
from support.models import make_vlm_pair

QUESTION = " the capital of"
SPEED_PATHS = [dict(), dict(skip_layers=False), dict(max_batch_rows=3)]


@pytest.fixture(scope="module")
def pair():
    _, vlm, tok = make_vlm_pair(VisionSpec(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                                           num_hidden_layers=3, num_attention_heads=4))
    return vlm, tok


def flag(country: str) -> torch.Tensor:
    return render([[c for c, _ in COUNTRIES].index(country)], torch.Generator().manual_seed(0), jitter=False)[0]


def _module(vlm, site, layer):
    if site.startswith("vision_"):
        block = vlm.model.vision_tower.encoder.layers[layer]
        site = site[len("vision_"):]
    else:
        block = vlm.model.language_model.layers[layer]
    return {"block_output": block, "mlp_output": block.mlp, "attention_output": getattr(block, "self_attn"),
            "block_input": block}[site]


def _clean(vlm, ids, pixels, site) -> dict:
    tower = site.startswith("vision_")
    n = len(vlm.model.vision_tower.encoder.layers if tower else vlm.model.language_model.layers)
    return ref.states_at({l: _module(vlm, site, l) for l in range(n)}, site.endswith("block_input"),
                         lambda: vlm(input_ids=torch.tensor([ids]), pixel_values=pixels[None]))


@torch.no_grad()
def _logits(vlm, ids, pixels, *, noise=None, restores=()):
    pairs = []
    if noise is not None:
        def add(t, noise=noise):
            t[:, 1:] += noise
        pairs.append((vlm.model.vision_tower.embeddings, add, False))
    for site, layer, positions, clean in restores:
        def put(t, positions=list(positions), clean=clean):
            t[:, positions] = clean[positions]
        pairs.append((_module(vlm, site, layer), put, site.endswith("block_input")))
    with ref.hooks(pairs):
        return vlm(input_ids=torch.tensor([ids]), pixel_values=pixels[None]).logits[0, -1]


def test_image_to_answer_equals_the_llava_forward(pair):
    vlm, tok = pair
    model = ImageToAnswer(vlm)
    ids = image_prompt(tok, vlm, QUESTION)
    pixels = torch.stack([flag("France"), flag("Japan")])
    context = torch.tensor([ids, ids])
    got = model(inputs_embeds=model.patch_embeddings(pixels), context_ids=context,
                context_mask=torch.ones_like(context)).logits
    want = vlm(input_ids=context, pixel_values=pixels).logits[:, -1]
    assert got.shape[1] == 17 and torch.allclose(got[:, -1], want, atol=1e-5) and torch.allclose(got[:, 0], want, atol=1e-5)


@pytest.mark.parametrize("corruption", ["patch_noise", "swap"])
def test_tower_and_language_model_cells_equal_plain_hooks(pair, corruption):
    """One plan: tower grids (layers × CLS, each patch, all patches) and language-model grids (layers × tokens),
    every cell equal to the LLaVA forward with hooks, on every speed path."""
    vlm, tok = pair
    spec = parse_spec({"kind": "trace", "corruption": corruption, "samples": 2, "window": 2, "seed": 4,
                       "sites": ["hidden", "mlp"], "vision_sites": ["hidden", "mlp", "attention"],
                       "prompts": [{"image": "flag:France", "prompt": QUESTION, "target": "paris",
                                    "counterfactual_image": "flag:Italy"}]})
    results = [run(spec, vlm, tok, **options) for options in SPEED_PATHS]
    rec = results[0].prompts[0]
    pixels, other = flag("France"), flag("Italy")
    ids = image_prompt(tok, vlm, QUESTION)
    assert rec["context_columns"][0] == tok.decode(ids[:1]) and rec["image_positions"] == image_positions(ids, vlm)
    assert rec["columns"][0] == "CLS" and len(rec["columns"]) == 1 + 16 + 1
    if corruption == "patch_noise":
        embeds = vlm.model.vision_tower.embeddings(pixel_values=pixels[None])[0]
        sigma = float(embeds[1:].detach().std())
        assert results[0].meta["sigma"] == pytest.approx(sigma, rel=1e-5)
        gen = noise_generator(4, QUESTION, tuple(range(1, 17)), hashlib.sha256(pixels.numpy().tobytes()).digest())
        eps = torch.randn(2, 16, 24, generator=gen) * 3.0 * sigma
        runs = [(pixels, eps[k]) for k in range(2)]
    else:
        runs = [(other, None)]
    tid = tok("paris", add_special_tokens=False).input_ids[0]

    def want(restores=()):
        return sum(float(_logits(vlm, ids, px, noise=e, restores=restores).softmax(-1)[tid]) for px, e in runs) / len(runs)

    assert rec["corrupted_prob"] == pytest.approx(want(), abs=1e-6)
    grids = {"vision_hidden": ("vision_block_output", 3, "columns"), "vision_mlp": ("vision_mlp_output", 3, "columns"),
             "vision_attention": ("vision_attention_output", 3, "columns"),
             "hidden": ("block_output", 4, "context_columns"), "mlp": ("mlp_output", 4, "context_columns")}
    for name, (site, n, columns) in grids.items():
        clean = _clean(vlm, ids, pixels, site)
        assert results[0].grids[name].context == (columns == "context_columns")
        for layer in range(n):
            window = [layer] if name.endswith("hidden") else ref.window(layer, 2, n)
            for column, positions in enumerate(rec[columns.replace("columns", "column_positions")]):
                expected = want([(site, l, positions, clean[l]) for l in window])
                for result in results:
                    assert float(result.grids[name].values[0, layer, column]) == pytest.approx(expected, abs=1e-5), \
                        (name, layer, column)


def test_tower_patch_and_attribution(pair):
    """`kind: patch` with tower and language-model grids equals hooks; attribution runs on the same plan and its
    last-layer tower hidden cell at CLS is the first-order term."""
    vlm, tok = pair
    spec = parse_spec({"kind": "patch", "metric": "logit_diff", "sites": ["block_output"],
                       "vision_sites": ["block_output"], "image_cells": "block",
                       "prompts": [{"image": "flag:France", "source_image": "flag:Japan", "base": QUESTION,
                                    "target": "paris", "counterfactual_target": "tokyo"}]})
    result = run(spec, vlm, tok)
    base, source = flag("France"), flag("Japan")
    ids = image_prompt(tok, vlm, QUESTION)
    t, c = (tok(w, add_special_tokens=False).input_ids[0] for w in ("paris", "tokyo"))
    rec = result.prompts[0]
    for name, site, n, key in (("vision_block_output", "vision_block_output", 3, "column_positions"),
                               ("block_output", "block_output", 4, "context_column_positions")):
        clean = _clean(vlm, ids, source, site)
        for layer in range(n):
            for column, positions in enumerate(rec[key]):
                out = _logits(vlm, ids, base, restores=[(site, layer, positions, clean[layer])])
                assert float(result.grids[name].values[0, layer, column]) == pytest.approx(float(out[t] - out[c]),
                                                                                          abs=1e-5), (name, layer)
    spec = parse_spec({"kind": "trace", "corruption": "swap", "method": "attribution", "sites": ["hidden"],
                       "vision_sites": ["hidden"], "image_cells": "each",
                       "prompts": [{"image": "flag:France", "prompt": QUESTION, "target": "paris",
                                    "counterfactual_image": "flag:Italy"}]})
    attribution = run(spec, vlm, tok)
    other = flag("Italy")
    clean = _clean(vlm, ids, base, "vision_block_output")
    kept = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["x"] = out
    handle = vlm.model.vision_tower.encoder.layers[2].register_forward_hook(keep)
    try:
        p = vlm(input_ids=torch.tensor([ids]), pixel_values=other[None]).logits[0, -1].softmax(-1)[
            tok("paris", add_special_tokens=False).input_ids[0]]
        p.backward()
    finally:
        handle.remove()
    term = ((clean[2] - kept["x"][0].detach()) * kept["x"].grad[0])[0].sum()
    assert float(attribution.grids["vision_hidden"].values[0, 2, 0]) == pytest.approx(float(p.detach() + term), abs=1e-5)


def test_tower_lens_reads_each_layer_through_projector_and_language_model(pair):
    """Each tower layer's states, put where the feature layer's go, give the model's answer: by hand, the LLaVA
    forward told to read its image features after that layer (`vision_feature_layer`)."""
    from interventions.lenses.lens import run_lens

    vlm, tok = pair
    spec = parse_spec({"kind": "lens", "tower": True, "prompts": [{"image": "flag:France", "prompt": QUESTION,
                                                                    "target": "paris"}]})
    result = run_lens(spec, vlm, tok)
    ids = image_prompt(tok, vlm, QUESTION)
    tid = tok("paris", add_special_tokens=False).input_ids[0]
    for layer in range(3):
        with torch.no_grad():
            want = float(vlm(input_ids=torch.tensor([ids]), pixel_values=flag("France")[None],
                             vision_feature_layer=layer + 1).logits[0, -1].softmax(-1)[tid])
        assert float(result.grids["tower_lens"].values[0, layer, 0]) == pytest.approx(want, abs=1e-5)
    assert result.prompts[0]["clean_prob"] == pytest.approx(float(result.grids["tower_lens"].values[0, 2, 0]), abs=1e-6)


def test_tower_specs_refuse_what_cannot_reach_the_tower():
    from interventions.core.errors import SpecError

    prompt = {"image": "flag:France", "prompt": QUESTION, "target": "paris"}
    with pytest.raises(SpecError, match="patch_noise"):
        parse_spec({"kind": "trace", "corruption": "noise", "vision_sites": ["hidden"], "prompts": [prompt]})
    with pytest.raises(SpecError, match="vision_sites"):
        parse_spec({"kind": "trace", "corruption": "patch_noise", "vision_sites": ["blocks"], "prompts": [prompt]})
    with pytest.raises(SpecError, match="tower"):
        parse_spec({"kind": "lens", "tower": True, "layers": [0], "prompts": [prompt]})
