"""Runtime helpers every floor above uses: scoped eval mode, where inputs go, what a forward accepts.

>>> import torch
>>> layer = torch.nn.Dropout().train()
>>> with eval_mode(layer):
...     layer.training
False
>>> layer.training
True
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Run in eval mode (no dropout), restoring each module's mode afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def input_device(model) -> torch.device:
    """Where the model's inputs go: the input embedding's device, or its execution device
    when accelerate dispatched the model (``device_map``; offloaded weights sit on ``meta``)."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        device = hook.execution_device
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return embed.weight.device


def keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (the LM head at chosen positions only)."""
    forward = model.forward
    return _takes_logits_to_keep(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=64)
def _takes_logits_to_keep(forward) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters
