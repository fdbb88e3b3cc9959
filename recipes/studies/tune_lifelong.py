"""Choose UltraEdit's step and ridge on the tuning split of a fact set, over a sequential stream.

    python -m recipes.studies.tune_lifelong --facts recipes/facts/smollm2-135m-10k.json.gz --requests 1000 \
        --json recipes/figures/tune_lifelong_smollm2.json

UltraEdit's lifelong normalisation only shows what it does over many batches, so each candidate
(`lr`, `ridge`) edits the first `--requests` tuning requests in batches of `--batch`, each batch on the
model with the earlier ones applied (`editors.editor.compute_edit`), and is measured once at the end:
efficacy over all the edits, paraphrase and neighbourhood over at most 200 of them, top-1 accuracy on
the held-out known facts. The rule: the highest mean of efficacy, neighbourhood and held-out accuracy
relative to the unedited model's. The last line is one JSON object with every candidate's numbers.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from editors.delta import applied
from editors.editor import compute_edit
from editors.requests import resolve_requests
from editors.sequential import DEFAULT_TEXT, ScaleProbe, read_heldout
from interventions import load_model, parse_spec
from recipes.studies.tune_edit import write_report


def candidate_row(spec, model, tokenizer, probe, over: dict, base: float) -> dict:
    """One candidate's sequential run and its measurement at the end."""
    run = spec.model_copy(update={"hyperparameters": over})
    start = time.perf_counter()
    delta, _ = compute_edit(run, model, tokenizer)
    seconds = time.perf_counter() - start
    with applied(model, delta):
        row = {"candidate": over, "edit_seconds": seconds, **probe.measure(model, tokenizer, list(spec.requests))}
    kept = row["heldout_accuracy"] / base if base else row["heldout_accuracy"]      # a model that knew none keeps 0
    row["score"] = (row["efficacy"] + row["neighbourhood"] + kept) / 3
    print(f"{over}: efficacy {row['efficacy']:.3f}, paraphrase {row['paraphrase']:.3f}, neighbourhood "
          f"{row['neighbourhood']:.3f}, held-out {row['heldout_accuracy']:.3f}, perplexity {row['perplexity']:.2f}, "
          f"{seconds:.0f} s", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--facts", default="recipes/facts/smollm2-135m-10k.json.gz")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--lr", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    p.add_argument("--ridge", type=float, nargs="+", default=[1.0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    spec = resolve_requests(parse_spec({
        "kind": "edit", "model": args.model, "method": "ultraedit", "layers": args.layers,
        "requests_from": {"path": args.facts, "split": "tune", "limit": args.requests},
        "sequential": {"batch_size": args.batch}}))
    probe = ScaleProbe(read_heldout(args.facts, "--facts"), DEFAULT_TEXT.read_text(encoding="utf-8"),
                       [r.subject for r in spec.requests[:4]], sample=200)
    unedited = probe.measure(model, tokenizer, list(spec.requests))
    rows = [{"candidate": "unedited", **unedited}]
    for lr, ridge in itertools.product(args.lr, args.ridge):
        rows.append(candidate_row(spec, model, tokenizer, probe, {"lr": lr, "ridge": ridge},
                                  unedited["heldout_accuracy"]))
    best = max(rows[1:], key=lambda r: r["score"])
    report = {"method": "ultraedit", "requests": len(spec.requests), "split": "tune", "batch_size": args.batch,
              "layers": args.layers, "rows": rows, "chosen": best["candidate"]}
    return write_report(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
