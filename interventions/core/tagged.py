"""Safetensors files tagged with metadata (deltas, steering vectors, tuned lenses): sealed with two
hashes when written, and read with every failure turned into the caller's own error type, naming
the field and the file.

The seal: ``content_sha256``, the hash of every tensor's name, shape, dtype and bytes, and
``integrity_sha256``, the hash of all the other metadata (the content hash included). A changed
byte anywhere in the file fails one of the two.
"""

from __future__ import annotations

import hashlib
import json

import torch

from interventions.core.errors import LesionError, short
from interventions.core.reading import existing_file


def fingerprint(tensor: torch.Tensor) -> dict:
    """Shape, dtype and sha256 of a tensor's bytes."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return {"shape": list(data.shape), "dtype": str(data.dtype).removeprefix("torch."), "sha256": digest}


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names and fingerprints, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + json.dumps(fingerprint(tensors[name])).encode())
    return digest.hexdigest()


def integrity_hash(meta: dict) -> str:
    """sha256 of the metadata (which holds the tensors' content hash), itself excluded."""
    body = {k: v for k, v in meta.items() if k != "integrity_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """`meta` with the content hash of `tensors` and the integrity hash of the whole added."""
    sealed = {k: v for k, v in meta.items() if k != "integrity_sha256"}
    sealed["content_sha256"] = content_hash(tensors)
    return {**sealed, "integrity_sha256": integrity_hash(sealed)}


def broken_seal(meta: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with the seal of a file's `meta` and `tensors`, or None when it holds."""
    if not isinstance(meta.get("content_sha256"), str) or not isinstance(meta.get("integrity_sha256"), str):
        return "it carries no integrity hash (written by an older Lesion, or not by Lesion; write it again)"
    if integrity_hash(meta) != meta["integrity_sha256"]:
        return "its metadata does not match its integrity hash (edited or corrupt)"
    if content_hash(tensors) != meta["content_sha256"]:
        return "its tensors do not match the recorded content hash (edited or corrupt)"
    return None


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
