"""Metrics read at the answer position of one row.

>>> import torch
>>> logits = torch.tensor([2.0, 0.0, 0.0])
>>> round(prob(logits, 0), 4)
0.7870
>>> logit_diff(logits, 0, 1)
2.0
"""

from __future__ import annotations

import torch


def prob(logits: torch.Tensor, target: int) -> float:
    """p(target) under softmax(logits); logits: ``Float[Tensor, "vocab"]``."""
    return float(logits.float().softmax(-1)[target])


def logit_diff(logits: torch.Tensor, target: int, counterfactual: int) -> float:
    """logit(target) − logit(counterfactual)."""
    return float(logits[target] - logits[counterfactual])


def kl(reference_logprobs: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference ‖ softmax(logits)) in nats: how far a patched run is from the reference run."""
    logp = logits.float().log_softmax(-1)
    ref = reference_logprobs.float()
    return float((ref.exp() * (ref - logp)).sum())


def continuation_logprob(logits: torch.Tensor, prompt_length: int, ids: list[int]) -> float:
    """Mean log-probability of the tokens `ids` that follow a prompt of `prompt_length` tokens, teacher
    forced; logits: ``Float[Tensor, "position vocab"]`` of the prompt followed by `ids`."""
    lp = logits[prompt_length - 1: prompt_length - 1 + len(ids)].float().log_softmax(-1)
    return float(lp[torch.arange(len(ids)), torch.tensor(ids, device=logits.device)].mean())


def score(metric: str, logits: torch.Tensor, targets: list[int], counterfactuals: list[int | None],
          reference_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """The metric for every row at once, on the rows' device, read back once.

    logits: ``Float[Tensor, "rows vocab"]``; `reference_logprobs` (``"rows vocab"``) only for
    ``kl``. Returns ``Float64[Tensor, "rows"]`` on the CPU; row ``i`` equals the single-row
    functions above applied to ``logits[i]``.
    """
    rows = torch.arange(len(logits), device=logits.device)
    target = torch.tensor(targets, device=logits.device)
    if metric == "prob":
        out = logits.float().softmax(-1)[rows, target]
    elif metric == "logit_diff":
        out = logits[rows, target] - logits[rows, torch.tensor(counterfactuals, device=logits.device)]
    elif metric == "kl":
        ref = reference_logprobs.float().to(logits.device)
        out = (ref.exp() * (ref - logits.float().log_softmax(-1))).sum(-1)
    else:
        raise ValueError(f"`metric`: got {metric!r}; expected one of 'prob', 'logit_diff', 'kl'")
    return out.double().cpu()


def pearson(x: torch.Tensor, y: torch.Tensor, grid: str = "") -> float:
    """Pearson correlation over the cells finite in both (NaN when either is constant there)."""
    x, y = x.double(), y.double()
    if x.shape != y.shape:
        raise ValueError(f"grid {grid!r}: shapes {list(x.shape)} and {list(y.shape)} differ; not the same spec")
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep] - x[keep].mean(), y[keep] - y[keep].mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def top_overlap(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """The share of the `k` largest cells of `x` (finite in both) that are among the `k` largest of `y`."""
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep].double(), y[keep].double()
    k = min(k, x.numel())
    if k == 0:
        return float("nan")
    top_x, top_y = set(x.topk(k).indices.tolist()), set(y.topk(k).indices.tolist())
    return len(top_x & top_y) / k
