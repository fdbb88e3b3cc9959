"""Lesion's own eager attention, registered with transformers, for what needs to reach inside it.

transformers computes attention in one function call, so the scores and probabilities are no
module's output. Inside `lesion_attention(model)` every self-attention module of the language model
runs on the function registered here under ``lesion_scores`` (transformers' `AttentionInterface`, its
documented extension point; each config's previous implementation is restored on exit). It computes
plain eager attention, with two optional reaches:

- a child module ``lesion_scores`` on the attention module sees the pre-softmax scores as
  ``(batch, query, heads x keys)``, so pyvene can intervene on them (attention knockout);
- a callable attribute ``lesion_weights`` on the attention module receives the probabilities with the
  call's query and key states and returns the probabilities to use (attribution rules: RelP holds
  them constant, the QK fix keeps them and their gradients).

`attention_scores` is the one function that turns query and key states into masked scores; the
attribution rules use it to recompute a pattern with some positions' queries and keys changed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from interventions.core.errors import SpecError
from interventions.models.sites import get_module, site_table

SCORES = "lesion_scores"
WEIGHTS = "lesion_weights"
#: Families whose attention modules call transformers' attention interface with `scaling`.
ATTENTION_FAMILIES = ("gpt2", "llama", "gemma3", "llava", "clip")


@dataclass(frozen=True)
class ScoreArgs:
    """What turns an attention call's query and key states into its masked scores."""

    attention_mask: torch.Tensor | None
    scaling: float
    softcap: float | None


def attention_scores(query: torch.Tensor, key: torch.Tensor, args: ScoreArgs) -> torch.Tensor:
    """``(batch, heads, query, keys)`` scores, keys repeated over grouped heads, soft-capped and masked as
    the model does before its softmax."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * args.scaling
    if args.softcap is not None:
        scores = torch.tanh(scores / args.softcap) * args.softcap
    if args.attention_mask is not None:
        mask = args.attention_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(scores.dtype).min)
        scores = scores + mask[:, :, :, :key.shape[-2]]
    return scores


class ScoresSite(nn.Module):
    """An identity whose output is an attention's pre-softmax scores, ``(batch, query, heads x keys)``."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


def eager_attention(module, query, key, value, attention_mask, scaling: float | None = None, dropout: float = 0.0,
                    softcap: float | None = None, **kwargs):
    """Eager attention whose scores pass through ``module.lesion_scores`` and whose probabilities pass
    through ``module.lesion_weights`` when it has them."""
    args = ScoreArgs(attention_mask, query.shape[-1] ** -0.5 if scaling is None else scaling, softcap)
    scores = attention_scores(query, key, args)
    site = getattr(module, SCORES, None)
    if site is not None:
        b, h, q, k = scores.shape
        scores = site(scores.transpose(1, 2).reshape(b, q, h * k)).reshape(b, q, h, k).transpose(1, 2)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    reach = module.__dict__.get(WEIGHTS)
    if reach is not None:
        weights = reach(module, query, key, weights, args)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SCORES, eager_attention)
    AttentionMaskInterface.register(SCORES, eager_mask)


def attention_modules(model, use: str, families: tuple[str, ...] = ATTENTION_FAMILIES) -> list[nn.Module]:
    """The language model's self-attention module of every layer; a model outside `families` is refused,
    `use` naming what needed them."""
    table = site_table(model)
    if table.family not in families:
        raise SpecError("model", table.family, f"a model of the families {', '.join(families)} for "
                        f"{use} (their attention takes a registered attention function)")
    path = table.sites["attention_output"][0]
    return [get_module(model, path.format(layer)) for layer in range(table.num_layers(model))]


@contextlib.contextmanager
def lesion_attention(model, use: str = "Lesion's eager attention", families: tuple[str, ...] = ATTENTION_FAMILIES):
    """Within: every attention module of the language model runs `eager_attention`; yields the modules.
    On exit each config's attention implementation is restored. `use`, `families`: as for
    `attention_modules`."""
    _register()
    modules = attention_modules(model, use, families)
    configs = {id(m.config): m.config for m in modules if hasattr(m, "config")}
    if getattr(model, "config", None) is not None:
        configs.setdefault(id(model.config), model.config)
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = SCORES
        yield modules
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]
