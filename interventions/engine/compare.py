"""Compare two results of the same spec (e.g. `method: exact` against `method: attribution`).

>>> correlation(exact, approx, "hidden")      # Pearson r over every finite cell   # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from interventions.core.errors import SpecError
from interventions.core.metrics import pearson, top_overlap
from interventions.core.reading import read_json, read_safetensors
from interventions.engine.result import Result


def _values(result: Result, grid: str) -> torch.Tensor:
    return result.indirect_effect(grid) if result.kind == "trace" else result.grids[grid].values


def correlation(a: Result, b: Result, grid: str) -> float:
    """Pearson correlation of two results' cells (indirect effects for traces), finite cells only."""
    return pearson(_values(a, grid), _values(b, grid), grid)


def overlap(a: Result, b: Result, grid: str, k: int = 10) -> float:
    """The share of `a`'s `k` largest cells (indirect effects for traces) among `b`'s `k` largest."""
    return top_overlap(_values(a, grid), _values(b, grid), k)


def saved_grids(folder: str | Path, field: str = "result") -> tuple[str | None, dict[str, torch.Tensor]]:
    """A saved result's kind (from result.json) and grids (indirect effects for traces, from
    result.safetensors); a folder that is not a whole `lesion run` result is one `SpecError`."""
    what = "a result folder written by `lesion run` (result.json and result.safetensors)"
    meta = read_json(Path(folder) / "result.json", field, what)
    _, tensors = read_safetensors(Path(folder) / "result.safetensors", field, what)
    names = [k for k in tensors if "." not in k and k not in ("clean_prob", "corrupted_prob")]
    grids = {k: tensors.get(f"{k}.indirect_effect", tensors[k]) for k in names}
    if not grids or not all(g.is_floating_point() for g in grids.values()):
        raise SpecError(field, str(folder), f"{what}; its result.safetensors holds no floating-point grids")
    kind = meta.get("kind") if isinstance(meta, dict) else None
    return kind if isinstance(kind, str) else None, grids


def compare_saved(a: str | Path, b: str | Path) -> dict[str, dict]:
    """`compare` for two result folders on disk (the grids both have, which must have one shape)."""
    (kind_a, x), (kind_b, y) = saved_grids(a, "a"), saved_grids(b, "b")
    if kind_a != kind_b:
        raise SpecError("b", str(b), f"a result of the same kind as `a` ({kind_a}); it is a {kind_b} result")
    out = {}
    for grid in [g for g in x if g in y]:
        if x[grid].shape != y[grid].shape:
            raise SpecError("b", str(b), f"a result of the same spec as `a`: grid {grid!r} has shape "
                            f"{list(y[grid].shape)} there and {list(x[grid].shape)} in `a`")
        keep = torch.isfinite(x[grid]) & torch.isfinite(y[grid])
        out[grid] = {"pearson": pearson(x[grid], y[grid], grid), "top10_overlap": top_overlap(x[grid], y[grid], 10),
                     "max_abs_diff": float((x[grid][keep] - y[grid][keep]).abs().max()) if keep.any() else math.nan}
    return out
