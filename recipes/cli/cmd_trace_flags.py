"""`lesion trace-flags`: on the vision-language testbed, trace a capital fact with the country as an image and as text, side by side."""

from __future__ import annotations

from recipes.jobs.flag_checks import natural_int, positive_int


def add_parser(sub, parents) -> None:
    tf = sub.add_parser("trace-flags", parents=parents, help="vision-language testbed: trace a capital fact with the country as an image and "
                                            "as text, side by side")
    tf.add_argument("--out", required=True)
    tf.add_argument("--countries", nargs="+", default=["France", "Germany", "Japan", "Korea"])
    tf.add_argument("--samples", type=positive_int, default=5)
    tf.add_argument("--seed", type=natural_int, default=2_000_000)
    tf.set_defaults(fn=main)


def main(args) -> int:
    from recipes.studies.trace_flags import main as trace_flags

    return trace_flags(args)
