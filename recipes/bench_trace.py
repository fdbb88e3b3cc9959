"""Benchmark: Lesion's batched trace against a ROME-style reference loop, in one run.

    lesion --threads 2 bench-trace [--model smollm2-135m] [--device cuda]

The reference does what ROME's ``trace_with_patch`` does: for every cell, one
forward of an 11-row batch (row 0 clean, rows 1..10 with the subject embeddings
noised), plain forward hooks copying row 0's state into rows 1..10 at the
restored layer(s) and position, full logits. Both use the same seeded noise, so
they must give the same numbers; the benchmark checks that before reporting.
"""

from __future__ import annotations

import json
import time

import torch

from interventions import compile_spec, load_model, parse_spec, run, run_plan
from interventions.compare import correlation
from interventions.memory import PeakMemory
from interventions.units import parse_bytes
from interventions.conventions import window
from interventions.sites import site_table

SPEC = {
    "kind": "trace",
    "prompts": [{"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"}],
    "sites": ["hidden", "mlp", "attention"], "window": 10, "seed": 0,
}
SITES = {"hidden": "block_output", "mlp": "mlp_output", "attention": "attention_output"}


@torch.inference_mode()
def rome_loop(model, plan, answer: int) -> dict[str, torch.Tensor]:
    """One 11-row forward per (site, layer, position) cell; returns grids [layers, positions]."""
    table = site_table(model)
    prompt = plan.prompts[0]
    ids, subject = list(prompt.source.ids), list(prompt.source.subject)
    noise = plan.noise[0].to(next(model.parameters()).device)
    batch = torch.tensor([ids] * (noise.shape[0] + 1), device=noise.device)
    n = table.num_layers(model)

    def add_noise(module, args, out):
        out[1:, subject] += noise
        return out

    def restore(pos):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h[1:, pos] = h[0, pos]
        return hook

    grids = {}
    embed = table.module(model, "embed")
    for name, site in SITES.items():
        grid = torch.zeros(n, len(ids))
        for layer in range(n):
            layers = (layer,) if name == "hidden" else window(layer, 10, n)
            for pos in range(len(ids)):
                handles = [embed.register_forward_hook(add_noise)]
                handles += [table.module(model, site, l).register_forward_hook(restore(pos)) for l in layers]
                try:
                    probs = model(batch).logits[1:, -1].float().softmax(-1)
                finally:
                    for h in handles:
                        h.remove()
                grid[layer, pos] = probs[:, answer].mean()
        grids[name] = grid
    return grids


@torch.inference_mode()
def plain_forwards(model, plan, rows: int, size: int) -> float:
    """Seconds for `rows` plain full-length forwards of the plan's base prompts, in turn, in
    batches of `size`, answer logits only (the no-intervention bound)."""
    device = next(model.parameters()).device
    ids = [p.base.ids for p in plan.prompts]
    start = time.perf_counter()
    done = 0
    while done < rows:
        batch = [ids[(done + j) % len(ids)] for j in range(min(size, rows - done))]
        width = max(len(b) for b in batch)
        x = torch.tensor([b + b[-1:] * (width - len(b)) for b in batch], device=device)
        model(x, logits_to_keep=1)
        done += len(batch)
    return time.perf_counter() - start


def plain_and_attribution(model, tokenizer, spec, plan, rows: int, args) -> tuple[float, object, float]:
    """The plain-forward bound for `rows` rows, then `spec` by attribution: (plain s, result, s)."""
    plain = plain_forwards(model, plan, rows, args.max_batch_rows)
    _sync(args.device)
    start = time.perf_counter()
    attribution = run(spec.model_copy(update={"method": "attribution"}), model, tokenizer)
    _sync(args.device)
    return plain, attribution, time.perf_counter() - start


def print_report(report: dict, json_path: str | None, diff: float, tolerance: float) -> int:
    """Print the report as a table (and write it as JSON); 1 if Lesion and the reference disagree."""
    print("| what | value |\n|---|---|")
    for k, v in report.items():
        print(f"| {k} | {v} |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    if diff > tolerance:
        print(f"error: Lesion and the reference loop disagree (max abs diff {diff:.2e})")
        return 1
    return 0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(args) -> int:
    model, tokenizer = load_model(args.model, device=args.device)
    spec = parse_spec({**SPEC, "model": args.model, "samples": args.samples, "max_batch_rows": args.max_batch_rows})
    plan = compile_spec(spec, model, tokenizer)
    warm = parse_spec({**SPEC, "model": args.model, "layers": [0], "samples": 2})
    rome_loop(model, compile_spec(warm, model, tokenizer), 0)   # warm-up
    _sync(args.device)
    memory = parse_bytes(args.memory, "--memory") if getattr(args, "memory", None) else None
    t0 = time.perf_counter()
    with PeakMemory(args.device, model=model) as peak:
        result = run_plan(compile_spec(spec, model, tokenizer, memory=memory), progress=False)
    _sync(args.device)
    t1 = time.perf_counter()
    reference = rome_loop(model, plan, result.prompts[0]["answer_id"])
    _sync(args.device)
    t2 = time.perf_counter()
    plain, attribution, attribution_s = plain_and_attribution(model, tokenizer, spec, plan, result.meta["rows"], args)
    lesion_s, ref_s = t1 - t0, t2 - t1
    diff = max(float((result.grids[k].values[0] - reference[k]).abs().max()) for k in SITES)
    cells = sum(g.values[0].numel() for g in result.grids.values())
    report = {
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(),
        "cells": cells, "samples": args.samples, "rows": result.meta["rows"],
        "max_batch_rows": args.max_batch_rows, "memory_budget": memory, "lesion_peak_bytes": peak.bytes,
        "lesion_chunks": result.meta["chunks"], "lesion_prompt_blocks": result.meta["prompt_blocks"],
        "lesion_s": round(lesion_s, 2), "reference_s": round(ref_s, 2), "speedup": round(ref_s / lesion_s, 2),
        "lesion_cells_per_s": round(cells / lesion_s, 1), "reference_cells_per_s": round(cells / ref_s, 1),
        "plain_forward_s": round(plain, 2), "lesion_over_plain_forward": round(lesion_s / plain, 2),
        "max_abs_diff": diff,
        "attribution_s": round(attribution_s, 2), "attribution_speedup": round(ref_s / attribution_s, 1),
        **{f"attribution_correlation_{k}": round(correlation(result, attribution, k), 3) for k in SITES},
    }
    return print_report(report, args.json, diff, 1e-4)
