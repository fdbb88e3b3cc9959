"""A CLIP model as the engine runs it: zero-shot classification of an image among captions.

`ZeroShot` wraps a transformers `CLIPModel` and the embeddings of a fixed set of classes (each the mean of
its captions' normalised text embeddings, CLIP's prompt ensembling). Its input is the image tower's
input sequence (`patch_embeddings`: CLS and patch embeddings with their positions added), so that a
prompt is an image's patch sequence and every grid position is CLS or a patch. Its output is, at every
position, the zero-shot logits ``logit_scale · cos(image embedding, class embedding)`` over the classes;
`ClassNames` plays the tokenizer, naming the classes. The image tower runs with the model's own modules
(pre-norm, encoder layers, post-norm of CLS, visual projection), so the logits equal `CLIPModel`'s own
``logits_per_image`` for the class captions (a test checks it).

Sites (`interventions.models.sites.CLIP`): ``embed`` (the patch embeddings, where noise corrupts an
image), and per encoder layer ``block_input``, ``block_output``, ``mlp_output``, ``attention_output`` and
``mlp_key``, at CLS (position 0) and each patch (1…). The encoder is bidirectional: the engine shares no
prefix for it.

>>> model, tokenizer = scenes_clip.build(seed=0)                                          # doctest: +SKIP
>>> zs = ZeroShot(model, class_embeddings(model, tokenizer, {"red": ["a red circle"], "blue": ["a blue circle"]}))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


def text_embeddings(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """``(n, p)`` normalised text embeddings."""
    device = model.logit_scale.device
    inputs = tokenizer(list(texts), padding=True, return_tensors="pt").to(device)
    return nn.functional.normalize(model.get_text_features(**inputs).pooler_output, dim=-1)


def image_embeddings(model, pixels: torch.Tensor) -> torch.Tensor:
    """``(n, p)`` normalised image embeddings of ``pixels (n, 3, H, W)``."""
    return nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


@torch.no_grad()
def class_embeddings(model, tokenizer, classes: dict[str, list[str]]) -> tuple[list[str], torch.Tensor]:
    """``(labels, (classes, p))``: per class the renormalised mean of its captions' text embeddings."""
    rows = [nn.functional.normalize(text_embeddings(model, tokenizer, texts).mean(0), dim=-1)
            for texts in classes.values()]
    return list(classes), torch.stack(rows)


@dataclass
class ClassNames:
    """The engine's tokenizer for a `ZeroShot` model: class index <-> label."""

    labels: list[str]
    pad_token_id: int = 0
    eos_token_id: int | None = None

    def decode(self, ids) -> str:
        return " ".join(self.labels[int(i)] for i in ids)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Output:
    logits: torch.Tensor


class ClassHead(nn.Module):
    """Post-normed CLS state -> zero-shot logits: visual projection, normalisation, scaled cosine with the
    classes. The logit lens of a ViT reads intermediate CLS states through the post-norm and this head."""

    def __init__(self, projection: nn.Linear, logit_scale: torch.Tensor, classes: torch.Tensor):
        super().__init__()
        self.projection = projection
        self.register_buffer("classes", classes.detach().clone(), persistent=False)
        self.register_buffer("scale", logit_scale.detach().exp().clone(), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        e = nn.functional.normalize(self.projection(h), dim=-1)
        return self.scale * e @ self.classes.to(e.dtype).T


class ZeroShot(nn.Module):
    """`clip`'s image tower and the class embeddings as one model over patch-embedding sequences."""

    def __init__(self, clip, classes: tuple[list[str], torch.Tensor]):
        super().__init__()
        labels, embeddings = classes
        self.clip = clip
        self.labels = labels
        self.patches = nn.Identity()          # the `embed` site: where image noise is added
        self.head = ClassHead(clip.visual_projection, clip.logit_scale, embeddings.to(clip.logit_scale.device))
        self.config = copy.copy(clip.config.vision_config)
        self.config.model_type = "clip_zero_shot"
        self.config.vocab_size = len(labels)

    @property
    def vision(self):
        return self.clip.vision_model

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def get_input_embeddings(self) -> nn.Module:
        return self.vision.embeddings.patch_embedding

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    @torch.no_grad()
    def patch_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(n, 1 + patches, d)``: the tower's input sequence for ``pixels (n, 3, H, W)``."""
        weight = self.get_input_embeddings().weight
        return self.vision.embeddings(pixels.to(weight.device, weight.dtype))

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> Output:
        """Zero-shot logits ``(batch, positions, classes)``, the same at every position (the engine reads
        a row's last). Every image has the same number of positions; there is no padding to mask."""
        h = self.vision.pre_layrnorm(self.patches(inputs_embeds))
        h = self.vision.encoder(inputs_embeds=h).last_hidden_state
        logits = self.head(self.vision.post_layernorm(h[:, 0]))
        return Output(logits[:, None].expand(-1, h.shape[1], -1))


def zero_shot(clip, tokenizer, classes: dict[str, list[str]]) -> tuple[ZeroShot, ClassNames]:
    """``(ZeroShot model, ClassNames)`` for `classes` (label -> captions)."""
    labels_and_rows = class_embeddings(clip, tokenizer, classes)
    return ZeroShot(clip, labels_and_rows).eval(), ClassNames(labels_and_rows[0])
