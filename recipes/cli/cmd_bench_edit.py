"""`lesion bench-edit`: every edit method's time and peak memory, delta size, apply time, and generation speed edited against base."""

from __future__ import annotations

from interventions.spec import EDIT_METHODS
from recipes.jobs.flag_checks import natural_int, positive_int


def add_parser(sub, parents) -> None:
    be = sub.add_parser("bench-edit", parents=parents, help="benchmark every edit method's time and peak memory, delta size, apply time, and "
                                           "generation speed edited against base")
    be.add_argument("--spec", default="recipes/edit/bench_edit_smollm2.yaml",
                    help="a `kind: edit` spec with a `layer` (ROME, r-ROME, EMMET): model, requests, hyperparameters")
    be.add_argument("--methods", nargs="+", default=list(EDIT_METHODS), choices=list(EDIT_METHODS))
    be.add_argument("--rome", type=positive_int, default=5, help="time ROME and r-ROME on the first N requests")
    be.add_argument("--batch", type=positive_int, default=100, help="time one EMMET/MEMIT/AlphaEdit batch of the "
                                                                   "first N requests")
    be.add_argument("--memit-layers", type=natural_int, nargs="+", default=[2, 3, 4, 5, 6])
    be.add_argument("--repeats", type=positive_int, default=5, help="alternating base/edited generation rounds")
    be.add_argument("--new-tokens", type=positive_int, default=32)
    be.add_argument("--json", default=None, help="also write the numbers to this file")
    be.set_defaults(fn=main)


def main(args) -> int:
    from recipes.bench.bench_edit import main as bench

    return bench(args)
