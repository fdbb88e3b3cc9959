"""A plain PyTorch forward-hook reference for causal tracing and activation patching.

Written independently of Lesion's engine: no pyvene, no site tables, one forward
per cell, module paths spelled out per family. The tests compare every grid cell
of the engine with this.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

PRE = {"block_input", "mlp_key"}   # sites read at a module's input


def module(model, family: str, site: str, layer: int | None = None) -> torch.nn.Module:
    if family == "gpt2":
        blocks, embed = model.transformer.h, model.transformer.wte
        down = "c_proj"
        attn = "attn"
    else:
        blocks, embed = model.model.layers, model.model.embed_tokens
        down = "down_proj"
        attn = "self_attn"
    if site == "embed":
        return embed
    block = blocks[layer]
    return {"block_input": block, "block_output": block, "mlp_output": block.mlp,
            "attention_output": getattr(block, attn), "mlp_key": getattr(block.mlp, down)}[site]


def num_layers(model, family: str) -> int:
    return len(model.transformer.h if family == "gpt2" else model.model.layers)


@contextmanager
def hooks(pairs):
    """pairs: (module, fn(tensor) -> None editing in place, is_pre). Removed on exit."""
    handles = []
    try:
        for mod, fn, is_pre in pairs:
            if is_pre:
                handles.append(mod.register_forward_pre_hook(lambda m, args, fn=fn: fn(args[0])))
            else:
                handles.append(mod.register_forward_hook(
                    lambda m, args, out, fn=fn: fn(out[0] if isinstance(out, tuple) else out)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def states_at(modules: dict, pre: bool, call) -> dict:
    """{key: Tensor[T, d]}: the first row of each module's output (its input when `pre`) while `call()` runs."""
    states = {}

    def keep(key):
        return lambda t: states.__setitem__(key, t[0].clone())

    with hooks([(m, keep(key), pre) for key, m in modules.items()]):
        call()
    return states


@torch.no_grad()
def capture(model, family, ids: list[int], site: str) -> dict:
    """Clean states of `site` at every layer: {layer: Tensor[T, d]} (layer None for embed)."""
    layers = [None] if site == "embed" else range(num_layers(model, family))
    states = {}

    def keep(layer):
        return lambda t: states.__setitem__(layer, t[0].clone())

    with hooks([(module(model, family, site, l), keep(l), site in PRE) for l in layers]):
        model(torch.tensor([ids]))
    return states


@torch.no_grad()
def last_logits(model, family, ids_batch: torch.Tensor, *, noise=None, subject=(), restores=()) -> torch.Tensor:
    """Logits at the last position, with noise added to the subject embeddings and states replaced.

    restores: (site, layer, positions, clean Tensor[T, d]).
    """
    pairs = []
    if noise is not None:
        def add_noise(t):
            t[:, list(subject)] += noise.to(t.dtype)
        pairs.append((module(model, family, "embed"), add_noise, False))
    for site, layer, positions, clean in restores:
        def put(t, positions=positions, clean=clean):
            t[:, list(positions)] = clean[list(positions)].to(t.dtype)
        pairs.append((module(model, family, site, layer), put, site in PRE))
    with hooks(pairs):
        return model(ids_batch).logits[:, -1].float()


def window(layer: int, size: int, n: int) -> list[int]:
    lo = layer - size // 2
    return [l for l in range(lo, lo + size) if 0 <= l < n]
