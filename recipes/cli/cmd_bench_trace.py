"""`lesion bench-trace`: benchmark the batched trace against a ROME-style reference loop."""

from __future__ import annotations

from recipes.jobs.flag_checks import device_flag, positive_int


def add_parser(sub, parents) -> None:
    b = sub.add_parser("bench-trace", parents=parents, help="benchmark the batched trace against a ROME-style reference loop")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--samples", type=positive_int, default=10)
    b.add_argument("--max-batch-rows", type=positive_int, default=48)
    b.add_argument("--device", type=device_flag, default="cpu")
    b.add_argument("--json", default=None, help="also write the numbers to this file")
    b.add_argument("--memory", default=None, metavar="SIZE", help="run Lesion exact under this memory budget "
                                                                  "and report its measured peak")
    b.set_defaults(fn=main)


def main(args) -> int:
    from recipes.bench.bench_trace import main as bench

    return bench(args)
