"""`lesion bench-patch`: a 100-prompt patching sweep against a one-forward-per-cell reference loop."""

from __future__ import annotations

from recipes.jobs.flag_checks import device_flag, positive_int


def add_parser(sub, parents) -> None:
    bp = sub.add_parser("bench-patch", parents=parents, help="benchmark a 100-prompt patching sweep against a one-forward-per-cell "
                                            "reference loop")
    bp.add_argument("--model", default="smollm2-135m")
    bp.add_argument("--prompts", type=positive_int, default=100)
    bp.add_argument("--max-batch-rows", type=positive_int, default=48)
    bp.add_argument("--reference-prompts", type=positive_int, default=None, metavar="K",
                    help="time the reference loop on K evenly spaced prompts and scale by cells (default: all)")
    bp.add_argument("--device", type=device_flag, default="cpu")
    bp.add_argument("--json", default=None, help="also write the numbers to this file")
    bp.set_defaults(fn=main)


def main(args) -> int:
    from recipes.bench.bench_patch import main as bench

    return bench(args)
