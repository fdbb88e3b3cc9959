"""`lesion docs`: write the spec reference's field tables (interventions/README.md) from the specs' field
descriptions, or with `--check` only say whether the file is current."""

from __future__ import annotations

from interventions.core.errors import SpecError
from interventions.core.paths import PROJECT

README = PROJECT / "interventions" / "README.md"


def add_parser(sub, parents) -> None:
    d = sub.add_parser("docs", parents=parents, help="write the spec reference's field tables into "
                                                     "interventions/README.md from the specs' field descriptions")
    d.add_argument("--check", action="store_true", help="write nothing; exit 2 if the file is not current")
    d.set_defaults(fn=main)


def main(args) -> int:
    from interventions.core.atomic import atomic_write
    from interventions.spec.reference import with_tables

    text = README.read_text(encoding="utf-8")
    current = with_tables(text)
    if args.check:
        if current != text:
            raise SpecError("interventions/README.md", "out of date", "the field tables `lesion docs` writes "
                            "(run it)")
        print(f"{README.relative_to(PROJECT)}: the field tables are current")
        return 0
    atomic_write(README, current.encode("utf-8"))
    print(f"wrote the field tables of {README.relative_to(PROJECT)}")
    return 0
