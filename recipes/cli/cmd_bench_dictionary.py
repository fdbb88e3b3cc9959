"""`lesion bench-dictionary`: a dictionary's training throughput and its overhead in a forward pass."""

from __future__ import annotations

from recipes.jobs.flag_checks import natural_int, positive_int


def add_parser(sub, parents) -> None:
    bd = sub.add_parser("bench-dictionary", parents=parents, help="a feature dictionary's training tokens per second "
                                                                  "and its overhead in a forward pass")
    bd.add_argument("--model", default="smollm2-135m")
    bd.add_argument("--layer", type=natural_int, default=7)
    bd.add_argument("--dictionary", default=None, help="time this dictionary in the forward pass (default: the "
                    "one trained here)")
    bd.add_argument("--tokens", type=positive_int, default=8192, help="activation rows to train on")
    bd.add_argument("--features", type=positive_int, default=2048)
    bd.add_argument("--k", type=positive_int, default=16)
    bd.add_argument("--batch", type=positive_int, default=16, help="prompts per timed forward pass")
    bd.add_argument("--repeats", type=positive_int, default=5)
    bd.add_argument("--json", default=None, help="also write the numbers to this file")
    bd.set_defaults(fn=main)


def main(args) -> int:
    from recipes.bench.bench_dictionary import main as bench

    return bench(args)
