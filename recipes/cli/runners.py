"""What `lesion run` (and `validate --compile`) does with each kind of spec: one table, keyed by (kind, modality).

>>> sorted(RUNNERS)[:3]
[('apply', 'language'), ('apply', 'text-to-image'), ('daam', 'text-to-image')]
>>> sorted(RUNNERS[("trace", "language")].flags)
['device_map', 'max_batch_rows', 'memory', 'offload_folder']

A runner gets the spec, the parsed arguments and `out`: a staging folder that becomes
``--out`` only once the runner has returned (see `interventions.core.atomic.atomic_folder`), or
None for kinds that write nothing. It prints its own summary and returns an exit status.
Optional flags a runner does not list in `flags` are refused before anything loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from interventions.core.errors import SpecError
from recipes.cli import compile_checks as checks


@dataclass(frozen=True)
class Runner:
    run: Callable[..., int]
    check: Callable[..., str]             # `validate --compile`: the spec against its model (compile_checks)
    flags: frozenset[str] = frozenset()   # optional `lesion run` flags it takes
    writes: bool = True                   # needs --out
    distributed: bool = False             # may run under torchrun


def run_grid(spec, args, out: Path | None) -> int:
    """`kind: trace` / `kind: patch` on a language model or a VLM: the one batched engine."""
    from interventions import run
    from interventions.modalities.vision_language.llava import load_language_or_vision
    from interventions.core.distributed import local_device, world
    from interventions.core.memory import PeakMemory
    from interventions.core.units import human, parse_bytes
    from interventions.core.runtime import input_device
    from recipes.cli.checks import parse_device_map

    memory = parse_bytes(args.memory, "--memory") if args.memory else None
    placement = dict(device=local_device(args.device), device_map=parse_device_map(args.device_map),
                     offload_folder=args.offload_folder)
    vision = spec.modality == "vision-language"
    model, tokenizer, processor = load_language_or_vision(spec.model, vision=vision, **placement)
    start = time.perf_counter()
    with PeakMemory(input_device(model), model=model) as peak:
        result = run(spec, model, tokenizer, processor=processor, max_batch_rows=args.max_batch_rows,
                     progress=not args.quiet, memory=memory)
    seconds = time.perf_counter() - start
    result.meta.update(memory_peak_bytes=peak.bytes, memory_peak_measured_by=peak.method, seconds=round(seconds, 1))
    if world()[0] != 0:
        return 0
    written = result.save(out, heatmap=not vision)
    if vision:
        from interventions.core.plot import vlm_trace_heatmap
        from recipes.jobs.run_vision_language import images_of

        vlm_trace_heatmap(result, images_of(result, model, processor), out / "heatmap.png")
        written.append("heatmap.png")
    budget = f" (budget {human(memory)})" if memory else ""
    print(f"{spec.kind} of {len(result.prompts)} prompt(s) on {spec.model}: {result.meta['rows']} rows "
          f"in {seconds:.1f} s; peak memory beyond the weights {human(peak.bytes)}{budget}")
    for p in result.prompts:
        label = f"{p['label']} + " if p.get("label") else ""
        line = f"  {label}{p['prompt']!r} -> {p['answer']!r}: clean p={p['clean_prob']:.3f}"
        if "corrupted_prob" in p:
            line += f", corrupted p={p['corrupted_prob']:.3f}"
        if "base_metric" in p:
            line += f", base {spec.metric}={p['base_metric']:.3f}"
        print(line)
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0


def run_edit(spec, args, out: Path) -> int:
    from interventions import load_model
    from editors.editor import fmt_metric, run_edit as edit
    from editors.requests import resolve_requests

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
    args.shipping = dict(method=spec.method, edited=report["edited"], layers=layers, metrics=report["metrics"],
                         located=report["located"], lesion_version=report["lesion_version"],
                         note=f"C from {spec.mom2_tokens:,} tokens of " + (
                             "the spec's corpus files" if spec.corpus else "text sampled from the model itself"))
    return 0


def run_apply(spec, args, out: None) -> int:
    from interventions import load_model
    from editors.editor import run_apply as apply

    model, tokenizer = load_model(spec.model, device=args.device)
    what = " + ".join((["edited"] if spec.deltas else []) + ([f"steered x{spec.coef:g}"] if spec.steer else []))
    for row in apply(spec, model, tokenizer):
        print(f"prompt: {row['prompt']!r}\n  base:   {row['base']!r}\n  {what}: {row['edited']!r}")
    return 0


def run_steer(spec, args, out: Path) -> int:
    from interventions import load_model
    from recipes.jobs.run_steer import markdown_table, run_steer as steer

    model, tokenizer = load_model(spec.model, device=args.device)
    start = time.perf_counter()
    report = steer(spec, model, tokenizer, out)
    norms = ", ".join(f"layer {k}: {v:.2f}" for k, v in report["norms"].items())
    print(f"{spec.method} steering vector ({norms}) and {len(spec.coefficients)} coefficient(s) x "
          f"{len(spec.prompts)} prompt(s) in {time.perf_counter() - start:.1f} s")
    print(markdown_table(report["table"], report["metrics"]), end="")
    for metric, ok in report["monotone"].items():
        top = report["rises_up_to"][metric]
        print(f"{metric}: " + ("monotone over all coefficients" if ok else
                               f"rises up to coefficient {top:g}, then falls" if top is not None else
                               "does not rise from the first coefficient"))
    print(f"wrote vector.safetensors, generations.jsonl, results.json, table.md, steer.png to {args.out}")
    return 0


def run_vlm_edit(spec, args, out: Path) -> int:
    """`kind: edit` on a LLaVA model: ROME keyed at the image tokens (recipes/jobs/run_vision_language.py)."""
    from recipes.jobs.run_vision_language import run_edit as edit

    start = time.perf_counter()
    report = edit(spec, out, device=args.device)
    print(f"rome edit of {spec.image} at layer {report['layer']} of {spec.model} in "
          f"{time.perf_counter() - start:.1f} s: {Path(args.out) / report['delta']} ({report['bytes']} bytes)")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
    print((out / "table.md").read_text(), end="")
    args.shipping = dict(method="rome-vlm", edited=report["edited"], layer=report["layer"], metrics=report["metrics"],
                         located=report["located"],
                         note=f"key: mean over the image tokens of {spec.image}; C from {spec.mom2_tokens:,} tokens "
                              + ("of the spec's corpus files" if spec.corpus else "of text sampled from the model"))
    return 0


def run_diffusion_trace(spec, args, out: Path) -> int:
    from recipes.jobs import run_text_to_image as jobs

    pipe = jobs.pipeline_for(spec, device=args.device)
    report = jobs.run_trace(spec, pipe, out)
    result = report["result"]
    print(f"trace of {len(result.prompts)} prompt(s) on {spec.model}: {result.meta['images_per_cell']} images "
          f"per cell, {pipe.steps} steps, in {report['seconds']:.1f} s")
    for i, p in enumerate(result.prompts):
        print(f"  {p['prompt']!r} (corrupted: {p['corrupted_prompt']!r}) shows {p['target']!r}: "
              f"clean {p['clean_prob']:.2f}, corrupted {p['corrupted_prob']:.2f}")
        for name, grid in result.grids.items():
            vals = grid.values[i, :, :grid.lengths[i]]
            best = int(vals.nan_to_num(-1).argmax())
            layer, pos = divmod(best, vals.shape[1])
            where = (f"attn2 window from {grid.layers[layer]}" if name == "cross_attention"
                     else f"layer {grid.layers[layer]}, token {pos} {p['columns'][pos]!r}")
            print(f"    {name}: best {float(vals.flatten()[best]):.2f} at {where}")
    print(f"wrote {', '.join(report['written'])} to {args.out}")
    return 0


def run_erase(spec, args, out: Path) -> int:
    from recipes.jobs import run_text_to_image as jobs

    pipe = jobs.pipeline_for(spec, device=args.device)
    report = jobs.run_erase(spec, pipe, out)
    ranks = sorted(set(report["rank"].values()))
    print(f"{spec.method} ({spec.edit}) edit of {len(report['edited'])} projection(s) in "
          f"{report['edit_seconds']:.2f} s (rank {ranks or 'dense'})")

    def pct(v):
        return "n/a" if v is None else f"{v:.2f}"

    e, b = report["erased_rate"], report.get("erased_rate_before", {})
    print(f"  erased concept shown after (before): templates {pct(e['templates'])} ({pct(b.get('templates'))}), "
          f"held-out phrasings {pct(e['heldout'])} ({pct(b.get('heldout'))}), adversarial search "
          f"{pct(e['adversarial'])}; other concepts kept {pct(report['kept_rate'])}")
    if "summary" in report:
        s = report["summary"]
        print(f"  erased concept shown: {s['erased_before']:.2f} -> {s['erased_after']:.2f}; other colours "
              f"{s['other_colours_before']:.2f} -> {s['other_colours_after']:.2f}; other shapes "
              f"{s['other_shapes_before']:.2f} -> {s['other_shapes_after']:.2f}")
    print(f"wrote delta.safetensors, grid.png, report.json{', table.md' if 'summary' in report else ''} to {args.out}")
    metrics = {**report.get("summary", {}), **{f"erased_{k}": v for k, v in report["erased_rate"].items()},
               "kept_rate": report["kept_rate"]}
    args.shipping = dict(method=spec.method, edit=spec.edit, edited=report["edited"], metrics=metrics)
    return 0


def run_diffusion_apply(spec, args, out: Path | None) -> int:
    from recipes.jobs import run_text_to_image as jobs

    pipe = jobs.pipeline_for(spec, device=args.device)
    report = jobs.run_apply(spec, pipe, out)
    print(f"{report['images']} images with and without {len(spec.deltas)} delta(s): "
          f"{report['base_seconds']:.2f} s base, {report['edited_seconds']:.2f} s edited")
    for prompt, row in (report.get("after") or {}).items():
        b = report["before"][prompt]
        asked = row["asked_colour"] + row["asked_shape"]
        print(f"  {prompt!r}: " + ", ".join(f"{w} {b[w]:.2f} -> {row[w]:.2f}" for w in asked))
    if out is not None:
        print(f"wrote grid.png, report.json to {args.out}")
    return 0


def run_lens(spec, args, out: Path) -> int:
    from recipes.jobs.run_lenses import run_lens as lens

    return lens(spec, args, out)


def run_knockout(spec, args, out: Path) -> int:
    from recipes.jobs.run_lenses import run_knockout as knockout

    return knockout(spec, args, out)


def run_probe(spec, args, out: Path) -> int:
    from recipes.jobs.run_lenses import run_probe as probe

    return probe(spec, args, out)


def run_daam(spec, args, out: Path) -> int:
    from recipes.jobs.run_lenses import run_daam as daam

    return daam(spec, args, out)


_GRID = frozenset({"device_map", "offload_folder", "memory", "max_batch_rows"})
_ROWS = frozenset({"max_batch_rows"})
RUNNERS: dict[tuple[str, str], Runner] = {
    ("trace", "language"): Runner(run_grid, checks.check_grid, _GRID, distributed=True),
    ("patch", "language"): Runner(run_grid, checks.check_grid, _GRID, distributed=True),
    ("edit", "language"): Runner(run_edit, checks.check_edit, frozenset({"checkpoint"})),
    ("steer", "language"): Runner(run_steer, checks.check_steer),
    ("apply", "language"): Runner(run_apply, checks.check_apply, writes=False),
    ("trace", "vision-language"): Runner(run_grid, checks.check_grid, _GRID, distributed=True),
    ("patch", "vision-language"): Runner(run_grid, checks.check_grid, _GRID, distributed=True),
    ("edit", "vision-language"): Runner(run_vlm_edit, checks.check_vlm_edit, frozenset({"checkpoint"})),
    ("trace", "text-to-image"): Runner(run_diffusion_trace, checks.check_diffusion_trace),
    ("erase", "text-to-image"): Runner(run_erase, checks.check_erase, frozenset({"checkpoint"})),
    ("apply", "text-to-image"): Runner(run_diffusion_apply, checks.check_diffusion_apply, frozenset({"out"}),
                                       writes=False),
    ("lens", "language"): Runner(run_lens, checks.check_reading, _ROWS),
    ("lens", "vision-language"): Runner(run_lens, checks.check_reading, _ROWS),
    ("knockout", "language"): Runner(run_knockout, checks.check_reading, _ROWS),
    ("knockout", "vision-language"): Runner(run_knockout, checks.check_reading, _ROWS),
    ("probe", "language"): Runner(run_probe, checks.check_reading),
    ("probe", "vision-language"): Runner(run_probe, checks.check_reading),
    ("daam", "text-to-image"): Runner(run_daam, checks.check_daam),
}
#: The optional flags of `lesion run`, as argparse names them, and how the user spells them.
OPTIONAL_FLAGS = {"device_map": "--device-map", "offload_folder": "--offload-folder", "memory": "--memory",
                  "max_batch_rows": "--max-batch-rows", "checkpoint": "--checkpoint", "out": "--out"}


def runner_for(spec, args) -> Runner:
    """The spec's runner, after refusing every flag it does not take."""
    runner = RUNNERS[(spec.kind, spec.modality)]
    takes = runner.flags | ({"out"} if runner.writes else set())
    for name, flag in OPTIONAL_FLAGS.items():
        if getattr(args, name, None) is not None and name not in takes:
            raise SpecError(flag, getattr(args, name), f"nothing: `kind: {spec.kind}` with `modality: "
                            f"{spec.modality}` does not take {flag}")
    return runner


def compile_check(spec) -> str:
    """One line saying what was checked; raises on the first problem."""
    from recipes.cli.checks import check_spec_files

    check_spec_files(spec)
    return f"ok: {spec.kind} spec ({spec.modality}), {RUNNERS[(spec.kind, spec.modality)].check(spec)}"
