"""Every erasure method on one spec, judged the same way: the table of the README's erasure section.

    python -m recipes.studies.erase_methods recipes/erase/erase_red_scenes.yaml --out runs/erase_red_scenes

For each method (`--methods`, default all: uce, time, rece, esd-x, diff-quickfix; diff-quickfix on
text-encoder layer `--layer`, by default located by a
trace of the text encoder's self-attention outputs) it runs the spec's erasure (`recipes.jobs.run_text_to_image.run_erase`, into
``OUT/<method>/``) and tabulates: the erased concepts shown before, and after on the edit's own
templates, on held-out phrasings and under the adversarial search; the other concepts kept
(after / before); the edit's seconds. Writes ``OUT/table.md`` and ``OUT/results.json``; the last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from editors.methods.erase import METHODS, with_method
from interventions.core.atomic import atomic_write
from interventions.spec import load_spec
from recipes.jobs.run_text_to_image import pipeline_for, run_erase


def row(method: str, report: dict) -> dict:
    e, b = report["erased_rate"], report["erased_rate_before"]
    return {"method": method, "before_templates": b["templates"], "before_heldout": b["heldout"],
            "templates": e["templates"], "heldout": e["heldout"], "adversarial": e["adversarial"],
            "kept_rate": report["kept_rate"], "edit_seconds": report["edit_seconds"],
            "edited": len(report["edited"])}


def table(rows: list[dict], concepts: str) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    b = rows[0]
    lines = [f"| method | {concepts} shown: templates | held-out phrasings | adversarial search | others kept | "
             "edit time |", "|---|---|---|---|---|---|",
             f"| before (unedited) | {f(b['before_templates'])} | {f(b['before_heldout'])} | – | 1.00 | – |"]
    for r in rows:
        lines.append(f"| {r['method']} | {f(r['templates'])} | {f(r['heldout'])} | {f(r['adversarial'])} | "
                     f"{f(r['kept_rate'])} | {r['edit_seconds']:.2f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--layer", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="diff-quickfix's text-encoder layer, or auto: located by a trace (default)")
    ap.add_argument("--images", type=int, default=None, help="images per prompt (default: the spec's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    if args.images is not None:
        spec = spec.model_copy(update={"images": args.images})
    pipe = pipeline_for(spec)
    rows = []
    for method in args.methods:
        report = run_erase(with_method(spec, method, args.layer), pipe, args.out / method)
        rows.append(row(method, report))
        print(json.dumps(rows[-1]), flush=True)
    concepts = ", ".join(c.concept for c in spec.concepts)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "table.md", table(rows, concepts if len(spec.concepts) == 1 else "erased").encode())
    result = {"spec": args.spec, "concepts": [c.concept for c in spec.concepts], "rows": rows,
              "images_per_prompt": spec.images, "threads": args.threads}
    atomic_write(args.out / "results.json", json.dumps(result, indent=1).encode())
    print(table(rows, concepts))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
