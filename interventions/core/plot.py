"""Heatmaps in the style of ROME's causal-trace figures.

One panel per grid (site kind), tokens down the side with the subject marked by
``*``, layers across; one row of panels per prompt (at most `max_prompts`).

>>> heatmap(result, "runs/eiffel/heatmap.png")          # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attention": "Reds"}
CMAPS.update({f"vision_{k}": v for k, v in CMAPS.items()})
TITLES = {"hidden": "hidden state (block output)", "mlp": "MLP output", "attention": "attention output"}
TITLES.update({f"vision_{k}": f"vision tower: {v}" for k, v in TITLES.items()})


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
    ax.set_xticks(range(0, len(grid.layers), step), [row_label(x) for x in grid.layers[::step]], fontsize=7)
    ax.set_xlabel(axis_label(grid, name), fontsize=8)
    what = TITLES.get(name, name)
    ax.set_title(f"{what}\n{record['prompt'][:48]} → {record['answer']!r}", fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.05)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(f"p({record['answer'].strip()})" if grid.metric == "prob" else grid.metric, fontsize=7)


def row_label(row) -> str:
    """A grid row's tick label: a layer or a feature, features restored together joined by "+" (more than
    three: their count)."""
    if not isinstance(row, (tuple, list)):
        return str(row)
    return "+".join(map(str, row)) if len(row) <= 3 else f"{len(row)} features"


def axis_label(grid, name: str) -> str:
    """What a grid panel's horizontal axis counts: layers (window centres for `mlp` and `attention`) or a
    dictionary's features at one layer."""
    if grid.axis == "feature":
        return f"feature (at layer {grid.layer})"
    return "layer" + (" (window centre)" if name in ("mlp", "attention") else "")


def to_uint8(pixels):
    """An image tensor (``[..., 3, h, w]``) as uint8 for display and saving: floats in [0, 1] scaled by 255; a
    processor-normalised image (values outside [0, 1]) stretched to its own range first."""
    import torch

    if pixels.dtype == torch.uint8:
        return pixels.cpu()
    img = pixels.detach().float().cpu()
    lo, hi = float(img.min()), float(img.max())
    if lo < 0 or hi > 1:
        img = (img - lo) / max(hi - lo, 1e-8)
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def save_images(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Images (name -> ``[n, 3, h, w]``) into a safetensors file as uint8, what a report shows."""
    from interventions.core.atomic import atomic_save_file

    atomic_save_file({k: to_uint8(v).contiguous() for k, v in tensors.items()}, path, metadata)


def image_grid(panels: list[tuple[str, object]], row_labels: list[str], path: str | Path, *,
               scale: int = 4, per_row: int = 8) -> None:
    """A PNG of image panels side by side (e.g. before | after), one row per label.

    panels: ``[(title, Float[Tensor, "rows per_row 3 h w"])]`` in [0, 1]; the same prompts and seeds
    in every panel, so that a column compares one seed across panels."""
    import numpy as np
    from PIL import Image, ImageDraw

    rows = len(row_labels)
    h, w = panels[0][1].shape[-2:]
    cell_h, cell_w = h * scale + 4, w * scale + 4
    label_w, title_h = 150, 18
    width = label_w + len(panels) * (per_row * cell_w + 12)
    canvas = Image.new("RGB", (width, title_h + rows * cell_h), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for j, (title, images) in enumerate(panels):
        x0 = label_w + j * (per_row * cell_w + 12)
        draw.text((x0, 3), title, fill=(230, 230, 230))
        for r in range(rows):
            for k in range(min(per_row, images.shape[1])):
                arr = (images[r, k].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
                tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST)
                canvas.paste(tile, (x0 + k * cell_w + 2, title_h + r * cell_h + 2))
    for r, label in enumerate(row_labels):
        draw.text((4, title_h + r * cell_h + cell_h // 2 - 6), label[:24], fill=(230, 230, 230))
    canvas.save(path)


def diffusion_trace_heatmap(result, path: str | Path, *, max_prompts: int = 6) -> None:
    """Text-encoder grids (tokens down, layers across) and the cross-attention window curve, per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.grids)
    prompts = result.prompts[:max_prompts]
    fig, axes = plt.subplots(len(prompts), len(names), squeeze=False,
                             figsize=(3.4 * len(names) + 0.6, 3.2 * len(prompts)))
    for i, rec in enumerate(prompts):
        for j, name in enumerate(names):
            ax, grid = axes[i][j], result.grids[name]
            n = grid.lengths[i]
            title = f"{name}\n{rec['corrupted_prompt']!r} → {rec['target']!r}"
            if name == "cross_attention":
                vals = grid.values[i, :, 0].numpy()
                ax.bar(range(len(vals)), vals, color="tab:blue")
                ax.axhline(rec["clean_prob"], color="green", ls="--", lw=1, label="clean")
                ax.axhline(rec["corrupted_prob"], color="red", ls=":", lw=1, label="corrupted")
                ax.set_ylim(0, 1)
                ax.set_xlabel("first cross-attention layer of the clean window", fontsize=7)
                ax.set_ylabel(f"share of images showing {rec['target']}", fontsize=7)
                ax.legend(fontsize=6)
            else:
                im = ax.imshow(grid.values[i, :, :n].T.numpy(), aspect="auto", cmap="Purples", vmin=0, vmax=1,
                               interpolation="nearest")
                subject = set(rec["subject_positions"])
                ax.set_yticks(range(n), [t + ("*" if k in subject else "") for k, t in enumerate(rec["columns"][:n])],
                              fontsize=7)
                ax.set_xticks(range(len(grid.layers)), [str(x) for x in grid.layers], fontsize=7)
                ax.set_xlabel("text-encoder layer", fontsize=7)
                fig.colorbar(im, ax=ax, fraction=0.05).set_label(f"share showing {rec['target']}", fontsize=7)
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_cell_columns(record: dict) -> tuple[list[int], int | None]:
    """Of a VLM record's grid columns: those restoring one image token each (in image order), and the
    aggregated image column (None when not traced)."""
    img = record.get("image_positions") or []
    singles = {pos[0]: c for c, pos in enumerate(record["column_positions"]) if len(pos) == 1 and pos[0] in img}
    return [singles[p] for p in img if p in singles], record.get("image_column")


def grid_view(record: dict, grid) -> dict:
    """A record as `grid` sees it: over the context's tokens for a context grid (a VLM's text beside its tower's
    grids), over the tower's CLS and patches for a tower grid (`patch_positions`), else the record itself."""
    if getattr(grid, "context", False):
        return {**record, "columns": record["context_columns"], "column_positions": record["context_column_positions"],
                "subject_positions": []}
    if "patch_positions" in record:
        return {**record, "image_positions": record["patch_positions"], "image_column": record["patch_column"],
                "subject_positions": []}
    return record


def vlm_rows(record: dict, values) -> tuple[list[str], object]:
    """A VLM grid ``(layers, columns)`` with its image tokens collapsed: ``(row labels, (rows, layers) array)``.

    Rows: the tokens before the image, ``[image: all N]`` (the aggregated image column, when traced),
    ``[image: mean of N]`` (the mean single-token effect, when traced), then the text tokens; positions
    of the corrupted words end in ``*``."""
    import numpy as np

    img = record.get("image_positions") or []
    cols = record["column_positions"]
    singles, block = image_cell_columns(record)
    subject = set(record["subject_positions"]) - set(img)
    text = [c for c, pos in enumerate(cols) if len(pos) == 1 and pos[0] not in img]
    label = lambda c: repr(record["columns"][c])[1:-1] + ("*" if cols[c][0] in subject else "")   # noqa: E731
    before = [c for c in text if img and cols[c][0] < img[0]]
    labels, rows = [label(c) for c in before], [values[:, c] for c in before]
    if block is not None:
        labels.append(f"[image: all {len(img)}]" + ("*" if record.get("corruption") in ("noise", "swap") else ""))
        rows.append(values[:, block])
    if singles:
        labels.append(f"[image: mean of {len(img)}]")
        rows.append(values[:, singles].mean(axis=1))
    after = [c for c in text if c not in before]
    labels += [label(c) for c in after]
    rows += [values[:, c] for c in after]
    return labels, np.stack(rows)


def patch_overlay(ax, pixels, patch_values, title: str) -> None:
    """The image with a (side, side) grid of per-patch values over it, each value printed when legible."""
    import numpy as np

    img = to_uint8(pixels).permute(1, 2, 0).numpy()     # a processor-normalised image is stretched for display
    side = patch_values.shape[0]
    h, w = img.shape[:2]
    ax.imshow(img)
    ax.imshow(np.asarray(patch_values), cmap="magma", alpha=0.55, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
              interpolation="nearest")
    if side <= 8:
        for y in range(side):
            for x in range(side):
                ax.text((x + 0.5) * w / side - 0.5, (y + 0.5) * h / side - 0.5, f"{float(patch_values[y, x]):.2f}",
                        ha="center", va="center", color="white", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def vlm_trace_heatmap(result, images: list, path: str | Path, *, max_prompts: int = 6) -> None:
    """Per prompt of a VLM trace or patch: one panel per site (image tokens collapsed, see `vlm_rows`),
    then the per-patch effect of the first site at the layer where its mean image-token effect peaks,
    over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.grids)
    prompts = result.prompts[:max_prompts]
    height = max(len(grid_view(p, g)["columns"]) - len(image_cell_columns(grid_view(p, g))[0]) + 2
                 for p in prompts for g in result.grids.values())
    fig, axes = plt.subplots(len(prompts), len(names) + 1, squeeze=False,
                             figsize=(3.6 * len(names) + 3.6, (0.28 * height + 1.6) * len(prompts)))
    for i, record in enumerate(prompts):
        trace = "corrupted_prob" in record
        low = record["corrupted_prob"] if trace else None
        how = f"{record['corruption']}-corrupted" if trace else f"patched from {record['source_image']}"
        for j, name in enumerate(names):
            grid, ax = result.grids[name], axes[i][j]
            values = grid.values[i, :, :grid.lengths[i]].numpy()
            labels, rows = vlm_rows(grid_view(record, grid), values)
            im = ax.imshow(rows, aspect="auto", cmap=CMAPS.get(name, "viridis"), vmin=low, interpolation="nearest")
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            step = max(1, len(grid.layers) // 10)
            ax.set_xticks(range(0, len(grid.layers), step), [row_label(x) for x in grid.layers[::step]], fontsize=7)
            ax.set_xlabel(axis_label(grid, name), fontsize=8)
            ax.set_title(f"{TITLES.get(name, name)}, {how}\n{record['context'][-44:] if 'context' in record else record['prompt'][:44]} → "
                         f"{record['answer']!r}",
                         fontsize=8)
            bar = fig.colorbar(im, ax=ax, fraction=0.05)
            bar.ax.tick_params(labelsize=7)
            bar.set_label(f"p({record['answer'].strip()})" if grid.metric == "prob" else grid.metric, fontsize=7)
        ax = axes[i][-1]
        name = next((n for n in names if not result.grids[n].context), names[0])      # a tower's grid, if traced
        grid = result.grids[name]
        singles, _ = image_cell_columns(grid_view(record, grid))
        side = int(round(len(singles) ** 0.5))
        if not singles or side * side != len(singles) or images[i] is None:
            ax.axis("off")
            ax.text(0.5, 0.5, "no per-patch cells\n(image_cells: block, or no image)" if not singles
                    else "image tokens are not a square grid", ha="center", va="center", fontsize=8)
            continue
        cells = grid.values[i][:, singles].numpy()
        layer = int(cells.mean(axis=1).argmax())
        patch_overlay(ax, images[i], cells[layer].reshape(side, side),
                      f"{name}: per-patch {grid.metric}, {grid.axis} {row_label(grid.layers[layer])}")
    if len(result.prompts) > max_prompts:
        fig.suptitle(f"first {max_prompts} of {len(result.prompts)} prompts; all values are in result.json")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
