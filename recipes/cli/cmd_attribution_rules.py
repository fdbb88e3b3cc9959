"""`lesion attribution-rules`: every attribution rule against exact tracing on five cases: r, top-10 overlap and time."""

from __future__ import annotations

import argparse

from recipes.jobs.flag_checks import natural_int, positive_int


def _cases(text: str) -> list[str]:
    from recipes.studies.attribution_rules import CASES

    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CASES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(CASES)}")
    return names


def add_parser(sub, parents) -> None:
    at = sub.add_parser("attribution-rules", parents=parents, help="every attribution rule against exact tracing "
                                                                   "on five cases: r, top-10 overlap and time")
    at.add_argument("--out", required=True)
    at.add_argument("--cases", type=_cases, default="eiffel,colosseum,louvre,gemma-eiffel,vlm-flag",
                    help="comma-separated cases (default: all five)")
    at.add_argument("--samples", type=positive_int, default=10)
    at.add_argument("--seed", type=natural_int, default=0)
    at.set_defaults(fn=main)


def main(args) -> int:
    from recipes.studies.attribution_rules import main as measure

    return measure(args)
