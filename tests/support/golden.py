"""Frozen outputs of shipped recipes at small settings: the check that a change of structure changes no behaviour.

Each case is a shipped recipe with a few fields overridden so it runs in seconds, run through the CLI
exactly as a user would (`lesion run SPEC --out DIR`). Its outputs are reduced to a fingerprint:
- every JSON file, parsed, with the run's clock readings and hashes of float bytes dropped;
- every safetensors file's metadata, read the same way, and each tensor as its dtype and shape plus, for
  floating tensors, numbers that any change shows in (`tensor_print`); other tensors as the sha256 of their
  bytes. A delta's `::u`/`::v` factors are fingerprinted as their product `u @ v`, the change itself,
  which float rounding cannot turn into another factorisation (an SVD's signs may flip).

    python tests/support/golden.py --record      # rewrite tests/golden/*.json from the code as it is now

`tests/test_behaviour.py` reruns every case and compares numbers to `TOLERANCE`. Bit-for-bit records failed
on another CPU (the same code, float sums rounded in another order: differences near 1e-6); a change of
behaviour moves these numbers by far more than `TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import yaml

from interventions.core.atomic import MARKER

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parents[1] / "golden"

#: case name -> (recipe path relative to the project root, fields overridden for a small run)
CASES: dict[str, tuple[str, dict]] = {
    "trace_eiffel": ("recipes/trace/trace_eiffel.yaml",
                     {"layers": [0, 12, 24], "samples": 2, "max_batch_rows": 16}),
    "trace_eiffel_attribution": ("recipes/trace/trace_eiffel.yaml",
                                 {"layers": [0, 12, 24], "samples": 2, "method": "attribution"}),
    "patch_eiffel": ("recipes/patch/patch_eiffel.yaml", {"layers": [3, 20], "sites": ["block_output", "mlp_output"]}),
    "knockout_eiffel": ("recipes/lenses/knockout_eiffel.yaml", {"prompts": "first:1"}),
    "lens_eiffel": ("recipes/lenses/lens_eiffel.yaml", {}),
    "steer_ocean": ("recipes/steer/steer_ocean.yaml",
                    {"pairs": "first:4", "coefficients": [0, 4], "prompts": "first:1", "max_new_tokens": 6}),
    "edit_eiffel": ("recipes/edit/edit_eiffel.yaml",
                    {"layer": 4, "mom2_tokens": 2000, "hyperparameters": {"v_steps": 4, "context_templates": []}}),
    "trace_flag_france": ("recipes/vision-language/trace_flag_france.yaml",
                          {"samples": 1, "layers": [0, 15], "sites": ["hidden", "mlp"]}),
    "patch_flag_france": ("recipes/vision-language/patch_flag_france.yaml", {"layers": [2, 20]}),
    "probe_flags_continent": ("recipes/vision-language/probe_flags_continent.yaml", {}),
    "trace_shapes": ("recipes/text-to-image/trace_shapes.yaml",
                     {"prompts": "first:1", "images": 2, "steps": 4, "sites": ["text_hidden", "cross_attention"]}),
    "erase_red": ("recipes/erase/erase_red.yaml", {"images": 2, "steps": 4, "attack": {"prompts": 0}}),
    "daam_shapes": ("recipes/text-to-image/daam_shapes.yaml", {"images": 1, "prompts": "first:1"}),
}

#: keys whose values are clock readings or environment facts, not behaviour; `integrity` is a delta's hash
#: over its header, creation time included (its tensors are compared bit for bit on their own)
VOLATILE = ("seconds", "time", "created", "lesion_version", "version", "torch", "threads", "elapsed", "per_s",
            "memory_peak", "peak", "host", "date", "argv", "command", "path", "out", "integrity", "content")

#: numbers in a fingerprint agree to this, absolutely or relative to the recorded value when that is above 1:
#: two units of the 4th decimal, because results rounded to 4 decimals (the lenses' top-k probabilities) flip
#: their last digit when a rounding-level change crosses a half
TOLERANCE = 2e-4
#: random unit directions each floating tensor is projected on (`tensor_print`)
PROBES = 6


def small_spec(case: str, cases: dict | None = None) -> dict:
    """The recipe's YAML with the case's overrides; `"first:N"` keeps the first N items of a list."""
    recipe, overrides = (cases or CASES)[case]
    spec = yaml.safe_load((ROOT / recipe).read_text(encoding="utf-8"))
    for key, value in overrides.items():
        if isinstance(value, str) and value.startswith("first:"):
            value = spec[key][: int(value.split(":")[1])]
        elif isinstance(value, dict) and isinstance(spec.get(key), dict):
            value = {**spec[key], **value}
        spec[key] = value
    return spec


def run_small(case: str, work: Path, cases: dict | None = None) -> Path:
    """Run one case (of `cases`, default `CASES`) through the CLI in `work`; its output folder."""
    from recipes.cli import main

    spec_file = work / f"{case}.yaml"
    spec_file.write_text(yaml.safe_dump(small_spec(case, cases), sort_keys=False), encoding="utf-8")
    out = work / case
    status = main(["--threads", "1", "run", str(spec_file), "--out", str(out)])
    if status != 0:
        raise RuntimeError(f"{case}: `lesion run` exited {status}")
    return out


def run_case(case: str, work: Path) -> dict:
    """Run one case through the CLI in `work`, and return its fingerprint."""
    return fingerprint(run_small(case, work))


def _volatile(key: str) -> bool:
    key = key.lower()
    return any(word == key or key.startswith(word + "_") or key.endswith("_" + word) for word in VOLATILE)


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not _volatile(str(k))}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def fingerprint(folder: Path) -> dict:
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.name == MARKER:          # bookkeeping (file sizes, PNGs' included), not behaviour
            continue
        if path.suffix == ".json":
            found[rel] = _clean(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                meta = {k: _maybe_json(v) for k, v in (f.metadata() or {}).items()}
                tensors = factor_products({name: f.get_tensor(name) for name in f.keys()})
            found[rel] = {"metadata": _clean(meta), "tensors": {k: tensor_print(t) for k, t in sorted(tensors.items())}}
    return found


def factor_products(tensors: dict) -> dict:
    """A delta's factor pairs `name::u`, `name::v` replaced by `name::u@v`, their product."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith("::u") and k[:-1] + "v" in tensors]:
        name = key[: -len("::u")]
        out[f"{name}::u@v"] = out.pop(key).double() @ out.pop(f"{name}::v").double()
    return out


def _maybe_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def tensor_print(t: torch.Tensor):
    """A non-floating tensor: its dtype, shape and the sha256 of its bytes. A floating one: its dtype and
    shape, its norm, and its projections on `PROBES` fixed random unit directions, scaled by √n/‖t‖ so each
    is of order 1 and moves by about δ/‖t‖ when any one element moves by δ."""
    t = t.contiguous()
    head = f"{t.dtype} {tuple(t.shape)}"
    if not t.is_floating_point():
        return f"{head} {hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}"
    x = t.double().reshape(-1)
    directions = torch.randn(PROBES, x.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-300)
    norm = float(x.norm())
    scale = x.numel() ** 0.5 / norm if norm > 0 else 0.0
    return {"tensor": head, "norm": norm, "probes": [float(p) * scale for p in directions @ x]}


def differences(expected, got, where: str = "", tol: float = TOLERANCE) -> list[str]:
    """Where `got` differs from `expected`: numbers beyond `tol` (absolute, or relative for large values),
    anything else when not equal."""
    if isinstance(expected, dict) and isinstance(got, dict):
        out = [f"{where}/{k}: missing" for k in expected if k not in got]
        out += [f"{where}/{k}: unexpected" for k in got if k not in expected]
        for k in expected:
            if k in got:
                out += differences(expected[k], got[k], f"{where}/{k}", tol)
        return out
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{where}: length {len(got)}, expected {len(expected)}"]
        return [d for i, (a, b) in enumerate(zip(expected, got)) for d in differences(a, b, f"{where}[{i}]", tol)]
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(got, numbers) and not isinstance(expected, bool):
        if (math.isnan(expected) and math.isnan(got)) or expected == got:
            return []
        if abs(expected - got) <= tol * max(1.0, abs(expected)):
            return []
        return [f"{where}: {got!r}, expected {expected!r}"]
    return [] if expected == got else [f"{where}: {got!r}, expected {expected!r}"]


def record(names: list[str]) -> None:
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    for case in names:
        with tempfile.TemporaryDirectory() as tmp:
            found = run_case(case, Path(tmp))
        (GOLDEN / f"{case}.json").write_text(json.dumps(found, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"recorded {case}: {len(found)} files")


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    if sys.argv[1:2] != ["--record"]:
        sys.exit("usage: python tests/support/golden.py --record [CASE ...]")
    record(sys.argv[2:] or list(CASES))
