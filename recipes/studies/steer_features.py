"""Steering with one dictionary feature against the mean-difference vector, at matched fluency (AxBench's comparison).

    python -m recipes.studies.steer_features recipes/steer/steer_ocean.yaml --dictionary checkpoints/sae_smollm2_l15 \
        --out runs/steer_features

Both vectors come from the spec's contrastive prompts at the dictionary's layer and site: `mean_diff`
(CAA/ActAdd) and `feature` (the feature whose activation differs most between the positive and negative
prompts, its decoder row times that difference). Both are swept over the same coefficients on the same
prompts (greedy), scored by the spec's lexicon share and by fluency: the generations' mean negative
log-likelihood under the unsteered model and their n-gram entropy. "Matched fluency": for each method,
the best lexicon share among the coefficients whose generations stay within `--nll-budget` nats of the
unsteered generations' NLL and keep 90% of their entropy. Writes ``OUT/<method>/`` (the steer runs),
``OUT/table.md`` and ``OUT/results.json``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from interventions import load_model, load_spec
from interventions.core.atomic import atomic_write
from interventions.features.dictionary import load_dictionary
from recipes.jobs.run_steer import run_steer

COEFFICIENTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def best_within(table: list[dict], budget: float) -> dict:
    """The coefficient with the highest lexicon share among those whose fluency stays within the budget."""
    base = next(r for r in table if r["coef"] == 0)
    fluent = [r for r in table if r["unsteered_nll"] <= base["unsteered_nll"] + budget
              and r["entropy"] >= 0.9 * base["entropy"]]
    best = max(fluent, key=lambda r: r["lexicon_share"])
    return {"coef": best["coef"], "lexicon_share": best["lexicon_share"], "unsteered_nll": best["unsteered_nll"],
            "entropy": best["entropy"], "example": best["example"]}


def table(report: dict) -> str:
    lines = [f"Steering at layer {report['layer']} ({report['site']}); feature {report['feature']} of "
             f"`{report['dictionary']}`; lexicon share (fluency: unsteered NLL per token, n-gram entropy).", "",
             "| coef | mean_diff: lexicon | NLL | entropy | feature: lexicon | NLL | entropy |", "|---|---|---|---|---|---|---|"]
    for a, b in zip(report["runs"]["mean_diff"], report["runs"]["feature"]):
        lines.append(f"| {a['coef']:g} | {a['lexicon_share']:.3f} | {a['unsteered_nll']:.2f} | {a['entropy']:.2f} | "
                     f"{b['lexicon_share']:.3f} | {b['unsteered_nll']:.2f} | {b['entropy']:.2f} |")
    lines += ["", f"At matched fluency (NLL within {report['nll_budget']} nats of unsteered, entropy ≥ 90%):"]
    for method, best in report["matched"].items():
        lines.append(f"- {method}: lexicon share {best['lexicon_share']:.3f} at coefficient {best['coef']:g}: "
                     f"{best['example']!r}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="a kind: steer spec with a lexicon")
    ap.add_argument("--dictionary", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--nll-budget", type=float, default=1.0)
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    d = load_dictionary(args.dictionary)
    model, tokenizer = load_model(spec.model)
    common = {"layers": (d.where.layer,), "site": d.where.site, "coefficients": COEFFICIENTS}
    specs = {"mean_diff": spec.model_copy(update={**common, "method": "mean_diff"}),
             "feature": spec.model_copy(update={**common, "method": "feature", "dictionary": args.dictionary})}
    runs, seconds, feature = {}, {}, None
    for method, s in specs.items():
        start = time.perf_counter()
        report = run_steer(type(s).model_validate(s.model_dump()), model, tokenizer, args.out / method)
        seconds[method] = round(time.perf_counter() - start, 1)
        runs[method] = [{k: r[k] for k in ("coef", "lexicon_share", "unsteered_nll", "entropy", "example")}
                        for r in report["table"]]
        if method == "feature":
            from interventions.lenses.steering import load_vector

            feature = load_vector(args.out / method / "vector.safetensors").meta["feature"]
    report = {"spec": args.spec, "dictionary": args.dictionary, "layer": d.where.layer, "site": d.where.site,
              "feature": feature, "nll_budget": args.nll_budget, "runs": runs,
              "matched": {m: best_within(rows, args.nll_budget) for m, rows in runs.items()},
              "seconds": seconds, "threads": torch.get_num_threads()}
    atomic_write(args.out / "results.json", json.dumps(report, indent=1).encode())
    atomic_write(args.out / "table.md", table(report).encode())
    print(table(report))
    print(json.dumps({"study": "steer_features", "feature": feature,
                      **{f"{m}_lexicon_share": b["lexicon_share"] for m, b in report["matched"].items()},
                      **{f"{m}_coef": b["coef"] for m, b in report["matched"].items()}, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
