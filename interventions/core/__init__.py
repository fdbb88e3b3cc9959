"""Lowest floor: errors, units, atomic writes, conventions, metrics, memory, prompts, runtime helpers."""

__version__ = "0.1.0"
