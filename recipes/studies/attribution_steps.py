"""How close does attribution patching get to exact causal tracing, with and without path integration?

    lesion --threads 2 attribution-steps --out runs/attribution_steps

For facts that no other recipe uses, it runs the exact noise trace (hidden states, every layer and
position, 10 samples) and `method: attribution` with `steps` k = 1, 2, 4, 8 (EAP-IG's averaged
gradients; k = 1 is plain attribution patching) on the same spec, in one process, and reports per
fact and pooled the Pearson r of each attribution grid with the exact one, and the time of each
against the exact trace. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import json
import time

import torch

#: Facts SmolLM2-135M knows (top-1) that no recipe traces; the answers as they follow the prompt.
FACTS = (
    {"prompt": "The Colosseum is located in the city of", "subject": "The Colosseum", "target": " Rome"},
    {"prompt": "Big Ben is located in the city of", "subject": "Big Ben", "target": " London"},
    {"prompt": "The Brandenburg Gate is located in the city of", "subject": "The Brandenburg Gate",
     "target": " Berlin"},
    {"prompt": "The Statue of Liberty is located in the city of", "subject": "The Statue of Liberty",
     "target": " New"},
)
STEPS = (1, 2, 4, 8)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    mask = ~(torch.isnan(a) | torch.isnan(b))
    return float(torch.corrcoef(torch.stack([a[mask].double(), b[mask].double()]))[0, 1])


def main(args) -> int:
    from interventions import load_model, parse_spec, run
    from interventions.core.atomic import atomic_folder, check_out

    out = check_out(args.out, True, "the measured grids")
    model, tokenizer = load_model(args.model)
    base = {"kind": "trace", "model": args.model, "prompts": list(FACTS), "sites": ["hidden"],
            "samples": args.samples, "seed": args.seed}
    start = time.perf_counter()
    exact = run(parse_spec(base), model, tokenizer, progress=False)
    exact_s = time.perf_counter() - start
    report = {"model": args.model, "samples": args.samples, "facts": [f["prompt"] for f in FACTS],
              "exact_seconds": exact_s, "clean": [p["clean_prob"] for p in exact.prompts],
              "corrupted": [p["corrupted_prob"] for p in exact.prompts], "steps": {}}
    e = exact.indirect_effect("hidden")
    for k in STEPS:
        start = time.perf_counter()
        approx = run(parse_spec(dict(base, method="attribution", steps=k)), model, tokenizer)
        seconds = time.perf_counter() - start
        a = approx.indirect_effect("hidden")
        report["steps"][k] = {"seconds": seconds, "speedup": exact_s / seconds, "r_pooled": pearson(e, a),
                              "r_per_fact": [pearson(e[i], a[i]) for i in range(len(FACTS))]}
    with atomic_folder(out) as staging:
        (staging / "report.json").write_text(json.dumps(report, indent=1))
    print(f"exact trace of {len(FACTS)} facts (hidden, {args.samples} samples): {exact_s:.1f} s")
    print("| steps | r pooled | r per fact | seconds | exact / attribution |\n|---|---|---|---|---|")
    for k, row in report["steps"].items():
        per = " / ".join(f"{r:.3f}" for r in row["r_per_fact"])
        print(f"| {k} | {row['r_pooled']:.3f} | {per} | {row['seconds']:.1f} | {row['speedup']:.0f}x |")
    print(json.dumps({"exact_s": round(exact_s, 2), **{f"r_steps_{k}": round(v["r_pooled"], 4)
                                                       for k, v in report["steps"].items()},
                      **{f"speedup_steps_{k}": round(v["speedup"], 1) for k, v in report["steps"].items()}}))
    return 0
