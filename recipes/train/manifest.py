"""checkpoints/manifest.json: every shipped artefact with its sha256, size, and the recipe that made it.

>>> register(Path("runs/edit/delta.safetensors"), "rome_eiffel_to_rome_smollm2.safetensors",
...          kind="delta", recipe="recipes/edit/edit_eiffel.yaml", command="lesion run ...")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from interventions.core.atomic import atomic_path, atomic_write
from interventions.core.errors import SpecError
from interventions.core.paths import CHECKPOINTS

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-.")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_name(name: str) -> str:
    if not name or set(name) - NAME_CHARS or name.startswith("."):
        raise SpecError("checkpoint name", name, "lower-case letters, digits, '_', '-' and '.' (no folders)")
    return name


def register(source: Path, name: str, *, root: Path | None = None, **entry) -> dict:
    """Copy `source` to `root/name` and list it in `root/manifest.json` (replacing an entry of that
    name). The copy and the manifest are each written atomically."""
    check_name(name)
    root = CHECKPOINTS if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return register_in_place(target, root=root, **entry)


def register_in_place(path: Path, *, root: Path | None = None, **entry) -> dict:
    """List a file already written inside `root` (e.g. a testbed) in `root/manifest.json`."""
    root = CHECKPOINTS if root is None else root
    name = check_name(path.name)
    if path.resolve().parent != root.resolve():
        raise SpecError("path", str(path), f"a file directly inside {root}")
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"format": 1, "artefacts": []}
    row = {"path": name, "sha256": sha256(path), "bytes": path.stat().st_size, **entry,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest["artefacts"] = [a for a in manifest["artefacts"] if a["path"] != name] + [row]
    atomic_write(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    return row
