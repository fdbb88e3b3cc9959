"""Benchmark the weight layer: seconds per edit of every edit method, their peak memory, delta size,
apply/revert time, and generation speed with a delta applied against the base model, all in one run.

    lesion --threads 2 bench-edit [--spec recipes/edit/bench_edit_smollm2.yaml] [--rome 5] [--batch 100]

- Second-moment statistics are computed (or read from the cache) before any timing; the report
  says which. Context templates are drawn once per method before its timing (as a sequential run
  draws them once); the spec's `hyperparameters` apply to every method.
- ROME, r-ROME: seconds per edit over the first `--rome` requests at the spec's `layer`.
- EMMET (at `layer`), MEMIT, AlphaEdit, ENCORE and UltraEdit (at `--memit-layers`): seconds for one batch
  of the first `--batch` requests, all optimised together (UltraEdit optimises nothing: one forward and
  backward pass, then a closed form). Every method's seconds per edit is in the JSON line
  (``<method>_s_per_edit``).
- Peak memory per method: the resident set's high-water mark above the loaded model
  (`interventions.core.memory.PeakMemory`).
- Delta size: the saved files' bytes; apply and revert: median of 20 of each.
- Generation: greedy tokens per second, base and edited alternating `--repeats` times, so that
  the machine's drift hits both alike. Applied edits are merged weights: the goal is 1.00 ± 0.05.

The last line is one JSON object with the figures (``rome_s_per_edit``, ``memit_batch100_s``, …).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from editors.delta import apply, load_delta, revert
from editors.editor import corpus_texts, edit_request, hyperparameters, key_statistics
from editors.methods.emmet import compute_emmet
from editors.methods.memit import compute_memit
from editors.methods.rome import compute_rome, context_templates
from editors.methods.ultraedit import compute_ultraedit
from editors.stats import stats_paths
from interventions import SpecError, load_model, load_spec
from interventions.core.prompts import pad_token_id
from interventions.spec import ONE_LAYER_METHODS

PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of France is", "My favourite food is"]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.inference_mode()
def tokens_per_second(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    pad = pad_token_id(tokenizer)
    total, seconds = 0, 0.0
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        start = time.perf_counter()
        out = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=pad)
        seconds += time.perf_counter() - start
        total += out.shape[1] - enc["input_ids"].shape[1]
    return total / seconds


def main(args) -> int:
    from editors.requests import resolve_requests

    spec = resolve_requests(load_spec(args.spec))
    if spec.kind != "edit" or spec.method not in ONE_LAYER_METHODS or spec.layer == "auto":
        raise SpecError("--spec", args.spec, "a `kind: edit` spec with an integer `layer` (method rome, r-rome "
                                             "or emmet)")
    model, tokenizer = load_model(spec.model)
    layers = sorted({spec.layer, *args.memit_layers})
    paths = stats_paths(model, layers, corpus_texts(spec), max_tokens=spec.mom2_tokens,
                        corpus_name="files" if spec.corpus else "model-samples")
    cached = {layer: path.exists() for layer, path in paths.items()}
    C, stats_seconds = _timed(lambda: key_statistics(spec, model, tokenizer, layers))
    report = {"model": spec.model, "threads": torch.get_num_threads(), "statistics_cached": cached,
              "statistics_seconds": stats_seconds, "methods": {}}
    requests = [edit_request(r) for r in spec.requests]
    figures, deltas = {}, {}
    for method in args.methods:
        row, deltas[method] = _time_method(method, spec, args, model, tokenizer, C, requests, figures)
        report["methods"][method] = row
        print(f"{method}: " + (f"{row['seconds_per_edit']:.1f} s per edit" if "seconds_per_edit" in row else
                               f"{row['seconds']:.1f} s for a batch of {row['requests']}") +
              f", peak {row['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    delta = _delta_io(report, deltas, args, model, len(requests[: args.batch]))
    b, e = _generation(report, model, tokenizer, delta, args)
    _print_table(report, spec, cached, stats_seconds, b, e)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({**figures, "generation_ratio": e / b, "apply_ms": 1e3 * report["apply_seconds"],
                      "threads": report["threads"], "statistics_cached": all(cached.values())}))
    return 0


def _time_method(method: str, spec, args, model, tokenizer, C: dict, requests: list, figures: dict):
    """One method's timing row (ROME, r-ROME: each of the first `--rome` requests; the others: one batch of
    `--batch`) with its peak memory, and its last Delta; its figures are added to `figures`."""
    from interventions.core.memory import PeakMemory

    batch = requests[: args.batch]
    where = {"layer": spec.layer, "layers": None} if method in ONE_LAYER_METHODS else \
        {"layer": None, "layers": tuple(args.memit_layers)}
    overrides = {} if method == "ultraedit" else dict(spec.hyperparameters)    # the optimisers' settings
    hp = hyperparameters(spec.model_copy(update={"method": method, **where, "hyperparameters": overrides}))
    templates = context_templates(model, tokenizer, hp.context_templates, hp.seed) if method != "ultraedit" else []
    common = dict(base_model=spec.model, templates=templates)
    with PeakMemory("cpu", model) as peak:
        if method in ("rome", "r-rome"):
            seconds = []
            for request in requests[: args.rome]:
                (delta, _), s = _timed(lambda: compute_rome(model, tokenizer, request, hp, C=C[spec.layer],
                                                            method=method, **common))
                seconds.append(s)
            row = {"layer": spec.layer, "edits": len(seconds), "seconds_per_edit": statistics.mean(seconds),
                   "seconds": seconds}
            figures[f"{method.replace('-', '_')}_s_per_edit"] = row["seconds_per_edit"]
        else:
            if method == "emmet":
                (delta, _), s = _timed(lambda: compute_emmet(model, tokenizer, batch, hp, C=C[spec.layer], **common))
            elif method == "ultraedit":
                (delta, _), s = _timed(lambda: compute_ultraedit(model, tokenizer, batch, hp, base_model=spec.model))
            else:
                (delta, _), s = _timed(lambda: compute_memit(model, tokenizer, batch, hp, C=C, **common))
            row = {"layers": [spec.layer] if method == "emmet" else list(args.memit_layers),
                   "requests": len(batch), "seconds": s, "seconds_per_request": s / len(batch)}
            figures[f"{method}_batch{len(batch)}_s"] = s
            figures[f"{method}_s_per_edit"] = s / len(batch)
    row["peak_bytes"] = peak.bytes
    figures[f"{method.replace('-', '_')}_peak_bytes"] = peak.bytes
    return row, delta


def _delta_io(report: dict, deltas: dict, args, model, batch: int):
    """Each delta's size on disk; loading, applying and reverting the first method's (median of 20)."""
    first = deltas[args.methods[0]]
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {f"{m}_{'rank1' if m in ('rome', 'r-rome') else f'{batch}_requests'}":
                 d.save(Path(tmp) / f"{m}.safetensors").stat().st_size for m, d in deltas.items()}
        delta, load_s = _timed(lambda: load_delta(Path(tmp) / f"{args.methods[0]}.safetensors"))
    assert delta.id == first.id
    apply_s, revert_s = [], []
    for _ in range(20):
        apply_s.append(_timed(lambda: apply(model, delta))[1])
        revert_s.append(_timed(lambda: revert(model, delta))[1])
    report.update(delta_bytes=sizes, load_seconds=load_s, apply_seconds=statistics.median(apply_s),
                  revert_seconds=statistics.median(revert_s))
    return delta


def _generation(report: dict, model, tokenizer, delta, args) -> tuple[float, float]:
    """Greedy tokens per second without and with the delta, alternating, `--repeats` rounds (medians)."""
    base, edited = [], []
    tokens_per_second(model, tokenizer, PROMPTS[:1], 4)                    # warm-up
    for _ in range(args.repeats):
        base.append(tokens_per_second(model, tokenizer, PROMPTS, args.new_tokens))
        apply(model, delta)
        try:
            edited.append(tokens_per_second(model, tokenizer, PROMPTS, args.new_tokens))
        finally:
            revert(model, delta)
    b, e = statistics.median(base), statistics.median(edited)
    report["generation"] = {"base_tokens_per_s": b, "edited_tokens_per_s": e, "ratio": e / b,
                            "repeats": args.repeats, "new_tokens": args.new_tokens, "prompts": len(PROMPTS)}
    return b, e


def _print_table(report: dict, spec, cached: dict, stats_seconds: float, b: float, e: float) -> None:
    print(f"\nedit benchmark, {spec.model}, {report['threads']} threads "
          f"(statistics {'cached' if all(cached.values()) else 'computed'}: {stats_seconds:.1f} s)")
    print("| method | layers | seconds | peak memory |\n|---|---|---|---|")
    for method, row in report["methods"].items():
        time_s = (f"{row['seconds_per_edit']:.1f} per edit ({row['edits']} edits)" if "seconds_per_edit" in row
                  else f"{row['seconds']:.1f} for a batch of {row['requests']} ({row['seconds_per_request']:.2f} "
                       "per request)")
        print(f"| {method} | {row.get('layers', [row.get('layer')])} | {time_s} | "
              f"{row['peak_bytes'] / 2**20:.0f} MiB |")
    for name, size in report["delta_bytes"].items():
        print(f"| delta bytes, {name} | {size:,} | | |")
    print(f"| load / apply / revert (ms) | {1e3 * report['load_seconds']:.2f} / {1e3 * report['apply_seconds']:.2f} / "
          f"{1e3 * report['revert_seconds']:.2f} | | |")
    print(f"| generation tokens/s, base / edited | {b:.1f} / {e:.1f} | edited / base {e / b:.3f} | |")
