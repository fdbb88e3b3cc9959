"""What `lesion run` does with an edit or apply spec on a language model: the `Editor` (editors.editor), a
summary table, and what a `--checkpoint` ships."""

from __future__ import annotations

import time
from pathlib import Path


def edit_job(spec, args, out: Path) -> dict | None:
    from editors.editor import fmt_metric
    from editors.editor import run_edit as edit
    from editors.requests import resolve_requests
    from interventions import load_model

    spec = resolve_requests(spec)
    model, tokenizer = load_model(spec.model, device=args.device)
    start = time.perf_counter()
    report = edit(spec, model, tokenizer, out)
    layers = report["layers"]
    where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers}"
    if report["located"]:
        where += f" (auto: from the MLP trace at {report['located']['position']}, written to {args.out}/locate)"
    print(f"{spec.method} edit of {len(spec.requests)} fact(s) at {where} of {spec.model} "
          f"in {time.perf_counter() - start:.1f} s: {Path(args.out) / report['delta']} ({report['bytes']} bytes)")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
    if "rows" in report:                                   # sequential: the curve's first and last rows
        from editors.sequential import CURVE_METRICS

        first, last = report["rows"][0], report["rows"][-1]
        print(f"| metric | unedited | after {last['edits']} edits |\n|---|---|---|")
        for key in CURVE_METRICS:
            print(f"| {key} | {fmt_metric(first[key])} | {fmt_metric(last[key])} |")
        print(f"curves: {Path(args.out) / 'curves.json'}, {Path(args.out) / 'curves.png'}")
    else:
        print("| metric | unedited | edited |\n|---|---|---|")
        for key in ("efficacy", "paraphrase", "neighbourhood", "fluency"):
            print(f"| {key} | {fmt_metric(report['before'][key])} | {fmt_metric(report['after'][key])} |")
    return dict(method=spec.method, edited=report["edited"], layers=layers, metrics=report["metrics"],
                located=report["located"], lesion_version=report["lesion_version"],
                note=f"C from {spec.mom2_tokens:,} tokens of " + (
                    "the spec's corpus files" if spec.corpus else "text sampled from the model itself"))


def apply_job(spec, args, out: None) -> dict | None:
    from editors.editor import run_apply as apply
    from interventions import load_model

    model, tokenizer = load_model(spec.model, device=args.device)
    what = " + ".join((["edited"] if spec.deltas else []) + ([f"steered x{spec.coef:g}"] if spec.steer else []))
    for row in apply(spec, model, tokenizer):
        print(f"prompt: {row['prompt']!r}\n  base:   {row['base']!r}\n  {what}: {row['edited']!r}")
    return None
