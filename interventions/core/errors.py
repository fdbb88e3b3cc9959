"""Errors a user can cause, each naming the field, the value and what is allowed.

>>> err = SpecError("prompts[0].subject", "Colosseum", "a substring of the prompt")
>>> str(err)
"`prompts[0].subject`: got 'Colosseum'; expected a substring of the prompt"
>>> short("x" * 500).endswith("… (502 chars)")
True

Every error Lesion raises on purpose is a `LesionError`; the CLI prints it as one
``error:`` line and exits with status 2. Messages echo the offending value through
`short`, so a huge value (a 1 MB prompt, an alias-expanded YAML tree) never makes a
huge message.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

#: The longest echo of a user's value inside a message.
MAX_ECHO = 120


class LesionError(Exception):
    """Base class of every error Lesion raises on purpose."""


def short(value: Any, limit: int = MAX_ECHO) -> str:
    """`repr(value)`, cut to about `limit` characters with the full length said.

    The repr of a deeply nested or self-referencing value is never built whole: containers
    are summarised before `repr` runs on them.
    """
    if isinstance(value, (list, tuple, dict, set)):
        kind = type(value).__name__
        try:
            n = len(value)
        except TypeError:
            n = "?"
        text = _bounded_repr(value, limit)
        return text if len(text) <= limit else f"<{kind} of {n} items>"
    try:
        text = repr(value)
    except (RecursionError, ValueError):   # ValueError: an int past Python's digit limit
        return f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} chars)"


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """Plain text cut to about `limit` characters (for messages that are not a value's repr)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def _bounded_repr(value: Any, limit: int, depth: int = 0) -> str:
    """A repr that stops growing once it passes `limit` (aliases can make a 1 KB YAML a 1 GB tree)."""
    if depth > 8:
        return "…"
    if isinstance(value, dict):
        parts, size = [], 0
        for k, v in value.items():
            part = f"{short(k, limit)}: {_bounded_repr(v, limit, depth + 1)}"
            parts.append(part)
            size += len(part)
            if size > limit:
                break
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, (list, tuple, set)):
        parts, size = [], 0
        for v in value:
            part = _bounded_repr(v, limit, depth + 1)
            parts.append(part)
            size += len(part)
            if size > limit:
                break
        open_, close = ("(", ")") if isinstance(value, tuple) else ("{", "}") if isinstance(value, set) else ("[", "]")
        return open_ + ", ".join(parts) + close
    return short(value, limit)


class SpecError(LesionError, ValueError):
    """A spec field (or a command-line flag) holds a value that cannot be used.

    `field` is a dotted path such as ``prompts[2].subject``, or a flag such as
    ``--threads``; `allowed` says what would be accepted, or what to do next.
    `str(err)` is one line; several problems are joined with ``; ``.
    """

    def __init__(self, field: str, value: Any, allowed: str, *, problems: list[str] | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        self.problems = problems or [f"`{field}`: got {short(value)}; expected {allowed}"]
        super().__init__("; ".join(self.problems))

    @classmethod
    def many(cls, problems: list[str]) -> "SpecError":
        """One error carrying several already formatted problems."""
        err = cls.__new__(cls)
        err.field, err.value, err.allowed, err.problems = "", None, "", problems
        Exception.__init__(err, "; ".join(problems))
        return err


class ModelNotAvailable(LesionError, LookupError):
    """A model named in a spec is not installed, or cannot be reached offline."""


def suggest(value: Any, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    if not isinstance(value, str) or len(value) > 200:
        return ""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(value: Any, choices: Iterable[str]) -> str:
    """The 'allowed' text for a choice among names, with a suggestion."""
    choices = list(choices)
    return "one of " + ", ".join(repr(c) for c in choices) + suggest(value, choices)
