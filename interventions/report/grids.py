"""Report sections for grid runs (trace, patch, attribution, lens, knockout; language, VLM and CLIP models): one
interactive heatmap per prompt and grid, the image with its image-token cells over it, and two runs compared.

Every section names where its numbers come from (`source`, a JSON pointer into a file of the run), so a test can
check that the page shows exactly what the run wrote.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from interventions.core.conventions import window
from interventions.core.errors import SpecError
from interventions.core.metrics import pearson, top_overlap
from interventions.core.plot import grid_view, image_cell_columns, row_label
from interventions.report.run import Run, check_grid_result, png_of

#: Grids that restore one layer per cell (the engine's `SINGLE_LAYER_GRIDS`); others restore a window.
SINGLE_LAYER = ("hidden", "vision_hidden")
#: At most this many prompts get heatmaps in one page (all values stay in result.json).
MAX_PROMPTS = 24


def pointer(file: str, *parts) -> str:
    """A JSON pointer (RFC 6901) into one of the run's files: ``result.json#/grids/hidden/values/0``."""
    escaped = [str(p).replace("~", "~0").replace("/", "~1") for p in parts]
    return f"{file}#/" + "/".join(escaped)


def grid_sections(run: Run) -> list[dict]:
    result = run.json.get("result.json")
    check_grid_result(result, str(run.folder / "result.json"))
    images = run.tensors("images.safetensors").get("prompt")
    if images is not None and (images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8):
        raise SpecError("RUN_DIR", str(run.folder / "images.safetensors"), "a `prompt` tensor of uint8 images "
                        f"[n, 3, h, w] (got {images.dtype} {list(images.shape)})")
    sections = []
    for i, record in enumerate(result["prompts"][:MAX_PROMPTS]):
        for name, grid in result["grids"].items():
            section = grid_section(result, i, name)
            if images is not None and i < len(images):
                section["image"] = _image_cells(record, grid, images[i])
            sections.append(section)
    if len(result["prompts"]) > MAX_PROMPTS:
        sections.append({"type": "note", "text": f"heatmaps of the first {MAX_PROMPTS} of {len(result['prompts'])} "
                         "prompts; every value is in result.json"})
    return sections


def grid_section(result: dict, i: int, name: str) -> dict:
    """One heatmap: rows are the grid's layers (or features), columns the prompt's tokens (or patches)."""
    grid, record = result["grids"][name], result["prompts"][i]
    view = _view(record, grid)
    subject = set(view.get("subject_positions") or [])
    positions = view.get("column_positions") or [[p] for p in view.get("positions", range(len(view["columns"])))]
    columns = [f"{c}*" if subject & set(pos) else c for c, pos in zip(view["columns"], positions)]
    if len(view["columns"]) > 1 and all(len(r) == 1 for r in grid["values"][i]):     # one column: the subject's
        columns = ["subject: " + "".join(view["columns"][p] for p in sorted(subject) if p < len(view["columns"]))]
        positions = [sorted(subject)]
    rows = grid["layers"] if "layers" in grid else grid["features"]
    section = {"type": "grid", "id": f"grid-{i}-{name}", "grid": name, "prompt": i,
               "title": f"{_label(record)}: {name}", "source": pointer("result.json", "grids", name, "values", i),
               "z": grid["values"][i], "x": [row_label(r) for r in rows], "y": columns,
               "positions": [pos if len(pos) > 1 else pos[0] for pos in positions],
               "axis": "layer" if "layers" in grid else f"feature (layer {grid.get('layer')})",
               "site": grid["site"], "metric": grid["metric"], "answer": record.get("answer", record.get("target")),
               "clean": record.get("clean_prob"), "corrupted": record.get("corrupted_prob"),
               "windows": _windows(result, name, grid)}
    topk = record.get(name.removesuffix("_rank") + "_top_k")
    if topk is not None:
        section["topk"] = [[", ".join(f"{t!r} {p:.3g}" for t, p in cell) for cell in row] for row in topk]
    return section


def compare_sections(a: Run, b: Run) -> list[dict]:
    """Grids both runs hold with the same shape: A, B and A − B side by side, with Pearson r and the top-10
    overlap (of the largest cells) over all their prompts, computed as `lesion compare` computes r."""
    ra, rb = a.json.get("result.json"), b.json.get("result.json")
    check_grid_result(ra, str(a.folder / "result.json"))
    if not isinstance(rb, dict) or "grids" not in rb:
        raise SpecError("--compare", str(b.folder), "a grid run (trace, patch, lens, knockout) to set beside RUN_DIR")
    try:
        check_grid_result(rb, str(b.folder / "result.json"))
    except SpecError as err:
        raise SpecError("--compare", str(b.folder), err.allowed) from None
    sections = []
    for name in [n for n in ra["grids"] if n in rb["grids"]]:
        va, vb = ra["grids"][name]["values"], rb["grids"][name]["values"]
        if _shape(va) != _shape(vb):
            sections.append({"type": "note", "text": f"{name}: the two runs' grids differ in shape"})
            continue
        # the quantity `lesion compare` correlates: indirect effects for traces, the values otherwise
        key = "indirect_effect" if all("indirect_effect" in r["grids"][name] for r in (ra, rb)) else "values"
        xa, xb = _tensor(ra["grids"][name][key]), _tensor(rb["grids"][name][key])
        both = torch.isfinite(xa) & torch.isfinite(xb)
        stats = {"r": _number(pearson(xa, xb, name)), "top10_overlap": _number(top_overlap(xa, xb, 10)),
                 "cells": int(both.sum()), "of": key}
        sections.append({"type": "note", "text": f"{name}: r = {_fmt(stats['r'])}, top-10 overlap "
                         f"{_fmt(stats['top10_overlap'])} over {stats['cells']} cells ({key})", "stats": stats, "grid": name})
        for i in range(min(len(va), MAX_PROMPTS)):
            left, right = grid_section(ra, i, name), grid_section(rb, i, name)
            diff = [[None if x is None or y is None else x - y for x, y in zip(ra_, rb_)]
                    for ra_, rb_ in zip(left["z"], right["z"])]
            sections.append({**left, "type": "compare", "id": f"compare-{i}-{name}",
                             "title": f"{_label(ra['prompts'][i])}: {name}", "names": [a.name, b.name],
                             "z_b": right["z"], "source_b": pointer("other:result.json", "grids", name, "values", i),
                             "diff": diff})
    return sections or [{"type": "note", "text": "the two runs share no grid"}]


def _view(record: dict, grid: dict) -> dict:
    return grid_view(record, SimpleNamespace(context=grid.get("columns") == "context_columns"))


def _label(record: dict) -> str:
    label = record.get("label")
    return f"{label} + {record['prompt']!r}" if label and label != record.get("prompt") else repr(record["prompt"])


def _windows(result: dict, name: str, grid: dict) -> list | None:
    """The layers each row's cells restore (ROME's window, `interventions.core.conventions.window`)."""
    spec = result.get("spec", {})
    size = spec.get("window", 1)
    if "layers" not in grid or name in SINGLE_LAYER or size <= 1 or result["kind"] not in ("trace", "patch"):
        return None
    context = grid.get("columns") == "context_columns"
    total = max(grid["layers"]) + 1 if context else result.get("meta", {}).get("num_layers", max(grid["layers"]) + 1)
    return [[w[0], w[-1]] for w in (window(layer, size, total) for layer in grid["layers"])]


def _image_cells(record: dict, grid: dict, pixels) -> dict | None:
    """The image and which grid columns are its patches, row by row (None: not a square of single patches)."""
    singles, _ = image_cell_columns(_view(record, grid))
    side = round(len(singles) ** 0.5)
    if not singles or side * side != len(singles):
        return None
    return {"src": png_of(pixels), "cells": singles, "side": side}


def _shape(values) -> list:
    return [[len(row) for row in prompt] for prompt in values]


def _tensor(values) -> torch.Tensor:
    """A saved grid's [prompt][layer][column] lists (ragged, None for a cell beyond a prompt) as one tensor."""
    width = max((len(row) for prompt in values for row in prompt), default=0)
    return torch.tensor([[[math.nan if v is None else v for v in row] + [math.nan] * (width - len(row))
                          for row in prompt] for prompt in values], dtype=torch.float64)


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
