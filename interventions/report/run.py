"""A run folder as the report reads it: its JSON files, generations, images and PNGs, and what kind of run it is.

>>> run = Run.open("runs/eiffel")                        # doctest: +SKIP
>>> run.kind, sorted(run.json)                           # doctest: +SKIP
('trace', ['result.json'])

The report reads files only, never a model: what a page shows is what the run wrote.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from interventions.core.errors import SpecError
from interventions.core.plot import to_uint8

#: The files a run writes that a report reads (the rest it lists by name).
JSON_FILES = ("result.json", "report.json", "metrics.json", "curves.json", "results.json")
#: A run folder without a spec.yaml (edits, erasures) is told by a file or a key that only its kind writes:
#: (file, key or None) -> kind. The first that matches decides.
SIGNATURES = (
    ("curves.json", None, "edit"), ("metrics.json", None, "edit"), ("generations.jsonl", None, "steer"),
    ("report.json", "erased_rate", "erase"), ("report.json", "mean_iou", "daam"),
    ("report.json", "selectivity", "probe"), ("result.json", "decomposition_max_error", "decompose"),
    ("report.json", "edited", "edit"), ("report.json", "images", "apply"),
)
#: Folders above this many bytes of JSON are refused rather than inlined into one page.
MAX_JSON_BYTES = 200_000_000


@dataclass
class Run:
    """What one run folder holds. `json`: parsed JSON files by name; `pngs`: PNG files by name."""

    folder: Path
    kind: str
    modality: str
    json: dict[str, object]
    spec: dict = field(default_factory=dict)
    generations: list[dict] = field(default_factory=list)
    pngs: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name

    def png_uri(self, name: str) -> str:
        return data_uri((self.folder / name).read_bytes())

    def tensors(self, name: str) -> dict:
        """A safetensors file of the run as a dict of tensors ({} when absent)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.folder / name
        if not path.is_file():
            return {}
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise SpecError("RUN_DIR", str(path), f"a safetensors file as Lesion writes it ({str(err)[:80]})") from None

    @staticmethod
    def open(folder: str | Path) -> Run:
        folder = Path(folder)
        if not folder.is_dir():
            raise SpecError("RUN_DIR", str(folder), "a folder `lesion run` wrote (holding result.json, report.json, "
                            "metrics.json or curves.json)")
        found = {n: _read_json(folder / n) for n in JSON_FILES if (folder / n).is_file()}
        spec = _read_spec(folder)
        generations = _read_jsonl(folder / "generations.jsonl")
        kind = spec.get("kind") or _kind_of(folder, found)
        if kind is None:
            raise SpecError("RUN_DIR", str(folder), "a folder `lesion run` wrote: it holds none of "
                            + ", ".join(JSON_FILES))
        modality = spec.get("modality") or (found.get("result.json") or {}).get("spec", {}).get("modality", "")
        pngs = sorted(p.name for p in folder.glob("*.png"))
        return Run(folder, kind, modality or "", found, spec, generations, pngs)


def check_grid_result(result, where: str) -> None:
    """A grid result.json's structure, before anything is drawn: prompts with their columns, and per grid one
    [layer][column] list of numbers (or null) per prompt. One `SpecError` naming what is wrong."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise SpecError("RUN_DIR", where, f"a result.json as `lesion run` writes it: {what}")

    need(isinstance(result, dict) and isinstance(result.get("kind"), str), "an object with a text `kind`")
    prompts, grids = result.get("prompts"), result.get("grids")
    need(isinstance(prompts, list) and prompts and all(isinstance(p, dict) for p in prompts), "`prompts`, a list of objects")
    for i, p in enumerate(prompts):
        need(_texts(p.get("columns")) and isinstance(p.get("prompt"), str), f"prompts[{i}] with `prompt` and `columns` (texts)")
        for key in ("column_positions", "context_column_positions", "patch_positions"):
            need(key not in p or _int_lists(p[key]) or _ints(p[key]), f"prompts[{i}].{key}, lists of positions")
    need(isinstance(grids, dict) and grids, "`grids`, an object of grids")
    for name, g in grids.items():
        need(isinstance(g, dict) and isinstance(g.get("site"), str) and isinstance(g.get("metric"), str),
             f"grids.{name} with a text `site` and `metric`")
        rows = g.get("layers", g.get("features"))
        need(isinstance(rows, list) and rows, f"grids.{name}.layers (or features), a list")
        values = g.get("values")
        need(isinstance(values, list) and len(values) == len(prompts), f"grids.{name}.values, one entry per prompt")
        for i, v in enumerate(values):
            key = "context_columns" if g.get("columns") == "context_columns" else "columns"
            width = len(prompts[i].get(key) or [])
            need(isinstance(v, list) and len(v) == len(rows) and all(
                isinstance(r, list) and len(r) in (width, 1) and all(
                    x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in r) for r in v),
                 f"grids.{name}.values[{i}]: {len(rows)} rows of {width} numbers (one per column of prompts[{i}]; "
                 "or 1, the subject's)")


def _texts(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _int_lists(v) -> bool:
    return isinstance(v, list) and all(_ints(x) for x in v)


def is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in JSON_FILES)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_of(pixels) -> str:
    """A data URI of an image tensor ``[3, h, w]`` (`interventions.core.plot.to_uint8`'s convention)."""
    import numpy as np
    from PIL import Image

    arr = to_uint8(pixels).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buffer, format="PNG")
    return data_uri(buffer.getvalue())


def _kind_of(folder: Path, found: dict) -> str | None:
    for name, key, kind in SIGNATURES:
        if name.endswith(".jsonl"):
            if (folder / name).is_file():
                return kind
        elif name in found and (key is None or (isinstance(found[name], dict) and key in found[name])):
            return kind
    result = found.get("result.json")
    return result.get("kind") if isinstance(result, dict) else None


def _read_json(path: Path):
    if path.stat().st_size > MAX_JSON_BYTES:
        raise SpecError("RUN_DIR", str(path), f"JSON files of at most {MAX_JSON_BYTES:,} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise SpecError("RUN_DIR", str(path), f"a JSON file as Lesion writes it ({type(err).__name__}: "
                        f"{str(err)[:80]})") from None


def _read_spec(folder: Path) -> dict:
    path = folder / "spec.yaml"
    if not path.is_file():
        return {}
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SpecError("RUN_DIR", str(path), f"a spec.yaml as Lesion writes it ({type(err).__name__})") from None
    return spec if isinstance(spec, dict) else {}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise SpecError("RUN_DIR", str(path), f"one JSON object per line ({type(err).__name__})") from None
