"""Deltas exported as PEFT LoRA adapters, checked with PEFT itself: `PeftModel` gives the logits of
Lesion's `applied`, `merge_and_unload` gives Lesion's apply, and import gives the change back."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

from editors.delta import Delta, applied
from editors.export import ExportError, export_peft, import_peft
from editors.methods.memit import MemitHyperparameters, compute_memit
from editors.methods.rome import EditRequest, RomeHyperparameters, compute_rome
from interventions.core.atomic import MARKER
from support.models import make_model, make_tokenizer

ROOT = Path(__file__).parents[2]

REQUESTS = [EditRequest("{} is located in the city of", "the eiffel tower", "rome", "paris"),
            EditRequest("{} is in", "the colosseum", "london", "rome")]
PROMPTS = ["the eiffel tower is located in the city of", "the colosseum is in"]


def tiny(family: str):
    tok = make_tokenizer()
    model = make_model("llama" if family == "llava" else family, len(tok))
    if family == "llava":
        from interventions.modalities.vision_language.llava import VisionSpec, assemble_llava

        model, tok = assemble_llava(model, tok, VisionSpec(hidden_size=24, intermediate_size=48))
    return model, tok


def edits(model, tok) -> list[Delta]:
    """A real ROME delta (rank 1, layer 1) and a real MEMIT delta (rank 2, layers 1 and 2); stacked,
    layer 1 has rank 3 and layer 2 rank 2, so the adapter needs PEFT's rank_pattern."""
    from editors.methods.rome import is_conv1d
    from interventions.models.sites import site_table

    down = site_table(model).module(model, "mlp_key", 1)
    C = torch.eye(down.weight.shape[0] if is_conv1d(down) else down.weight.shape[1])   # the key's width
    rome, _ = compute_rome(model, tok, REQUESTS[0], RomeHyperparameters(layer=1, v_steps=5, context_templates=()),
                           base_model="tiny", C=C)
    memit, _ = compute_memit(model, tok, REQUESTS, MemitHyperparameters(layers=(1, 2), v_steps=5, context_templates=()),
                             base_model="tiny", C={1: C, 2: C})
    return [rome, memit]


@torch.no_grad()
def logits(model, tok) -> torch.Tensor:
    return torch.cat([model(torch.tensor([tok(p)["input_ids"]])).logits[0] for p in PROMPTS])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "llava"])
def test_peft_model_equals_lesion_apply(family, tmp_path):
    import copy

    model, tok = tiny(family)
    deltas = edits(model, tok)
    export_peft(model, deltas, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3 and list(config["rank_pattern"].values()) == [2]
    assert config["fan_in_fan_out"] == (family == "gpt2")
    with applied(model, *deltas):
        want = logits(model, tok)
        applied_weights = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model, tok)
    assert (want - base).abs().max() > 1e-3                       # the edit changes something
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(wrapped, tok), want, atol=1e-5, rtol=0)
    merged = wrapped.merge_and_unload()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, applied_weights[name], atol=1e-6, rtol=0)
    back = import_peft(model, tmp_path / "adapter", base_model="tiny")
    for name in back.names:
        want_change = sum(d.difference(name) for d in deltas if name in d.names)
        torch.testing.assert_close(back.difference(name), want_change, atol=1e-6, rtol=0)
    with applied(model, back):
        torch.testing.assert_close(logits(model, tok), want, atol=1e-5, rtol=0)


def test_export_refuses_what_lora_cannot_hold_and_writes_nothing(tmp_path):
    model, tok = tiny("llama")
    down = "model.layers.1.mlp.down_proj.weight"
    dense = Delta.from_factors(model, dense={down: torch.full_like(model.get_parameter(down), 1e-3)},
                               method="uce", base_model="tiny")
    d = model.config.hidden_size
    embedding = Delta.from_factors(model, {"model.embed_tokens.weight": (torch.ones(len(tok), 1), torch.ones(1, d))},
                                   method="x", base_model="tiny")
    with pytest.raises(ExportError, match=r"`model.layers.1.mlp.down_proj.weight`: a dense change \(method 'uce'\)"):
        export_peft(model, [dense], tmp_path / "a")
    with pytest.raises(ExportError, match=r"linear layers' weights only; this is 'weight' of Embedding"):
        export_peft(model, [embedding], tmp_path / "b")
    assert not list(tmp_path.iterdir())


def test_cli_exports_stacked_deltas_as_one_adapter_or_as_named_adapters(tiny_folder, tokenizer, tmp_path, capsys):
    """`lesion export A B --to peft` adds both; `--each` writes one named adapter per delta, which PEFT loads
    side by side and switches between; `lesion import` reads the combined adapter back."""
    import copy

    from editors.delta import load_delta
    from interventions import load_model
    from recipes.cli import main

    model, tok = load_model(str(tiny_folder / "tiny"))
    rome, memit = edits(model, tok)
    paths = [tmp_path / "rome.safetensors", tmp_path / "memit.safetensors"]
    for delta, path in zip((rome, memit), paths):
        delta.save(path)
    args = ["export", *map(str, paths), "--to", "peft", "--model", str(tiny_folder / "tiny")]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "named"), "--each"]) == 0
    assert sorted(p.name for p in (tmp_path / "named").iterdir()) == [MARKER, "memit", "rome"]
    served = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "named" / "rome"),
                                            adapter_name="rome").eval()
    served.load_adapter(str(tmp_path / "named" / "memit"), adapter_name="memit")
    for name, delta in (("rome", rome), ("memit", memit)):
        served.set_adapter(name)
        with applied(model, delta):
            torch.testing.assert_close(logits(served, tok), logits(model, tok), atol=1e-5, rtol=0)
    assert main(["import", str(tmp_path / "one"), "--model", str(tiny_folder / "tiny"),
                 "--out", str(tmp_path / "back.safetensors")]) == 0
    back = load_delta(tmp_path / "back.safetensors")
    with applied(model, rome, memit):
        want = logits(model, tok)
    with applied(model, back):
        torch.testing.assert_close(logits(model, tok), want, atol=1e-5, rtol=0)
    capsys.readouterr()


@pytest.mark.parametrize("kind", [dict(method="uce"), dict(method="time", preserve=()),
                                  dict(edit="text_encoder", layer=1)], ids=["uce", "time", "diff-quickfix"])
def test_diffusers_pipeline_with_load_lora_weights_equals_lesion_apply(kind, tmp_path):
    """A plain diffusers `StableDiffusionPipeline` (tiny, seeded) that loads the exported LoRA weights with
    `load_lora_weights` makes the images the same pipeline makes with Lesion's apply, within 1e-5
    (pixels in [0, 1], 3 DDIM steps, same seed): UCE and TIME on the UNet's `attn2.to_k`/`to_v`,
    Diff-QuickFix on a text-encoder `out_proj`."""
    import copy

    from diffusers import StableDiffusionPipeline

    from editors.export import export_diffusers
    from editors.methods.erase import erase
    from interventions.spec import EraseSpec
    from support.diffusion import tiny_sd

    pipe = tiny_sd()
    spec = EraseSpec(**{**dict(model="tiny-sd-0", concepts=[{"concept": "red", "guide": "blue"}],
                               preserve=["green", "yellow"], templates=["a {} cat", "a {} dog"], lam=0.1), **kind})
    delta = erase(spec, pipe)
    export_diffusers(pipe, [delta], tmp_path / "lora")

    def diffusers_pipeline(unet, text_encoder):
        return StableDiffusionPipeline(vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                       scheduler=copy.deepcopy(pipe.scheduler), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def images(sd):
        return sd(["a red cat", "a green dog"], num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0), height=16, width=16).images

    with applied(pipe, delta):
        want = images(diffusers_pipeline(pipe.unet, pipe.text_encoder))
    base = images(diffusers_pipeline(pipe.unet, pipe.text_encoder))
    served = diffusers_pipeline(copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder))
    served.load_lora_weights(str(tmp_path / "lora"))
    got = images(served)
    assert (want - base).abs().max() > 1e-3                    # the edit changes the images
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the same delta as PEFT adapters, one per part it changes, on the bare UNet / text encoder
    export_peft(pipe, [delta], tmp_path / "peft")
    part = "text_encoder" if kind.get("edit") == "text_encoder" else "unet"
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == sorted([MARKER, part])
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(getattr(pipe, part)), str(tmp_path / "peft" / part)).eval()
    with torch.no_grad():
        if part == "unet":
            x, t, e = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500]), \
                torch.randn(2, 8, 24, generator=torch.Generator().manual_seed(2))
            with applied(pipe, delta):
                expected = pipe.unet(x, t, e).sample
            got_part = wrapped(x, t, e).sample
        else:
            ids = pipe.tokenize(["a red cat", "a green dog"])
            with applied(pipe, delta):
                expected = pipe.text_encoder(ids).last_hidden_state
            got_part = wrapped(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got_part, expected, atol=1e-5, rtol=1e-5)


def test_cli_exports_the_shipped_erase_delta_for_diffusers(tmp_path, capsys):
    """`lesion export` of the shipped UCE delta (the shapes testbed): diffusers-format LoRA weights for its 14
    projections, whose B @ A is the delta's change; `--to peft` names the right target instead."""
    from pathlib import Path

    from safetensors import safe_open

    from editors.delta import load_delta
    from recipes.cli import main

    path = Path(__file__).parents[2] / "checkpoints" / "erase_red_uce_shapes.safetensors"
    assert main(["export", str(path), "--to", "diffusers", "--out", str(tmp_path / "lora")]) == 0
    delta = load_delta(path)
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert json.loads(f.metadata()["lesion_delta"])[0]["content_sha256"] == delta.id
    assert len(tensors) == 2 * len(delta.names) == 28
    for name in delta.names:
        module = name.removesuffix(".weight")
        got = tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
        torch.testing.assert_close(got, delta.difference(name), atol=1e-6, rtol=0)
    assert main(["export", str(path), "--to", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [MARKER, "unet"]    # UCE changes the UNet only
    capsys.readouterr()
    assert main(["export", str(ROOT / "checkpoints" / "rome_eiffel_to_rome_smollm2.safetensors"), "--to",
                 "diffusers", "--out", str(tmp_path / "no")]) == 2
    assert "expected 'peft' or 'gguf' for a language-model" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_merged_export_is_a_folder_transformers_loads_with_the_edit(tiny_folder, tmp_path, capsys):
    """`lesion export --merged`: a Hugging Face folder whose model gives Lesion's applied logits; its
    config also names the RoPE base where transformers 4.x reads it (top-level `rope_theta`), and its
    tokenizer by a class 4.x knows; the base model is left bit for bit as it was."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from interventions import load_model
    from recipes.cli import main

    model, tok = load_model(str(tiny_folder / "tiny"))
    rome, memit = edits(model, tok)
    rome.save(tmp_path / "rome.safetensors")
    memit.save(tmp_path / "memit.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert main(["export", str(tmp_path / "rome.safetensors"), str(tmp_path / "memit.safetensors"), "--merged",
                 "--model", str(tiny_folder / "tiny"), "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert [d["content_sha256"] for d in config["lesion_deltas"]] == [rome.id, memit.id]
    tokenizer_class = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert tokenizer_class != "TokenizersBackend"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tok("the colosseum is in")["input_ids"] == tok("the colosseum is in")["input_ids"]
    with applied(model, rome, memit):
        want = logits(model, tok)
    torch.testing.assert_close(logits(merged, tok), want, atol=1e-6, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    capsys.readouterr()
    assert main(["export", str(tmp_path / "rome.safetensors"), "--to", "peft", "--merged",
                 "--out", str(tmp_path / "both")]) == 2
    assert "--to" in capsys.readouterr().err and not (tmp_path / "both").exists()


def test_portable_config_names_gemma3_s_two_rope_bases():
    from editors.export import portable_config

    config = {"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_theta": 1_000_000.0, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}}}
    out = portable_config(config)
    assert (out["rope_theta"], out["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)
    assert out["rope_parameters"] == config["rope_parameters"]
