"""Checks of command-line flags and paths, made before any model loads or any work starts.

>>> positive_int("3")
3
>>> parse_device_map('{"model.layers.0": "cpu", "lm_head": "disk"}')
{'model.layers.0': 'cpu', 'lm_head': 'disk'}

Each check raises `SpecError` naming the flag, echoing the value and saying what is allowed;
the CLI prints it as one ``error:`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re

from interventions.core.errors import SpecError, short
from interventions.core.reading import existing_file

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"(cpu|mps|cuda|xpu)(:\d+)?")


def _whole_number(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"got {short(text)}; expected a whole number of at least {minimum}")
        return value
    return parse


#: argparse `type=` for counts (threads, rows, tokens): a whole number ≥ 1.
positive_int = _whole_number(1)
#: argparse `type=` for a layer index or an optional count: a whole number ≥ 0.
natural_int = _whole_number(0)


def finite_float(text: str) -> float:
    """argparse `type=` for a coefficient: a finite number (not nan or inf)."""
    import math

    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"got {short(text)}; expected a finite number")
    return value


def device_flag(text: str) -> str:
    """argparse `type=` for `--device` (see `check_device`)."""
    try:
        return check_device(text)
    except SpecError as err:
        raise argparse.ArgumentTypeError(f"got {short(text)}; expected {err.allowed}") from None


def check_device(text: str, flag: str = "--device") -> str:
    """A device this machine has: ``cpu``, ``cuda``, ``cuda:N`` (N below the GPU count) or ``mps``."""
    if not isinstance(text, str) or not _DEVICE.fullmatch(text):
        raise SpecError(flag, text, "cpu, cuda, cuda:N or mps")
    kind, _, index = text.partition(":")
    if kind == "cpu":
        return text
    import torch

    count = {"cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
             "mps": int(torch.backends.mps.is_available()), "xpu": 0, "cpu": 1}[kind]
    if kind != "cpu" and (count == 0 or (index and int(index) >= count)):
        have = f"{count} {kind} device(s)" if count else f"no {kind} device"
        raise SpecError(flag, text, f"a device this machine has (it has {have}; cpu always works)")
    return text


def parse_device_map(text: str | None):
    """``--device-map``: one of accelerate's strategies, or a JSON object of module -> device."""
    if text is None or text in DEVICE_MAPS:
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict) or not value:
        raise SpecError("--device-map", text, f"one of {', '.join(DEVICE_MAPS)}, or a JSON object mapping module "
                        "names to devices, e.g. '{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}'")
    for module, device in value.items():
        if device == "disk":
            continue
        name = f"cuda:{device}" if isinstance(device, int) and not isinstance(device, bool) and device >= 0 else device
        if not isinstance(name, str):
            raise SpecError(f"--device-map[{module!r}]", device, "a GPU index, 'cpu', 'disk' or a device name")
        check_device(name, f"--device-map[{short(module, 40)}]")
    return value


def check_spec_files(spec) -> None:
    """The files a spec names (deltas, a steering vector, corpus files, a requests file, a tuned lens) exist: checked before a model
    loads, so a typo costs no load. Their content is checked when they are read."""
    named = [(f"{field}[{i}]", path) for field in ("deltas", "corpus") for i, path in
             enumerate(getattr(spec, field, None) or ())]
    if getattr(spec, "steer", None) is not None:
        named.append(("steer", spec.steer))
    if getattr(spec, "tuned", None) is not None:
        named.append(("tuned", spec.tuned))
    if getattr(spec, "requests_from", None) is not None:
        named.append(("requests_from.path", spec.requests_from.path))
    for field, path in named:
        if not existing_file(path):
            raise SpecError(field, path, "an existing file")


def load_spec_for(path: str, model: str | None):
    """The spec file at `path`, with `--model` (when given) in place of its `model`."""
    from interventions.spec import load_spec, parse_spec, spec_to_dict

    spec = load_spec(path)
    if model is not None:
        spec = parse_spec({**spec_to_dict(spec), "model": model})
    return spec


def model_for(name: str):
    """A language model or a vision-language model by its name (a delta's base, or `--model`):
    `(model, tokenizer)`."""
    from interventions.modalities.vision_language.llava import is_vlm_model, load_language_or_vision

    return load_language_or_vision(name, vision=is_vlm_model(name))[:2]
