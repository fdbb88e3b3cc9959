"""What kind of model a name refers to, told from the name and the files alone (nothing is loaded).

One table of the built-in names that are not plain language models, and the file checks that tell a
local folder's modality. Loaders and runners ask here instead of importing each other's modules.

>>> model_modality("shapes-diffusion"), model_modality("llava-flags-smollm2"), model_modality("smollm2-135m")
('text-to-image', 'vision-language', 'language')
>>> model_modality("scenes-clip")
'contrastive'

"""

from __future__ import annotations

import json
import re
from pathlib import Path

SHAPES = "shapes-diffusion"          # the coloured-shapes text-to-image testbed
SCENES = "scenes-smollm2"            # the scenes text-to-image testbed (SmolLM2 as its text encoder)
FLAGS_VLM = "llava-flags-smollm2"    # the flags vision-language testbed (LLaVA around SmolLM2)
SCENES_CLIP = "scenes-clip"          # the contrastive testbed (a small CLIP trained on the scenes world)
FLAGS_VLM_DEEP = "llava-flags-deep-smollm2"   # the flags testbed with a tower worth looking into (6 layers, 16 patches)

#: built-in testbed name -> its modality
TESTBEDS = {SHAPES: "text-to-image", SCENES: "text-to-image", FLAGS_VLM: "vision-language",
            FLAGS_VLM_DEEP: "vision-language", SCENES_CLIP: "contrastive"}

_DIFFUSION_HUB = re.compile(r"stable-diffusion|(^|/)sd-|sd-turbo|sdxl", re.IGNORECASE)


def is_text_to_image(name: str) -> bool:
    """True for a text-to-image testbed, a local diffusers pipeline folder, or a hub id naming Stable Diffusion."""
    if TESTBEDS.get(name) == "text-to-image":
        return True
    path = local_folder(name)
    if path is not None:
        return (path / "model_index.json").is_file() or (path / "unet").is_dir()
    return bool(_DIFFUSION_HUB.search(name))


def is_vision_language(name: str) -> bool:
    """True for the vision-language testbed, a local folder holding a LLaVA config, or a hub id naming LLaVA."""
    if TESTBEDS.get(name) == "vision-language":
        return True
    path = local_folder(name)
    if path is not None:
        cfg = path / "config.json"
        return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "llava"
    return "llava" in name.lower()


def is_contrastive(name: str) -> bool:
    """True for the contrastive testbed, or a local folder holding a CLIP config (`model_type: clip`)."""
    if TESTBEDS.get(name) == "contrastive":
        return True
    path = local_folder(name)
    cfg = path / "config.json" if path is not None else None
    return bool(cfg and cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "clip")


def model_modality(name: str) -> str:
    """'text-to-image', 'vision-language', 'contrastive' or 'language' for a model name, by the checks above."""
    if is_text_to_image(name):
        return "text-to-image"
    if is_contrastive(name):
        return "contrastive"
    return "vision-language" if is_vision_language(name) else "language"


def local_folder(name: str) -> Path | None:
    """`name` as an existing local folder (``~`` expanded), or None. A name the file system cannot
    even look up (too long, a bad character) is simply not a folder."""
    try:
        path = Path(name).expanduser()
        return path if path.is_dir() else None
    except (OSError, ValueError, RuntimeError):
        return None
