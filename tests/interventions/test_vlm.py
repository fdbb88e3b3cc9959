"""LLaVA assembled around a language model (issue 6's foundation), on tiny seeded configs.

- text-only logits equal the language model's, bit for bit;
- the image tokens the LM receives equal an independent vision-tower + projector computation;
- every LLaVA site resolves to a module of the assembled model;
- batched equals one image at a time.
"""

from __future__ import annotations

import pytest
import torch

from interventions.core.errors import SpecError
from interventions.modalities.vision_language.llava import VisionSpec, assemble_llava, image_positions, image_prompt
from interventions.models.sites import LLAVA, site_table
from support.models import make_model, make_tokenizer

VISION = VisionSpec(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def pair():
    tok = make_tokenizer()
    lm = make_model("llama", len(tok))
    vlm, tok = assemble_llava(lm, tok, VISION)
    return lm, vlm, tok


def test_text_only_logits_equal_the_language_model(pair):
    lm, vlm, tok = pair
    ids = torch.tensor([tok("the eiffel tower is located in the city of").input_ids])
    with torch.no_grad():
        want = lm(ids).logits
        got = vlm(input_ids=ids).logits
    assert torch.equal(got[..., :want.shape[-1]], want)
    assert got.shape[-1] == want.shape[-1] + 1                 # the <image> token
    assert (got[..., -1:] < got[..., :-1].max(dim=-1, keepdim=True).values).all()


def test_image_tokens_are_the_projected_vision_features(pair):
    _, vlm, tok = pair
    ids = image_prompt(tok, vlm, "the capital of")
    pos = image_positions(ids, vlm)
    assert pos == [1, 2, 3, 4] and ids[0] == tok.bos_token_id
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = {}
    handle = vlm.model.language_model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.__setitem__("x", (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True)
    try:
        with torch.no_grad():
            batched = vlm(input_ids=torch.tensor([ids, ids]), pixel_values=pixels).logits
    finally:
        handle.remove()
    with torch.no_grad():
        tower = vlm.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]     # drop CLS ("default")
        p = vlm.model.multi_modal_projector
        want = p.linear_2(p.act(p.linear_1(tower)))
        torch.testing.assert_close(seen["x"][:, pos], want, atol=1e-6, rtol=1e-6)
        one = torch.cat([vlm(input_ids=torch.tensor([ids]), pixel_values=pixels[i:i + 1]).logits for i in range(2)])
    torch.testing.assert_close(batched, one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0, -1], batched[1, -1])


def test_llava_site_table_resolves_every_site(pair):
    _, vlm, _ = pair
    assert site_table(vlm) is LLAVA
    assert LLAVA.num_layers(vlm) == vlm.config.text_config.num_hidden_layers
    for site in LLAVA.sites:
        layer = 0 if LLAVA.is_layered(site) else None
        assert isinstance(LLAVA.module(vlm, site, layer), torch.nn.Module)
    assert LLAVA.module(vlm, "vision_block_output", 1) is vlm.model.vision_tower.encoder.layers[1]
    assert LLAVA.module(vlm, "mlp_key", 2) is vlm.model.language_model.layers[2].mlp.down_proj


def test_assembly_refuses_bad_input():
    with pytest.raises(SpecError, match="patch_size"):
        VisionSpec(image_size=32, patch_size=12)
    tok = make_tokenizer()
    with pytest.raises(SpecError, match="model"):
        assemble_llava(make_model("gpt2", len(tok)), tok, VISION)


def test_text_only_trace_runs_on_the_assembled_llava(pair):
    """The LM engine runs on LLaVA through its site table; the grids match the bare LM's up to the one
    extra vocabulary entry (<image>, whose logit is the mean) in the softmax."""
    from interventions import parse_spec, run

    lm, vlm, tok = pair
    spec = parse_spec({"kind": "trace", "prompts": [{"prompt": "the eiffel tower is located in the city of",
                                                     "subject": "eiffel tower"}], "samples": 2})
    a, b = run(spec, lm, tok, progress=False), run(spec, vlm, tok, progress=False)
    for name in a.grids:
        assert (a.grids[name].values - b.grids[name].values).abs().max() < 0.01


# ------------------------------------------------------------------ VLM specs through the CLI
@pytest.mark.parametrize("corruption", ["noise", "text"])
def test_vlm_trace_spec_runs_from_the_cli_on_a_saved_llava(pair, tmp_path, corruption):
    """`kind: trace` with an image, on a LLaVA folder: the CLI's grids equal the API's (`interventions.run`,
    which tests/interventions/test_vlm_engine.py checks against plain hooks), for image noise and for noise on the
    text constraint; the heatmap is drawn."""
    import json

    from interventions import run
    from interventions.spec import VLMTraceSpec, dump_spec, load_yaml, parse_spec
    from recipes.cli import main as cli

    _, vlm, tok = pair
    folder = tmp_path / "llava"
    vlm.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = {"kind": "trace", "model": str(folder), "samples": 2, "window": 2, "sites": ["hidden", "mlp"],
            "corruption": corruption,
            "prompts": [{"image": "flag:Japan", "prompt": " the capital of", "target": "paris", "constraint": "capital"}]}
    spec = parse_spec(data)
    assert isinstance(spec, VLMTraceSpec) and parse_spec(load_yaml(dump_spec(spec))) == spec
    (tmp_path / "spec.yaml").write_text(dump_spec(spec))
    assert cli(["run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "result.json").read_text())
    want = run(spec, vlm, tok)
    for site in ("hidden", "mlp"):
        torch.testing.assert_close(torch.tensor(got["grids"][site]["values"][0]), want.grids[site].values[0],
                                   atol=1e-5, rtol=0)
    assert got["prompts"][0]["column_positions"] == want.prompts[0]["column_positions"]
    assert (tmp_path / "out" / "heatmap.png").stat().st_size > 10_000
    with pytest.raises(SpecError, match="flag:"):
        from interventions.modalities.vision_language.llava import load_image
        load_image("flag:Atlantis", vlm)


def test_vlm_specs_compile_against_a_llava_folder_of_any_name(pair, tmp_path, capsys):
    """`validate --compile`: images load and layers exist; the folder's name says nothing ("my-vision-model")."""
    import json

    from recipes.cli import main as cli

    _, vlm, tok = pair
    folder = tmp_path / "my-vision-model"
    vlm.save_pretrained(folder)
    tok.save_pretrained(folder)
    trace = {"kind": "trace", "model": str(folder), "prompts": [{"image": "flag:Japan", "prompt": " the capital of",
                                                                  "target": "paris"}]}
    edit = {"kind": "edit", "model": str(folder), "image": "flag:Japan", "layer": 99, "questions": [" the capital of"],
            "target_new": "rome"}
    results = []
    for data in (trace, {**trace, "prompts": [dict(trace["prompts"][0], image="flag:Atlantis")]}, edit):
        (tmp_path / "spec.yaml").write_text(json.dumps(data))
        code = cli(["validate", str(tmp_path / "spec.yaml"), "--compile"])
        captured = capsys.readouterr()
        results.append((code, (captured.out if code == 0 else captured.err).strip().splitlines()[-1]))  # after the load bar
    assert results[0][0] == 0 and results[0][1].startswith("ok: trace spec (vision-language), 1 prompt(s), compiles to 3 graph(s)")
    assert results[1][0] == 2 and "`prompts[0].image`" in results[1][1] and "Atlantis" in results[1][1]
    n = vlm.config.text_config.num_hidden_layers
    assert results[2] == (2, f"error: `layer`: got 99; expected a layer from 0 to {n - 1} (the model has {n})")


def test_vlm_trace_spec_names_the_missing_corruption_input():
    from interventions.spec import parse_spec

    base = {"kind": "trace", "model": "llava-flags-smollm2",
            "prompts": [{"image": "flag:France", "prompt": " The capital is", "target": "Paris"}]}
    with pytest.raises(SpecError, match=r"prompts\[0\]\.constraint.*' The capital is'.*None"):
        parse_spec({**base, "corruption": "text"})
    with pytest.raises(SpecError, match=r"prompts\[0\]\.counterfactual_image"):
        parse_spec({**base, "corruption": "swap"})
    with pytest.raises(SpecError, match="image_cells"):
        parse_spec({**base, "image_cells": "all"})


def test_vlm_rome_maps_the_image_key_to_its_value(pair):
    """ROME read at the image tokens: W' k* = v* (the defining equation), rank one, and the model is
    unchanged by computing."""
    from editors.delta import applied
    from editors.methods.rome import RomeHyperparameters
    from editors.methods.rome_vision_language import compute_vlm_rome

    _, vlm, tok = pair
    pixels = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))
    d_mlp = vlm.config.text_config.intermediate_size
    A = torch.randn(d_mlp, d_mlp, generator=torch.Generator().manual_seed(5))
    C = A @ A.T / d_mlp + torch.eye(d_mlp)
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    delta, info = compute_vlm_rome(vlm, tok, pixels, [" the capital of"], "rome", layer=1, C=C, base_model="tiny",
                                   hp=RomeHyperparameters(layer=1, v_steps=5))
    assert all(torch.equal(p, before[n]) for n, p in vlm.named_parameters())
    (name,) = delta.names
    assert name == "model.language_model.layers.1.mlp.down_proj.weight" and delta.factors[name][0].shape[1] == 1
    W = dict(vlm.named_parameters())[name].detach().clone()
    with applied(vlm, delta):
        Wn = dict(vlm.named_parameters())[name].detach()
        torch.testing.assert_close(Wn @ info["k_star"], info["v_star"], atol=1e-4, rtol=1e-4)
    ids = image_prompt(tok, vlm, " the capital of")
    keys = {}
    handle = vlm.model.language_model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: keys.__setitem__("k", a[0]))
    with torch.no_grad():
        vlm(input_ids=torch.tensor([ids]), pixel_values=pixels[None])
    handle.remove()
    torch.testing.assert_close(keys["k"][0, image_positions(ids, vlm)].mean(0), info["k_star"], atol=1e-5, rtol=1e-5)
    assert torch.equal(W, before[name])
    assert all(torch.equal(p, before[n]) for n, p in vlm.named_parameters())


def test_apply_image_cli_edits_and_refuses_foreign_deltas(pair, tmp_path, capsys):
    """`lesion apply --image` on a saved LLaVA folder: generates with and without a VLM delta; a delta made
    for another model is refused with exit status 2 and the model is not touched."""
    from editors.methods.rome import RomeHyperparameters
    from editors.methods.rome_vision_language import compute_vlm_rome
    from interventions.testbeds.flags import COUNTRIES, render
    from recipes.cli import main as cli

    _, vlm, tok = pair
    folder = tmp_path / "llava"
    vlm.save_pretrained(folder)
    tok.save_pretrained(folder)
    pixels = render([[c for c, _ in COUNTRIES].index("Kenya")], torch.Generator().manual_seed(0), jitter=False)[0]
    C = torch.eye(vlm.config.text_config.intermediate_size)
    delta, _ = compute_vlm_rome(vlm, tok, pixels, [" the capital of"], "rome", layer=2, C=C, base_model=str(folder),
                                hp=RomeHyperparameters(layer=2, v_steps=10))
    path = delta.save(tmp_path / "d.safetensors")
    code = cli(["apply", "--model", str(folder), "--delta", str(path), "--image", "flag:Kenya", "--prompt",
                " the capital of", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "base:" in out and "edited:" in out
    other = tiny_llava_other(tmp_path)
    assert cli(["apply", "--model", str(other), "--delta", str(path), "--image", "flag:Kenya", "--prompt", "x"]) == 2
    assert "layers.2.mlp.down_proj" in capsys.readouterr().err


def tiny_llava_other(tmp_path):
    """A LLaVA folder with different language-model weights."""
    tok = make_tokenizer()
    torch.manual_seed(1)
    lm = make_model("llama", len(tok))
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.01)
    vlm, tok = assemble_llava(lm, tok, VISION)
    folder = tmp_path / "other"
    vlm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_vlm_key_statistics_equal_the_language_model_s(pair):
    """C read through the assembled LLaVA (text only) equals C of the bare language model."""
    from editors.stats import collect_keys_moment

    lm, vlm, tok = pair
    corpus = ["the capital of france is paris", "a b c d e f g", "rome is the capital of italy"]
    (c_lm, n_lm), (c_vlm, n_vlm) = (collect_keys_moment(m, tok, [1, 2], corpus, max_tokens=100) for m in (lm, vlm))
    assert n_lm == n_vlm > 0
    for layer in (1, 2):
        torch.testing.assert_close(c_vlm[layer], c_lm[layer], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer", [1, "auto"])
def test_vlm_edit_spec_runs_from_the_cli_and_its_report_is_reproducible(pair, tmp_path, monkeypatch, layer):
    """`kind: edit` on a LLaVA folder: spec -> YAML -> spec is identical; the delta is keyed at the
    image's tokens (W' k* = v* on the VLM loaded again); the report's answers are what the model gives
    with the delta applied (recomputed here); apply then revert is bit-exact."""
    import json

    from editors.delta import applied, load_delta
    from editors.methods.rome_vision_language import compute_k_star
    from interventions.modalities.vision_language.llava import load_image, load_vlm, top_answers
    from interventions.spec import VLMEditSpec, dump_spec, load_yaml, parse_spec
    from recipes.cli import main as cli

    monkeypatch.setenv("LESION_HOME", str(tmp_path / "home"))
    _, vlm, tok = pair
    folder = tmp_path / "llava"
    vlm.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = {"kind": "edit", "model": str(folder), "layer": layer, "image": "flag:Japan",
            "questions": [" the capital of"], "paraphrases": [" its capital"], "target_new": "rome",
            "target_true": "paris", "other_images": ["flag:France", "flag:Italy"], "kl_prompt": " a",
            "hyperparameters": {"v_steps": 8}, "mom2_tokens": 200, "locate": {"samples": 2, "window": 2}}
    spec = parse_spec(data)
    assert isinstance(spec, VLMEditSpec) and parse_spec(load_yaml(dump_spec(spec))) == spec
    (tmp_path / "spec.yaml").write_text(dump_spec(spec))
    out = tmp_path / "out"
    assert cli(["run", str(tmp_path / "spec.yaml"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    if layer == "auto":
        effect = report["located"]["effect"]
        assert report["layer"] == max(range(len(effect)), key=effect.__getitem__)
        assert (out / "locate" / "result.json").is_file()
    model, tokenizer, _ = load_vlm(str(folder))
    delta = load_delta(out / "delta.safetensors")
    (name,) = delta.names
    assert name == f"model.language_model.layers.{report['layer']}.mlp.down_proj.weight"
    pixels = load_image("flag:Japan", model)
    k = compute_k_star(model, tokenizer, pixels, [" the capital of"], report["layer"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    W = dict(model.named_parameters())[name].detach().clone()
    with applied(model, delta):
        Wn = dict(model.named_parameters())[name].detach()
        # the change is the stored rank-one product, and it moves k*
        u, v = delta.factors[name]
        assert u.shape[1] == 1 and v.shape[0] == 1
        torch.testing.assert_close(Wn, W + (u @ v).to(W.dtype), atol=1e-6, rtol=1e-5)
        assert float(((Wn - W) @ k).norm()) > 0
        for q in (" the capital of", " its capital"):
            assert report["after"]["answers"][q] == top_answers(model, tokenizer, pixels[None], q)[0]
        others = torch.stack([load_image(f"flag:{c}", model) for c in ("France", "Italy")])
        assert report["after"]["other_images"][" its capital"] == top_answers(model, tokenizer, others, " its capital")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert report["metrics"]["efficacy"] == float(report["after"]["answers"][" the capital of"] == "rome")
    assert "| 'the capital of' | edit |" in (out / "table.md").read_text()


def test_vlm_edit_spec_refuses_bad_input():
    from interventions.spec import parse_spec

    base = {"kind": "edit", "model": "llava-flags-smollm2", "image": "flag:France", "questions": [" Its capital is"],
            "target_new": "Rome"}
    with pytest.raises(SpecError, match="target_true"):
        parse_spec({**base, "layer": "auto"})
    with pytest.raises(SpecError, match="layer"):
        parse_spec({**base, "layer": -1})
    with pytest.raises(SpecError, match="questions"):
        parse_spec({**base, "layer": 4, "questions": []})


# ------------------------------------------------------------------ a LLaVA-1.5-shaped folder
@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    """A tiny folder with LLaVA-1.5's config choices (features from the second-to-last vision layer,
    CLS dropped, GELU projector), a CLIP image processor, a tokenizer with <image>, and two PNGs:
    what `llava-hf/llava-1.5-7b-hf` looks like on disk, at toy size."""
    import numpy as np
    from PIL import Image
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    folder = tmp_path_factory.mktemp("llava15")
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)
    vision = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=4)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=4)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_llava15_folder_image_tokens_are_the_second_to_last_layer_without_cls(llava15):
    """The projector site on a LLaVA-1.5-shaped model: hidden_states[-2] of CLIP, CLS dropped, projected."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from interventions.modalities.vision_language.llava import load_image, load_vlm

    vlm, tok, processor = load_vlm(str(llava15))
    pixels = load_image(str(llava15 / "a.png"), vlm, processor)
    want_pixels = CLIPImageProcessor.from_pretrained(llava15)(images=Image.open(llava15 / "a.png").convert("RGB"),
                                                              return_tensors="pt").pixel_values[0]
    assert torch.equal(pixels, want_pixels) and pixels.min() < 0        # normalised by the processor
    ids = image_prompt(tok, vlm, " the capital of")
    assert len(image_positions(ids, vlm)) == 4                         # (28 / 14)² patches, no CLS
    got = {}
    h = vlm.model.multi_modal_projector.register_forward_hook(lambda m, a, o: got.__setitem__("x", o))
    with torch.no_grad():
        vlm(input_ids=torch.tensor([ids]), pixel_values=pixels[None])
        h.remove()
        hidden = vlm.model.vision_tower(pixels[None], output_hidden_states=True).hidden_states[-2][:, 1:]
        want = vlm.model.multi_modal_projector.linear_2(torch.nn.functional.gelu(
            vlm.model.multi_modal_projector.linear_1(hidden)))
    torch.testing.assert_close(got["x"].reshape(want.shape), want, atol=1e-5, rtol=1e-5)


def test_llava15_folder_runs_trace_edit_and_apply_specs_with_image_files(llava15, tmp_path, monkeypatch, capsys):
    """The documented claim: the same specs, pointed at a LLaVA-1.5-layout folder with image files, run
    unchanged through the CLI (trace with a swapped image, edit, apply --image), and the trace equals
    the API on the processor's pixels."""
    import json

    from interventions import run
    from interventions.modalities.vision_language.llava import load_vlm
    from interventions.spec import dump_spec, parse_spec
    from recipes.cli import main as cli

    monkeypatch.setenv("LESION_HOME", str(tmp_path / "home"))
    a, b = str(llava15 / "a.png"), str(llava15 / "b.png")
    trace = {"kind": "trace", "model": str(llava15), "corruption": "swap", "sites": ["hidden"], "window": 2,
             "image_cells": "block",
             "prompts": [{"image": a, "counterfactual_image": b, "prompt": " the capital of", "target": "paris"}]}
    (tmp_path / "trace.yaml").write_text(dump_spec(parse_spec(trace)))
    assert cli(["run", str(tmp_path / "trace.yaml"), "--out", str(tmp_path / "trace")]) == 0
    got = json.loads((tmp_path / "trace" / "result.json").read_text())
    vlm, tok, processor = load_vlm(str(llava15))
    want = run(parse_spec(trace), vlm, tok, processor=processor)
    values = torch.tensor([[float("nan") if x is None else x for x in row] for row in got["grids"]["hidden"]["values"][0]])
    torch.testing.assert_close(values, want.grids["hidden"].values[0], atol=1e-5, rtol=0, equal_nan=True)
    column = got["prompts"][0]["image_column"]
    assert got["prompts"][0]["column_positions"][column] == want.prompts[0]["image_positions"]
    edit = {"kind": "edit", "model": str(llava15), "layer": 2, "image": a, "questions": [" the capital of"],
            "target_new": "rome", "other_images": [b], "kl_prompt": " a", "hyperparameters": {"v_steps": 5},
            "mom2_tokens": 100}
    (tmp_path / "edit.yaml").write_text(dump_spec(parse_spec(edit)))
    assert cli(["run", str(tmp_path / "edit.yaml"), "--out", str(tmp_path / "edit")]) == 0
    capsys.readouterr()
    assert cli(["apply", "--model", str(llava15), "--delta", str(tmp_path / "edit" / "delta.safetensors"),
                "--image", a, "--prompt", " the capital of", "--max-new-tokens", "2"]) == 0
    assert "edited:" in capsys.readouterr().out


def _image_keys_by_hand(vlm, tok, images, layer, question):
    """Keys at the image tokens, read with a plain hook, one image at a time, with a question after it."""
    ids = image_prompt(tok, vlm, question)
    at = image_positions(ids, vlm)
    keys = []
    module = vlm.model.language_model.layers[layer].mlp.down_proj
    h = module.register_forward_pre_hook(lambda m, a: keys.append(a[0][0, at].double()))
    with torch.no_grad():
        for px in images:
            vlm(input_ids=torch.tensor([ids]), pixel_values=px[None])
    h.remove()
    K = torch.cat(keys)
    return (K.T @ K / len(K)).float()


def test_image_key_moment_equals_plain_hooks_and_ignores_the_question(pair):
    from editors.methods.rome_vision_language import image_key_moment

    _, vlm, tok = pair
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    C, n = image_key_moment(vlm, tok, images, 2, batch=2)
    assert n == 5 * 4
    for question in ("", " the capital of paris"):
        torch.testing.assert_close(C, _image_keys_by_hand(vlm, tok, images, 2, question), atol=1e-5, rtol=1e-4)


def test_load_images_resolves_flags_seeds_and_folders(pair, tmp_path):
    import numpy as np
    from PIL import Image

    from interventions.modalities.vision_language.llava import load_image, load_images
    from interventions.testbeds.flags import COUNTRIES, render

    _, vlm, _ = pair
    names = [c for c, _ in COUNTRIES]
    jittered = load_image("flag:France@3", vlm)
    assert torch.equal(jittered, render([names.index("France")], torch.Generator().manual_seed(3))[0])
    assert not torch.equal(jittered, load_image("flag:France", vlm))
    every = load_images("flag:*@3", vlm)
    assert len(every) == len(COUNTRIES) and torch.equal(every[names.index("France")], jittered)
    for name in ("b.png", "a.png", "notes.txt"):
        if name.endswith(".png"):
            Image.fromarray(np.full((8, 8, 3), 40 if name == "a.png" else 200, dtype=np.uint8)).save(tmp_path / name)
        else:
            (tmp_path / name).write_text("not an image")
    folder = load_images(str(tmp_path), vlm)
    assert len(folder) == 2 and float(folder[0].mean()) < float(folder[1].mean())     # sorted: a.png first
    with pytest.raises(SpecError, match="seed an integer in \\[0, 2\\^63\\)"):
        load_image("flag:France@x", vlm)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"`image_corpus\[2\]`.*folder holding image files"):
        load_images(str(tmp_path / "empty"), vlm, field="image_corpus[2]")


def test_vlm_edit_with_an_image_corpus_solves_against_text_plus_image_keys(pair, tmp_path, monkeypatch):
    """`image_corpus`: the update's input direction is (C_text + w C_images + ridge)⁻¹ k*, with C_images
    computed here by plain hooks, and differs from the text-only direction."""
    import json

    from editors.delta import load_delta
    from editors.methods.rome_vision_language import compute_k_star
    from editors.stats import second_moment
    from interventions.modalities.vision_language.llava import load_image, load_images, load_vlm
    from interventions.spec import dump_spec, parse_spec
    from recipes.cli import main as cli

    monkeypatch.setenv("LESION_HOME", str(tmp_path / "home"))
    _, vlm, tok = pair
    folder = tmp_path / "llava"
    vlm.save_pretrained(folder)
    tok.save_pretrained(folder)
    edit = {"kind": "edit", "model": str(folder), "layer": 1, "image": "flag:Japan", "questions": [" the capital of"],
            "target_new": "rome", "kl_prompt": " a", "hyperparameters": {"v_steps": 4}, "mom2_tokens": 200,
            "image_corpus": ["flag:*@5", "flag:Japan@6"], "image_corpus_weight": 2.0}
    (tmp_path / "edit.yaml").write_text(dump_spec(parse_spec(edit)))
    assert cli(["run", str(tmp_path / "edit.yaml"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["image_corpus"] == {"images": 25, "keys": 100, "weight": 2.0}
    model, tokenizer, _ = load_vlm(str(folder))
    images = load_images("flag:*@5", model) + [load_image("flag:Japan@6", model)]
    C_text = second_moment(model, tokenizer, 1, None, max_tokens=200)          # the run's cached statistics
    C = (C_text + 2.0 * _image_keys_by_hand(model, tokenizer, images, 1, "")).double()
    k = compute_k_star(model, tokenizer, load_image("flag:Japan", model), [" the capital of"], 1).double()
    (name,) = load_delta(tmp_path / "out" / "delta.safetensors").names
    right = load_delta(tmp_path / "out" / "delta.safetensors").factors[name][1][0].double()
    ridge = 1e-4 * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=C.dtype)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))                          # noqa: E731
    assert cos(right, torch.linalg.solve(C + ridge, k)) > 0.9999
    text_only = C_text.double() + 1e-4 * torch.trace(C_text.double()) / C.shape[0] * torch.eye(C.shape[0])
    assert cos(right, torch.linalg.solve(text_only, k)) < 0.999


def test_vlm_rome_over_several_renders_starts_v_star_at_w_k_star(pair):
    """With several images of the subject, k* is the mean key over all their image tokens and v* − δ
    is W k* (the MLP output is linear in the key), so W' k* = v* and ‖v* − W k*‖ = ‖δ‖."""
    from editors.delta import applied
    from editors.methods.rome import RomeHyperparameters
    from editors.methods.rome_vision_language import compute_k_star, compute_vlm_rome

    _, vlm, tok = pair
    renders = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    C = torch.eye(vlm.config.text_config.intermediate_size)
    delta, info = compute_vlm_rome(vlm, tok, renders, [" the capital of", " its capital"], "rome", layer=2, C=C,
                                   base_model="tiny", hp=RomeHyperparameters(layer=2, v_steps=4), kl_question=" a")
    k_each = torch.stack([compute_k_star(vlm, tok, r, [" the capital of"], 2) for r in renders])
    torch.testing.assert_close(info["k_star"], k_each.mean(0), atol=1e-5, rtol=1e-5)
    (name,) = delta.names
    W = dict(vlm.named_parameters())[name].detach().clone()
    assert float((info["v_star"] - W @ info["k_star"]).norm()) == pytest.approx(info["delta_norm"], rel=1e-3)
    with applied(vlm, delta):
        Wn = dict(vlm.named_parameters())[name].detach()
        torch.testing.assert_close(Wn @ info["k_star"], info["v_star"], atol=1e-4, rtol=1e-4)
