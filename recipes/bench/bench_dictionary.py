"""Benchmark a feature dictionary: training throughput, and what reading features costs a forward pass.

    lesion --threads 2 bench-dictionary [--dictionary DIR] [--model smollm2-135m]

- Training: a TopK dictionary (`--features`, `--k`) fitted on `--tokens` activation rows of the
  model's `--layer` (collected once, not timed); tokens per second of `fit` alone.
- Overhead: the same batch of prompts through the model plain, and through a pyvene graph whose one
  node edits features at the dictionary's site and changes nothing (encode and decode at every
  position, the error added back: bit-identical logits, checked); alternated `--repeats` times, the
  median of each, and their ratio (with features / without).
Ends with one JSON line of the figures, the thread count included.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from interventions import load_model
from interventions.core.prompts import encode, model_inputs, pad_token_id
from interventions.engine.pv import build_graph
from interventions.features.dictionary import Where, load_dictionary
from interventions.features.splice import FeatureEdit, component
from interventions.features.training import fit, stream_activations

PROMPTS = ["The Eiffel Tower is located in the city of Paris, which is the capital of France.",
           "a small red circle on the left and a large blue square on the right",
           "Yesterday afternoon I walked along the river and watched the boats go by."]


def main(args) -> int:
    model, tokenizer = load_model(args.model)
    texts = [p for p in PROMPTS for _ in range(max(1, args.tokens // 8))]
    where = Where("block_output", args.layer, args.model)
    rows = torch.cat(list(stream_activations(model, tokenizer, texts, where, buffer_tokens=args.tokens)))[:args.tokens]
    d, state = fit([rows], rows.shape[1], features=args.features, k=args.k, batch_tokens=min(512, len(rows)),
                   where=where, log=None)
    if args.dictionary:
        d = load_dictionary(args.dictionary)
    encs = [encode(tokenizer, p, field="prompts") for p in PROMPTS * (args.batch // len(PROMPTS) + 1)][:args.batch]
    inputs = {**model_inputs(encs, pad_token_id(tokenizer)), "use_cache": False}
    every = [list(range(inputs["input_ids"].shape[1]))] * len(encs)
    graph = build_graph(model, [(component(model, d), FeatureEdit(d, lambda f, s: f.clone()))])
    times = {"plain": [], "with features": []}
    with torch.inference_mode():
        plain = model(**inputs).logits
        _, edited = graph(base=inputs, unit_locations={"base": [every]})
        assert torch.equal(plain, edited.logits), "a no-op feature edit changed the logits"
        for _ in range(args.repeats):
            t = time.perf_counter()
            model(**inputs)
            times["plain"].append(time.perf_counter() - t)
            t = time.perf_counter()
            graph(base=inputs, unit_locations={"base": [every]})
            times["with features"].append(time.perf_counter() - t)
    median = {k: statistics.median(v) for k, v in times.items()}
    figures = {"model": args.model, "threads": torch.get_num_threads(), "d_in": d.d_in, "d_sae": d.d_sae, "k": d.k,
               "train_tokens": state["tokens"], "train_tokens_per_s": round(state["tokens"] / state["seconds"]),
               "forward_tokens": int(inputs["attention_mask"].sum()), "plain_s": round(median["plain"], 4),
               "with_features_s": round(median["with features"], 4),
               "overhead": round(median["with features"] / median["plain"], 3), "repeats": args.repeats}
    print(f"| training | {figures['train_tokens_per_s']:,} tokens/s (d_sae {d.d_sae}, k {d.k}) |")
    print(f"| forward with features / without | {figures['overhead']:.3f} ({figures['with_features_s']} s / "
          f"{figures['plain_s']} s, {figures['forward_tokens']} tokens) |")
    line = json.dumps(figures)
    if args.json:
        from interventions.core.atomic import atomic_write

        atomic_write(args.json, (line + "\n").encode())
    print(line)
    return 0
