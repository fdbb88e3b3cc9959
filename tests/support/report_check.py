"""Check a report page against its run's files: every number a section shows, read back from the page's data,
must equal the value at the JSON pointer the section names (`source`, `sources`, `x_source`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from interventions.report import read_data


def resolve(folder: Path, ref: str, other: Path | None = None):
    """The value a pointer names: ``file#/a/0/b``; ``*`` maps over a list; ``other:`` reads the compared run."""
    file, _, path = ref.partition("#")
    if file.startswith("other:"):
        folder, file = other, file.removeprefix("other:")
    data = json.loads((folder / file).read_text(encoding="utf-8"))
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.strip("/").split("/")] if path.strip("/") else []
    return _walk(data, parts)


def _walk(value, parts: list[str]):
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if head == "*":
        return [_walk(v, rest) for v in value]
    return _walk(value[int(head)] if isinstance(value, list) else value[head], rest)


def same(a, b, tol: float = 1e-9) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(b))
    if a is None and isinstance(b, float):
        return not math.isfinite(b)
    return a == b


def page_differences(folder: Path, page: Path, other: Path | None = None) -> tuple[list[str], int]:
    """``(differences, values checked)`` between a report page and the run folder it was written from."""
    doc = read_data(page.read_text(encoding="utf-8"))
    found, checked = [], 0
    for s in doc["sections"]:
        pairs = []
        if "source" in s and s["type"] in ("grid", "compare"):
            pairs.append((s["source"], s["z"]))
        if s["type"] == "compare":
            pairs.append((s["source_b"], s["z_b"]))
        if s["type"] == "table":
            pairs += [(src, v) for row, srcs in zip(s["rows"], s["sources"]) for v, src in zip(row, srcs) if src]
        if s["type"] == "curves":
            pairs += [(s["x_source"], s["x"])] + [(series["source"], series["y"]) for series in s["series"]]
        if s["type"] == "gallery":
            pairs += [(item["source"], item["label"]) for item in s["items"]]
        for ref, shown in pairs:
            checked += 1
            expected = resolve(folder, ref, other)
            if not same(shown, expected):
                found.append(f"{s.get('title')}: {ref} shows {str(shown)[:80]}, the file has {str(expected)[:80]}")
    return found, checked
