"""Benchmark the weight layer: ROME and MEMIT edit times, delta size, apply/revert time, and
generation speed with the delta applied against the base model, all in one run.

    lesion --threads 2 bench-edit [--spec recipes/counterfact_smollm2.yaml] [--rome 5] [--memit 21]

- Second-moment statistics are computed (or read from the cache) before any timing; the report
  says which.
- ROME: seconds per edit over the first `--rome` requests (k*, v* optimisation, update).
- MEMIT: seconds for one batch of the first `--memit` requests over MEMIT layers `--memit-layers`.
- Delta size: the saved files' bytes; apply and revert: median of 20 of each.
- Generation: greedy tokens per second, base and edited alternating `--repeats` times, so that
  the machine's drift hits both alike. Applied edits are merged weights: the goal is 1.00 ± 0.05.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from editors.delta import apply, load_delta, revert
from editors.memit import MemitHyperParams, compute_memit
from editors.rome import compute_rome
from editors.stats import stats_paths
from interventions import SpecError, load_model, load_spec
from interventions.prompts import pad_token_id
from recipes.edit import corpus_texts, key_statistics, edit_request, hyperparameters

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
    from recipes.requests import resolve_requests

    spec = resolve_requests(load_spec(args.spec))
    if spec.kind != "edit" or spec.method != "rome" or spec.layer == "auto":
        raise SpecError("--spec", args.spec, "a `kind: edit`, `method: rome` spec with an integer `layer`")
    model, tokenizer = load_model(spec.model)
    layers = sorted({spec.layer, *args.memit_layers})
    paths = stats_paths(model, layers, corpus_texts(spec), max_tokens=spec.mom2_tokens,
                        corpus_name="files" if spec.corpus else "model-samples")
    cached = {layer: path.exists() for layer, path in paths.items()}
    C, stats_seconds = _timed(lambda: key_statistics(spec, model, tokenizer, layers))
    report = {"model": spec.model, "threads": torch.get_num_threads(), "statistics_cached": cached,
              "statistics_seconds": stats_seconds}
    requests = [edit_request(r) for r in spec.requests]

    hp = hyperparameters(spec)
    rome_seconds, deltas = [], []
    for request in requests[: args.rome]:
        (delta, _), s = _timed(lambda: compute_rome(model, tokenizer, request, hp, base_model=spec.model,
                                                    C=C[spec.layer]))
        rome_seconds.append(s)
        deltas.append(delta)
        print(f"ROME {request.subject}: {s:.1f} s", flush=True)
    report["rome"] = {"layer": spec.layer, "edits": len(rome_seconds),
                      "seconds_per_edit": statistics.mean(rome_seconds), "seconds": rome_seconds}

    memit_delta = None
    if args.memit:
        mhp = MemitHyperParams(layers=tuple(args.memit_layers), mom2_tokens=spec.mom2_tokens)
        (memit_delta, _), s = _timed(lambda: compute_memit(model, tokenizer, requests[: args.memit], mhp,
                                                           base_model=spec.model, C=C))
        report["memit"] = {"layers": list(args.memit_layers), "requests": len(requests[: args.memit]), "seconds": s,
                           "seconds_per_request": s / len(requests[: args.memit])}
        print(f"MEMIT batch of {len(requests[: args.memit])}: {s:.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"rome_rank1": deltas[0].save(Path(tmp) / "rome.safetensors").stat().st_size}
        if memit_delta is not None:
            sizes[f"memit_{len(requests[: args.memit])}_requests"] = \
                memit_delta.save(Path(tmp) / "memit.safetensors").stat().st_size
        delta, load_s = _timed(lambda: load_delta(Path(tmp) / "rome.safetensors"))
    report["delta_bytes"] = sizes
    apply_s, revert_s = [], []
    for _ in range(20):
        apply_s.append(_timed(lambda: apply(model, delta))[1])
        revert_s.append(_timed(lambda: revert(model, delta))[1])
    report["load_seconds"] = load_s
    report["apply_seconds"] = statistics.median(apply_s)
    report["revert_seconds"] = statistics.median(revert_s)

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

    print(f"\nedit benchmark, {spec.model}, {report['threads']} threads "
          f"(statistics {'cached' if all(cached.values()) else 'computed'}: {stats_seconds:.1f} s)")
    print("| measure | value |\n|---|---|")
    print(f"| ROME, seconds per edit (layer {spec.layer}, {len(rome_seconds)} edits) | "
          f"{report['rome']['seconds_per_edit']:.1f} |")
    if memit_delta is not None:
        m = report["memit"]
        print(f"| MEMIT, seconds for a batch of {m['requests']} (layers {m['layers']}) | {m['seconds']:.1f} "
              f"({m['seconds_per_request']:.1f} per request) |")
    for name, size in sizes.items():
        print(f"| delta bytes, {name} | {size:,} |")
    print(f"| load / apply / revert (ms) | {1e3 * load_s:.2f} / {1e3 * report['apply_seconds']:.2f} / "
          f"{1e3 * report['revert_seconds']:.2f} |")
    print(f"| generation tokens/s, base / edited | {b:.1f} / {e:.1f} |")
    print(f"| edited / base | {e / b:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
