"""Heatmaps in the style of ROME's causal-trace figures.

One panel per grid (site kind), tokens down the side with the subject marked by
``*``, layers across; one row of panels per prompt (at most `max_prompts`).

>>> heatmap(result, "runs/eiffel/heatmap.png")          # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attention": "Reds"}
TITLES = {"hidden": "hidden state (block output)", "mlp": "MLP output", "attention": "attention output"}


def heatmap(result, path: str | Path, *, max_prompts: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.grids)
    prompts = result.prompts[:max_prompts]
    height = max(len(p["columns"]) for p in prompts)
    fig, axes = plt.subplots(len(prompts), len(names), squeeze=False,
                             figsize=(3.6 * len(names) + 0.6, (0.28 * height + 1.4) * len(prompts)))
    for i, record in enumerate(prompts):
        for j, name in enumerate(names):
            _panel(fig, axes[i][j], result, name, i, record, plt)
    if len(result.prompts) > max_prompts:
        fig.suptitle(f"first {max_prompts} of {len(result.prompts)} prompts; all values are in result.json")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(fig, ax, result, name, i, record, plt):
    grid = result.grids[name]
    n = grid.lengths[i]
    values = grid.values[i, :, :n].T.numpy()          # positions down, layers across
    low = record.get("corrupted_prob") if result.kind == "trace" else None
    cmap = CMAPS.get(name, "viridis" if grid.metric != "logit_diff" else "RdBu_r")
    vmin = low if low is not None and math.isfinite(low) else None
    norm = None
    if grid.metric == "logit_diff" and values.min() < 0 < values.max():
        from matplotlib.colors import TwoSlopeNorm

        norm, vmin = TwoSlopeNorm(vcenter=0.0), None     # red: towards the target, blue: away
    im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, norm=norm, interpolation="nearest")
    subject = set(record.get("subject_positions", []))
    labels = []
    for k, label in enumerate(record["columns"]):
        marked = k < len(record["tokens"]) and label == record["tokens"][k] and k in subject
        labels.append(repr(label)[1:-1] + ("*" if marked else ""))
    ax.set_yticks(range(n), labels, fontsize=7)
    step = max(1, len(grid.layers) // 10)
    ax.set_xticks(range(0, len(grid.layers), step), [str(x) for x in grid.layers[::step]], fontsize=7)
    ax.set_xlabel("layer" + (" (window centre)" if name in ("mlp", "attention") else ""), fontsize=8)
    what = TITLES.get(name, name)
    ax.set_title(f"{what}\n{record['prompt'][:48]} → {record['answer']!r}", fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.05)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(f"p({record['answer'].strip()})" if grid.metric == "prob" else grid.metric, fontsize=7)
