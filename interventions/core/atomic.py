"""Atomic writes: a temporary file (or folder) beside the target, renamed over the target on success and
removed on failure, so a crash never leaves a half-written result, delta, vector or manifest."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from interventions.core.errors import SpecError


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
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


#: Names a Lesion run writes into its output folder. An existing folder holding only these (an
#: earlier result) may be replaced; any other content is refused rather than deleted.
OUTPUT_NAMES = frozenset({
    "result.json", "result.safetensors", "spec.yaml", "heatmap.png", "delta.safetensors", "metrics.json",
    "report.json", "table.md", "grid.png", "vector.safetensors", "generations.jsonl", "results.json", "steer.png",
    "locate", "compare.png", "lens.png", "knockout.png", "probe.png", "daam.png", "maps.safetensors",
})
#: Name patterns of outputs named after a spec's values: a probe's concept vectors, one per label.
OUTPUT_PATTERNS = ("concept_*.safetensors",)


def replaceable(path: str | Path) -> bool:
    """True when `path` does not exist, or is a folder that is empty or holds only an earlier result."""
    path = Path(path)
    if not path.exists():
        return True
    return path.is_dir() and all(p.name in OUTPUT_NAMES or any(p.match(g) for g in OUTPUT_PATTERNS)
                                 for p in path.iterdir())


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """Yield a new staging folder beside `path`; on a clean exit it becomes `path` (an earlier result
    there is replaced whole); on an error or Ctrl-C it is removed. So a run leaves either no new result
    or a complete one, never a half-written folder. The caller checks `replaceable(path)` first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = staging.with_name(staging.name.replace(".partial-", ".old-"))
        os.rename(path, old)
    os.rename(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_out(out: str | None, needed: bool, what: str) -> Path | None:
    """`--out` before any work: given when `needed`, and a folder that a finished result may take
    (new, empty, or holding only an earlier result, which is then replaced whole)."""
    if out is None:
        if needed:
            raise SpecError("--out", None, f"an output folder for {what}")
        return None
    path = Path(out)
    try:
        ok = replaceable(path)
        exists_as_file = path.exists() and not path.is_dir()
    except OSError as err:
        raise SpecError("--out", out, f"a usable folder path ({err.strerror or err})") from None
    if exists_as_file:
        raise SpecError("--out", out, "a folder; a file of that name exists (nothing was run)")
    if not ok:
        raise SpecError("--out", out, "a new or empty folder, or one holding an earlier Lesion result; this one "
                        "holds other files, which Lesion will not replace (nothing was run)")
    return path


def check_out_file(out: str, what: str, suffix: str | None = None) -> Path:
    """`--out` for one file, before any work: a new path in an existing folder. An existing file, folder
    or link (a dangling one included) is refused, so nothing the user had is replaced."""
    path = Path(out)
    try:
        taken = path.is_symlink() or path.exists()
        folder = path.parent.is_dir()
    except (OSError, ValueError) as err:
        raise SpecError("--out", out, f"a usable file path ({getattr(err, 'strerror', None) or err})") from None
    if taken:
        raise SpecError("--out", out, f"a new file path for {what}; this one exists, and Lesion does not replace "
                        "a file (nothing was run)")
    if not folder:
        raise SpecError("--out", out, f"a file path in an existing folder for {what} (nothing was run)")
    if suffix is not None and path.suffix != suffix:
        raise SpecError("--out", out, f"a {suffix} file path for {what}")
    return path

