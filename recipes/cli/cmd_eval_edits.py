"""`lesion eval-edits`: ROME one edit at a time over an edit spec's requests, with metrics."""

from __future__ import annotations

from recipes.jobs.flag_checks import positive_int


def add_parser(sub, parents) -> None:
    e = sub.add_parser("eval-edits", parents=parents, help="ROME one edit at a time over an edit spec's requests, with metrics")
    e.add_argument("spec")
    e.add_argument("--limit", type=positive_int, default=None, help="only the first N requests")
    e.add_argument("--json", default=None, help="also write the numbers to this file")
    e.set_defaults(fn=main)


def main(args) -> int:
    from recipes.studies.eval_edits import main as evaluate_edits

    return evaluate_edits(args)
