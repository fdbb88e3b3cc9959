"""Memory budgets: estimate what the engine holds, and measure the real peak (sizes: `units`).

A budget (``--memory 512MB``) bounds the memory a sweep allocates *beyond the model's
weights*: the clean states and baseline caches of the prompts in flight, and the
activations of one forward pass. The plan sizes its prompt blocks and chunks from
`Costs`, an estimate from the model's config; `PeakMemory` measures what was really
used, so the estimate is checked, not assumed.

>>> from interventions.core.units import parse_bytes
>>> parse_bytes("1.5GiB")
1610612736
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Costs:
    """Bytes per unit of work for one model, from its config.

    An upper estimate of a decoder forward under ``inference_mode``: the widest moment of
    one layer (residual, normed input, q/k/v, attention output, the MLP's three widest
    tensors), the attention scores, the key/value cache (the prefix and its concatenated
    copy), the answer position's logits (model dtype, float32, log-softmax) and what the
    engine adds per row (source states, skipped layers' outputs).
    """

    elt: int                 # bytes per element in the model's dtype
    hidden: int              # d
    kv: int                  # key/value width per layer (heads × head_dim), keys and values
    layers: int
    heads: int
    ffn: int
    vocab: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Costs":
        cfg = model.config.get_text_config(decoder=True)
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
        return cls(next(model.parameters()).element_size(), cfg.hidden_size, 2 * kv_heads * head_dim,
                   cfg.num_hidden_layers, heads, ffn, cfg.vocab_size)

    @property
    def layer_tokens(self) -> int:
        """Bytes of one token's activations inside one layer, at the layer's widest."""
        return self.elt * (6 * self.hidden + 2 * self.heads * (self.hidden // self.heads) + 3 * self.ffn)

    @property
    def cache_token(self) -> int:
        """Bytes of one token's key/value states over all layers."""
        return self.elt * self.layers * self.kv

    @property
    def layers_token(self) -> int:
        """Bytes of one token's outputs of every layer (kept for skipped layers)."""
        return self.elt * self.layers * self.hidden

    def row(self, new: int, context: int, nodes: int, units: int, skipped: int) -> int:
        """One row of a forward pass computing `new` tokens after ``context - new`` cached ones."""
        return (new * self.layer_tokens
                + 2 * context * self.cache_token
                + 8 * new * context * self.heads          # attention scores and their softmax
                + self.vocab * (self.elt + 8)             # logits, float32 copy, log-softmax
                + nodes * units * self.hidden * self.elt  # source representations
                + skipped * new * self.hidden * self.elt)

    def prompt_state(self, length: int, nodes: int, variants: int, skip_layers: bool) -> int:
        """What one prompt holds while its rows run: its clean states at every collected node,
        each variant's baseline key/value cache (and layer outputs), its source log-probs."""
        baseline = self.cache_token + (self.layers_token if skip_layers else 0)
        return length * (nodes * self.hidden * self.elt + variants * baseline) + 4 * self.vocab


class PeakMemory:
    """Measure the peak bytes allocated inside the block beyond what was allocated before it.

    On CUDA, the caching allocator's exact peak. On the CPU (Linux), the process's resident
    set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) after handing
    freed heap memory back with ``malloc_trim``: an upper bound of what torch allocated,
    since the C allocator may keep freed memory resident. glibc raises its mmap threshold
    as large blocks are freed, which keeps tens of megabytes resident; for a tight figure
    run with ``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072`` (as the tests do). Pass the `model` so that its
    memory-mapped weights are paged in before the measurement starts.

    >>> with PeakMemory("cpu") as peak:        # doctest: +SKIP
    ...     run_plan(plan)
    >>> peak.bytes, peak.method                # doctest: +SKIP
    """

    def __init__(self, device: str | torch.device = "cpu", model: torch.nn.Module | None = None):
        self.device = torch.device(device)
        self.model = model
        self.bytes: int | None = None
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            if self.model is not None:
                resident(self.model)
            _trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                      # reset VmHWM to the current resident size
            self._before = _status_kib("VmRSS") * 1024
            self.method = "resident set high-water mark (VmHWM)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        else:
            self.bytes = _status_kib("VmHWM") * 1024 - self._before
        return False


@torch.no_grad()
def resident(model: torch.nn.Module) -> None:
    """Read every weight once, so that weights memory-mapped from a safetensors file are
    resident before a measurement: their first touch is the model's memory, not the sweep's."""
    for p in model.parameters():
        if p.device.type == "cpu":
            p.view(-1)[:: max(1, 4096 // p.element_size())].sum()     # one element per page


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
