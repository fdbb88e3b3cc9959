"""Linear probes on a site's states, per layer x position, with a control task and concept vectors.

- **Features**: the states at `site` (block output by default) of every requested layer, read by
  the same pyvene collection as the lens (`interventions.lenses.lens.collect_states`), at `last`, a token
  index, or `image` (the mean over a VLM prompt's image tokens).
- **Probe**: multinomial logistic regression on features standardized with the training split's
  mean and std, minimising ``sum(log-loss) + l2/2 * ||W||^2`` (scikit-learn's objective with
  ``C = 1/l2``), solved by L-BFGS in float64.
- **Split**: stratified by label and seeded; a share `heldout` of each label is held out.
- **Control task** (Hewitt & Liang 2019): each `group` (an input's type, e.g. the country a flag
  shows whatever its jitter) gets a random label drawn from the labels' empirical distribution;
  the same probe is fitted to those labels on the same split. Selectivity = accuracy - control
  accuracy: how much of the accuracy is more than memorising the inputs' identities.
- **Concept vectors** (TCAV, Kim et al. 2018): at the best cell (held-out accuracy, then
  selectivity), each label's probe direction mapped back to the raw state space, unit length,
  scaled to the distance between the label's mean state and the others', saved in the
  steering-vector format (`interventions.lenses.steering`) so that ``lesion apply --steer`` can add it.
"""

from __future__ import annotations

import random

import torch

from interventions.core.errors import SpecError
from interventions.engine.plan import resolve_layers
from interventions.lenses.lens import collect_states, prepare
from interventions.models.sites import site_table
from interventions.spec.lens_specs import example_group


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, *, iterations: int = 500):
    """``(W (classes, d), b (classes,))`` minimising ``sum(log-loss) + l2/2 ||W||^2`` (float64 L-BFGS)."""
    x, y = x.double(), y.long()
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iterations, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum") + l2 / 2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def stratified_split(labels: list[int], heldout: float, seed: int,
                     groups: list[str] | None = None) -> tuple[list[int], list[int]]:
    """(train, test) indices: a share `heldout` of each label's examples (or, with `groups`, of each
    label's groups, every example of a group on one side) held out: at least one, never all."""
    rng = random.Random(seed)
    keys = groups if groups is not None else [str(i) for i in range(len(labels))]
    train, test = [], []
    for label in sorted(set(labels)):
        units = sorted({k for k, v in zip(keys, labels) if v == label})
        rng.shuffle(units)
        k = min(len(units) - 1, max(1, round(heldout * len(units)))) if len(units) > 1 else 0
        out = set(units[:k])
        for i, (key, v) in enumerate(zip(keys, labels)):
            if v == label:
                (test if key in out else train).append(i)
    return sorted(train), sorted(test)


def control_labels(groups: list[str], labels: list[int], seed: int) -> list[int]:
    """Each group's random label, drawn from the empirical label distribution (Hewitt & Liang)."""
    rng = random.Random(f"control:{seed}")
    drawn = {g: rng.choice(labels) for g in sorted(set(groups))}
    return [drawn[g] for g in groups]


def _accuracy(x, y, train, test, classes, l2):
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    w, b = fit_logistic((x[train] - mean) / std, y[train], classes, l2)
    pred = (((x[test] - mean) / std).double() @ w.T + b).argmax(-1)
    return float((pred == y[test]).double().mean()), w, b, mean, std


def read_positions(r, sel, i: int) -> list[int]:
    """The positions of example `i` (a `lens.Reading`) whose states a probe at `sel` averages."""
    n = len(r.enc)
    if sel == "image":
        if "image" not in r.groups:
            raise SpecError(f"examples[{i}].image", None, "an image for `positions: [image]`")
        return list(r.groups["image"])
    if sel == "last":
        return [n - 1]
    if not -n <= sel < n:
        raise SpecError("positions", sel, f"a position in [-{n}, {n - 1}] for examples[{i}] ({n} tokens)")
    return [sel % n]


def example_readings(spec, model, tokenizer, processor=None) -> list:
    """Each example prepared (image loaded), its positions checked against every `positions` entry."""
    vision = spec.modality == "vision-language"
    readings = [prepare(model, tokenizer, e.prompt, field=f"examples[{i}]", processor=processor,
                        image=getattr(e, "image", None), vision=vision) for i, e in enumerate(spec.examples)]
    for i, r in enumerate(readings):
        for sel in spec.positions:
            read_positions(r, sel, i)
    return readings


def features(spec, model, tokenizer, processor=None) -> tuple[list[int], dict[tuple[int, str], torch.Tensor]]:
    """(layers, {(layer, position label): Float[Tensor, "example d"]})."""
    layers = list(resolve_layers(spec, site_table(model).num_layers(model)))
    readings = example_readings(spec, model, tokenizer, processor)
    states, _ = collect_states(model, tokenizer, [r.enc for r in readings], layers, site=spec.site,
                               max_rows=spec.max_batch_rows)
    out = {}
    for k, layer in enumerate(layers):
        for sel in spec.positions:
            out[(layer, str(sel))] = torch.stack([s[k, read_positions(r, sel, i)].mean(0)
                                                  for i, (r, s) in enumerate(zip(readings, states))])
    return layers, out


def run_probe(spec, model, tokenizer, processor=None) -> dict:
    """Fit every probe; the report (accuracy, control accuracy and selectivity per layer x position)
    and the concept vectors of the best cell, ``{label: (layer, Float[Tensor, "d"])}``."""
    names = sorted({e.label for e in spec.examples})
    y = torch.tensor([names.index(e.label) for e in spec.examples])
    groups = [example_group(e) for e in spec.examples]
    train, test = stratified_split(y.tolist(), spec.heldout, spec.seed,
                                   groups if spec.split == "groups" else None)
    control = torch.tensor(control_labels(groups, y.tolist(), spec.seed))
    layers, feats = features(spec, model, tokenizer, processor)
    positions = [str(p) for p in spec.positions]
    acc = torch.full((len(layers), len(positions)), float("nan"))
    ctrl, sel_ = acc.clone(), acc.clone()
    fits = {}
    for (layer, pos), x in feats.items():
        k, c = layers.index(layer), positions.index(pos)
        acc[k, c], w, b, mean, std = _accuracy(x, y, train, test, len(names), spec.l2)
        fits[(layer, pos)] = (w, std)
        if spec.control:
            ctrl[k, c] = _accuracy(x, control, train, test, len(names), spec.l2)[0]
            sel_[k, c] = acc[k, c] - ctrl[k, c]
    score = acc + 1e-3 * torch.nan_to_num(sel_, nan=0.0)
    k, c = divmod(int(score.argmax()), len(positions))
    best = (layers[k], positions[c])
    w, std = fits[best]
    x = feats[best]
    vectors = {}
    for j, label in enumerate(names):
        direction = (w[j] / std.double()).float()
        direction = direction / direction.norm()
        inside = y == j
        gap = (x[inside].mean(0) - x[~inside].mean(0)).norm()
        vectors[label] = (best[0], direction * gap)
    majority = max(float((y[test] == j).double().mean()) for j in range(len(names)))
    report = {"labels": names, "split": spec.split, "layers": layers, "positions": positions, "train": len(train), "test": len(test),
              "groups": len(set(groups)), "majority_baseline": majority, "accuracy": acc.tolist(),
              "control_accuracy": ctrl.tolist() if spec.control else None,
              "selectivity": sel_.tolist() if spec.control else None,
              "best": {"layer": best[0], "position": best[1], "accuracy": float(acc[k, c]),
                       "control_accuracy": float(ctrl[k, c]) if spec.control else None}}
    return {"report": report, "vectors": vectors}
