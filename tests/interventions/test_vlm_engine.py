"""VLM traces and patches on the one engine (`interventions.engine.plan` + `engine`), on a tiny seeded LLaVA.

Expected values come from plain PyTorch hooks on the whole LLaVA forward (``input_ids`` and
``pixel_values``, the model merging its own image features): noise added to the projector's output
or to the constraint's token embeddings, the counterfactual image's pixels, and clean states copied
in at each cell. Nothing of Lesion's but the spec and the documented noise convention is used.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from interventions import compile_spec, parse_spec, run
from interventions.core.conventions import noise_generator
from interventions.modalities.vision_language.llava import IMAGE_TOKEN, image_positions, image_prompt
from interventions.testbeds.flags import COUNTRIES, render
from support import reference as ref
from support.models import make_vlm_pair

QUESTION = " the capital of"
SPEED_PATHS = [dict(), dict(share_prefix=False, skip_layers=False), dict(share_prefix=False),
               dict(skip_layers=False), dict(max_batch_rows=3)]


@pytest.fixture(scope="module")
def pair():
    return make_vlm_pair()


def flag(country: str) -> torch.Tensor:
    return render([[c for c, _ in COUNTRIES].index(country)], torch.Generator().manual_seed(0), jitter=False)[0]


def _module(vlm, site, layer):
    block = vlm.model.language_model.layers[layer]
    return {"block_output": block, "mlp_output": block.mlp, "attention_output": block.self_attn,
            "mlp_key": block.mlp.down_proj, "block_input": block}[site]


def _clean(vlm, ids, pixels, site) -> dict:
    """{layer: (T, d)} clean states of `site` with plain hooks."""
    return ref.states_at({l: _module(vlm, site, l) for l in range(len(vlm.model.language_model.layers))},
                         site in ref.PRE, lambda: vlm(input_ids=torch.tensor([ids]), pixel_values=pixels[None]))


@torch.no_grad()
def _adder(noise, where):
    """An in-place hook body (it returns None, so the hook leaves the output object as it is)."""
    def fn(t):
        t[:, where] += noise.to(t.dtype)
    return fn


@torch.no_grad()
def _logits(vlm, ids, pixels, *, corrupt=None, restores=()) -> torch.Tensor:
    """Last-position logits of one plain forward: `corrupt` = (module, noise, positions) adds noise to
    that module's output; `restores` = (site, layer, positions, clean states)."""
    pairs = []
    if corrupt is not None:
        module, eps, where = corrupt
        pairs.append((module, _adder(eps, where), False))
    for site, layer, positions, clean in restores:
        def put(t, positions=list(positions), clean=clean):
            t[:, positions] = clean[positions]
        pairs.append((_module(vlm, site, layer), put, site in ref.PRE))
    with ref.hooks(pairs):
        return vlm(input_ids=torch.tensor([ids]), pixel_values=pixels[None]).logits[0, -1]


@pytest.mark.parametrize("corruption", ["noise", "swap", "text"])
def test_vlm_trace_equals_plain_hook_reference_on_every_speed_path(pair, corruption):
    """Every cell (each image token, the aggregated image cell, every text token) of every site equals
    plain hooks, with the shared prefix, skipped layers and small chunks on or off."""
    _, vlm, tok = pair
    spec = parse_spec({"kind": "trace", "model": "tiny-llava", "corruption": corruption, "samples": 2, "window": 2,
                       "seed": 5, "prompts": [{"image": "flag:France", "prompt": QUESTION, "target": "paris",
                                               "counterfactual_image": "flag:Italy", "constraint": "capital"}]})
    results = [run(spec, vlm, tok, **options) for options in SPEED_PATHS]
    rec = results[0].prompts[0]
    pixels, other = flag("France"), flag("Italy")
    ids = image_prompt(tok, vlm, QUESTION)
    img = image_positions(ids, vlm)
    assert rec["tokens"] == [tok.decode([i]) for i in ids] and rec["image_positions"] == img
    d = vlm.config.text_config.hidden_size
    if corruption == "noise":                # noise on the projected image tokens, σ their std
        subject = img
        projected = {}

        def grab(t):
            projected["x"] = t[0].clone()
        with ref.hooks([(vlm.model.multi_modal_projector, grab, False)]), torch.no_grad():
            vlm(input_ids=torch.tensor([ids]), pixel_values=pixels[None])
        projected = projected["x"]
        sigma, module, where = float(projected.std()), vlm.model.multi_modal_projector, list(range(len(img)))
    elif corruption == "text":               # noise on the constraint's token embeddings, σ their std
        subject = [p for p, t in enumerate(tok.convert_ids_to_tokens(ids)) if "capital" in t]
        embeds = vlm.get_input_embeddings().weight[[ids[p] for p in subject]].detach()
        sigma, module, where = float(embeds.std()), vlm.model.language_model.embed_tokens, subject
    if corruption != "swap":
        assert rec["subject_positions"] == subject and results[0].meta["sigma"] == pytest.approx(sigma, rel=1e-5)
        gen = noise_generator(5, QUESTION, tuple(subject), hashlib.sha256(pixels.numpy().tobytes()).digest())
        eps = torch.randn(2, len(subject), d, generator=gen) * 3.0 * sigma
        runs = [(pixels, (module, eps[k], where)) for k in range(2)]
    else:
        runs = [(other, None)]
    tid = tok("paris", add_special_tokens=False).input_ids[0]

    def want(restores=()):
        return sum(float(_logits(vlm, ids, px, corrupt=c, restores=restores).softmax(-1)[tid]) for px, c in runs) / len(runs)

    assert rec["corrupted_prob"] == pytest.approx(want(), abs=1e-6)
    assert rec["columns"][rec["image_column"]] == f"{IMAGE_TOKEN}×{len(img)}"
    checked = 0
    for name, site in (("hidden", "block_output"), ("mlp", "mlp_output"), ("attention", "attention_output")):
        clean = _clean(vlm, ids, pixels, site)
        for layer in range(4):
            window = [layer] if name == "hidden" else ref.window(layer, 2, 4)
            for column, positions in enumerate(rec["column_positions"]):
                expected = want([(site, l, positions, clean[l]) for l in window])
                for result in results:
                    assert float(result.grids[name].values[0, layer, column]) == pytest.approx(expected, abs=1e-5), \
                        (name, layer, column)
                checked += 1
    assert checked == 3 * 4 * (len(ids) + 1)
    assert abs(rec["clean_prob"] - rec["corrupted_prob"]) > 1e-3


@pytest.mark.parametrize("metric", ["prob", "logit_diff"])
def test_image_to_image_patch_equals_plain_hook_reference(pair, metric):
    """`kind: patch` with images: states of the run on another image (and another question) patched
    into the run on this image, at image-token and text positions, on every speed path."""
    _, vlm, tok = pair
    spec = parse_spec({"kind": "patch", "model": "tiny-llava", "metric": metric, "window": 2,
                       "sites": ["block_output", "mlp_output", "mlp_key"],
                       "prompts": [{"image": "flag:France", "base": QUESTION, "source_image": "flag:Japan",
                                    "source": " the capital in", "target": "paris"}]})
    results = [run(spec, vlm, tok, **options) for options in SPEED_PATHS]
    rec = results[0].prompts[0]
    base_ids, source_ids = image_prompt(tok, vlm, QUESTION), image_prompt(tok, vlm, " the capital in")
    base_px, source_px = flag("France"), flag("Japan")
    tid, cid = rec["answer_id"], rec["counterfactual_id"]
    assert tid == tok("paris", add_special_tokens=False).input_ids[0]
    assert cid == int(_logits(vlm, base_ids, base_px).argmax())     # default: the base's top-1

    def m(logits):
        return float(logits.softmax(-1)[tid]) if metric == "prob" else float(logits[tid] - logits[cid])

    assert rec["base_metric"] == pytest.approx(m(_logits(vlm, base_ids, base_px)), abs=1e-5)
    for site in spec.sites:
        source = _clean(vlm, source_ids, source_px, site)
        for layer in range(4):
            window = ref.window(layer, 2, 4)
            for column, positions in enumerate(rec["column_positions"]):
                expected = m(_logits(vlm, base_ids, base_px, restores=[(site, l, positions, source[l]) for l in window]))
                for result in results:
                    assert float(result.grids[site].values[0, layer, column]) == pytest.approx(expected, abs=1e-5), \
                        (site, layer, column)


def test_a_text_only_prompt_through_the_vlm_gives_the_language_model_s_grid(pair):
    """The same prompt, subject and seed: the VLM engine (embeddings in, noise where they enter the first
    layer) and the LM engine on the bare language model (ids in, noise on the embedding lookup)."""
    lm, vlm, tok = pair
    prompt = "the eiffel tower is located in the city of"
    common = {"samples": 3, "seed": 2, "window": 3, "model": "tiny"}
    vl = parse_spec({"kind": "trace", "modality": "vision-language", "corruption": "text", **common,
                     "prompts": [{"prompt": prompt, "target": " paris", "constraint": "eiffel tower"}]})
    language = parse_spec({"kind": "trace", **common,
                           "prompts": [{"prompt": prompt, "subject": "eiffel tower", "target": " paris"}]})
    a, b = run(vl, vlm, tok), run(language, lm, tok)
    assert a.prompts[0]["tokens"] == b.prompts[0]["tokens"] and a.meta["sigma"] == b.meta["sigma"]
    assert a.prompts[0]["corrupted_prob"] == pytest.approx(b.prompts[0]["corrupted_prob"], abs=1e-6)
    for name in b.grids:
        torch.testing.assert_close(a.grids[name].values, b.grids[name].values, atol=1e-6, rtol=0)


def test_several_prompts_equal_each_alone_in_any_order(pair):
    """Prompts of different lengths (text-only among them) traced together equal each traced alone:
    a prompt's noise is keyed by the prompt itself, never by its index; the noise is seeded. (σ is
    given: by default it is pooled over the spec's prompts, as ROME's is.)"""
    _, vlm, tok = pair
    prompts = [{"image": "flag:France", "prompt": QUESTION, "target": "paris", "constraint": "capital"},
               {"image": "flag:Japan", "prompt": " its capital city is in", "target": "rome",
                "constraint": "capital city"},
               {"prompt": "the capital of the colosseum is", "target": "rome", "constraint": "colosseum"}]
    spec = parse_spec({"kind": "trace", "modality": "vision-language", "model": "m", "corruption": "text",
                       "sigma": 0.5, "samples": 2, "window": 2, "seed": 3, "sites": ["mlp"], "prompts": prompts})
    together = run(spec, vlm, tok, max_batch_rows=5)
    backwards = run(spec.model_copy(update={"prompts": spec.prompts[::-1]}), vlm, tok)
    for i in range(3):
        alone = run(spec.model_copy(update={"prompts": spec.prompts[i:i + 1]}), vlm, tok)
        n = together.grids["mlp"].lengths[i]
        torch.testing.assert_close(together.grids["mlp"].values[i, :, :n], alone.grids["mlp"].values[0], atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(backwards.grids["mlp"].values[2 - i, :, :n], alone.grids["mlp"].values[0],
                                   atol=1e-5, rtol=0)
        assert torch.isnan(together.grids["mlp"].values[i, :, n:]).all()
    other_seed = run(spec.model_copy(update={"seed": 4}), vlm, tok)
    assert not torch.allclose(other_seed.grids["mlp"].values.nan_to_num(), together.grids["mlp"].values.nan_to_num())


def test_image_cells_choose_the_columns_and_not_the_values(pair):
    _, vlm, tok = pair
    data = {"kind": "trace", "model": "m", "samples": 2, "sites": ["hidden"],
            "prompts": [{"image": "flag:Kenya", "prompt": QUESTION, "target": "nairobi"}]}
    out = {cells: run(parse_spec({**data, "image_cells": cells}), vlm, tok) for cells in ("each", "block", "both")}
    both = out["both"].prompts[0]
    values = {cells: {tuple(p): out[cells].grids["hidden"].values[0, :, c]
                      for c, p in enumerate(out[cells].prompts[0]["column_positions"])} for cells in out}
    img = tuple(both["image_positions"])
    assert img in values["block"] and (img[0],) not in values["block"] and img not in values["each"]
    assert set(values["both"]) == set(values["block"]) | set(values["each"])
    for cells in ("each", "block"):
        for key, v in values[cells].items():
            torch.testing.assert_close(v, values["both"][key])


@pytest.mark.parametrize("corruption", ["noise", "text"])
def test_image_token_attribution_equals_finite_differences(pair, corruption, float64_norms):
    """Each image-token and text cell's attribution term is the directional derivative of the corrupted
    run's p(target) along (clean − corrupted) at that state: central differences, float64, plain hooks."""
    _, vlm, tok = pair
    vlm = vlm.double()
    try:
        spec = parse_spec({"kind": "trace", "model": "m", "corruption": corruption, "samples": 2, "seed": 1,
                           "sites": ["hidden", "mlp"], "window": 1, "method": "attribution", "image_cells": "each",
                           "prompts": [{"image": "flag:France", "prompt": QUESTION, "target": "paris",
                                        "constraint": "capital"}]})
        result = run(spec, vlm, tok)
        plan = compile_spec(spec.model_copy(update={"method": "exact"}), vlm, tok)
        rec = result.prompts[0]
        ids = image_prompt(tok, vlm, QUESTION)
        pixels = flag("France").double()
        noise = plan.noise[0]
        module = (vlm.model.multi_modal_projector if corruption == "noise" else vlm.model.language_model.embed_tokens)
        where = list(range(len(rec["image_positions"]))) if corruption == "noise" else rec["subject_positions"]
        tid, corrupted, eps = rec["answer_id"], rec["corrupted_prob"], 1e-4

        def p(site, layer, replace=None):
            """Mean p(target) over the noise draws, the state of `site` at `layer` optionally replaced."""
            total, kept = 0.0, []
            for k in range(noise.shape[0]):
                pairs = [(module, _adder(noise[k], where), False)]
                if replace is not None:
                    def swap(t, k=k):
                        t.copy_(replace(k, t))
                    pairs.append((_module(vlm, site, layer), swap, False))

                def keep(t):
                    kept.append(t[0].clone())
                pairs.append((_module(vlm, site, layer), keep, False))
                with ref.hooks(pairs), torch.no_grad():
                    total += float(vlm(input_ids=torch.tensor([ids]), pixel_values=pixels[None]).logits[0, -1]
                                   .softmax(-1)[tid])
            return total / noise.shape[0], kept

        for name, site in (("hidden", "block_output"), ("mlp", "mlp_output")):
            clean = _clean(vlm, ids, pixels, site)
            for layer in (0, 3):
                value, base = p(site, layer)
                assert value == pytest.approx(corrupted, abs=1e-9)
                for column, (position,) in enumerate(rec["column_positions"]):
                    def moved(t, k, step):
                        out = base[k].clone()
                        out[position] += step * (clean[layer][position] - base[k][position])
                        return out[None]
                    plus, _ = p(site, layer, lambda k, t: moved(t, k, eps))
                    minus, _ = p(site, layer, lambda k, t: moved(t, k, -eps))
                    got = float(result.grids[name].values[0, layer, column]) - corrupted
                    assert got == pytest.approx((plus - minus) / (2 * eps), abs=1e-6), (name, layer, column)
    finally:
        vlm.float()


def test_vlm_trace_under_device_map_equals_one_device(pair, tmp_path):
    """accelerate's dispatch (two language-model layers on "disk") gives the single-device grids."""
    from interventions.modalities.vision_language.llava import dispatch

    _, vlm, tok = pair
    import copy

    spread = copy.deepcopy(vlm)
    mapping = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
               "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
               "model.language_model.layers.1": "disk", "model.language_model.layers.2": "cpu",
               "model.language_model.layers.3": "disk", "model.language_model.norm": "cpu",
               "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    spread = dispatch(spread, mapping, tmp_path / "offload")
    assert spread.model.language_model.layers[1].mlp.down_proj.weight.device.type == "meta"
    spec = parse_spec({"kind": "trace", "model": "m", "samples": 2, "window": 2,
                       "prompts": [{"image": "flag:Chile", "prompt": QUESTION, "target": "santiago"}]})
    one, many = run(spec, vlm, tok), run(spec, spread, tok)
    for name in one.grids:
        torch.testing.assert_close(one.grids[name].values, many.grids[name].values, atol=1e-5, rtol=0)


def test_a_vision_language_spec_on_a_language_model_names_the_field(pair):
    from interventions import SpecError

    lm, _, tok = pair
    spec = parse_spec({"kind": "trace", "model": "m", "prompts": [{"image": "flag:France", "prompt": QUESTION,
                                                                    "target": "paris"}]})
    with pytest.raises(SpecError, match=r"`model`: got 'llama'; expected a LLaVA-architecture model"):
        run(spec, lm, tok)
