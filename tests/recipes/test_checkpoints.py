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


def test_the_shipped_dictionaries_load_in_lesion_and_in_saelens():
    import sae_lens

    from interventions.core.paths import CHECKPOINTS
    from interventions.features.dictionary import load_dictionary

    for folder, where, d_sae in (("sae_docs_smollm2_l15", ("block_output", 15), 4096),
                                 ("sae_flags_vlm_l3", ("block_output", 3), 512),
                                 ("sae_scenes_captions_smollm2_l7", ("block_output", 7), 2048)):
        d = load_dictionary(CHECKPOINTS / folder)                # the seal is checked
        assert (d.where.site, d.where.layer, d.d_sae) == (*where, d_sae)
        assert d.meta["report"]["explained_variance"] >= 0.95 and d.meta["report"]["l0"] <= 64
        assert sae_lens.SAE.load_from_disk(str(CHECKPOINTS / folder)).cfg.d_sae == d_sae
