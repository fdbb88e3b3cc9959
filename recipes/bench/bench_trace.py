"""Benchmark: Lesion's batched trace against a ROME-style reference loop, in one run.

    lesion --threads 2 bench-trace [--model smollm2-135m] [--device cuda]
    lesion --threads 2 bench-trace --model llava-flags-smollm2

The reference does what ROME's ``trace_with_patch`` does: for every cell, one
forward of an 11-row batch (row 0 clean, rows 1..10 with the subject embeddings
noised), plain forward hooks copying row 0's state into rows 1..10 at the
restored layer(s) and position(s), full logits. On a VLM (the testbed, or a local
LLaVA folder) the prompt is a flag and a question, the noise goes on the image
tokens where the projector hands them to the language model, and the cells are
every position, each image token included, plus the aggregated image cell; the
reference runs the whole LLaVA forward (pixels in) per cell. Both use the same
seeded noise, so they must give the same numbers; the benchmark checks that
before reporting. The last line printed is the report as one JSON object.
"""

from __future__ import annotations

import json
import time

import torch

from interventions import compile_spec, parse_spec, run, run_plan
from interventions.core.conventions import window
from interventions.core.memory import PeakMemory
from interventions.core.prompts import model_inputs, pad_token_id
from interventions.core.runtime import input_device
from interventions.core.units import parse_bytes
from interventions.engine.compare import correlation, overlap
from interventions.models.sites import site_table

SPEC = {
    "kind": "trace",
    "prompts": [{"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"}],
    "sites": ["hidden", "mlp", "attention"], "window": 10, "seed": 0,
}
VLM_SPEC = {
    "kind": "trace", "image_cells": "both",
    "prompts": [{"image": "flag:France", "prompt": " This is the flag of a country whose capital is",
                 "target": " Paris"}],
    "sites": ["hidden", "mlp", "attention"], "window": 10, "seed": 0,
}
SITES = {"hidden": "block_output", "mlp": "mlp_output", "attention": "attention_output"}
#: Path-integrated attribution is also timed and scored at these numbers of steps.
STEPS = (2, 4, 8)
#: ... and under these rules (`interventions.engine.rules`), at one step.
RULES = ("relp", "qk-fix", "atp-star")


@torch.inference_mode()
def rome_loop(model, plan, answer: int, inputs: dict, noised: tuple) -> dict[str, torch.Tensor]:
    """One 11-row forward per (site, layer, column) cell; returns grids [layers, columns].

    `inputs`: one row of the model's plain inputs (``input_ids``, and ``pixel_values`` for a VLM);
    `noised`: (module, unit positions in its output) where the noise is added."""
    table = site_table(model)
    prompt = plan.prompts[0]
    module, units = noised
    noise = plan.noise[0].to(next(model.parameters()).device)
    batch = {k: v.expand(noise.shape[0] + 1, *v.shape[1:]).to(noise.device) for k, v in inputs.items()}
    n = table.num_layers(model)

    def add_noise(module, args, out):
        out[1:, units] += noise.to(out.dtype)
        return out

    def restore(positions):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h[1:, positions] = h[0, positions]
        return hook

    grids = {}
    for name, site in SITES.items():
        axis = plan.grids[name].layers           # the plan's layers (the warm-up's is one layer)
        grid = torch.zeros(len(axis), len(prompt.columns))
        for row, layer in enumerate(axis):
            layers = (layer,) if name == "hidden" else window(layer, 10, n)
            for column, (_, positions) in enumerate(prompt.columns):
                handles = [module.register_forward_hook(add_noise)]
                handles += [table.module(model, site, l).register_forward_hook(restore(list(positions)))
                            for l in layers]
                try:
                    probs = model(**batch).logits[1:, -1].float().softmax(-1)
                finally:
                    for h in handles:
                        h.remove()
                grid[row, column] = probs[:, answer].mean()
        grids[name] = grid
    return grids


def reference_inputs(model, plan, vision: bool) -> tuple[dict, tuple]:
    """The reference loop's plain inputs for the plan's one prompt, and where its noise goes: the
    embedding lookup at the subject tokens, or the VLM's projector output at every image token."""
    prompt = plan.prompts[0]
    ids = torch.tensor([prompt.source.ids])
    if not vision:
        return {"input_ids": ids}, (site_table(model).module(model, "embed"), list(prompt.source.subject))
    from interventions.modalities.vision_language.llava import load_image

    pixels = load_image(plan.spec.prompts[0].image, model)[None]
    return ({"input_ids": ids, "pixel_values": pixels},
            (model.model.multi_modal_projector, list(range(len(prompt.record["image_positions"])))))


@torch.inference_mode()
def plain_forwards(model, plan, rows: int, size: int, *, probabilities: bool = False) -> float:
    """Seconds for `rows` plain full-length forwards of the plan's base prompts, in turn, in
    batches of `size`, answer logits only (the no-intervention bound); with `probabilities`, each
    row's p(answer) is read as well (the softmax a trace's metric needs)."""
    device = input_device(model)
    pad = pad_token_id(plan.tokenizer)
    start = time.perf_counter()
    done = 0
    while done < rows:
        prompts = [plan.prompts[(done + j) % len(plan.prompts)] for j in range(min(size, rows - done))]
        out = model(**model_inputs([p.base for p in prompts], pad, device), logits_to_keep=1)
        if probabilities:
            answers = torch.tensor([p.target_id for p in prompts], device=out.logits.device)
            out.logits[:, -1].float().softmax(-1)[torch.arange(len(prompts), device=answers.device), answers].cpu()
        done += len(prompts)
    return time.perf_counter() - start


def plain_and_attribution(model, tokenizer, spec, plan, rows: int, args) -> tuple[float, object, float]:
    """The plain-forward bound for `rows` rows, then `spec` by attribution: (plain s, result, s)."""
    plain = plain_forwards(model, plan, rows, args.max_batch_rows)
    sync(args.device)
    start = time.perf_counter()
    attribution = run(spec.model_copy(update={"method": "attribution"}), model, tokenizer)
    sync(args.device)
    return plain, attribution, time.perf_counter() - start


def timed(spec, model, tokenizer, args) -> tuple[object, float]:
    """`spec`'s result and the seconds it took (the device synchronised)."""
    start = time.perf_counter()
    result = run(spec, model, tokenizer)
    sync(args.device)
    return result, time.perf_counter() - start


def print_report(report: dict, json_path: str | None, diff: float, tolerance: float) -> int:
    """Print the report as a table, then as one JSON line (and write it to `json_path`);
    1 if Lesion and the reference disagree."""
    print("| what | value |\n|---|---|")
    for k, v in report.items():
        print(f"| {k} | {v} |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    failed = diff > tolerance
    if failed:
        print(f"error: Lesion and the reference loop disagree (max abs diff {diff:.2e})")
    print(json.dumps(report))
    return int(failed)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(args) -> int:
    from interventions.modalities.vision_language.llava import is_vlm_model, load_language_or_vision

    vision = is_vlm_model(args.model)     # a command-line model name, not a spec: its files are read
    model, tokenizer, _ = load_language_or_vision(args.model, vision=vision, device=args.device)
    base = VLM_SPEC if vision else SPEC
    spec = parse_spec({**base, "model": args.model, "samples": args.samples, "max_batch_rows": args.max_batch_rows})
    plan = compile_spec(spec, model, tokenizer)
    inputs, noised = reference_inputs(model, plan, vision)
    warm = parse_spec({**base, "model": args.model, "layers": [0], "samples": 2})
    warm_plan = compile_spec(warm, model, tokenizer)
    rome_loop(model, warm_plan, 0, inputs, noised)   # warm-up
    sync(args.device)
    memory = parse_bytes(args.memory, "--memory") if getattr(args, "memory", None) else None
    t0 = time.perf_counter()
    with PeakMemory(args.device, model=model) as peak:
        result = run_plan(compile_spec(spec, model, tokenizer, memory=memory), progress=False)
    sync(args.device)
    t1 = time.perf_counter()
    reference = rome_loop(model, plan, result.prompts[0]["answer_id"], inputs, noised)
    sync(args.device)
    t2 = time.perf_counter()
    plain, attribution, attribution_s = plain_and_attribution(model, tokenizer, spec, plan, result.meta["rows"], args)
    lesion_s, ref_s = t1 - t0, t2 - t1
    diff = max(float((result.grids[k].values[0] - reference[k]).abs().max()) for k in SITES)
    cells = sum(g.values[0].numel() for g in result.grids.values())
    correlations = {k: round(correlation(result, attribution, k), 3) for k in SITES}
    integrated = {}                 # path-integrated attribution (`steps`): cost and fidelity per k
    for k in STEPS:
        estimate, seconds = timed(spec.model_copy(update={"method": "attribution", "steps": k}), model, tokenizer, args)
        integrated[k] = {"s": round(seconds, 2), "speedup": round(ref_s / seconds, 1),
                         "r_hidden": round(correlation(result, estimate, "hidden"), 3)}
    rules = {}                      # the other attribution rules: cost and fidelity per grid
    for rule in RULES:
        estimate, seconds = timed(spec.model_copy(update={"method": "attribution", "rule": rule}), model, tokenizer,
                                  args)
        rules[rule] = {"s": round(seconds, 2), "speedup": round(ref_s / seconds, 1),
                       "speedup_over_lesion_exact": round(lesion_s / seconds, 1),
                       **{f"r_{k}": round(correlation(result, estimate, k), 3) for k in SITES},
                       **{f"top10_{k}": round(overlap(result, estimate, k), 2) for k in SITES}}
    report = {
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(),
        "tokens": len(plan.prompts[0].base), "image_tokens": len(plan.prompts[0].record.get("image_positions", [])),
        "cells": cells, "samples": args.samples, "rows": result.meta["rows"],
        "max_batch_rows": args.max_batch_rows, "memory_budget": memory, "lesion_peak_bytes": peak.bytes,
        "lesion_chunks": result.meta["chunks"], "lesion_prompt_blocks": result.meta["prompt_blocks"],
        "lesion_s": round(lesion_s, 2), "reference_s": round(ref_s, 2), "speedup": round(ref_s / lesion_s, 2),
        "lesion_cells_per_s": round(cells / lesion_s, 1), "reference_cells_per_s": round(cells / ref_s, 1),
        "plain_forward_s": round(plain, 2), "lesion_over_plain_forward": round(lesion_s / plain, 2),
        "max_abs_diff": diff,
        "attribution_s": round(attribution_s, 2), "attribution_speedup": round(ref_s / attribution_s, 1),
        "attribution_r": correlations["hidden"],
        **{f"attribution_correlation_{k}": r for k, r in correlations.items()},
        "attribution_steps": integrated,
        "attribution_rules": rules,
    }
    return print_report(report, args.json, diff, 1e-4)
