"""Choose MEMIT's λ, AlphaEdit's l2 and ENCORE's norm penalty on the tuning split of a fact set, never on the
evaluation split.

    python -m recipes.studies.tune_edit --facts recipes/facts/smollm2-135m.json --requests 100 --json runs/tune.json

One batch of `--requests` tuning requests; their targets z are optimised once (MEMIT's and AlphaEdit's,
which share them; and ENCORE's, stopped early by MPES), then each candidate's closed-form update is
computed from those z (ENCORE's over λ and its norm penalty μ) and
measured on the tuning requests (efficacy, paraphrase, neighbourhood) and on the held-out known
facts (top-1). The rule: the candidate with the highest mean of efficacy, neighbourhood and held-out
accuracy (ties: the weaker update). The last line is one JSON object with every candidate's numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from editors.delta import applied
from editors.editor import edit_request
from editors.methods.memit import AlphaEditHyperparameters, EncoreHyperparameters, MemitHyperparameters, compute_memit
from editors.methods.rome import context_templates
from editors.requests import read_requests
from editors.sequential import DEFAULT_TEXT, ScaleProbe, read_heldout
from editors.stats import second_moments
from interventions import load_model
from interventions.spec import RequestsFile

CANDIDATES = [("memit", {"mom2_update_weight": w}) for w in (150.0, 1500.0, 15000.0)] + \
             [("alphaedit", {"l2": l2}) for l2 in (1.0, 10.0)] + \
             [("encore", {"mom2_update_weight": w, "norm_penalty": mu}) for w in (150.0, 1500.0)
              for mu in (1.0, 10.0, 100.0)]
CLASSES = {"memit": MemitHyperparameters, "alphaedit": AlphaEditHyperparameters, "encore": EncoreHyperparameters}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--facts", default="recipes/facts/smollm2-135m.json")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--only", nargs="+", choices=sorted(CLASSES), default=sorted(CLASSES), help="methods to tune")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    specs = read_requests(RequestsFile(path=args.facts, split="tune", limit=args.requests))
    requests = [edit_request(r) for r in specs]
    layers = tuple(args.layers)
    C = second_moments(model, tokenizer, list(layers))
    base = MemitHyperparameters(layers=layers, context_templates=())
    templates = context_templates(model, tokenizer, base.context_templates, base.seed)
    z, z_seconds = {}, {}
    kinds = {"mpes" if m == "encore" else "nll" for m in args.only}
    for kind, hp in (("nll", base), ("mpes", EncoreHyperparameters(layers=layers, context_templates=()))):
        if kind not in kinds:
            continue
        start = time.perf_counter()
        _, info = compute_memit(model, tokenizer, requests, hp, base_model=args.model, C=C, templates=templates)
        z[kind], z_seconds[kind] = info["z"], time.perf_counter() - start

    probe = ScaleProbe(read_heldout(args.facts, "--facts"), DEFAULT_TEXT.read_text(encoding="utf-8"),
                       [r.subject for r in specs[:4]], sample=len(specs))
    rows = [{"candidate": "unedited", **probe.measure(model, tokenizer, list(specs))}]
    for method, over in [(m, o) for m, o in CANDIDATES if m in args.only]:
        hp = CLASSES[method](layers=layers, context_templates=(), **over)
        delta, _ = compute_memit(model, tokenizer, requests, hp, base_model=args.model, C=C,
                                 z=z["mpes" if method == "encore" else "nll"], templates=templates)
        with applied(model, delta):
            row = {"candidate": f"{method} {over}", "method": method, **over,
                   **probe.measure(model, tokenizer, list(specs))}
        row["score"] = (row["efficacy"] + row["neighbourhood"] + row["heldout_accuracy"]) / 3
        rows.append(row)
        print(f"{row['candidate']}: efficacy {row['efficacy']:.3f}, paraphrase {row['paraphrase']:.3f}, "
              f"neighbourhood {row['neighbourhood']:.3f}, held-out {row['heldout_accuracy']:.3f}, "
              f"perplexity {row['perplexity']:.2f}", flush=True)
    best = {m: max((r for r in rows[1:] if r["method"] == m), key=lambda r: r["score"]) for m in args.only}
    report = {"requests": len(requests), "split": "tune", "layers": list(layers), "z_seconds": z_seconds,
              "rows": rows, "chosen": {m: r["candidate"] for m, r in best.items()}}
    return write_report(report, args.json)


def write_report(report: dict, path: str | None) -> int:
    """Write a tuning report to `path` (if given) and print it as the last line, one JSON object."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
