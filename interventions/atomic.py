"""Atomic writes: a temporary file in the target's folder, renamed over the target on success and
removed on failure, so a crash never leaves a half-written result, delta, vector or manifest."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_save_file(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors' `save_file`, atomically."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)
