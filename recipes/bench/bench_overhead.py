"""Benchmark: the engine's own overhead, as its time over plain batched forwards of the same rows.

    lesion --threads 2 bench-overhead [--samples 10] [--json out.json] [--profile 25]

On a tiny Llama (4 layers, d 64, SmolLM2's tokenizer and vocabulary, seeded weights) a forward costs almost
nothing on the CPU, as a real model's forward costs almost nothing on a GPU: what remains is the engine's own
work per chunk (building pyvene's unit locations, subspaces and source states, bookkeeping). The same Eiffel
trace (hidden, MLP and attention, window 10, `samples` noise draws) then runs on SmolLM2-135M, where the
forwards dominate. Each ratio is the engine's time (compiling the plan and running it) over plain batched
forwards of as many full-length rows (answer logits only, `max_batch_rows` per batch), measured in the same
run; so is the ratio to plain forwards that also read each row's p(answer) (the softmax over the vocabulary
that a trace's metric needs and a bare forward does not pay). `--profile N` prints the N functions with the
most own time in the tiny run (cProfile). The last line printed is the report as one JSON object.
"""

from __future__ import annotations

import json
import time

import torch

from interventions import compile_spec, parse_spec, run_plan
from recipes.bench.bench_trace import SPEC, plain_forwards


def tiny_llama(tokenizer, seed: int = 0):
    """A seeded 4-layer, d-64 Llama over `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def measure(model, tokenizer, samples: int, rows: int, repeats: int = 1) -> dict:
    """The engine's and the plain forwards' seconds for the Eiffel trace on `model` (best of `repeats`)."""
    spec = parse_spec({**SPEC, "samples": samples, "max_batch_rows": rows})
    run_plan(compile_spec(spec.model_copy(update={"layers": [0], "samples": 1}), model, tokenizer), progress=False)
    engine, plain, metric, result = [], [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        plan = compile_spec(spec, model, tokenizer)
        result = run_plan(plan, progress=False)
        engine.append(time.perf_counter() - start)
        plain.append(plain_forwards(model, plan, result.meta["rows"], rows))
        metric.append(plain_forwards(model, plan, result.meta["rows"], rows, probabilities=True))
    return {"rows": result.meta["rows"], "chunks": result.meta["chunks"], "engine_s": round(min(engine), 3),
            "plain_s": round(min(plain), 3), "ratio": round(min(engine) / min(plain), 2),
            "plain_with_probabilities_s": round(min(metric), 3),
            "ratio_to_plain_with_probabilities": round(min(engine) / min(metric), 2), "result": result}


def main(args) -> int:
    from interventions import load_model

    lm, tokenizer = load_model("smollm2-135m")
    tiny = tiny_llama(tokenizer)
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        measure(tiny, tokenizer, args.samples, args.max_batch_rows)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
    small = measure(tiny, tokenizer, args.samples, args.max_batch_rows, repeats=3)
    real = measure(lm, tokenizer, args.samples, args.max_batch_rows)
    report = {"threads": torch.get_num_threads(), "samples": args.samples, "max_batch_rows": args.max_batch_rows,
              "tiny": {k: v for k, v in small.items() if k != "result"},
              "smollm2": {k: v for k, v in real.items() if k != "result"},
              "engine_over_plain_tiny": small["ratio"], "engine_over_plain_smollm2": real["ratio"],
              "engine_over_plain_with_probabilities_tiny": small["ratio_to_plain_with_probabilities"]}
    print(f"tiny Llama (4 layers, d 64): engine {small['engine_s']} s, plain forwards {small['plain_s']} s of "
          f"{small['rows']} rows: {small['ratio']}x")
    print(f"SmolLM2-135M: engine {real['engine_s']} s, plain forwards {real['plain_s']} s of {real['rows']} rows: "
          f"{real['ratio']}x")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0
