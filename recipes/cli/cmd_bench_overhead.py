"""`lesion bench-overhead`: the engine's time over plain forwards of the same rows, on a tiny Llama and SmolLM2."""

from __future__ import annotations

from recipes.jobs.flag_checks import positive_int


def add_parser(sub, parents) -> None:
    b = sub.add_parser("bench-overhead", parents=parents,
                       help="the engine's time over plain forwards of the same rows (a tiny Llama, SmolLM2)")
    b.add_argument("--samples", type=positive_int, default=10)
    b.add_argument("--max-batch-rows", type=positive_int, default=48)
    b.add_argument("--profile", type=int, default=0, metavar="N", help="print the N functions with the most own "
                                                                        "time in the tiny run")
    b.add_argument("--json", default=None, help="also write the numbers to this file")
    b.set_defaults(fn=main)


def main(args) -> int:
    from recipes.bench.bench_overhead import main as bench

    return bench(args)
