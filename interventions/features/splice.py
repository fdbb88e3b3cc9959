"""Dictionaries inside a forward pass, as pyvene interventions at the dictionary's site.

- `FeatureEdit`: change the features of the states at the unit locations and keep the dictionary's
  error (``x + (f' - f) W_dec``, `Dictionary.edit`); `change` gets ``f`` (``batch units d_sae``) and,
  when a source is given, the source states' features (patching). A change that returns ``f``
  itself leaves the states bit for bit.
- `Splice`: replace the states by the reconstruction (no error term), or by zeros: what SAELens's
  "loss recovered" compares.

>>> graph = build_graph(model, [(component, FeatureEdit(dictionary, zero_features([1204])))])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from pyvene.models.interventions import Intervention, LocalistRepresentationIntervention

from interventions.core.prompts import encode, head, model_inputs, pad_token_id
from interventions.core.runtime import eval_mode, input_device
from interventions.engine.pv import build_graph
from interventions.features.dictionary import Dictionary
from interventions.models.sites import site_table

#: A text's tokens read at most when training or scoring a dictionary (the rest is cut): one forward
#: pass's memory grows with the square of it.
MAX_TEXT_TOKENS = 256

#: change(f, source_f) -> new f; source_f is None without a source.
Change = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class FeatureEdit(Intervention, LocalistRepresentationIntervention):
    """Edit features at the unit locations, keeping the reconstruction error (see the module docstring)."""

    def __init__(self, dictionary: Dictionary, change: Change, **kwargs):
        super().__init__(keep_last_dim=True, **kwargs)
        self.dictionary, self.change = dictionary, change
        # pyvene runs a node without a source run only when its source is "constant"
        self.is_source_constant = not getattr(change, "needs_source", False)

    def forward(self, base, source=None, subspaces=None, **kwargs):
        d = self.dictionary
        source_f = None if source is None else d.encode(source.to(base.device))
        return d.edit(base, lambda f: self.change(f, source_f))

    def __str__(self):
        return "FeatureEdit()"


class Splice(Intervention, LocalistRepresentationIntervention):
    """Replace the states by the dictionary's reconstruction (``mode="reconstruct"``) or by zeros."""

    def __init__(self, dictionary: Dictionary, mode: str = "reconstruct", **kwargs):
        super().__init__(keep_last_dim=True, **kwargs)
        self.dictionary, self.mode = dictionary, mode
        self.is_source_constant = True

    def forward(self, base, source=None, subspaces=None, **kwargs):
        if self.mode == "zero":
            return torch.zeros_like(base)
        return self.dictionary(base).to(base.dtype)

    def __str__(self):
        return f"Splice({self.mode})"


def zero_features(features: list[int]) -> Change:
    def change(f, source_f):
        out = f.clone()
        out[..., features] = 0
        return out
    return change


def set_features(features: list[int], values: torch.Tensor | float) -> Change:
    """Clamp `features` to `values` (a number, or one per feature)."""
    def change(f, source_f):
        out = f.clone()
        out[..., features] = torch.as_tensor(values, dtype=f.dtype, device=f.device)
        return out
    return change


def add_to_features(features: list[int], amounts: torch.Tensor | float) -> Change:
    def change(f, source_f):
        out = f.clone()
        out[..., features] += torch.as_tensor(amounts, dtype=f.dtype, device=f.device)
        return out
    return change


def patch_features(features: list[int]) -> Change:
    """Take `features` from the source run (same positions), the rest from the base run."""
    def change(f, source_f):
        out = f.clone()
        out[..., features] = source_f[..., features]
        return out
    change.needs_source = True
    return change


@contextlib.contextmanager
def features_edited(module: torch.nn.Module, dictionary: Dictionary, change: Change):
    """Within the block, `module`'s output (its first element, if a tuple) has its features changed by
    `change` with the error kept, at every position: for models no pyvene graph wraps, such as a
    text-to-image pipeline's text encoder. The hook is removed on exit."""
    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        new = dictionary.edit(h, lambda f: change(f, None))
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def component(model, dictionary: Dictionary) -> str:
    """The pyvene component the dictionary reads (its site at its layer)."""
    return site_table(model).component(dictionary.where.site, dictionary.where.layer)


@torch.no_grad()
def spliced_losses(d: Dictionary, model, tokenizer, texts: list[str], *, scale: float = 1.0,
                   max_texts: int = 64) -> dict[str, float]:
    """Mean next-token cross-entropy over `texts` (each cut to its first 256 tokens): clean, with the
    reconstruction spliced in at every position but the first, and with the site zero-ablated there."""
    encs = [head(e, MAX_TEXT_TOKENS) for e in (encode(tokenizer, t, field="texts") for t in texts[:max_texts])]
    encs = [e for e in encs if len(e) > 2]
    where = component(model, d)
    sums = {"clean": 0.0, "reconstruct": 0.0, "zero": 0.0}
    count = 0
    device = input_device(model)
    with eval_mode(model):
        graphs = {mode: build_graph(model, [(where, Splice(d, mode))]) for mode in ("reconstruct", "zero")}
        for lo in range(0, len(encs), 16):
            batch = encs[lo:lo + 16]
            inputs = {**model_inputs(batch, pad_token_id(tokenizer), device), "use_cache": False}
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            keep = mask[:, 1:].bool()
            runs = {"clean": model(**inputs).logits}
            after_first = [list(range(1, ids.shape[1]))] * len(batch)      # right padding: pads change nothing
            for name, graph in graphs.items():
                _, out = graph(base=inputs, unit_locations={"base": [after_first]})
                runs[name] = out.logits
            for name, logits in runs.items():
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
                sums[name] += float(nll[keep].sum())
            count += int(keep.sum())
    means = {k: v / max(count, 1) for k, v in sums.items()}
    return {"clean": means["clean"], "spliced": means["reconstruct"], "zero": means["zero"]}
