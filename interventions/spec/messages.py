"""One-line messages for invalid specs, from pydantic's errors.

>>> expected({"type": "finite_number", "input": float("inf")})
'a finite number (not nan or inf)'
>>> expected({"type": "int_type", "input": True})
'an integer (true/false is not one)'

`problems` turns a `ValidationError` into one line per field: the errors of a union's branches
(`layers: 'all' | [int, ...]`) are merged; pydantic's names for union branches (`int`,
`literal['auto']`, the spec classes' tags) are dropped from field paths; the extra "at least 1 item
after validation" that pydantic adds when an item failed is dropped; values are echoed through
`errors.short`. The spec catalogue (classes by (kind, modality), every field name) is passed in by
`interventions.spec.catalogue`, which owns it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

from pydantic import ValidationError

from interventions.core.errors import one_of, short, suggest


@dataclass(frozen=True)
class Catalogue:
    """What the messages need to know of the specs."""

    classes: dict           # (kind, modality) -> spec class
    fields: list[str]       # every field name of every spec model, for "did you mean"
    kinds: tuple[str, ...]
    modality_of: Callable[[dict], Any]

    @cached_property
    def tags(self) -> frozenset[str]:
        """The discriminator's tags, ``kind:modality``, one per spec class."""
        return frozenset(f"{kind}:{modality}" for kind, modality in self.classes)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _is_type_tag(part, tags: frozenset[str]) -> bool:
    """pydantic names the branches of a union (`int`, `literal['auto']`, `tuple[int, ...]`, `function-after[...]`)
    in an error's location; the user wrote no such field."""
    return isinstance(part, str) and (part in ("int", "float", "str", "bool", "none", "dict", "list") or (
        "[" in part and part.endswith("]")) or part in tags)


def expected(e: dict) -> str:
    """What one pydantic error says is allowed, in the user's terms."""
    kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "an integer (true/false is not one)" if isinstance(value, bool) else "an integer"
    if kind in ("float_type", "float_parsing"):
        return "a number (true/false is not one)" if isinstance(value, bool) else "a number"
    if kind == "finite_number":
        return "a finite number (not nan or inf)"
    if kind in ("string_type", "string_sub_type"):
        return "a text"
    if kind == "literal_error":
        return "one of " + ctx.get("expected", "") + _suggest_literal(value, ctx.get("expected", ""))
    if kind in ("tuple_type", "list_type"):
        return "a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "a mapping of field: value"
    if kind == "too_short":
        return f"at least {ctx.get('min_length')} item(s)" if isinstance(value, (list, tuple, dict)) else \
            f"at least {ctx.get('min_length')} character(s)"
    if kind == "missing":
        return "a value: this field is required"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        word = {"greater_than": "greater than", "greater_than_equal": "at least", "less_than": "less than",
                "less_than_equal": "at most"}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"a number {word} {bound}"
    return e["msg"].removeprefix("Value error, ")


def _suggest_literal(value, expected: str) -> str:
    choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",")]
    return suggest(value, choices)


def _suggest_field(e: dict, cat: Catalogue) -> str:
    name = next((p for p in reversed(e["loc"]) if isinstance(p, str) and not _is_type_tag(p, cat.tags)), "")
    return suggest(name, [f for f in cat.fields if f != name])


def _elsewhere(data: dict, field: str, cat: Catalogue) -> str:
    """A hint when an unknown top-level field belongs to the same kind for another modality."""
    kind = data.get("kind")
    for (k, modality), cls in cat.classes.items():
        if k == kind and modality != cat.modality_of(data) and field in cls.model_fields:
            return f" (`{field}` is a field of `kind: {kind}` with `modality: {modality}`; add that line)"
    return ""


def problems(err: ValidationError, data: dict, cat: Catalogue) -> list[str]:
    """One line per field: the errors of a union's branches (`layers: 'all' | [int, ...]`) are merged."""
    grouped: dict[str, list[dict]] = {}
    for e in err.errors():
        field = _loc(tuple(p for p in e["loc"] if not _is_type_tag(p, cat.tags))) or "spec"
        grouped.setdefault(field, []).append(e)
    for field in list(grouped):
        nested = any(other.startswith((f"{field}[", f"{field}.")) for other in grouped if other != field)
        if nested:   # pydantic adds "at least 1 item after validation" when an item failed: said already
            grouped[field] = [e for e in grouped[field] if e["type"] != "too_short"]
    problems = []
    for field, errors in grouped.items():
        if not errors:
            continue
        value = errors[0].get("input")
        if errors[0]["type"] == "extra_forbidden":
            hint = _elsewhere(data, field, cat) or _suggest_field(errors[0], cat)
            problems.append(f"`{field}`: unknown field{hint}; `lesion schema` lists the fields each kind takes")
            continue
        if errors[0]["type"] == "missing":
            problems.append(f"`{field}`: missing; this field is required")
            continue
        wants = list(dict.fromkeys(expected(e) for e in errors))
        named = re.match(r"`(\w+)", wants[0])
        if field == "spec" and named and named.group(1) in data:    # a whole-spec check that names its field
            field, value = named.group(1), data[named.group(1)]
        custom = [w for w in wants if not w.startswith(("a ", "an ", "one of", "at least", "at most"))]
        text = "; ".join(custom) if custom else "expected " + " or ".join(wants)
        problems.append(f"`{field}`: got {short(value)}; {text}")
    hints = [p for p in problems if "add that line" in p]
    return hints + [p for p in problems if p not in hints]


def tag_problem(data: dict, cat: Catalogue) -> str:
    """Why `data`'s (kind, modality) names no spec class."""
    kind, modality = data.get("kind"), cat.modality_of(data)
    if kind not in cat.kinds:
        return f"`kind`: got {short(kind)}; expected {one_of(kind, cat.kinds)}"
    allowed = [m for (k, m) in cat.classes if k == kind]
    how = "" if "modality" in data else " (implied by the spec's fields)"
    takes = f"only {allowed[0]!r}" if len(allowed) == 1 else one_of(modality, allowed)
    return f"`modality`: got {short(modality)}{how}; `kind: {kind}` takes {takes}"
