"""The `lesion` command line.

    lesion run recipes/trace_eiffel.yaml --out runs/eiffel
    lesion validate recipes/trace_eiffel.yaml [--compile]
    lesion schema > lesion.schema.json
    lesion apply --model smollm2-135m --delta runs/edit/delta.safetensors --prompt "The Eiffel Tower is in"
    lesion apply --steer runs/steer/vector.safetensors --coef 8 --prompt "I went out yesterday and"
    lesion bench-trace --threads 2
    lesion bench-patch --threads 2
    lesion bench-edit --threads 2
    lesion bench-steer --threads 2
    lesion run recipes/erase_red.yaml --out runs/erase_red           # text-to-image: erase a concept
    lesion apply --model shapes-diffusion --delta runs/erase_red/delta.safetensors --prompt "a red circle" --out g
    lesion bench-erase --threads 2

Errors a user can cause print one clear message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from interventions.errors import LesionError, SpecError


def _load(path: str, model: str | None):
    from interventions import load_spec

    spec = load_spec(path)
    if model is not None:
        spec = spec.model_copy(update={"model": model})
        from interventions.spec import parse_spec, spec_to_dict

        spec = parse_spec(spec_to_dict(spec))
    return spec


def cmd_run(args) -> int:
    from interventions import load_model, run
    from interventions.distributed import init_from_env, local_device, world

    spec = _load(args.spec, args.model)
    if _is_diffusion_spec(spec):
        return _diffusion(spec, args)
    from interventions.spec import VLMEditSpec, VLMTraceSpec

    if isinstance(spec, VLMTraceSpec):
        return _vlm_trace(spec, args)
    if isinstance(spec, VLMEditSpec):
        return _vlm_edit(spec, args)
    if init_from_env() and spec.kind not in ("trace", "patch"):
        raise SpecError("kind", spec.kind, "'trace' or 'patch' under torchrun (other kinds run in one process)")
    if args.out is None and spec.kind != "apply":
        raise SpecError("--out", None, f"an output folder for a `{spec.kind}` spec")
    if args.checkpoint:
        from recipes.manifest import check_name

        if spec.kind not in ("edit", "erase"):
            raise SpecError("--checkpoint", args.checkpoint, "only with a `kind: edit` or `kind: erase` spec "
                            "(it ships the delta)")
        check_name(args.checkpoint)
    device_map = _device_map(getattr(args, "device_map", None))
    if device_map is not None and spec.kind not in ("trace", "patch"):
        raise SpecError("--device-map", args.device_map, "only with `kind: trace` or `kind: patch` specs")
    model, tokenizer = load_model(spec.model, device=local_device(args.device), device_map=device_map,
                                  offload_folder=getattr(args, "offload_folder", None))
    if spec.kind == "edit":
        return _edit(spec, model, tokenizer, args.out, checkpoint=args.checkpoint,
                     command=" ".join(["lesion"] + (args.argv or [])), source=args.spec)
    if spec.kind == "apply":
        return _apply(spec, model, tokenizer)
    if spec.kind == "steer":
        return _steer(spec, model, tokenizer, args.out)
    from interventions.memory import PeakMemory, human, parse_bytes

    memory = parse_bytes(args.memory, "--memory") if args.memory else None
    start = time.perf_counter()
    from interventions.engine import _device

    with PeakMemory(_device(model), model=model) as peak:
        result = run(spec, model, tokenizer, max_batch_rows=args.max_batch_rows, progress=not args.quiet,
                     memory=memory)
    seconds = time.perf_counter() - start
    result.meta.update(memory_peak_bytes=peak.bytes, memory_peak_measured_by=peak.method)
    rank, processes = world()
    if rank != 0:
        return 0
    written = result.save(args.out)
    budget = f" (budget {human(memory)})" if memory else ""
    print(f"{spec.kind} of {len(result.prompts)} prompt(s) on {spec.model}: {result.meta['rows']} rows "
          f"in {seconds:.1f} s; peak memory beyond the weights {human(peak.bytes)}{budget}")
    for p in result.prompts:
        line = f"  {p['prompt']!r} -> {p['answer']!r}: clean p={p['clean_prob']:.3f}"
        if "corrupted_prob" in p:
            line += f", corrupted p={p['corrupted_prob']:.3f}"
        if "base_metric" in p:
            line += f", base {spec.metric}={p['base_metric']:.3f}"
        print(line)
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0


def _vlm_trace(spec, args) -> int:
    """`kind: trace` on a LLaVA model (recipes/vlm.py)."""
    from pathlib import Path

    from recipes.vlm import run_trace

    if args.out is None:
        raise SpecError("--out", None, "an output folder for a `trace` spec")
    for flag in ("device_map", "memory", "checkpoint"):
        if getattr(args, flag, None):
            raise SpecError(f"--{flag.replace('_', '-')}", getattr(args, flag), "nothing: not for VLM traces (yet)")
    result, seconds = run_trace(spec, Path(args.out), device=args.device)
    print(f"trace of {len(result.prompts)} image prompt(s) on {spec.model} in {seconds:.1f} s")
    for p in result.prompts:
        print(f"  {p['label']} +{p['prompt']!r} -> {p['answer']!r}: clean p={p['clean_prob']:.3f}, "
              f"corrupted p={p['corrupted_prob']:.3f}")
    print(f"wrote result.json, result.safetensors, spec.yaml, heatmap.png to {args.out}")
    return 0


def _vlm_edit(spec, args) -> int:
    """`kind: edit` on a LLaVA model: ROME keyed at the image tokens (recipes/vlm.py)."""
    from pathlib import Path

    from recipes.vlm import run_edit

    if args.out is None:
        raise SpecError("--out", None, "an output folder for an `edit` spec")
    for flag in ("device_map", "memory"):
        if getattr(args, flag, None):
            raise SpecError(f"--{flag.replace('_', '-')}", getattr(args, flag), "nothing: not for VLM edits")
    if args.checkpoint:
        from recipes.manifest import check_name

        check_name(args.checkpoint)
    start = time.perf_counter()
    report = run_edit(spec, Path(args.out), device=args.device)
    print(f"rome edit of {spec.image} at layer {report['layer']} of {spec.model} in "
          f"{time.perf_counter() - start:.1f} s: {report['delta']} ({report['bytes']} bytes)")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
    print((Path(args.out) / "table.md").read_text(), end="")
    if args.checkpoint:
        from recipes.manifest import register

        row = register(Path(report["delta"]), f"{args.checkpoint}.safetensors", kind="delta", recipe=args.spec,
                       command=" ".join(["lesion"] + (args.argv or [])), base_model=spec.model, method="rome-vlm",
                       edited=report["edited"], layer=report["layer"], metrics=report["metrics"],
                       located=report["located"],
                       note=f"key: mean over the image tokens of {spec.image}; C from {spec.mom2_tokens:,} tokens "
                            + ("of the spec's corpus files" if spec.corpus else "of text sampled from the model"))
        print(f"shipped checkpoints/{row['path']} ({row['bytes']} bytes) and its manifest entry")
    return 0


def _is_diffusion_spec(spec) -> bool:
    from interventions.spec import DiffusionApplySpec, DiffusionTraceSpec, EraseSpec

    return isinstance(spec, (DiffusionTraceSpec, EraseSpec, DiffusionApplySpec))


def _diffusion(spec, args) -> int:
    """trace / erase / apply on a text-to-image pipeline (recipes/diffusion.py)."""
    from pathlib import Path

    from recipes import diffusion as jobs

    for flag in ("device_map", "memory", "checkpoint", "max_batch_rows"):
        if flag == "checkpoint" and spec.kind == "erase":
            continue
        if getattr(args, flag, None):
            raise SpecError(f"--{flag.replace('_', '-')}", getattr(args, flag),
                            "nothing: it is for language-model specs, not text-to-image ones")
    if args.out is None and spec.kind != "apply":
        raise SpecError("--out", None, f"an output folder for a `{spec.kind}` spec")
    out = Path(args.out) if args.out else None
    pipe = jobs.pipeline_for(spec, device=getattr(args, "device", "cpu"))
    if spec.kind == "trace":
        report = jobs.run_trace(spec, pipe, out)
        result = report["result"]
        print(f"trace of {len(result.prompts)} prompt(s) on {spec.model}: {result.meta['images_per_cell']} images "
              f"per cell, {pipe.steps} steps, in {report['seconds']:.1f} s")
        for p in result.prompts:
            print(f"  {p['prompt']!r} (corrupted: {p['corrupted_prompt']!r}) shows {p['target']!r}: "
                  f"clean {p['clean_prob']:.2f}, corrupted {p['corrupted_prob']:.2f}")
            for name, grid in result.grids.items():
                i = result.prompts.index(p)
                vals = grid.values[i, :, :grid.lengths[i]]
                best = int(vals.nan_to_num(-1).argmax())
                layer, pos = divmod(best, vals.shape[1])
                where = (f"attn2 window from {grid.layers[layer]}" if name == "cross_attention"
                         else f"layer {grid.layers[layer]}, token {pos} {p['columns'][pos]!r}")
                print(f"    {name}: best {float(vals.flatten()[best]):.2f} at {where}")
        print(f"wrote {', '.join(report['written'])} to {out}")
        return 0
    if spec.kind == "erase":
        report = jobs.run_erase(spec, pipe, out)
        ranks = sorted(set(report["rank"].values()))
        print(f"{spec.method} ({spec.edit}) edit of {len(report['edited'])} projection(s) in "
              f"{report['edit_seconds']:.2f} s (rank {ranks or 'dense'})")
        if "summary" in report:
            s = report["summary"]
            print(f"  erased concept shown: {s['erased_before']:.2f} -> {s['erased_after']:.2f}; other colours "
                  f"{s['other_colours_before']:.2f} -> {s['other_colours_after']:.2f}; other shapes "
                  f"{s['other_shapes_before']:.2f} -> {s['other_shapes_after']:.2f}")
        print(f"wrote delta.safetensors, grid.png, report.json{', table.md' if 'summary' in report else ''} to {out}")
        if getattr(args, "checkpoint", None):
            from recipes.manifest import check_name, register

            row = register(out / "delta.safetensors", f"{check_name(args.checkpoint)}.safetensors", kind="delta",
                           recipe=args.spec, command=" ".join(["lesion"] + (args.argv or [])), base_model=spec.model,
                           method=spec.method, edit=spec.edit, edited=report["edited"],
                           metrics=report.get("summary", {}))
            print(f"shipped checkpoints/{row['path']} ({row['bytes']} bytes) and its manifest entry")
        return 0
    report = jobs.run_apply(spec, pipe, out)
    print(f"{report['images']} images with and without {len(spec.deltas)} delta(s): "
          f"{report['base_seconds']:.2f} s base, {report['edited_seconds']:.2f} s edited")
    for prompt, row in (report.get("after") or {}).items():
        b = report["before"][prompt]
        asked = row["asked_colour"] + row["asked_shape"]
        print(f"  {prompt!r}: " + ", ".join(f"{w} {b[w]:.2f} -> {row[w]:.2f}" for w in asked))
    if out is not None:
        print(f"wrote grid.png, report.json to {out}")
    return 0


_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(text: str | None):
    """``--device-map``: one of accelerate's strategies, or a JSON object of module -> device."""
    if text is None or text in _DEVICE_MAPS:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise SpecError("--device-map", text, f"one of {', '.join(_DEVICE_MAPS)}, or a JSON object mapping module "
                        "names to devices, e.g. '{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}'")
    return value


def _edit(spec, model, tokenizer, out, *, checkpoint=None, command="", source="") -> int:
    from recipes.edit import fmt_metric, run_edit

    start = time.perf_counter()
    report = run_edit(spec, model, tokenizer, out)
    layers = report["layers"]
    where = f"layer {layers[0]}" if spec.method == "rome" else f"layers {layers}"
    if report["located"]:
        where += f" (auto: from the MLP trace at {report['located']['position']}, written to {out}/locate)"
    print(f"{spec.method} edit of {len(spec.requests)} fact(s) at {where} of {spec.model} "
          f"in {time.perf_counter() - start:.1f} s: {report['delta']} ({report['bytes']} bytes)")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
    print("| metric | unedited | edited |\n|---|---|---|")
    for key in ("efficacy", "paraphrase", "neighbourhood", "fluency"):
        b, a = report["before"][key], report["after"][key]
        print(f"| {key} | {fmt_metric(b)} | {fmt_metric(a)} |")
    if checkpoint:
        from pathlib import Path

        from recipes.manifest import register

        row = register(Path(report["delta"]), f"{checkpoint}.safetensors", kind="delta", recipe=source,
                       command=command, base_model=spec.model, method=spec.method, edited=report["edited"],
                       layers=layers, metrics=report["metrics"], located=report["located"],
                       lesion_version=report["lesion_version"],
                       note=f"C from {spec.mom2_tokens:,} tokens of "
                            + ("the spec's corpus files" if spec.corpus else "text sampled from the model itself"))
        print(f"shipped checkpoints/{row['path']} ({row['bytes']} bytes, sha256 {row['sha256'][:12]}…) "
              f"and its manifest entry")
    return 0


def _apply(spec, model, tokenizer) -> int:
    from recipes.edit import run_apply

    what = " + ".join((["edited"] if spec.deltas else []) + ([f"steered x{spec.coef:g}"] if spec.steer else []))
    for row in run_apply(spec, model, tokenizer):
        print(f"prompt: {row['prompt']!r}\n  base:   {row['base']!r}\n  {what}: {row['edited']!r}")
    return 0


def _steer(spec, model, tokenizer, out) -> int:
    from recipes.steer import markdown_table, run_steer

    start = time.perf_counter()
    report = run_steer(spec, model, tokenizer, out)
    norms = ", ".join(f"layer {k}: {v:.2f}" for k, v in report["norms"].items())
    print(f"{spec.method} steering vector ({norms}) and {len(spec.coefficients)} coefficient(s) x "
          f"{len(spec.prompts)} prompt(s) in {time.perf_counter() - start:.1f} s")
    print(markdown_table(report["table"], report["metrics"]), end="")
    for metric, ok in report["monotone"].items():
        top = report["rises_up_to"][metric]
        print(f"{metric}: " + ("monotone over all coefficients" if ok else
                               f"rises up to coefficient {top:g}, then falls" if top is not None else
                               "does not rise from the first coefficient"))
    print(f"wrote vector.safetensors, generations.jsonl, results.json, table.md, steer.png to {out}")
    return 0


def cmd_apply(args) -> int:
    from interventions import load_model
    from interventions.diffusion import is_diffusion_model
    from interventions.spec import parse_spec

    from interventions.vlm import is_vlm_model

    if is_vlm_model(args.model):
        if args.image is None or args.steer or not args.delta:
            raise SpecError("--image", args.image, "an image (flag:<Country> or a file) and --delta files for a "
                            "vision-language model (no --steer)")
        from recipes.vlm import run_apply as run_vlm_apply

        for row in run_vlm_apply(args.model, args.delta, args.image, args.prompt,
                                 max_new_tokens=args.max_new_tokens):
            print(f"image {args.image}, prompt: {row['prompt']!r}\n  base:   {row['base']!r}\n  edited: {row['edited']!r}")
        return 0
    if args.image is not None:
        raise SpecError("--image", args.image, "nothing: --image is for vision-language models (e.g. llava-flags-smollm2)")
    if is_diffusion_model(args.model):
        if args.steer:
            raise SpecError("--steer", args.steer, "nothing: steering vectors are for language models")
        spec = parse_spec({"kind": "apply", "model": args.model, "deltas": args.delta or [], "prompts": args.prompt,
                           "images": args.images, "seed": args.seed})
        args.device = "cpu"
        return _diffusion(spec, args)
    spec = parse_spec({"kind": "apply", "model": args.model, "deltas": args.delta or [], "prompts": args.prompt,
                       "steer": args.steer, "coef": args.coef, "apply_to": args.apply_to,
                       "max_new_tokens": args.max_new_tokens})
    model, tokenizer = load_model(spec.model)
    return _apply(spec, model, tokenizer)


def cmd_validate(args) -> int:
    spec = _load(args.spec, args.model)
    if args.compile and spec.kind in ("trace", "patch") and not _is_diffusion_spec(spec):
        from interventions import compile_spec, load_model

        model, tokenizer = load_model(spec.model)
        plan = compile_spec(spec, model, tokenizer)
        print(f"ok: {spec.kind} spec, {len(spec.prompts)} prompt(s), compiles to {len(plan.graphs)} graph(s) "
              f"and {plan.num_rows} rows in {len(plan.chunks)} chunk(s)")
    else:
        items = spec.requests if spec.kind == "edit" else spec.concepts if spec.kind == "erase" else spec.prompts
        noun = {"edit": "request", "erase": "concept"}.get(spec.kind, "prompt")
        print(f"ok: {spec.kind} spec, {len(items)} {noun}(s), model {spec.model}")
    return 0


def cmd_schema(args) -> int:
    from interventions import spec_schema

    print(json.dumps(spec_schema(), indent=2))
    return 0


def cmd_eval_edits(args) -> int:
    from recipes.eval_edits import main as evaluate_edits

    return evaluate_edits(args)


def cmd_bench_trace(args) -> int:
    from recipes.bench_trace import main as bench

    return bench(args)


def cmd_bench_patch(args) -> int:
    from recipes.bench_patch import main as bench

    return bench(args)


def cmd_bench_edit(args) -> int:
    from recipes.bench_edit import main as bench

    return bench(args)


def cmd_compare(args) -> int:
    from interventions.compare import compare_saved

    rows = compare_saved(args.a, args.b)
    if not rows:
        raise SpecError("results", [args.a, args.b], "two results with at least one grid in common")
    print("| grid | Pearson r | max abs diff |\n|---|---|---|")
    for grid, r in rows.items():
        print(f"| {grid} | {r['pearson']:.3f} | {r['max_abs_diff']:.2e} |")
    return 0


def cmd_bench_erase(args) -> int:
    from recipes.bench_erase import main as bench

    return bench(args)


def cmd_edit_flag(args) -> int:
    from recipes.edit_flag import main as edit_flag

    return edit_flag(args)


def cmd_trace_flags(args) -> int:
    from recipes.trace_flags import main as trace_flags

    return trace_flags(args)


def cmd_bench_steer(args) -> int:
    from recipes.bench_steer import main as bench

    return bench(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lesion", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a spec: trace/patch write result.json, result.safetensors, heatmap.png, "
                                   "spec.yaml; edit writes delta.safetensors and metrics.json")
    r.add_argument("spec")
    r.add_argument("--out", default=None, help="output folder (not needed for `kind: apply`)")
    r.add_argument("--model", default=None, help="override the spec's `model`")
    r.add_argument("--max-batch-rows", type=int, default=None, help="override the spec's `max_batch_rows`")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--device-map", default=None, metavar="MAP",
                   help="trace/patch: spread the model over devices with accelerate: auto, balanced, sequential, "
                        "or a JSON object of module -> device (\"disk\" offloads); --device is then ignored")
    r.add_argument("--offload-folder", default=None, help="where --device-map puts \"disk\" weights")
    r.add_argument("--memory", default=None, metavar="SIZE",
                   help="trace/patch: bound the sweep's memory beyond the weights, e.g. 512MB or 2GiB; "
                        "chunks and prompt blocks are sized to fit, and the measured peak is reported")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (under torchrun: cuda means each "
                                                   "process's LOCAL_RANK device)")
    r.add_argument("--checkpoint", default=None, metavar="NAME",
                   help="edit specs: also copy the delta to checkpoints/NAME.safetensors and list it in the manifest")
    r.set_defaults(fn=cmd_run)
    v = sub.add_parser("validate", help="check a spec")
    v.add_argument("spec")
    v.add_argument("--model", default=None)
    v.add_argument("--compile", action="store_true", help="also load the model and compile (no forward pass)")
    v.set_defaults(fn=cmd_validate)
    a = sub.add_parser("apply", help="apply saved deltas and generate with and without them")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--delta", action="append", default=None, help="a delta file (repeat to stack several)")
    a.add_argument("--steer", default=None, help="a steering vector file (from a `kind: steer` run)")
    a.add_argument("--coef", type=float, default=4.0, help="the steering vector's coefficient")
    a.add_argument("--apply-to", default="all", help="steer at: all | prompt | generated positions")
    a.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    a.add_argument("--max-new-tokens", type=int, default=20)
    a.add_argument("--images", type=int, default=8, help="text-to-image: images per prompt (one per seed)")
    a.add_argument("--image", default=None, help="vision-language: the image the prompts ask about "
                                                 "(flag:<Country> or an image file)")
    a.add_argument("--seed", type=int, default=0, help="text-to-image: the first seed")
    a.add_argument("--out", default=None, help="text-to-image: a folder for grid.png and report.json")
    a.set_defaults(fn=cmd_apply)
    c = sub.add_parser("compare", help="correlate two results of one spec, e.g. method: exact and attribution")
    c.add_argument("a", help="a result folder")
    c.add_argument("b", help="another result folder")
    c.set_defaults(fn=cmd_compare)
    s = sub.add_parser("schema", help="print the JSON Schema of all specs")
    s.set_defaults(fn=cmd_schema)
    e = sub.add_parser("eval-edits", help="ROME one edit at a time over an edit spec's requests, with metrics")
    e.add_argument("spec")
    e.add_argument("--limit", type=int, default=None, help="only the first N requests")
    e.add_argument("--json", default=None, help="also write the numbers to this file")
    e.set_defaults(fn=cmd_eval_edits)
    b = sub.add_parser("bench-trace", help="benchmark the batched trace against a ROME-style reference loop")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--samples", type=int, default=10)
    b.add_argument("--max-batch-rows", type=int, default=48)
    b.add_argument("--device", default="cpu")
    b.add_argument("--json", default=None, help="also write the numbers to this file")
    b.add_argument("--memory", default=None, metavar="SIZE", help="run Lesion exact under this memory budget "
                                                                  "and report its measured peak")
    b.set_defaults(fn=cmd_bench_trace)
    bp = sub.add_parser("bench-patch", help="benchmark a 100-prompt patching sweep against a one-forward-per-cell "
                                            "reference loop")
    bp.add_argument("--model", default="smollm2-135m")
    bp.add_argument("--prompts", type=int, default=100)
    bp.add_argument("--max-batch-rows", type=int, default=48)
    bp.add_argument("--reference-prompts", type=int, default=None, metavar="K",
                    help="time the reference loop on K evenly spaced prompts and scale by cells (default: all)")
    bp.add_argument("--device", default="cpu")
    bp.add_argument("--json", default=None, help="also write the numbers to this file")
    bp.set_defaults(fn=cmd_bench_patch)
    be = sub.add_parser("bench-edit", help="benchmark ROME/MEMIT edit time, delta size, apply time, and "
                                           "generation speed edited against base")
    be.add_argument("--spec", default="recipes/counterfact_smollm2.yaml", help="a `method: rome` edit spec")
    be.add_argument("--rome", type=int, default=5, help="time ROME on the first N requests")
    be.add_argument("--memit", type=int, default=21, help="time one MEMIT batch of the first N requests (0: skip)")
    be.add_argument("--memit-layers", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    be.add_argument("--repeats", type=int, default=5, help="alternating base/edited generation rounds")
    be.add_argument("--new-tokens", type=int, default=32)
    be.add_argument("--json", default=None, help="also write the numbers to this file")
    be.set_defaults(fn=cmd_bench_edit)
    bs = sub.add_parser("bench-steer", help="benchmark steered against plain generation (tokens per second)")
    bs.add_argument("--model", default="smollm2-135m")
    bs.add_argument("--vector", default=None, help="a vector file (default: estimate recipes/steer_ocean.yaml's)")
    bs.add_argument("--coef", type=float, default=4.0)
    bs.add_argument("--batch", type=int, default=8)
    bs.add_argument("--new-tokens", type=int, default=32)
    bs.add_argument("--repeats", type=int, default=5)
    bs.add_argument("--json", default=None, help="also write the numbers to this file")
    bs.set_defaults(fn=cmd_bench_steer)
    bz = sub.add_parser("bench-erase", help="benchmark a text-to-image erasure: edit time, and images/s with "
                                           "the delta applied against the base pipeline")
    bz.add_argument("--spec", default="recipes/erase_red.yaml", help="a `kind: erase` spec")
    bz.add_argument("--images", type=int, default=64)
    bz.add_argument("--repeats", type=int, default=5)
    bz.add_argument("--device", default="cpu")
    bz.add_argument("--json", default=None, help="also write the numbers to this file")
    bz.set_defaults(fn=cmd_bench_erase)
    tf = sub.add_parser("trace-flags", help="VLM testbed: trace a capital fact with the country as an image and "
                                            "as text, side by side")
    tf.add_argument("--out", required=True)
    tf.add_argument("--countries", nargs="+", default=["France", "Germany", "Japan", "Korea"])
    tf.add_argument("--samples", type=int, default=5)
    tf.add_argument("--seed", type=int, default=2_000_000)
    tf.set_defaults(fn=cmd_trace_flags)
    ef = sub.add_parser("edit-flag", help="VLM testbed: ROME edit read at the image tokens of one flag")
    ef.add_argument("--out", required=True)
    ef.add_argument("--country", default="France")
    ef.add_argument("--target", default="Rome")
    ef.add_argument("--layer", type=int, default=4)
    ef.add_argument("--mom2-tokens", type=int, default=20_000)
    ef.add_argument("--seed", type=int, default=3_000_000)
    ef.add_argument("--renders", type=int, default=1, metavar="N",
                    help="read k* and optimise v* over N jittered renders of the flag (ROME's context templates, for images)")
    ef.add_argument("--kl-factor", type=float, default=1.0,
                    help="weight of v*'s KL term on the naming prompt (ROME's default 0.0625 lets the flag's identity drift)")
    ef.add_argument("--image-stats", type=int, default=0, metavar="N",
                    help="add the image-token key statistics of N jittered renders of every flag to C (0: text only)")
    ef.add_argument("--checkpoint", default=None, metavar="NAME", help="also ship the delta as checkpoints/NAME.safetensors")
    ef.set_defaults(fn=cmd_edit_flag)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.fn(args)
    except LesionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
