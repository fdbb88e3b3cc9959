"""Captions of the scenes world, with the concepts each one holds, for the caption dictionary.

    python -m recipes.train.scene_captions --n 20000 --out runs/captions.txt             # training phrasing
    python -m recipes.train.scene_captions --heldout --n 300 --spec recipes/lenses/features_scenes.yaml

`--out` writes the captions as text, one passage each (for `lesion train-dictionary --text`); `--spec`
writes a `kind: features` spec whose examples are the captions with their concepts: the colour and
shape of every object in the scene, whatever words the caption uses ("a wedge the colour of a fire
truck" holds `red` and `triangle`). The held-out phrasing uses words, things and forms the training
captions never do.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
import yaml

from interventions.core.atomic import atomic_write
from interventions.testbeds.scenes import Phrasing, sample_scene


def captions(n: int, heldout: bool, seed: int) -> list[tuple[str, list[str]]]:
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(g)
        concepts = sorted({o.colour for o in scene} | {o.shape for o in scene})
        out.append((Phrasing(heldout=heldout).caption(scene, rnd), concepts))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--heldout", action="store_true", help="the held-out phrasing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the captions as a text file, passages separated by blank lines")
    p.add_argument("--spec", help="a kind: features spec over the captions and their concepts")
    p.add_argument("--dictionary", default="checkpoints/sae_scenes_captions_smollm2_l7")
    args = p.parse_args(argv)
    rows = captions(args.n, args.heldout, args.seed)
    if args.out:
        atomic_write(args.out, "\n\n".join(c for c, _ in rows).encode() + b"\n")
    if args.spec:
        spec = {"kind": "features", "model": "smollm2-135m", "dictionary": args.dictionary, "neurons": True,
                "pool": "max", "heldout": 0.5, "describe": 10,
                "examples": [{"prompt": c, "concepts": k} for c, k in rows]}
        header = (f"# {args.n} captions of the scenes world in the {'held-out' if args.heldout else 'training'} "
                  f"phrasing (seed {args.seed}), each with the colours and shapes its scene holds; written by\n"
                  f"# python -m recipes.train.scene_captions {' '.join(sys.argv[1:] if argv is None else argv)}\n")
        atomic_write(args.spec, (header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
