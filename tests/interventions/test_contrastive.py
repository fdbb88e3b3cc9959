"""Contrastive models (CLIP) on the one engine, the ViT logit lens and the text-span decomposition, on a tiny seeded
CLIP with the testbed's word tokenizer.

Expected values come from transformers' `CLIPModel` itself (``logits_per_image`` for the spec's captions) with
plain PyTorch hooks on its image tower: noise added to the patch embeddings' output, clean states copied in at
each cell. Nothing of Lesion's but the spec and the documented noise convention is used.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from interventions import parse_spec, run
from interventions.api import engine_model
from interventions.core.conventions import noise_generator
from interventions.lenses.lens import run_lens
from interventions.modalities.contrastive import decompose, scenes_clip
from interventions.modalities.contrastive.heads import decompose_report, head_table
from interventions.modalities.contrastive.inputs import load_image
from interventions.testbeds import scenes
from support import reference as ref

CAPTIONS = ["a red circle", "a blue circle", "a green square", "a red square"]
SPEED_PATHS = [dict(), dict(skip_layers=False), dict(max_batch_rows=5)]
SITES = {"hidden": "block_output", "mlp": "mlp_output", "attention": "attention_output"}


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPConfig, CLIPModel

    tok = scenes_clip.tokenizer()
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=len(tok), max_position_embeddings=40, pad_token_id=0, bos_token_id=2,
                                      eos_token_id=3),
                     vision_config=dict(image_size=24, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=4), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():                       # a sharper softmax than the default scale, so effects are visible
        model.logit_scale.fill_(3.0)
    return model, tok


def _module(clip, site, layer):
    block = clip.vision_model.encoder.layers[layer]
    return {"block_output": block, "block_input": block, "mlp_output": block.mlp, "attention_output": block.self_attn,
            "mlp_key": block.mlp.fc2}[site]


@torch.no_grad()
def _probs(clip, tok, pixels, *, corrupt=None, restores=()) -> torch.Tensor:
    """CLIPModel's own zero-shot probabilities over CAPTIONS for one image, with hooks: `corrupt` = (noise,
    positions) added to the patch embeddings; `restores` = (site, layer, positions, clean states)."""
    pairs = []
    if corrupt is not None:
        eps, where = corrupt

        def add(t, eps=eps, where=where):
            t[:, where] += eps
        pairs.append((clip.vision_model.embeddings, add, False))
    for site, layer, positions, clean in restores:
        def put(t, positions=list(positions), clean=clean):
            t[:, positions] = clean[positions]
        pairs.append((_module(clip, site, layer), put, site in ref.PRE))
    with ref.hooks(pairs):
        out = clip(**tok(CAPTIONS, padding=True, return_tensors="pt"), pixel_values=pixels[None])
    return out.logits_per_image[0].softmax(-1)


def _clean(clip, pixels, site) -> dict:
    n = len(clip.vision_model.encoder.layers)
    return ref.states_at({l: _module(clip, site, l) for l in range(n)}, site in ref.PRE,
                         lambda: clip.get_image_features(pixel_values=pixels[None]))


def test_zero_shot_logits_equal_clipmodel(clip):
    model, tok = clip
    spec = parse_spec({"kind": "lens", "modality": "contrastive", "classes": CAPTIONS,
                       "prompts": [{"image": "scene:red circle"}]})
    zs, names = engine_model(spec, model, tok)
    pixels = load_image("scene:red circle", 24)
    want = model(**tok(CAPTIONS, padding=True, return_tensors="pt"), pixel_values=pixels[None]).logits_per_image[0]
    got = zs(inputs_embeds=zs.patch_embeddings(pixels[None])).logits[0]
    assert torch.allclose(got, want[None].expand_as(got), atol=1e-5)
    assert names.decode([2]) == "a green square"


@pytest.mark.parametrize("corruption", ["noise", "swap"])
def test_trace_cells_equal_plain_hooks(clip, corruption):
    """Every cell (CLS, each patch, all patches) of every site at every layer equals CLIPModel with hooks, on the
    default path, without skipped layers and in chunks of 5 rows."""
    model, tok = clip
    image, other = "scene:red circle left@1", "scene:blue square right@2"
    spec = parse_spec({"kind": "trace", "modality": "contrastive", "classes": CAPTIONS, "corruption": corruption,
                       "samples": 2, "window": 2, "seed": 3, "prompts": [
                           {"image": image, "target": "a red circle", "counterfactual_image": other}]})
    results = [run(spec, model, tok, **options) for options in SPEED_PATHS]
    rec = results[0].prompts[0]
    pixels = load_image(image, 24)
    patches = list(range(1, 10))
    assert rec["columns"][:2] == ["CLS", "p0,0"] and rec["column_positions"][-1] == patches
    if corruption == "noise":
        embeddings = model.vision_model.embeddings(pixel_values=pixels[None])[0]
        sigma = float(embeddings[patches].detach().std())
        assert results[0].meta["sigma"] == pytest.approx(sigma, rel=1e-5)
        gen = noise_generator(3, image, tuple(patches), hashlib.sha256(pixels.numpy().tobytes()).digest())
        eps = torch.randn(2, len(patches), 32, generator=gen) * 3.0 * sigma
        runs = [(pixels, (eps[k], patches)) for k in range(2)]
    else:
        runs = [(load_image(other, 24), None)]

    def want(restores=()):
        return sum(float(_probs(model, tok, px, corrupt=c, restores=restores)[0]) for px, c in runs) / len(runs)

    assert rec["corrupted_prob"] == pytest.approx(want(), abs=1e-6)
    assert rec["clean_prob"] == pytest.approx(float(_probs(model, tok, pixels)[0]), abs=1e-6)
    for name, site in SITES.items():
        clean = _clean(model, pixels, site)
        for layer in range(3):
            window = [layer] if name == "hidden" else ref.window(layer, 2, 3)
            for column, positions in enumerate(rec["column_positions"]):
                expected = want([(site, l, positions, clean[l]) for l in window])
                for result in results:
                    assert float(result.grids[name].values[0, layer, column]) == pytest.approx(expected, abs=1e-5), \
                        (name, layer, column)
    # bidirectional: restoring one patch at the last layer moves CLS only through later layers (none), but an
    # early patch restore changes CLS; no cell was skipped as "equal to the baseline"
    assert results[0].meta["cells_equal_to_baseline"] == 0


def test_patch_cells_equal_plain_hooks_and_sites(clip):
    """`kind: patch` over every site the CLIP table has (embed = the patch embeddings), logit_diff."""
    model, tok = clip
    base, source = "scene:green square@4", "scene:red circle@5"
    sites = ["embed", "block_input", "block_output", "mlp_output", "attention_output", "mlp_key"]
    spec = parse_spec({"kind": "patch", "modality": "contrastive", "classes": CAPTIONS, "metric": "logit_diff",
                       "sites": sites, "image_cells": "block",
                       "prompts": [{"image": base, "source_image": source, "target": "a red circle",
                                    "counterfactual_target": "a green square"}]})
    result = run(spec, model, tok)
    bx, sx = load_image(base, 24), load_image(source, 24)

    @torch.no_grad()
    def diff(pairs):
        with ref.hooks(pairs):
            out = model(**tok(CAPTIONS, padding=True, return_tensors="pt"), pixel_values=bx[None]).logits_per_image[0]
        return float(out[0] - out[2])

    assert result.prompts[0]["base_metric"] == pytest.approx(diff([]), abs=1e-5)
    rec = result.prompts[0]
    for site in sites:
        layers = [None] if site == "embed" else range(3)
        for li, layer in enumerate(layers):
            if site == "embed":
                states = {}
                with ref.hooks([(model.vision_model.embeddings, lambda t: states.__setitem__(0, t[0].clone()), False)]):
                    model.get_image_features(pixel_values=sx[None])
                clean, module, pre = states[0], model.vision_model.embeddings, False
            else:
                clean, module, pre = _clean(model, sx, site)[layer], _module(model, site, layer), site in ref.PRE
            for column, positions in enumerate(rec["column_positions"]):
                def put(t, positions=list(positions), clean=clean):
                    t[:, positions] = clean[positions]
                expected = diff([(module, put, pre)])
                assert float(result.grids[site].values[0, li, column]) == pytest.approx(expected, abs=1e-4), \
                    (site, layer, column)


def test_attribution_runs_on_clip_and_matches_first_order_hooks(clip):
    """`method: attribution` on a contrastive trace: the hidden grid at the last layer is the first-order term
    computed with plain autograd on CLIPModel."""
    model, tok = clip
    image, other = "scene:red circle@1", "scene:blue square@2"
    spec = parse_spec({"kind": "trace", "modality": "contrastive", "classes": CAPTIONS, "corruption": "swap",
                       "method": "attribution", "sites": ["hidden"], "image_cells": "each",
                       "prompts": [{"image": image, "target": "a red circle", "counterfactual_image": other}]})
    result = run(spec, model, tok)
    pixels, corrupted = load_image(image, 24), load_image(other, 24)
    clean = _clean(model, pixels, "block_output")
    block = model.vision_model.encoder.layers[1]
    kept = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["x"] = out
    handle = block.register_forward_hook(keep)
    try:
        out = model(**tok(CAPTIONS, padding=True, return_tensors="pt"), pixel_values=corrupted[None])
        p = out.logits_per_image[0].softmax(-1)[0]
        p.backward()
    finally:
        handle.remove()
    grad, state = kept["x"].grad[0], kept["x"][0].detach()
    for column, positions in enumerate(result.prompts[0]["column_positions"]):
        expected = float(p.detach()) + float(((clean[1] - state) * grad)[positions].sum())
        assert float(result.grids["hidden"].values[0, 1, column]) == pytest.approx(expected, abs=1e-5)


def test_vit_logit_lens_reads_through_post_norm_and_projection(clip):
    model, tok = clip
    spec = parse_spec({"kind": "lens", "modality": "contrastive", "classes": CAPTIONS,
                       "prompts": [{"image": "scene:red circle@1", "target": "a red square"}]})
    zs, names = engine_model(spec, model, tok)
    result = run_lens(spec, zs, names)
    pixels = load_image("scene:red circle@1", 24)
    states = _clean(model, pixels, "block_output")
    text = torch.nn.functional.normalize(model.get_text_features(**tok(CAPTIONS, padding=True, return_tensors="pt"))
                                         .pooler_output, dim=-1)
    for layer in range(3):
        for position in (0, 4):
            e = model.visual_projection(model.vision_model.post_layernorm(states[layer][position]))
            p = (model.logit_scale.exp() * torch.nn.functional.normalize(e, dim=-1) @ text.T).softmax(-1).detach()
            assert float(result.grids["logit_lens"].values[0, layer, position]) == pytest.approx(float(p[3]), abs=1e-5)
    assert float(result.grids["logit_lens"].values[0, 2, 0]) == pytest.approx(result.prompts[0]["clean_prob"], abs=1e-6)
    assert result.prompts[0]["columns"][0] == "CLS"


def test_decomposition_sums_back_and_a_head_equals_the_hand_computation(clip):
    model, tok = clip
    g = torch.Generator().manual_seed(0)
    pixels = scenes.render([scenes.sample_scene(g) for _ in range(6)], g)
    c = decompose.contributions(model, pixels)
    own = model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(c.embeddings, own, atol=1e-6)
    assert (c.total() - own).abs().max() < 1e-5
    # one head by hand: the model's own attention with every other head's values zeroed, minus the output bias,
    # then the final norm's linear part (σ of this forward) and the visual projection
    layer, head, dk = 1, 2, 8
    attn = model.vision_model.encoder.layers[layer].self_attn
    finals = {}

    def only(module, args, out):
        mask = torch.zeros_like(out)
        mask[..., head * dk:(head + 1) * dk] = 1
        return out * mask
    with ref.hooks([(attn, lambda t: finals.__setitem__("attn", t[:, 0].clone()), False)]):
        handle = attn.v_proj.register_forward_hook(only)
        try:
            model.get_image_features(pixel_values=pixels)
        finally:
            handle.remove()
    with torch.no_grad():
        state = model.vision_model(pixel_values=pixels).last_hidden_state[:, 0]
        term = finals["attn"] - attn.out_proj.bias
        norm = model.vision_model.post_layernorm
        sigma = (state.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        by_hand = (norm.weight * (term - term.mean(-1, keepdim=True)) / sigma) @ model.visual_projection.weight.T
    assert torch.allclose(c.per_head[:, layer, head], by_hand, atol=1e-5)


def test_text_span_finds_the_directions_a_head_writes():
    """A head writing along three of 40 random text directions: TextSpan picks those three first, and their shares
    add up to all of its variance."""
    g = torch.Generator().manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=-1)
    q, _ = torch.linalg.qr(texts[[5, 17, 31]].T)
    texts[[5, 17, 31]] = q.T                                     # orthonormal, so the shares are exact
    C = torch.randn(200, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0]) @ texts[[5, 17, 31]]
    span = decompose.text_span(C, texts, 3, 8)
    assert span.texts == [5, 17, 31]
    assert sum(span.shares) == pytest.approx(1.0, abs=1e-6)
    assert span.shares[0] > span.shares[1] > span.shares[2]


def test_decompose_report_names_and_ablates(clip):
    model, tok = clip
    spec = parse_spec({"kind": "decompose", "images": ["scenes:random:40@7"], "spans": 3, "top_heads": 2,
                       "questions": ["scenes:colour", "scenes:shape"]})
    report, tensors = decompose_report(spec, model, tok)
    assert report["decomposition_max_error"] < 1e-5 and report["images"] == 40
    assert tensors["heads"].shape == (40, 3, 4, 16)
    colour = report["questions"]["colour"]
    assert colour["scored_against"] == "truth" and len(colour["layer_ablation"]) == 4
    assert colour["layer_ablation"][0] == colour["accuracy"]              # nothing ablated
    assert len(report["heads"]) == 12 and all(len(h["texts"]) == 3 for h in report["heads"])
    assert set(report["named_heads"]) <= set(scenes.ATTRIBUTES)
    assert "| L" in head_table(report)


def test_contrastive_refusals(clip):
    model, tok = clip
    from interventions.core.errors import SpecError

    bad = [({"image": "scene:red blob", "target": "a red circle"}, "scene:"),
           ({"image": "scene:red circle", "target": "a yellow circle"}, "a class of `classes`")]
    for prompt, says in bad:
        spec = parse_spec({"kind": "trace", "modality": "contrastive", "classes": CAPTIONS, "prompts": [prompt]})
        with pytest.raises(SpecError, match=says):
            run(spec, model, tok)
    with pytest.raises(SpecError, match="classes"):
        parse_spec({"kind": "trace", "modality": "contrastive", "classes": ["only one"],
                    "prompts": [{"image": "scene:red circle", "target": "only one"}]})


def test_memory_budget_and_batching_give_the_same_grid(clip):
    """Under a memory budget the plan packs fewer rows per chunk; the grid is the same."""
    model, tok = clip
    spec = parse_spec({"kind": "trace", "modality": "contrastive", "classes": CAPTIONS, "samples": 2,
                       "prompts": [{"image": "scene:red circle@1", "target": "a red circle"},
                                   {"image": "scene:blue circle@2", "target": "a blue circle"}]})
    free = run(spec, model, tok)
    bounded = run(spec, model, tok, memory=3 * 2**20)
    assert bounded.meta["chunks"] > free.meta["chunks"]
    for name in free.grids:
        assert torch.allclose(free.grids[name].values, bounded.grids[name].values, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("rule", ["relp", "qk-fix", "atp-star"])
def test_attribution_rules_on_clip(clip, rule):
    """Every attribution rule runs on CLIP's image tower (bidirectional attention, LayerNorm, QuickGELU) and
    leaves CLIPModel as it was; the QK fix approaches plain attribution patching as the noise shrinks
    (0.001 σ: within 1% of the largest effect)."""
    model, tok = clip
    before = model.vision_model.config._attn_implementation
    data = {"kind": "trace", "modality": "contrastive", "classes": CAPTIONS, "method": "attribution", "window": 2,
            "noise": 0.001, "samples": 2, "sites": ["hidden", "mlp", "attention"], "image_cells": "each",
            "prompts": [{"image": "scene:red circle@1", "target": "a red circle"}]}
    plain = run(parse_spec(data), model, tok)
    ruled = run(parse_spec({**data, "rule": rule}), model, tok)
    assert ruled.meta["rule"] == rule and model.vision_model.config._attn_implementation == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    for name in ("hidden", "mlp", "attention"):
        a, b = plain.indirect_effect(name), ruled.indirect_effect(name)
        assert bool(torch.isfinite(b).all())
        if rule == "qk-fix":
            assert float((a - b).abs().max()) < 0.01 * float(a.abs().max()), name
