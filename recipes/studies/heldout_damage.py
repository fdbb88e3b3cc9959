"""Which held-out known facts one batch of edits breaks, and what they answer instead.

    python -m recipes.studies.heldout_damage --facts recipes/facts/smollm2-135m-10k.json.gz --requests 100 \
        --json recipes/figures/heldout_damage_smollm2.json

For each group of tuning requests (`--groups`: a relation's first `--requests` tuning requests, or ``mixed``,
the first `--requests` of any relation), one batch of `--method` edits (the lifelong recipes' layers and
settings) is made on the unedited model. Then, over the held-out known facts the unedited model answers
top-1, per relation of the fact: the share that keeps its answer, and of those that lost it, the share whose
new top-1 is the first token of one of the batch's new targets (a relation rewritten, not a fact forgotten).
`--preserve-scale W ...` runs each group again with every other tuning request whose subject the group does
not edit preserved (`preserve_from`) at each scale W, and each run also reports its efficacy (the new target
above the true one on the edit prompt) and the share of all answered held-out facts kept. The last line is one
JSON object with every run's numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from editors.delta import applied
from editors.editor import compute_edit
from editors.evaluate import first_token, top1_tokens
from editors.requests import resolve_requests
from editors.sequential import edit_asks, share_preferring
from interventions import load_model, parse_spec
from interventions.core.reading import read_json
from interventions.spec import spec_to_dict
from recipes.studies.tune_edit import write_report


def damage_by_relation(relations: list[str], gold: list[int], before: list[int], after: list[int],
                       targets: set[int]) -> dict[str, dict]:
    """Per relation, over the facts answered before (``before == gold``): how many (`known`), the share still
    answered after (`kept`), and of the lost ones the share now answering a token in `targets`
    (`to_new_target`; None when none was lost)."""
    counts = defaultdict(lambda: [0, 0, 0])
    for relation, g, b, a in zip(relations, gold, before, after):
        if b != g:
            continue
        c = counts[relation]
        c[0] += 1
        c[1] += a == g
        c[2] += a != g and a in targets
    return {r: {"known": n, "kept": kept / n, "to_new_target": moved / (n - kept) if n > kept else None}
            for r, (n, kept, moved) in sorted(counts.items())}


def group_spec(args, group: str, records: list[dict], scale: float | None, folder: Path):
    """The edit spec of one group: its tuning requests, one batch. With a `scale`, every other tuning request
    whose subject the group does not edit is preserved (`preserve_from`, written to `folder`) at that scale."""
    offsets = [i for i, r in enumerate(records) if group == "mixed" or r.get("relation") == group][:args.requests]
    hp = json.loads(args.hyperparameters) | ({} if scale is None else {"preserve_scale": scale})
    spec = resolve_requests(parse_spec({"kind": "edit", "model": args.model, "method": args.method,
                                        "layers": args.layers, "requests_from": {"path": args.facts, "split": "tune"},
                                        "hyperparameters": hp}))
    spec = spec.model_copy(update={"requests": tuple(spec.requests[i] for i in offsets)})
    if scale is None:
        return spec
    edited = {r.subject for r in spec.requests}
    kept = [r for r in records if r["requested_rewrite"]["subject"] not in edited]
    path = folder / f"preserve_{group}.json"
    path.write_text(json.dumps(kept))
    return parse_spec({**spec_to_dict(spec), "preserve_from": {"path": str(path)}})


def group_row(model, tokenizer, spec, held: list[dict], gold: list[int], before: list[int]) -> dict:
    """One group's edit and what it did: efficacy over its requests, held-out damage by relation."""
    start = time.perf_counter()
    delta, _ = compute_edit(spec, model, tokenizer)
    with applied(model, delta):
        after = top1_tokens(model, tokenizer, [f["prompt"] for f in held])
        efficacy = share_preferring(model, tokenizer, edit_asks(spec.requests))
    targets = {first_token(tokenizer, r.target_new) for r in spec.requests}
    by = damage_by_relation([f["relation"] for f in held], gold, before, after, targets)
    kept = sum(r["known"] * r["kept"] for r in by.values()) / sum(r["known"] for r in by.values())
    return {"requests": len(spec.requests), "seconds": time.perf_counter() - start, "efficacy": efficacy,
            "heldout_kept": kept, "by_relation": by}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--facts", default="recipes/facts/smollm2-135m-10k.json.gz")
    p.add_argument("--method", default="alphaedit")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--hyperparameters", default='{"context_templates": [], "l2": 10}',
                   help="JSON; default: the lifelong AlphaEdit recipe's")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--groups", nargs="+", default=["city_famous", "city_country", "city_continent", "mixed"])
    p.add_argument("--preserve-scale", type=float, nargs="+", default=None,
                   help="also run each group with the other tuning subjects preserved at each of these scales")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
    data = read_json(args.facts, "--facts", "a fact set")
    records = [r for r in data["requests"] if r.get("split") == "tune"]
    held = data["heldout_known"]
    gold = [first_token(tokenizer, f["answer"]) for f in held]
    before = top1_tokens(model, tokenizer, [f["prompt"] for f in held])
    groups = {}
    with tempfile.TemporaryDirectory() as folder:
        for group, scale in itertools.product(args.groups, [None, *(args.preserve_scale or [])]):
            name = group if scale is None else f"{group}, preserve_scale {scale:g}"
            spec = group_spec(args, group, records, scale, Path(folder))
            groups[name] = group_row(model, tokenizer, spec, held, gold, before)
            print(name, json.dumps(groups[name]), flush=True)
    report = {"method": args.method, "layers": args.layers, "hyperparameters": json.loads(args.hyperparameters),
              "split": "tune", "heldout_known": len(held), "groups": groups}
    return write_report(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
