"""Cross-attention attribution maps (DAAM, Tang et al. 2023) for text-to-image UNets.

For each word of a prompt: the softmax cross-attention of every ``attn2`` layer from each image
location to the word's tokens, for the conditional half of the guided batch, summed over heads,
upscaled (bicubic, clamped at 0) from the layer's resolution to the image's, and summed over
layers (all, or the chosen ``attn2`` indices) and denoising steps. A word's map is min-max
normalised to [0, 1] per image; its region is where the map exceeds `threshold` (DAAM's tau = 0.4).

The probabilities are read by `MapsProcessor`, a diffusers attention processor (the library's
own per-module extension point) that computes exactly what diffusers' `AttnProcessor` computes
and records the probabilities; `recording` sets it on the ``attn2`` modules and puts the
previous processors back on exit. (pyvene does not wrap diffusers UNets, and the probabilities
are not any module's output, so this is a processor rather than a pyvene node.)

>>> images, maps = word_maps(pipe, "a red circle", ["red", "circle"], seeds=range(8))   # doctest: +SKIP
>>> maps["circle"].shape                                                                  # doctest: +SKIP
torch.Size([8, 16, 16])
"""

from __future__ import annotations

import contextlib
import math

import torch

from interventions.core.errors import SpecError
from interventions.core.prompts import overlapping
from interventions.modalities.text_to_image.pipeline import DiffusionPipe, cross_attention_layers


class MapStore:
    """Sums, over calls, each call's conditional-half attention probabilities upscaled to `size`."""

    def __init__(self, size: int):
        self.size = size
        self.total: torch.Tensor | None = None       # (rows, tokens, size, size)
        self.calls = 0

    def add(self, probs: torch.Tensor, batch: int, heads: int) -> None:
        """`probs`: ``(batch x heads, locations, tokens)`` as diffusers computes them; `batch` doubled
        (unconditional rows first, as `DiffusionPipe.sample` orders them)."""
        hw, tokens = probs.shape[1], probs.shape[2]
        side = math.isqrt(hw)
        p = probs.reshape(batch, heads, hw, tokens)[batch // 2:].sum(1)           # conditional rows
        p = p.transpose(1, 2).reshape(-1, tokens, side, side).float()
        up = torch.nn.functional.interpolate(p, size=(self.size, self.size), mode="bicubic",
                                             align_corners=False).clamp_min(0)
        self.total = up if self.total is None else self.total + up
        self.calls += 1


class MapsProcessor:
    """diffusers' `AttnProcessor` computation, recording the attention probabilities in a `MapStore`."""

    def __init__(self, store: MapStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.add(probs.detach(), hidden_states.shape[0], attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def recording(pipe: DiffusionPipe, size: int, layers: list[int] | None = None):
    """Within: the ``attn2`` modules (all, or those at `layers` in the UNet's order) record into the
    yielded `MapStore`; the old processors come back on exit."""
    store = MapStore(size)
    modules = dict(pipe.unet.named_modules())
    names = cross_attention_layers(pipe.unet)
    attn2 = [modules[name] for k, name in enumerate(names) if layers is None or k in layers]
    before = [m.processor for m in attn2]
    try:
        for m in attn2:
            m.set_processor(MapsProcessor(store))
        yield store
    finally:
        for m, old in zip(attn2, before):
            m.set_processor(old)


def word_tokens(pipe: DiffusionPipe, prompt: str, word: str, field: str) -> list[int]:
    """Positions, in the UNet's context, of the tokens overlapping `word`'s first whole-word occurrence."""
    import re

    found = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt)
    if found is None:
        raise SpecError(field, word, f"a word of the prompt {prompt!r}")
    offsets = pipe.tokenizer(prompt, return_offsets_mapping=True, truncation=True,
                             max_length=pipe.tokenizer.model_max_length)["offset_mapping"]
    positions = overlapping(offsets, found.start(), found.end())
    if not positions:
        raise SpecError(field, word, f"a word that keeps at least one token within the tokenizer's "
                        f"{pipe.tokenizer.model_max_length} tokens")
    return positions


@torch.no_grad()
def word_maps(pipe: DiffusionPipe, prompt: str, words: list[str], seeds, *, steps: int | None = None,
              guidance: float | None = None, layers: list[int] | None = None,
              field: str = "words") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images ``(n, 3, H, W)`` for `prompt` (one per seed) and each word's map ``(n, H, W)`` in [0, 1]."""
    seeds = list(seeds)
    context = pipe.encode([prompt] * len(seeds))
    positions = {w: word_tokens(pipe, prompt, w, field) for w in words}
    size = pipe.unet.config.sample_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae else 1)
    with recording(pipe, size, layers) as store:
        images = pipe.sample(context, seeds, steps=steps, guidance=guidance, batch=len(seeds))
    if images.shape[-1] != size:
        raise RuntimeError(f"maps at {size} px but images at {images.shape[-1]} px")
    maps = {}
    for w, pos in positions.items():
        m = store.total[:, pos].sum(1)
        lo, hi = m.flatten(1).min(1).values[:, None, None], m.flatten(1).max(1).values[:, None, None]
        maps[w] = (m - lo) / (hi - lo).clamp_min(1e-12)
    return images, maps


def iou(region: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per image, |region ∩ truth| / |region ∪ truth| (1 where both are empty)."""
    inter = (region & truth).flatten(1).sum(1).float()
    union = (region | truth).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def outline(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """The band of `width` pixels on either side of a mask's edge: dilated and not eroded (3x3 max-pool)."""
    m = mask.float()[:, None]
    k = 2 * width + 1
    dilated = torch.nn.functional.max_pool2d(m, k, stride=1, padding=width) > 0
    eroded = -torch.nn.functional.max_pool2d(-m, k, stride=1, padding=width) > 0
    return (dilated & ~eroded)[:, 0]
