"""`lesion bench-erase`: a text-to-image erasure: edit time, and images per second with the delta applied against the base pipeline."""

from __future__ import annotations

from recipes.jobs.flag_checks import device_flag, positive_int


def add_parser(sub, parents) -> None:
    bz = sub.add_parser("bench-erase", parents=parents, help="benchmark a text-to-image erasure: edit time, and images/s with "
                                           "the delta applied against the base pipeline")
    bz.add_argument("--spec", default="recipes/erase/erase_red.yaml", help="a `kind: erase` spec")
    bz.add_argument("--methods", nargs="+", default=None, help="some of uce, time, rece, esd-x, diff-quickfix "
                    "(default: the spec's)")
    bz.add_argument("--layer", type=int, default=0, help="the text-encoder layer of diff-quickfix when the spec has none")
    bz.add_argument("--images", type=positive_int, default=64)
    bz.add_argument("--repeats", type=positive_int, default=5)
    bz.add_argument("--device", type=device_flag, default="cpu")
    bz.add_argument("--json", default=None, help="also write the numbers to this file")
    bz.set_defaults(fn=main)


def main(args) -> int:
    from recipes.bench.bench_erase import main as bench

    return bench(args)
