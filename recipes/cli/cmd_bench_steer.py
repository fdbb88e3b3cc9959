"""`lesion bench-steer`: benchmark steered against plain generation (tokens per second)."""

from __future__ import annotations

from recipes.jobs.flag_checks import finite_float, positive_int


def add_parser(sub, parents) -> None:
    bs = sub.add_parser("bench-steer", parents=parents, help="benchmark steered against plain generation (tokens per second)")
    bs.add_argument("--model", default="smollm2-135m")
    bs.add_argument("--vector", default=None, help="a vector file (default: estimate recipes/steer/steer_ocean.yaml's)")
    bs.add_argument("--coef", type=finite_float, default=4.0)
    bs.add_argument("--batch", type=positive_int, default=8)
    bs.add_argument("--new-tokens", type=positive_int, default=32)
    bs.add_argument("--repeats", type=positive_int, default=5)
    bs.add_argument("--json", default=None, help="also write the numbers to this file")
    bs.set_defaults(fn=main)


def main(args) -> int:
    from recipes.bench.bench_steer import main as bench

    return bench(args)
