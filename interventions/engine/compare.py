"""Compare two results of the same spec (e.g. `method: exact` against `method: attribution`).

>>> correlation(exact, approx, "hidden")      # Pearson r over every finite cell   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch

from interventions.engine.result import Result


def _values(result: Result, grid: str) -> torch.Tensor:
    return result.indirect_effect(grid) if result.kind == "trace" else result.grids[grid].values


def pearson(x: torch.Tensor, y: torch.Tensor, grid: str = "") -> float:
    """Pearson correlation over the cells finite in both."""
    x, y = x.double(), y.double()
    if x.shape != y.shape:
        raise ValueError(f"grid {grid!r}: shapes {list(x.shape)} and {list(y.shape)} differ; not the same spec")
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep] - x[keep].mean(), y[keep] - y[keep].mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def correlation(a: Result, b: Result, grid: str) -> float:
    """Pearson correlation of two results' cells (indirect effects for traces), finite cells only."""
    return pearson(_values(a, grid), _values(b, grid), grid)


def saved_grids(folder: str | Path) -> dict[str, torch.Tensor]:
    """A saved result's grids (indirect effects for traces) from its result.safetensors."""
    from safetensors.torch import load_file

    from interventions.core.errors import SpecError

    path = Path(folder) / "result.safetensors"
    if not path.is_file():
        raise SpecError("result folder", str(folder), "a folder written by `lesion run` (with result.safetensors)")
    tensors = load_file(str(path))
    names = [k for k in tensors if "." not in k and k not in ("clean_prob", "corrupted_prob")]
    return {k: tensors.get(f"{k}.indirect_effect", tensors[k]) for k in names}


def compare_saved(a: str | Path, b: str | Path) -> dict[str, dict]:
    """`compare` for two result folders on disk (the grids both have)."""
    x, y = saved_grids(a), saved_grids(b)
    out = {}
    for grid in [g for g in x if g in y]:
        keep = torch.isfinite(x[grid]) & torch.isfinite(y[grid])
        out[grid] = {"pearson": pearson(x[grid], y[grid], grid),
                     "max_abs_diff": float((x[grid][keep] - y[grid][keep]).abs().max())}
    return out

