"""Contrastive grid prompts: images named in a spec, loaded and turned into the engine's prompts.

A prompt is an image's patch sequence (`ZeroShot.patch_embeddings`): position 0 is CLS, positions 1… the
patches in reading order, labelled ``CLS`` and ``p<row>,<col>``. Noise corrupts the patches (the subject);
CLS keeps its learned embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from interventions.core.conventions import pixels_identity
from interventions.core.errors import ModelNotAvailable, SpecError, one_of, short
from interventions.core.paths import CHECKPOINTS
from interventions.core.reading import read_image
from interventions.engine.plan import Prompt
from interventions.modalities.contrastive.clip import ClassNames, ZeroShot, zero_shot
from interventions.modalities.towers import patch_columns, patch_sequence
from interventions.models.families import SCENES_CLIP, local_folder
from interventions.testbeds import scenes


def load_clip(name: str, *, device: str | torch.device | None = "cpu", device_map=None, offload_folder=None):
    """``(CLIPModel, text tokenizer, image processor or None)`` for the testbed or a local CLIP folder. A CLIP model
    is small: it is not spread over devices."""
    if device_map is not None or offload_folder is not None:
        raise SpecError("--device-map" if device_map is not None else "--offload-folder", device_map or offload_folder,
                        "nothing for a contrastive model: it loads whole on `--device`")
    device = device or "cpu"
    if name == SCENES_CLIP:
        from interventions.modalities.contrastive.scenes_clip import load

        model, tokenizer, _ = load(CHECKPOINTS / "scenes_clip.safetensors", device=device)
        return model, tokenizer, None
    path = local_folder(name)
    if path is None:
        raise ModelNotAvailable(f"`model`: got {short(name)}; expected {SCENES_CLIP!r} or a local CLIP folder "
                                "(nothing is downloaded here)")
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelNotAvailable(f"`model`: {short(name)} is not a CLIP folder that loads "
                                f"({err.__class__.__name__}: {short(str(err), 300)})") from None
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        processor = None
    return model, tokenizer, processor


def class_captions(classes) -> dict[str, list[str]]:
    """A spec's `classes` as class name -> captions."""
    if isinstance(classes, str):
        return scenes.class_prompts(classes.split(":", 1)[1])
    if isinstance(classes, dict):
        return {k: list(v) for k, v in classes.items()}
    return {c: [c] for c in classes}


def runnable(spec, clip, tokenizer) -> tuple[ZeroShot, ClassNames]:
    """The engine's model and tokenizer for a contrastive spec: `clip` as a zero-shot classifier over the
    spec's classes (a model that already is one is kept)."""
    if isinstance(clip, ZeroShot):
        return clip, tokenizer
    return zero_shot(clip, tokenizer, class_captions(spec.classes))


def load_image(ref: str, size: int, processor=None, *, field: str = "image") -> torch.Tensor:
    """``(3, H, W)`` pixels for `ref`: a `scene:` render of the scenes world (resized to `size` when the model's
    input differs) or an image file (through `processor` when the model has one, else scaled to [0, 1])."""
    if ref.startswith("scene:"):
        text, _, seed = ref[len("scene:"):].partition("@")
        try:
            scene = scenes.parse_scene(text)
        except ValueError as err:
            raise SpecError(field, ref, f"scene:{err}[@<seed>]") from None
        if seed and not (seed.isascii() and seed.isdigit() and int(seed) < 2**63):
            raise SpecError(field, ref, "scene:<objects>@<seed>, the seed an integer in [0, 2^63)")
        drawn = scenes.render([scene], torch.Generator().manual_seed(int(seed or 0)))
        if drawn.shape[-1] != size:
            drawn = torch.nn.functional.interpolate(drawn, size=(size, size), mode="bilinear")
        return drawn[0]
    image = read_image(Path(ref).expanduser(), field, "an image file (or `scene:<colour> <shape>...`)")
    if processor is not None:
        return processor(images=image, return_tensors="pt").pixel_values[0]
    import numpy as np

    image = image.convert("RGB").resize((size, size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def image_sequence(model: ZeroShot, ref: str, processor=None, *, field: str) -> tuple:
    """``(the image's patch sequence as an `Encoded`, its pixels)``: CLS and patches, the patches its subject."""
    pixels = load_image(ref, model.config.image_size, processor, field=field)
    return patch_sequence(ref, model.config, model.patch_embeddings(pixels[None])[0]), pixels


def class_index(tokenizer: ClassNames, name: str | None, field: str) -> int | None:
    """The index of class `name` (None stays None)."""
    if name is None:
        return None
    if name not in tokenizer.labels:
        raise SpecError(field, name, f"a class of `classes`: {one_of(name, tokenizer.labels)}")
    return tokenizer.labels.index(name)


def contrastive_prompts(spec, model: ZeroShot, tokenizer: ClassNames, processor=None) -> list:
    """The engine's prompts for a contrastive trace or patch spec."""
    if not isinstance(model, ZeroShot):
        raise SpecError("model", getattr(model.config, "model_type", None),
                        "a CLIP model, because the spec is `modality: contrastive`")
    pixels = {}

    def encoded(ref, field):
        enc, pixels[ref] = image_sequence(model, ref, processor, field=field)
        return enc

    out = []
    for i, p in enumerate(spec.prompts):
        where = f"prompts[{i}]"
        base = encoded(p.image, f"{where}.image")
        if spec.kind == "trace":
            source = base
            if spec.corruption == "swap":
                base = encoded(p.counterfactual_image, f"{where}.counterfactual_image")
            record = {"label": p.image, "target": p.target, "corruption": spec.corruption,
                      "counterfactual_image": p.counterfactual_image}
            target, counterfactual = class_index(tokenizer, p.target, f"{where}.target"), None
            identity = (p.image, source.subject, pixels_identity(pixels[p.image]))
        else:
            source = encoded(p.source_image, f"{where}.source_image")
            record = {"label": p.image, "source_image": p.source_image}
            target = class_index(tokenizer, p.target, f"{where}.target")
            counterfactual = class_index(tokenizer, p.counterfactual_target, f"{where}.counterfactual_target")
            identity = ()
        columns = patch_columns(base.tokens, spec.image_cells)
        record.update(image_positions=list(base.subject),
                      image_column=next((c for c, (_, pos) in enumerate(columns) if len(pos) > 1), None))
        out.append(Prompt(base, source, columns, target_id=target, counterfactual_id=counterfactual, identity=identity,
                          record=record))
    return out


contrastive_prompts.modality = "contrastive"
