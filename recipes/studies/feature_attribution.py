"""Which dictionary features carry a fact: attribution over every feature, checked by exact patching of every feature.

    python -m recipes.studies.feature_attribution recipes/features/patch_colour_features.yaml --out runs/feature_attribution

The spec is a `kind: patch` (or `trace`) with `features: {dictionary: ..., features: all}`. The study runs it
twice over the same cells, one row per (prompt, feature, column):
- `method: attribution`: every feature's first-order term, ``(a_source[u] − a_base[u]) · (∂m/∂x · W_dec[u])``,
  from one forward and backward pass per prompt;
- `method: exact`: every feature restored alone, one patched forward per cell, in runs of at most 512 features.

It reports how well the estimate ranks the features (Pearson r over all cells, and over the cells where
either method moves the metric; how many of the exact top-N features the estimate's top-N holds) and the
whole state's patch at the dictionary's layer beside the features' effects. Writes ``OUT/results.json``
and ``OUT/table.md``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from interventions import load_model, load_spec, run
from interventions.core.atomic import atomic_write
from interventions.features.dictionary import load_dictionary
from interventions.spec.grid_specs import MAX_GRID_FEATURES


def effects(result, name: str) -> torch.Tensor:
    """``(prompt, unit, column)``: each cell's metric minus its prompt's base (patch) or corrupted (trace) value."""
    base = torch.tensor([p.get("base_metric", p.get("corrupted_prob")) for p in result.prompts])
    return result.grids[name].values - base[:, None, None]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def exact_all(spec, model, tokenizer, d_sae: int) -> tuple[torch.Tensor, object]:
    """Every feature restored alone, in runs of at most `MAX_GRID_FEATURES`: the effects and the first run."""
    parts, first = [], None
    for lo in range(0, d_sae, MAX_GRID_FEATURES):
        units = tuple(range(lo, min(d_sae, lo + MAX_GRID_FEATURES)))
        features = spec.features.model_copy(update={"features": units})
        result = run(spec.model_copy(update={"method": "exact", "features": features}), model, tokenizer,
                     progress=False)
        parts.append(effects(result, spec.features.name))
        first = first or result
    return torch.cat(parts, dim=1), first


def compare(estimate: torch.Tensor, exact: torch.Tensor, top: int) -> dict:
    """How the attribution estimate agrees with exact patching over the same cells."""
    keep = ~exact.isnan()
    e, x = estimate[keep], exact[keep]
    moved = (e.abs() > 0.01) | (x.abs() > 0.01)
    rank_e, rank_x = (t.nan_to_num(0).abs().amax(dim=(0, 2)) for t in (estimate, exact))
    best_e, best_x = set(rank_e.topk(top).indices.tolist()), set(rank_x.topk(top).indices.tolist())
    return {"cells": int(keep.sum()), "pearson_r": pearson(e, x), "cells_moved": int(moved.sum()),
            "pearson_r_moved": pearson(e[moved], x[moved]), "top_overlap": len(best_e & best_x),
            "top": top, "largest_exact": float(x.abs().max()), "largest_estimate": float(e.abs().max())}


def rows(result, estimate: torch.Tensor, exact: torch.Tensor, n: int = 12) -> list[dict]:
    """The `n` cells with the largest exact effects."""
    flat = exact.nan_to_num(0).abs().flatten()
    out = []
    for i in flat.topk(n).indices.tolist():
        p, rest = divmod(i, exact.shape[1] * exact.shape[2])
        u, c = divmod(rest, exact.shape[2])
        out.append({"prompt": result.prompts[p]["prompt"], "column": result.prompts[p]["columns"][c], "feature": u,
                    "exact": float(exact[p, u, c]), "attribution": float(estimate[p, u, c])})
    return out


def table(report: dict) -> str:
    s = report["summary"]
    lines = [f"Features of `{report['dictionary']}` on {report['prompts']} prompt(s), metric `{report['metric']}`; "
             f"every one of {report['features']} features at every column, exact and by attribution.", "",
             f"- Pearson r over all {s['cells']} cells: {s['pearson_r']:.3f}; over the {s['cells_moved']} cells where "
             f"either moves the metric by more than 0.01: {s['pearson_r_moved']:.3f}.",
             f"- Top-{s['top']} features (largest effect in any cell): {s['top_overlap']} shared.",
             f"- Whole state at layer {report['layer']} ({report['site']}), exact / attribution, per prompt at the "
             f"first column: {report['state_exact']} / {report['state_attribution']}.", "",
             "| prompt | column | feature | exact | attribution |", "|---|---|---|---|---|"]
    lines += [f"| {r['prompt']} | `{r['column']}` | {r['feature']} | {r['exact']:+.3f} | {r['attribution']:+.3f} |"
              for r in report["cells"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="a patch or trace spec with `features: {dictionary: ..., features: all}`")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--top", type=int, default=10, help="features compared by rank")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    model, tokenizer = load_model(spec.model)
    d = load_dictionary(spec.features.dictionary, "features.dictionary")
    spec = spec.model_copy(update={"layers": (d.where.layer,)})
    start = time.perf_counter()
    attributed = run(spec.model_copy(update={"method": "attribution"}), model, tokenizer)
    seconds_attribution = time.perf_counter() - start
    estimate = effects(attributed, spec.features.name)
    start = time.perf_counter()
    exact, first = exact_all(spec, model, tokenizer, d.d_sae)
    seconds_exact = time.perf_counter() - start
    site = spec.sites[0]
    grid = "hidden" if spec.kind == "trace" else site
    report = {"dictionary": spec.features.dictionary, "prompts": len(spec.prompts), "metric": getattr(spec, "metric", "prob"),
              "features": d.d_sae, "layer": d.where.layer, "site": d.where.site,
              "summary": compare(estimate, exact, args.top),
              "state_exact": [round(float(v), 3) for v in effects(first, grid)[:, 0, 0]],
              "state_attribution": [round(float(v), 3) for v in effects(attributed, grid)[:, 0, 0]],
              "seconds": {"attribution": round(seconds_attribution, 1), "exact": round(seconds_exact, 1)},
              "threads": torch.get_num_threads(), "cells": rows(attributed, estimate, exact)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "results.json", json.dumps(report, indent=1).encode())
    atomic_write(args.out / "table.md", table(report).encode())
    print(table(report))
    print(json.dumps({"study": "feature_attribution", **report["summary"], **report["seconds"],
                      "threads": report["threads"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
