"""`lesion bench-serve`: generation speed with the shipped edit in llama.cpp (LoRA) and transformers + PEFT (unmerged, merged)."""

from __future__ import annotations

from recipes.jobs.flag_checks import positive_int


def add_parser(sub, parents) -> None:
    bs = sub.add_parser("bench-serve", parents=parents, help="generation speed with the shipped edit in llama.cpp "
                                                              "(LoRA) and transformers + PEFT (unmerged, merged)")
    bs.add_argument("--tokens", type=positive_int, default=64)
    bs.add_argument("--repeats", type=positive_int, default=3)
    bs.set_defaults(fn=main)


def main(args) -> int:
    from recipes.bench.bench_serve import main as bench

    return bench(args)
