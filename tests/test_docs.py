"""The documentation holds: README.md is short, every link in it and in the per-folder READMEs resolves
(files and #anchors, as GitHub renders them), and the spec reference's field tables are what
`lesion docs` writes from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(ROOT.glob("*/README.md"))]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen, out, fence = {}, set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        if fence or not re.match(r"^#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(doc):
    broken = []
    for link in links(doc.read_text(encoding="utf-8")):
        if "://" in link or link.startswith("mailto:"):
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text(encoding="utf-8")):
            broken.append(link)
    assert broken == []


def test_the_link_check_sees_a_broken_anchor():
    md = "# A title\n\n## `kind: trace`\n\n```\n# not a heading\n```\n"
    assert anchors(md) == {"a-title", "kind-trace"}
    assert links("[x](a.md#b) and ![y](c.png)\n```\n[z](in-code.md)\n```") == ["a.md#b", "c.png"]


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 400


def test_the_field_tables_are_what_lesion_docs_writes():
    from interventions.spec.reference import BEGIN, END, with_tables

    text = (ROOT / "interventions" / "README.md").read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.count("<!-- field tables") == 1
    assert with_tables(text) == text, "run `lesion docs` and commit interventions/README.md"


def test_lesion_docs_check_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    from interventions.spec.reference import BEGIN
    from recipes.cli import cmd_docs, main

    head, tables = (ROOT / "interventions" / "README.md").read_text().split(BEGIN)
    stale = tmp_path / "README.md"
    stale.write_text(head + BEGIN + tables.replace("| `noise` |", "| `noize` |", 1))
    monkeypatch.setattr(cmd_docs, "README", stale)
    monkeypatch.setattr(cmd_docs, "PROJECT", tmp_path)
    assert main(["docs", "--check"]) == 2
    assert capsys.readouterr().err.startswith("error: `interventions/README.md`")
    assert main(["docs"]) == 0 and main(["docs", "--check"]) == 0


def test_every_spec_field_is_described():
    """The generated tables have no empty meaning column: every field of every spec says what it is."""
    from interventions.spec import SPEC_CLASSES

    bare = [f"{cls.__name__}.{name}" for cls in SPEC_CLASSES.values() for name, info in cls.model_fields.items()
            if name != "kind" and not info.description]
    assert bare == []
