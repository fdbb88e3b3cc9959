"""Errors a user can cause, each naming the field, the value and what is allowed.

>>> err = SpecError("prompts[0].subject", "Colosseum", "a substring of the prompt")
>>> str(err)
"`prompts[0].subject`: got 'Colosseum'; expected a substring of the prompt"
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable


class LesionError(Exception):
    """Base class of every error Lesion raises on purpose."""


class SpecError(LesionError, ValueError):
    """A spec field holds a value that cannot be used.

    `field` is a dotted path such as ``prompts[2].subject``; `allowed` says what
    would be accepted, or what to do next.
    """

    def __init__(self, field: str, value: Any, allowed: str, *, problems: list[str] | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        self.problems = problems or [f"`{field}`: got {value!r}; expected {allowed}"]
        super().__init__("\n".join(self.problems))

    @classmethod
    def many(cls, problems: list[str]) -> "SpecError":
        """One error carrying several already formatted problems."""
        err = cls.__new__(cls)
        err.field, err.value, err.allowed, err.problems = "", None, "", problems
        Exception.__init__(err, "\n".join(problems))
        return err


class ModelNotAvailable(LesionError, LookupError):
    """A model named in a spec is not installed, or cannot be reached offline."""


def suggest(value: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(value: Any, choices: Iterable[str]) -> str:
    """The 'allowed' text for a choice among names, with a suggestion."""
    choices = list(choices)
    return "one of " + ", ".join(repr(c) for c in choices) + suggest(value, choices)
