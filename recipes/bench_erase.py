"""Benchmark a concept erasure: seconds to compute the closed-form edit, and images per second with
the delta applied against the base pipeline (goal: ratio 1.00 +- 0.05).

    lesion --threads 2 bench-erase [--spec recipes/erase_red.yaml] [--images 64] [--repeats 5] [--device cpu]

The edit is timed `--repeats` times (median). Generation alternates base and edited rounds of the
same prompts and seeds, so that drift on a noisy machine hits both alike; the ratio is the
median edited rate over the median base rate. A merged delta changes no shapes, so the
ratio should be 1 within noise.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from editors.delta import apply, revert
from editors.erase import erase
from interventions.errors import SpecError
from interventions.spec import load_spec
from recipes.diffusion import default_prompts, pipeline_for


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(args) -> int:
    spec = load_spec(args.spec)
    if spec.kind != "erase":
        raise SpecError("--spec", args.spec, f"a `kind: erase` spec (this one is `kind: {spec.kind}`)")
    pipe = pipeline_for(spec, device=args.device)
    edit_s = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        delta = erase(spec, pipe)
        _sync(pipe.device)
        edit_s.append(time.perf_counter() - start)
    prompts = list(spec.prompts) or default_prompts()
    rows = [prompts[i % len(prompts)] for i in range(args.images)]
    seeds = list(range(args.images))
    pipe.generate(rows[:4], seeds[:4])                  # warm-up
    base, edited = [], []
    for _ in range(args.repeats):
        for which in ("base", "edited"):
            if which == "edited":
                apply(pipe, delta)
            _sync(pipe.device)
            start = time.perf_counter()
            pipe.generate(rows, seeds)
            _sync(pipe.device)
            (base if which == "base" else edited).append(args.images / (time.perf_counter() - start))
            if which == "edited":
                revert(pipe, delta)
    report = {
        "spec": args.spec, "model": spec.model, "device": str(pipe.device), "threads": torch.get_num_threads(),
        "method": spec.method, "edit": spec.edit, "projections": len(delta.names),
        "edit_seconds_median": statistics.median(edit_s), "edit_seconds": edit_s,
        "images": args.images, "steps": pipe.steps, "repeats": args.repeats,
        "base_images_per_s": statistics.median(base), "edited_images_per_s": statistics.median(edited),
    }
    report["ratio_edited_over_base"] = report["edited_images_per_s"] / report["base_images_per_s"]
    print(f"{spec.method} erase ({spec.edit}, {len(delta.names)} projections) on {spec.model}, {report['device']}, "
          f"{report['threads']} thread(s)")
    print("| measure | value |\n|---|---|")
    print(f"| edit time (median of {args.repeats}) | {report['edit_seconds_median']:.3f} s |")
    print(f"| base images/s ({args.images} images, {pipe.steps} steps) | {report['base_images_per_s']:.1f} |")
    print(f"| edited images/s | {report['edited_images_per_s']:.1f} |")
    print(f"| ratio edited / base | {report['ratio_edited_over_base']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
