"""The spec reference's field tables, written from the specs' own field descriptions, so the docs
cannot drift from the code: `lesion docs` rewrites the marked part of interventions/README.md, and
a test fails when the file differs from what it would write.

>>> print(field_table(SPEC_CLASSES[("steer", "language")]).splitlines()[2])
| `kind` | `"steer"` | `"steer"` |  |
"""

from __future__ import annotations

import json

from interventions.spec.catalogue import SPEC_CLASSES

BEGIN = "<!-- field tables: written by `lesion docs`; edit the field descriptions in interventions/spec/*_specs.py -->"
END = "<!-- end of the field tables -->"


def _type(schema: dict, defs: dict) -> str:
    """A short type for a field's JSON Schema: `int`, `"a" | "b"`, `list of X`, a nested object's name."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " \\| ".join(json.dumps(v) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " \\| ".join(dict.fromkeys(_type(s, defs) for s in schema[key]))
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items") or (schema.get("prefixItems") or [{}])[0]
        return f"list of {_type(items, defs)}"
    return {"integer": "int", "number": "float", "string": "text", "boolean": "bool", "null": "null",
            "object": "mapping"}.get(kind, "any")


def _default(info) -> str:
    if info.is_required():
        return "(required)"
    if info.default_factory is not None:
        value = info.default_factory()
        value = value.model_dump() if hasattr(value, "model_dump") else value
    else:
        value = info.default
    return f"`{json.dumps(value, default=str)}`"


def field_table(cls) -> str:
    """One spec class's fields as a Markdown table: name, type, default, description."""
    schema = cls.model_json_schema()
    defs, props = schema.get("$defs", {}), schema.get("properties", {})
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, info in cls.model_fields.items():
        text = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name}` | `{_type(props.get(name, {}), defs)}` | {_default(info)} | {text} |")
    return "\n".join(rows)


def field_tables() -> str:
    """Every spec class's table, one section per (kind, modality), between the markers."""
    parts = [BEGIN]
    for (kind, modality), cls in SPEC_CLASSES.items():
        parts += ["", f"### `kind: {kind}`, `modality: {modality}` ({cls.__name__})", "", field_table(cls)]
    return "\n".join(parts + ["", END])


def with_tables(readme: str) -> str:
    """`readme` with its marked part replaced by `field_tables()` (appended, under a heading, if unmarked)."""
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN, 1)
        return head + field_tables() + rest.split(END, 1)[1]
    return readme.rstrip() + "\n\n## Every field of every spec\n\n" + field_tables() + "\n"
