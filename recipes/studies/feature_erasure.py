"""Erasing a concept with no weight edit: ablate its dictionary features in the text encoder while sampling.

    python -m recipes.studies.feature_erasure recipes/erase/erase_red_scenes.yaml --out runs/feature_erasure

The features are the concept's union from `kind: features` on new training-phrasing captions
(`recipes/features/features_scenes_trained.yaml`; chosen on its fit half), the dictionary is
`checkpoints/sae_scenes_captions_smollm2_l7` (SmolLM2's layer-7 output, which the scenes testbed's
adapter reads). While sampling, those features are set to 0 at every token and the dictionary's error
is kept (`interventions.features.splice.features_edited`); nothing else changes. The erasure is judged
by the same code as `kind: erase` (`recipes.jobs.run_text_to_image.judge_erasure`): the concept on the
spec's templates, on held-out phrasings and under its adversarial search, and the other concepts kept.
Writes ``OUT/results.json`` and ``OUT/table.md``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from interventions import load_model, load_spec
from interventions.core.atomic import atomic_write
from interventions.core.prompts import encode
from interventions.features.dictionary import load_dictionary
from interventions.features.readout import spec_units
from interventions.features.splice import features_edited, zero_features
from recipes.jobs.run_text_to_image import judge_erasure, pipeline_for

DICTIONARY = "checkpoints/sae_scenes_captions_smollm2_l7"
CAPTIONS = "recipes/features/features_scenes_trained.yaml"


def concept_features(concept: str, precision: float) -> dict:
    """The features selective for `concept` on the training-phrasing captions: every feature that fires
    on at least 3 captions, at least `precision` of them holding the concept (a caption's largest
    activation after its first token); and the concept's detection union, for reference."""
    from interventions.features.describe import detection_scores
    from interventions.features.readout import concept_rows, pooled, unit_states

    spec = load_spec(CAPTIONS)
    model, tokenizer = load_model(spec.model)
    d, layer = spec_units(spec, model)
    encs = [encode(tokenizer, e.prompt, field="examples") for e in spec.examples]
    states = unit_states(model, tokenizer, encs, d, layer, False)          # collected once, used twice
    acts = pooled(states["feature"], spec.pool)
    labels = torch.tensor([[concept in e.concepts] for e in spec.examples])
    scores = detection_scores(acts, labels)
    fired = (acts > 0).sum(0)
    chosen = [int(u) for u in torch.nonzero((scores["precision"][:, 0] >= precision) & (fired >= 3)).flatten()]
    union = next(row["features"] for row in concept_rows(spec, states) if row["concept"] == concept)
    return {"units": chosen, "union": union["units"], "union_f1": union["f1"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="a kind: erase spec on scenes-smollm2 (its first concept is ablated)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=None, help="images per prompt (default: the spec's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", type=float, default=0.9, help="a feature is the concept's when at least this "
                    "share of the captions it fires on hold the concept")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    if args.images:
        spec = spec.model_copy(update={"images": args.images})
    concept = spec.concepts[0].concept
    chosen = concept_features(concept, args.precision)
    d = load_dictionary(DICTIONARY)
    pipe = pipeline_for(spec)
    layer = pipe.text_encoder.layers[d.where.layer]
    start = time.perf_counter()
    fields, _ = judge_erasure(spec, pipe, None, lambda: features_edited(layer, d, zero_features(chosen["units"])))
    e, b = fields["erased_rate"], fields["erased_rate_before"]
    result = {"concept": concept, "features": chosen["units"], "union": chosen["union"], "union_f1": chosen["union_f1"],
              "precision": args.precision, "images": spec.images,
              "before": b, "after": e, "kept_rate": fields["kept_rate"], "kept": fields["kept"],
              "seconds": round(time.perf_counter() - start, 1)}
    table = ("| method | red shown: templates | held-out phrasings | adversarial search | others kept |\n"
             "|---|---|---|---|---|\n"
             f"| before (unedited) | {b['templates']:.2f} | {b['heldout']:.2f} | – | 1.00 |\n"
             f"| ablate {len(chosen['units'])} features (precision ≥ {args.precision}) | {e['templates']:.2f} | {e['heldout']:.2f} | "
             f"{'n/a' if e['adversarial'] is None else format(e['adversarial'], '.2f')} | {fields['kept_rate']:.2f} |\n")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "table.md", table.encode())
    atomic_write(args.out / "results.json", json.dumps(result, indent=1).encode())
    print(table, end="")
    print(json.dumps({k: v for k, v in result.items() if k != "kept"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
