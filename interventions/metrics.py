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


def score(metric: str, logits: torch.Tensor, prompt, source_logprobs: torch.Tensor) -> float:
    """The spec's metric for one row of `prompt` (a `plan.Prompt` with resolved target ids)."""
    if metric == "prob":
        return prob(logits, prompt.target_id)
    if metric == "logit_diff":
        return logit_diff(logits, prompt.target_id, prompt.counterfactual_id)
    if metric == "kl":
        return kl(source_logprobs, logits)
    raise ValueError(f"`metric`: got {metric!r}; expected one of 'prob', 'logit_diff', 'kl'")
