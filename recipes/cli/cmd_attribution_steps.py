"""`lesion attribution-steps`: attribution (steps 1, 2, 4, 8) against exact tracing on facts no recipe uses: Pearson r and time."""

from __future__ import annotations

from recipes.jobs.flag_checks import natural_int, positive_int


def add_parser(sub, parents) -> None:
    at = sub.add_parser("attribution-steps", parents=parents, help="attribution (steps 1, 2, 4, 8) against exact "
                                                                   "tracing on facts no recipe uses: Pearson r and time")
    at.add_argument("--out", required=True)
    at.add_argument("--model", default="smollm2-135m")
    at.add_argument("--samples", type=positive_int, default=10)
    at.add_argument("--seed", type=natural_int, default=0)
    at.set_defaults(fn=main)


def main(args) -> int:
    from recipes.studies.attribution_steps import main as measure

    return measure(args)
