"""Every shipped artefact is listed in checkpoints/manifest.json, with a sha256 that matches."""

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).parents[2] / "checkpoints"


def test_manifest_lists_every_file_with_its_hash():
    manifest = json.loads((ROOT / "manifest.json").read_text())
    listed = {a["path"]: a for a in manifest["artefacts"]}
    present = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()} - {"manifest.json", "README.md"}
    assert present == set(listed)
    for path, entry in listed.items():
        assert hashlib.sha256((ROOT / path).read_bytes()).hexdigest() == entry["sha256"]
        assert entry.get("recipe"), f"{path} names no recipe"
