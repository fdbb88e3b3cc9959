"""Safetensors files tagged with one JSON metadata key (deltas, steering vectors): read with every
failure turned into the caller's own error type, naming the field and the file.

>>> existing_file("/no/such/file"), existing_file("x" * 5000)
(False, False)
"""

from __future__ import annotations

import json
from pathlib import Path

from interventions.core.errors import LesionError, short


def existing_file(path) -> bool:
    """Whether `path` is an existing file; a path the file system cannot even look up (too long, a NUL
    byte) is simply not one."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def read_tagged(path, key: str, error: type[LesionError], field: str, what: str) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a safetensors file whose metadata key `key` holds a JSON object.

    A missing, unreadable, truncated or untagged file, or metadata that is not a JSON object, raises
    `error` with one line: ``"`field`: ..."``."""
    from safetensors import safe_open

    shown = short(str(path))
    if not existing_file(path):
        raise error(f"`{field}`: got {shown}; expected an existing {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:   # noqa: BLE001 - safetensors raises several types for damaged files
        raise error(f"`{field}`: {shown} is not a readable safetensors file (corrupt or truncated?): "
                    f"{short(str(err))}") from None
    if raw is None:
        raise error(f"`{field}`: {shown} has no `{key}` metadata; expected a {what}")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise error(f"`{field}`: {shown}: its `{key}` metadata is not a JSON object")
    return meta, tensors
