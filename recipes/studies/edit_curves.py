"""Compare sequential-editing runs: one figure with every method's curves, and a table at given edit counts.

    python -m recipes.studies.edit_curves runs/seq_rome runs/seq_r-rome runs/seq_alphaedit \
        --out recipes/figures/sequential_smollm2.png --at 10 100 1000 10000

Without ``--out`` no figure is drawn (e.g. a table of one-batch runs, one point each). Each argument is the
output folder of a sequential `lesion run` (its ``curves.json``), or that file itself;
``--labels`` names the runs (default: each run's method, so two runs of one method need labels). The table row
of a method at N edits is its measurement at exactly N edits; a run that stopped earlier, or whose
batches skip N, shows n/a there. With ``--norms``, each run's final ``delta.safetensors`` is measured
against the base model it names: ‖ΔW‖_F / ‖W₀‖_F per edited matrix (runs made before the curves'
rows held ``delta_norm`` have it only this way). The last line is one JSON object with the table's
numbers (and ``delta_norms`` with ``--norms``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from editors.sequential import CURVE_METRICS, GENERATION_METRICS, plot_curves

#: The table's columns: the teacher-forced metrics, their generation-based twins, the update norm (a run
#: made before a column existed shows n/a there).
COLUMNS = (*CURVE_METRICS, *GENERATION_METRICS, "delta_norm")


def read_curves(folder: str | Path) -> tuple[str, list[dict]]:
    path = Path(folder)
    data = json.loads((path if path.is_file() else path / "curves.json").read_text())
    return data["method"], data["rows"]


def table(curves: dict[str, list[dict]], at: list[int]) -> dict:
    """``{method: {"0": row, "10": row, ...}}``: the unedited row and the rows at each count in `at`."""
    out = {}
    for method, rows in curves.items():
        by = {r["edits"]: r for r in rows}
        out[method] = {str(n): ({k: by[n].get(k) for k in (*COLUMNS, "edit_seconds")} if n in by else None)
                       for n in (0, *at)}
    return out


def final_norms(folders: list[str | Path]) -> dict[str, dict[str, float]]:
    """``{method: {parameter: ‖ΔW‖_F / ‖W₀‖_F}}`` of each run's final delta, against its base model
    (each base model loaded once)."""
    from editors.delta import load_delta, relative_norms
    from interventions.models.loading import load_model

    models, out = {}, {}
    for folder in folders:
        delta = load_delta(Path(folder) / "delta.safetensors")
        name = delta.meta["base_model"]
        if name not in models:
            models[name] = load_model(name)[0]
        out[delta.meta["method"]] = relative_norms(models[name], delta)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="output folders of sequential runs")
    p.add_argument("--out", default=None, help="the figure to write (PNG); without it, the table only")
    p.add_argument("--at", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--norms", action="store_true",
                   help="also measure each run's final delta against its base model (loads the model)")
    p.add_argument("--title", default="sequential editing, SmolLM2-135M, evaluation split")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one name per run for the figure and table (default: each run's method)")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        p.error(f"--labels: got {len(args.labels)} names for {len(args.runs)} runs; give one per run")
    read = [read_curves(folder) for folder in args.runs]
    names = args.labels or [method for method, _ in read]
    if len(set(names)) < len(names):
        p.error(f"runs: two runs would share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                "give --labels, one distinct name per run")
    curves = {label: rows for label, (_, rows) in zip(names, read)}
    if args.out is not None:
        plot_curves(curves, args.out, title=args.title)
    numbers = table(curves, args.at)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}" if x < 100 else f"{x:.0f}"       # noqa: E731
    print("| method | edits | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for method, cols in numbers.items():
        for n, row in cols.items():
            if row is not None:
                print(f"| {method} | {n} | " + " | ".join(fmt(row[k]) for k in COLUMNS) + " |")
    if args.norms:
        norms = final_norms(args.runs)
        print("| method | ‖ΔW‖/‖W₀‖ per edited matrix at the end |")
        print("|---|---|")
        for method, per in norms.items():
            print(f"| {method} | " + ", ".join(f"{name}: {value:.3f}" for name, value in per.items()) + " |")
        numbers = {**numbers, "delta_norms": norms}
    print(json.dumps(numbers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
