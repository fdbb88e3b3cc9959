"""`lesion compare`: correlate two results of one spec, e.g. method: exact and attribution."""

from __future__ import annotations

from interventions.core.errors import SpecError


def add_parser(sub, parents) -> None:
    c = sub.add_parser("compare", parents=parents, help="correlate two results of one spec, e.g. method: exact and attribution")
    c.add_argument("a", help="a result folder")
    c.add_argument("b", help="another result folder")
    c.set_defaults(fn=main)


def main(args) -> int:
    from interventions.engine.compare import compare_saved

    rows = compare_saved(args.a, args.b)
    if not rows:
        raise SpecError("results", [args.a, args.b], "two results with at least one grid in common")
    print("| grid | Pearson r | top-10 overlap | max abs diff |\n|---|---|---|---|")
    for grid, r in rows.items():
        print(f"| {grid} | {r['pearson']:.3f} | {r['top10_overlap']:.1f} | {r['max_abs_diff']:.2e} |")
    return 0
