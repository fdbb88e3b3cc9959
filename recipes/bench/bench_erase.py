"""Benchmark concept erasure per method: seconds to compute the edit, and images per second with the
delta applied against the base pipeline (goal: ratio 1.00 +- 0.05).

    lesion --threads 2 bench-erase [--spec recipes/erase/erase_red.yaml] [--methods uce time rece esd-x diff-quickfix]
                                   [--images 64] [--repeats 5] [--device cpu]

Each method runs on the spec's concepts and templates (`diff-quickfix`: UCE on the text encoder's
layer `--layer`, or the spec's). The closed forms are timed `--repeats` times (median), ESD-x (a
fine-tune) once. Generation alternates base and edited rounds of the same prompts and seeds, so
that drift on a noisy machine hits both alike; each method's ratio is its median edited rate over
the median of the base rounds interleaved with its own. A merged delta changes no shapes, so the
ratio should be 1 within noise. The last line is one JSON object.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from editors.delta import apply, revert
from editors.methods.erase import METHODS, erase, fill, with_method
from interventions.core.errors import SpecError
from interventions.spec import load_spec
from recipes.jobs.run_text_to_image import pipeline_for


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(args) -> int:
    spec = load_spec(args.spec)
    if spec.kind != "erase":
        raise SpecError("--spec", args.spec, f"a `kind: erase` spec (this one is `kind: {spec.kind}`)")
    methods = args.methods or [spec.method if spec.edit == "cross_attention" else "diff-quickfix"]
    for m in methods:
        if m not in METHODS:
            raise SpecError("--methods", m, "some of " + ", ".join(METHODS))
    pipe = pipeline_for(spec, device=args.device)
    layer = spec.layer if spec.layer is not None else args.layer
    prompts = list(spec.prompts) or list(dict.fromkeys(fill(t, c.concept) for t in spec.templates
                                                       for c in spec.concepts))
    rows = [prompts[i % len(prompts)] for i in range(args.images)]
    seeds = list(range(args.images))
    pipe.generate(rows[:4], seeds[:4])                  # warm-up
    base, results = [], {}
    for m in methods:
        results[m], mine = _time_method(with_method(spec, m, layer), m, pipe, rows, seeds, args)
        base += mine
    base_rate = statistics.median(base)
    report = {"spec": args.spec, "model": spec.model, "device": str(pipe.device), "threads": torch.get_num_threads(),
              "images": args.images, "steps": pipe.steps, "repeats": args.repeats, "base_images_per_s": base_rate,
              "methods": results,
              **{f"{m.replace('-', '_')}_edit_s": r["edit_seconds_median"] for m, r in results.items()},
              **{f"{m.replace('-', '_')}_ratio": r["ratio_edited_over_base"] for m, r in results.items()}}
    print(f"erase on {spec.model}, {report['device']}, {report['threads']} thread(s); {args.images} images, "
          f"{pipe.steps} steps, base {base_rate:.1f} images/s")
    print("| method | projections | edit time (median) | base images/s | edited images/s | edited / base |\n"
          "|---|---|---|---|---|---|")
    for m, r in results.items():
        print(f"| {m} | {r['projections']} | {r['edit_seconds_median']:.3f} s | {r['base_images_per_s']:.1f} | "
              f"{r['edited_images_per_s']:.1f} | {r['ratio_edited_over_base']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))
    return 0


def _time_method(mspec, m: str, pipe, rows: list[str], seeds: list[int], args) -> tuple[dict, list[float]]:
    """One method's edit time, and images per second with its delta against base rounds interleaved with
    its own (so drift between methods cancels); also the base rounds' rates."""
    repeats = 1 if m == "esd-x" else args.repeats     # a fine-tune: timed once
    edit_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        delta = erase(mspec, pipe)
        _sync(pipe.device)
        edit_s.append(time.perf_counter() - start)
    edited, mine = [], []           # this method's rounds, and the base rounds between them
    for _ in range(args.repeats):
        for which in ("base", "edited"):
            if which == "edited":
                apply(pipe, delta)
            _sync(pipe.device)
            start = time.perf_counter()
            pipe.generate(rows, seeds)
            _sync(pipe.device)
            rate = args.images / (time.perf_counter() - start)
            (mine if which == "base" else edited).append(rate)
            if which == "edited":
                revert(pipe, delta)
    return {"edit_seconds_median": statistics.median(edit_s), "edit_seconds": edit_s,
            "projections": len(delta.names), "edited_images_per_s": statistics.median(edited),
            "base_images_per_s": statistics.median(mine),
            "ratio_edited_over_base": statistics.median(edited) / statistics.median(mine)}, mine
