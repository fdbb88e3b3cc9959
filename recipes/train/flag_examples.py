"""Held-out flag renders with the concepts each one holds, as a `kind: features` spec on the flag testbed.

    python -m recipes.train.flag_examples --renders 20 --first-seed 10001 --dictionary checkpoints/sae_flags_vlm_l3 \
        --spec recipes/features/features_flags.yaml

Each example is a jittered render of one flag (`flag:<Country>@<seed>`, seeds from `--first-seed` on; the
dictionary shipped for the testbed was trained on seeds 1 to 300) with the naming prompt after it; its
concepts are the country, the flag's pattern and the colours it shows.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from interventions.core.atomic import atomic_write
from interventions.testbeds.flags import COUNTRIES, designs

#: The patterns that draw two of a design's colours (the others draw three).
TWO_COLOURS = ("horizontal2", "cross", "disc", "diagonal")


def concepts(index: int) -> list[str]:
    pattern, colours = designs()[index]
    shown = colours[:2] if pattern in TWO_COLOURS else colours
    return [COUNTRIES[index][0], pattern, *sorted(shown)]


def spec(renders: int, first_seed: int, dictionary: str | None, layer: int | None) -> dict:
    examples = [{"image": f"flag:{country}@{first_seed + r}", "prompt": " This is the flag of",
                 "concepts": concepts(i)} for r in range(renders) for i, (country, _) in enumerate(COUNTRIES)]
    out = {"kind": "features", "model": "llava-flags-smollm2", "positions": "image", "pool": "max", "heldout": 0.5,
           "describe": 10}
    if dictionary:
        out["dictionary"] = dictionary
    if layer is not None:
        out["layer"] = layer
    return {**out, "examples": examples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--renders", type=int, default=20, help="renders of each flag")
    p.add_argument("--first-seed", type=int, default=10001)
    p.add_argument("--dictionary", default=None)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--spec", required=True, help="the spec file to write")
    args = p.parse_args(argv)
    data = spec(args.renders, args.first_seed, args.dictionary, args.layer)
    head = (f"# {args.renders} held-out renders of each of the {len(COUNTRIES)} flags (seeds {args.first_seed} on), each "
            "with its country, pattern and colours; written by\n# python -m recipes.train.flag_examples "
            + " ".join(sys.argv[1:] if argv is None else argv) + "\n")
    atomic_write(args.spec, (head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)).encode())
    print(f"wrote {args.spec}: {len(data['examples'])} examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
