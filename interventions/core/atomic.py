"""Atomic writes: a temporary file (or folder) beside the target, renamed over the target on success and
removed on failure, so a crash never leaves a half-written result, delta, vector or manifest."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from interventions.core.errors import SpecError


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise SpecError("--out", str(path), f"a file Lesion may create ({err.strerror or err})") from None
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


def finite_json(value):
    """A value ready for JSON, which has no NaN or infinity: those floats become null (a grid's cells past a
    prompt's end, a metric with no value), in dicts, lists and tuples at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


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
    "images.safetensors", "images.json", "report.html",
})
#: Name patterns of outputs named after a spec's values: a probe's concept vectors, one per label.
OUTPUT_PATTERNS = ("concept_*.safetensors",)


#: Written into every folder `atomic_folder` finishes: the files Lesion put there (relative paths and
#: sizes). A folder whose contents are exactly its listing is an earlier Lesion output (a run, an
#: adapter, a merged model) and may be replaced whole; one the user added to or changed is not.
MARKER = ".lesion-output.json"


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != MARKER}


def _listed(folder: Path):
    """The file listing `folder`'s marker holds (None: no readable marker)."""
    marker = folder / MARKER
    if not marker.is_file() or marker.is_symlink() or marker.stat().st_size > 10_000_000:
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (ValueError, AttributeError, RecursionError):
        return None


def _marked(folder: Path) -> bool:
    """Whether `folder` holds exactly what its marker says Lesion wrote there."""
    listed = _listed(folder)
    if listed is None:
        return False
    others = [p for p in folder.rglob("*") if p.is_symlink() or not (p.is_file() or p.is_dir())]
    return not others and listed == _listing(folder)


def refresh_marker(folder: str | Path, added: str) -> None:
    """After Lesion added `added` to a folder it had marked (a run's report.html), list it in the marker, so
    the folder still counts as Lesion's own output. A folder the user changed stays unmarked."""
    folder = Path(folder)
    listed, now = _listed(folder), _listing(folder)
    if isinstance(listed, dict) and {k: v for k, v in listed.items() if k != added} == \
            {k: v for k, v in now.items() if k != added}:
        atomic_write(folder / MARKER, json.dumps({"files": now}, indent=1).encode())


def replaceable(path: str | Path) -> bool:
    """True when `path` does not exist, or is a folder that is empty or holds only an earlier result."""
    path = Path(path)
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    return _marked(path) or all(p.name in OUTPUT_NAMES or any(p.match(g) for g in OUTPUT_PATTERNS)
                                for p in path.iterdir())


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """Yield a new staging folder beside `path`; on a clean exit it becomes `path` (an earlier result
    there is replaced whole); on an error or Ctrl-C it is removed. So a run leaves either no new result
    or a complete one, never a half-written folder. The caller checks `replaceable(path)` first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    except OSError as err:
        raise SpecError("--out", str(path), f"a folder Lesion may create ({err.strerror or err}; nothing was run)") \
            from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _settle(staging, path)


def _settle(staging: Path, path: Path) -> None:
    """Mark a finished staging folder (`MARKER`) and move it to `path`, replacing an earlier result; if the
    file system refuses, the error says where the finished result is, so nothing is lost."""
    old = staging.with_name(staging.name.replace(".partial-", ".old-"))
    try:
        (staging / MARKER).write_text(json.dumps({"files": _listing(staging)}, indent=1))
        if path.exists():
            os.rename(path, old)
        os.rename(staging, path)
    except OSError as err:
        if old.exists() and not path.exists():
            os.rename(old, path)
        raise SpecError("--out", str(path), f"a folder Lesion may replace ({err.strerror or err}); the finished "
                        f"result is in {staging}") from None
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
        link = path.is_symlink()
        ok = not link and replaceable(path)
        exists_as_file = path.exists() and not path.is_dir()
        parent = _writable_ancestor(path.parent)
    except (OSError, ValueError) as err:
        raise SpecError("--out", out, f"a usable folder path ({getattr(err, 'strerror', None) or err})") from None
    if link:
        raise SpecError("--out", out, "a folder path, not a link (Lesion replaces a result folder whole, and will "
                        "not replace a link or what it points to; nothing was run)")
    if parent is not None:
        raise SpecError("--out", out, f"a folder path Lesion can create: {parent} (nothing was run)")
    if exists_as_file:
        raise SpecError("--out", out, "a folder; a file of that name exists (nothing was run)")
    if not ok:
        raise SpecError("--out", out, "a new or empty folder, or one holding an earlier Lesion result; this one "
                        "holds other files, which Lesion will not replace (nothing was run)")
    return path


def _writable_ancestor(folder: Path) -> str | None:
    """None when `folder` exists and may be written to, or can be created; else what stands in the way."""
    while not folder.exists():
        if folder.is_symlink():
            return f"{folder} is a link to nothing"
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} may not be written to"
    return None


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
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise SpecError("--out", out, f"a file path in a folder you may write to, for {what} (nothing was run)")
    if suffix is not None and path.suffix != suffix:
        raise SpecError("--out", out, f"a {suffix} file path for {what}")
    return path

