"""Which attribution rule agrees with exact causal tracing, and at what cost?

    lesion --threads 2 attribution-rules --out runs/attribution_rules [--cases eiffel,louvre]

For each case (a fact and a model) it runs the exact noise trace (hidden, MLP and attention grids, MLP
and attention over windows of 10 layers, 10 samples) and then `method: attribution` under every `rule`
(`gradient`, `relp`, `qk-fix`, `atp-star`; and `gradient` and `relp` path-integrated with `steps: 4`) on
the same spec, in one process, and reports per grid the
Pearson r of the indirect effects with the exact ones, the top-10 overlap (the share of exact's 10
largest cells among the rule's 10 largest), the seconds, and exact's seconds over the rule's. The
cases are the Eiffel, Colosseum and Louvre traces on SmolLM2-135M, the Eiffel trace on Gemma-3-270M and
the flag VLM testbed's trace (`lesion bench-trace --model llava-flags-smollm2`'s spec). The last line
is one JSON object with the figures.
"""

from __future__ import annotations

import json
import time

CITY = "is located in the city of"
CASES = {
    "eiffel": ("smollm2-135m", {"prompt": f"The Eiffel Tower {CITY}", "subject": "Eiffel Tower"}),
    "colosseum": ("smollm2-135m", {"prompt": f"The Colosseum {CITY}", "subject": "The Colosseum"}),
    "louvre": ("smollm2-135m", {"prompt": f"The Louvre {CITY}", "subject": "The Louvre"}),
    "gemma-eiffel": ("gemma3-270m", {"prompt": f"The Eiffel Tower {CITY}", "subject": "Eiffel Tower"}),
    "vlm-flag": ("llava-flags-smollm2", {"image": "flag:France", "target": " Paris",
                                         "prompt": " This is the flag of a country whose capital is"}),
}
#: name -> (rule, steps): every rule at one step, and the two that take `steps` path-integrated at 4
VARIANTS = {"gradient": ("gradient", 1), "relp": ("relp", 1), "qk-fix": ("qk-fix", 1), "atp-star": ("atp-star", 1),
            "gradient-steps4": ("gradient", 4), "relp-steps4": ("relp", 4)}
GRIDS = ("hidden", "mlp", "attention")


def measure(name: str, model, tokenizer, samples: int, seed: int) -> dict:
    """One case: the exact trace, then every rule, timed and scored against it."""
    from interventions import parse_spec, run
    from interventions.engine.compare import correlation, overlap

    model_name, prompt = CASES[name]
    spec = {"kind": "trace", "model": model_name, "prompts": [prompt], "sites": list(GRIDS), "window": 10,
            "samples": samples, "seed": seed, **({"image_cells": "both"} if "image" in prompt else {})}
    start = time.perf_counter()
    exact = run(parse_spec(spec), model, tokenizer, progress=False)
    exact_s = time.perf_counter() - start
    out = {"model": model_name, "prompt": prompt["prompt"], "exact_s": exact_s, "rows": exact.meta["rows"],
           "clean": exact.prompts[0]["clean_prob"], "corrupted": exact.prompts[0]["corrupted_prob"], "rules": {}}
    for variant, (rule, steps) in VARIANTS.items():
        start = time.perf_counter()
        approx = run(parse_spec({**spec, "method": "attribution", "rule": rule, "steps": steps}), model, tokenizer)
        seconds = time.perf_counter() - start
        out["rules"][variant] = {"s": seconds, "speedup": exact_s / seconds,
                              "r": {g: correlation(exact, approx, g) for g in GRIDS},
                              "top10": {g: overlap(exact, approx, g) for g in GRIDS}}
    return out


def table(report: dict) -> str:
    lines = ["| case | rule | r hidden | r MLP | r attention | top-10 hidden / MLP / attention | s | exact / rule |",
             "|---|---|---|---|---|---|---|---|"]
    for name, case in report["cases"].items():
        for rule, row in case["rules"].items():
            r, top = row["r"], row["top10"]
            lines.append(f"| {name} | {rule} | {r['hidden']:.3f} | {r['mlp']:.3f} | {r['attention']:.3f} | "
                         f"{top['hidden']:.1f} / {top['mlp']:.1f} / {top['attention']:.1f} | {row['s']:.1f} | "
                         f"{row['speedup']:.0f}x |")
    return "\n".join(lines)


def main(args) -> int:
    import torch

    from interventions.core.atomic import atomic_folder, check_out
    from interventions.modalities.vision_language.llava import is_vlm_model, load_language_or_vision

    out = check_out(args.out, True, "the measured figures")
    report, loaded = {"threads": torch.get_num_threads(), "samples": args.samples, "cases": {}}, {}
    for name in args.cases:
        model_name = CASES[name][0]
        if model_name not in loaded:
            loaded.clear()
            loaded[model_name] = load_language_or_vision(model_name, vision=is_vlm_model(model_name))[:2]
        report["cases"][name] = measure(name, *loaded[model_name], args.samples, args.seed)
        print(f"{name}: exact {report['cases'][name]['exact_s']:.1f} s", flush=True)
    with atomic_folder(out) as staging:
        (staging / "report.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    figures = {f"{name}_{rule}_{what}_{g}": round(row[what][g], 4)
               for name, case in report["cases"].items() for rule, row in case["rules"].items()
               for what in ("r", "top10") for g in GRIDS}
    figures.update({f"{name}_{rule}_speedup": round(row["speedup"], 1)
                    for name, case in report["cases"].items() for rule, row in case["rules"].items()})
    print(json.dumps(figures))
    return 0
