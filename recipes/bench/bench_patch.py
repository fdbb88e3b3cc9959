"""Benchmark: a 100-prompt activation-patching sweep, Lesion against a one-forward-per-cell loop.

    lesion --threads 2 bench-patch [--model smollm2-135m] [--prompts 100] [--device cuda]

Each prompt pair swaps one country name ("... of France ..." / "... of Japan ..."),
so base and source have the same tokens elsewhere. The sweep patches the residual
stream (`block_output`) from the source run into the base run at every layer × every
position, scoring the logit difference between the source's and the base's answers.

The reference does what a plain PyTorch user writes: for every cell, one forward of the
base prompt with a forward hook that copies the cached source state in, full logits.
Both must agree (max abs difference ≤ 1e-3 logits) before anything is reported. On a
slow machine `--reference-prompts K` times the reference on every (N/K)-th prompt only
and scales its time by cells; the report says so. The
same spec then runs with `method: attribution`, and plain forwards of as many rows as
Lesion ran give the no-intervention bound.
"""

from __future__ import annotations

import itertools
import time

import torch

from interventions import compile_spec, load_model, parse_spec, run, run_plan
from interventions.engine.compare import correlation
from interventions.models.sites import site_table
from recipes.bench.bench_trace import plain_and_attribution, print_report, sync

COUNTRIES = ["France", "Japan", "Italy", "Spain", "Germany", "China", "India", "Russia", "Canada", "Brazil",
             "Egypt", "Greece", "Mexico", "Poland", "Sweden", "Norway", "Kenya", "Peru", "Chile", "Turkey",
             "Iran", "Cuba", "Israel", "Ireland", "Portugal", "Austria", "Belgium", "Denmark", "Finland"]
TEMPLATES = ["The capital of {} is the city of", "The official language of {} is",
             "The currency used in {} is the", "The largest city in {} is"]


def prompts(tokenizer, n: int) -> list[dict]:
    """`n` aligned (base, source) pairs: single-token countries swapped in the same template."""
    single = [c for c in COUNTRIES if len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) == 1]
    pairs = [(a, b) for a, b in itertools.permutations(single, 2)]
    out = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        a, b = pairs[(i * 7) % len(pairs)]
        out.append({"base": template.format(a), "source": template.format(b)})
    return out


@torch.inference_mode()
def reference_loop(model, tokenizer, plan, result, which: list[int]) -> torch.Tensor:
    """One single-row forward per (prompt, layer, position) cell of the prompts `which`;
    returns [prompt, layer, position] (NaN elsewhere)."""
    table = site_table(model)
    n = table.num_layers(model)
    device = next(model.parameters()).device
    grid = torch.full(result.grids["block_output"].values.shape, float("nan"))
    for i in which:
        p, record = plan.prompts[i], result.prompts[i]
        base = torch.tensor([p.base.ids], device=device)
        states = {}
        hooks = [table.module(model, "block_output", l).register_forward_hook(
            lambda m, a, out, l=l: states.__setitem__(l, out.detach())) for l in range(n)]
        try:
            model(torch.tensor([p.source.ids], device=device))
        finally:
            for h in hooks:
                h.remove()
        target, counter = record["answer_id"], record["counterfactual_id"]
        for layer in range(n):
            for pos in range(len(p.base)):
                def patch(module, args, out, pos=pos, layer=layer):
                    out[:, pos] = states[layer][:, pos]
                    return out

                handle = table.module(model, "block_output", layer).register_forward_hook(patch)
                try:
                    logits = model(base).logits[0, -1]
                finally:
                    handle.remove()
                grid[i, layer, pos] = float(logits[target] - logits[counter])
    return grid


def main(args) -> int:
    model, tokenizer = load_model(args.model, device=args.device)
    spec = parse_spec({"kind": "patch", "model": args.model, "prompts": prompts(tokenizer, args.prompts),
                       "sites": ["block_output"], "metric": "logit_diff", "max_batch_rows": args.max_batch_rows})
    warm = parse_spec({**spec.model_dump(mode="json"), "prompts": spec.model_dump(mode="json")["prompts"][:2]})
    run(warm, model, tokenizer)       # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    plan = compile_spec(spec, model, tokenizer)
    result = run_plan(plan, progress=False)
    sync(args.device)
    t1 = time.perf_counter()
    k = min(args.reference_prompts or len(plan.prompts), len(plan.prompts))
    which = [round(j * len(plan.prompts) / k) for j in range(k)]
    reference = reference_loop(model, tokenizer, plan, result, which)
    sync(args.device)
    t2 = time.perf_counter()
    plain, attribution, attribution_s = plain_and_attribution(model, tokenizer, spec, plan, result.meta["rows"], args)
    values = result.grids["block_output"].values
    diff = float((values[which] - reference[which]).abs().nan_to_num().max())
    cells = int((~torch.isnan(values)).sum())
    timed = int((~torch.isnan(values[which])).sum())
    lesion_s, ref_s = t1 - t0, (t2 - t1) * cells / timed
    report = {
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(),
        "prompts": len(plan.prompts), "cells": cells, "rows": result.meta["rows"],
        "max_batch_rows": args.max_batch_rows,
        "reference_prompts_timed": k, "reference_cells_timed": timed, "reference_timed_s": round(t2 - t1, 2),
        "lesion_s": round(lesion_s, 2), "reference_s" + ("" if timed == cells else "_scaled_to_all_cells"):
        round(ref_s, 2), "speedup": round(ref_s / lesion_s, 2),
        "plain_forward_s": round(plain, 2), "lesion_over_plain_forward": round(lesion_s / plain, 2),
        "max_abs_diff": diff,
        "attribution_s": round(attribution_s, 2), "attribution_speedup": round(ref_s / attribution_s, 1),
        "attribution_correlation": round(correlation(result, attribution, "block_output"), 3),
    }
    return print_report(report, args.json, diff, 1e-3)
