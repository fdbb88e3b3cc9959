"""Scoring features and neurons against known concepts, and finding what makes a feature fire.

Units are columns of an activation matrix ``Float[Tensor, "examples units"]``: a dictionary's
features (`Dictionary.encode`) or a layer's MLP neurons (the states entering the down projection).
A concept is a column of a boolean matrix ``Bool[Tensor, "examples concepts"]`` (an example holds
the concept or not: a caption's colour, a flag's country, an image patch inside a region).

- **Detection** (`detection_scores`): a unit detects a concept where it fires (activation above
  its threshold); precision = firing examples with the concept / firing examples, recall = firing
  examples with the concept / examples with it, F1 their harmonic mean (0 where undefined).
- **Thresholds**: a sparse feature fires when it is above 0. A neuron is dense, so its threshold
  (and sign) is chosen where F1 is highest on a *fit* split and the F1 reported is the one on a
  separate *test* split (`fitted_thresholds`, `best_units`); features get the same split, so the
  comparison is fair.
- **IoU** (Network Dissection, Bau et al. 2017): over image positions, the unit's firing mask
  (above its top-`quantile` level for a neuron; above 0 for a feature) against the concept's mask,
  ``Σ|A ∩ M| / Σ|A ∪ M|`` summed over the data set (`iou_scores`).
"""

from __future__ import annotations

import torch


def detection_scores(acts: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor | float = 0.0,
                     signs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``precision``, ``recall`` and ``f1`` as ``Float[Tensor, "units concepts"]``: unit u fires on
    example i when ``sign_u · acts[i, u] > threshold_u`` (sign +1 unless given)."""
    signed = acts if signs is None else acts * signs
    fires = (signed > thresholds).double()                       # [N, U]
    labels = labels.double()                                     # [N, C]
    hits = fires.T @ labels                                      # [U, C]
    fired = fires.sum(0)[:, None]
    present = labels.sum(0)[None, :]
    precision = torch.where(fired > 0, hits / fired.clamp_min(1), torch.zeros_like(hits))
    recall = torch.where(present > 0, hits / present.clamp_min(1), torch.zeros_like(hits))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(hits))
    return {"precision": precision, "recall": recall, "f1": f1}


def fitted_thresholds(acts: torch.Tensor, labels: torch.Tensor, *, candidates: int = 64
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (unit, concept): the threshold and sign (±1) with the highest F1 on these examples,
    among the midpoints of `candidates` + 1 evenly spaced quantiles of the unit's activations (so a
    threshold falls in the gaps between values), ``(thresholds, signs)`` each ``[units, concepts]``."""
    qs = torch.linspace(0.0, 1.0, candidates + 1, dtype=torch.float64)
    best_f1 = torch.full((acts.shape[1], labels.shape[1]), -1.0, dtype=torch.float64)
    best_t = torch.zeros_like(best_f1)
    best_s = torch.ones_like(best_f1)
    for sign in (1.0, -1.0):
        values = torch.quantile((sign * acts).double(), qs, dim=0)          # [Q + 1, U]
        for level in (values[:-1] + values[1:]) / 2:
            f1 = detection_scores(sign * acts.double(), labels, level[:, None].T)["f1"]
            better = f1 > best_f1
            best_f1 = torch.where(better, f1, best_f1)
            best_t = torch.where(better, level[:, None].expand_as(f1), best_t)
            best_s = torch.where(better, torch.full_like(f1, sign), best_s)
    return best_t, best_s


def best_units(acts: torch.Tensor, labels: torch.Tensor, fit: torch.Tensor, test: torch.Tensor, *,
               dense: bool) -> list[dict]:
    """Per concept, the unit with the highest F1 on `fit` (thresholds fitted there when `dense`),
    and its precision, recall and F1 on `test`; `fit` and `test` are example indices."""
    out = []
    for c in range(labels.shape[1]):
        y_fit, y_test = labels[fit, c:c + 1], labels[test, c:c + 1]
        if dense:
            t, s = fitted_thresholds(acts[fit], y_fit)
            t, s = t[:, 0], s[:, 0]
        else:
            t, s = torch.zeros(acts.shape[1], dtype=torch.float64), torch.ones(acts.shape[1], dtype=torch.float64)
        on_fit = detection_scores(acts[fit].double() * s, y_fit, t)["f1"][:, 0]
        unit = int(on_fit.argmax())
        scores = detection_scores(acts[test][:, unit:unit + 1].double() * s[unit], y_test, float(t[unit]))
        out.append({"unit": unit, "threshold": float(t[unit]), "sign": int(s[unit]),
                    **{k: round(float(v[0, 0]), 4) for k, v in scores.items()}})
    return out


def best_union(acts: torch.Tensor, labels: torch.Tensor, fit: torch.Tensor, test: torch.Tensor, *,
               most: int = 8) -> list[dict]:
    """Per concept, the set of at most `most` features whose union (any of them above 0) detects it
    best: chosen greedily on `fit` (the feature that raises F1 most, until none does), scored on
    `test`. A dictionary often splits a concept by the words that express it ("red", "ruby", "a
    tomato"); one feature then has high precision and low recall, and the union is the concept."""
    fires = acts > 0
    out = []
    for c in range(labels.shape[1]):
        y = labels[:, c]
        chosen, union, best = [], torch.zeros(len(acts), dtype=torch.bool), 0.0
        for _ in range(most):
            cand = union[fit, None] | fires[fit]
            tp = (cand & y[fit, None]).sum(0).double()
            f1 = 2 * tp / (cand.sum(0) + y[fit].sum()).double().clamp_min(1)
            u = int(f1.argmax())
            if float(f1[u]) <= best + 1e-9:
                break
            chosen.append(u)
            union, best = union | fires[:, u], float(f1[u])
        scores = detection_scores(union[test, None].double(), y[test, None], 0.5)
        out.append({"units": chosen, **{k: round(float(v[0, 0]), 4) for k, v in scores.items()}})
    return out


def iou_scores(acts: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
    """``Float[Tensor, "units concepts"]``: Σ|A ∩ M| / Σ|A ∪ M| over every position of every example,
    with A the positions where a unit is above its threshold. `acts`: ``[positions, units]``; `masks`:
    ``Bool[positions, concepts]`` (positions of all examples stacked)."""
    fires = (acts > thresholds).double()
    m = masks.double()
    inter = fires.T @ m
    union = fires.sum(0)[:, None] + m.sum(0)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def top_level(acts: torch.Tensor, quantile: float = 0.005) -> torch.Tensor:
    """Network Dissection's per-unit level: the activation exceeded by the top `quantile` of positions."""
    return torch.quantile(acts.double(), 1 - quantile, dim=0)


def max_activating(acts: torch.Tensor, unit: int, top: int = 5) -> list[tuple[int, float]]:
    """``(example, activation)`` of the `top` examples where `unit` is highest."""
    values, index = acts[:, unit].topk(min(top, len(acts)))
    return [(int(i), round(float(v), 4)) for v, i in zip(values, index)]
