"""Benchmark steered generation against plain generation, in one run.

    lesion --threads 2 bench-steer [--vector runs/steer/vector.safetensors] [--coef 4]

Three ways to generate the same greedy tokens from the same left-padded batch of prompts,
alternated `--repeats` times so that the machine's drift hits all alike:
- plain: transformers' `model.generate`;
- Lesion, unsteered: our KV-cached decoding loop with coefficient 0 (the graph is skipped);
- Lesion, steered: the same loop adding coef·v through the pyvene graph at every position.
Reported: tokens per second of each (median over repeats) and steered / plain (goal ≥ 0.9).
Without `--vector`, a vector is estimated from recipes/steer/steer_ocean.yaml first (not timed).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from interventions import load_model, load_spec
from interventions.core.prompts import pad_token_id
from interventions.lenses.steering import Steerer, estimate, load_vector

PROMPTS = ["Yesterday afternoon I", "My favourite place in the world is", "The best thing about summer is",
           "Last weekend my family and I", "I woke up early this morning and", "The story begins with",
           "When I retire, I want to", "Every morning, the old man"]


def main(args) -> int:
    model, tokenizer = load_model(args.model)
    if args.vector:
        vector = load_vector(args.vector)
    else:
        spec = load_spec("recipes/steer/steer_ocean.yaml")
        positive, negative = spec.contrast()
        vector = estimate(model, tokenizer, positive, negative, layers=list(spec.layers), site=spec.site,
                          read=spec.read, method=spec.method, model_name=spec.model)
    prompts = (PROMPTS * ((args.batch + len(PROMPTS) - 1) // len(PROMPTS)))[: args.batch]
    n = args.new_tokens
    steer = Steerer(model, tokenizer, vector, coef=args.coef, apply_to="all")
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    pad = pad_token_id(tokenizer)

    def plain():
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)

    def ours(coef):
        ids = steer.generate_ids(prompts, coefs=[coef] * len(prompts), max_new_tokens=n, min_new_tokens=n)
        return sum(map(len, ids))

    runs = {"plain generate": plain, "Lesion, unsteered (coef 0)": lambda: ours(0.0),
            f"Lesion, steered (coef {args.coef:g})": lambda: ours(args.coef)}
    for fn in runs.values():                                  # warm-up
        fn()
    rates = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - start))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    base = medians["plain generate"]
    print(f"steered generation, {args.model}, batch {len(prompts)} x {n} new tokens, "
          f"{torch.get_num_threads()} threads, layers {vector.layers}, {args.repeats} repeats")
    print("| generation | tokens/s | ratio to plain |\n|---|---|---|")
    for name, rate in medians.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch": len(prompts), "new_tokens": n,
                                               "coef": args.coef, "layers": vector.layers, "rates": rates,
                                               "median_tokens_per_s": medians,
                                               "ratio_steered_to_plain": list(medians.values())[2] / base},
                                              indent=1))
    return 0
