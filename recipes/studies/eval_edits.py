"""Evaluate ROME one edit at a time on a request set, as ROME's paper reports CounterFact.

    lesion --threads 2 eval-edits recipes/edit/counterfact_smollm2.yaml [--limit N] [--json out.json]

For each request: compute its ROME delta on the unedited model, apply it, measure
efficacy, paraphrase, neighbourhood and fluency for that request, revert. The
unedited model is measured the same way, so every number has its baseline.
"""

from __future__ import annotations

import json
import time

from editors.delta import applied
from editors.editor import edit_request, fmt_metric, hyperparameters, key_statistics, resolve_edit_layers
from editors.evaluate import evaluate, mean_present
from editors.methods.rome import compute_rome
from interventions import load_model, load_spec

METRICS = ("efficacy", "paraphrase", "neighbourhood", "fluency")


def main(args) -> int:
    from editors.requests import resolve_requests

    spec = resolve_requests(load_spec(args.spec))
    if spec.kind != "edit" or spec.method not in ("rome", "r-rome"):
        from interventions import SpecError

        raise SpecError("method", getattr(spec, "method", spec.kind),
                        "'rome' or 'r-rome' in a `kind: edit` spec (the batch methods edit all requests at once: "
                        "use `lesion run`)")
    model, tokenizer = load_model(spec.model)
    spec, _ = resolve_edit_layers(spec, model, tokenizer)
    hp = hyperparameters(spec)
    requests = spec.requests[: args.limit] if args.limit else spec.requests
    C = key_statistics(spec, model, tokenizer, [spec.layer])[spec.layer]
    rows, seconds = [], []
    for i, r in enumerate(requests):
        before = evaluate(model, tokenizer, [r], fluency_prompts=[r.subject])
        start = time.perf_counter()
        delta, _ = compute_rome(model, tokenizer, edit_request(r), hp, base_model=spec.model, C=C, method=spec.method)
        seconds.append(time.perf_counter() - start)
        with applied(model, delta):
            after = evaluate(model, tokenizer, [r], fluency_prompts=[r.subject])
        rows.append({"subject": r.subject, "before": {k: before[k] for k in METRICS},
                     "after": {k: after[k] for k in METRICS}, "seconds": seconds[-1]})
        print(f"[{i + 1}/{len(requests)}] {r.subject}: " + ", ".join(
            f"{k} {fmt_metric(before[k])}->{fmt_metric(after[k])}" for k in METRICS), flush=True)
    summary = {when: {k: mean_present([row[when][k] for row in rows]) for k in METRICS}
               for when in ("before", "after")}
    print(f"\nROME, one edit at a time, layer {spec.layer}, {len(rows)} facts, "
          f"{sum(seconds) / len(seconds):.1f} s per edit (statistics cached)")
    print("| metric | unedited | edited |\n|---|---|---|")
    for k in METRICS:
        print(f"| {k} | {fmt_metric(summary['before'][k])} | {fmt_metric(summary['after'][k])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows, "layer": spec.layer, "model": spec.model}, f, indent=1)
    return 0
