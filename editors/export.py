"""Deltas in the formats serving libraries load: PEFT LoRA adapters (and back), diffusers LoRA weights,
and whole merged Hugging Face folders.

>>> export_peft(model, [delta], "adapters/eiffel")                        # doctest: +SKIP
>>> PeftModel.from_pretrained(base, "adapters/eiffel")                    # doctest: +SKIP
>>> delta = import_peft(model, "adapters/eiffel", base_model="smollm2-135m")   # doctest: +SKIP

A delta's low-rank change ``u @ v`` of a linear layer's weight ``W [out, in]`` is a LoRA
with ``lora_B = u [out, r]``, ``lora_A = v [r, in]`` and ``lora_alpha = r`` (PEFT's scaling
``alpha / r`` is then 1). GPT-2's `Conv1D` stores ``W`` as ``[in, out]``; PEFT handles it with
``fan_in_fan_out``, and the factors are transposed: ``lora_B = vᵀ``, ``lora_A = uᵀ``. Layers of
different ranks (MEMIT's) get PEFT's ``rank_pattern`` and ``alpha_pattern``. Several deltas on
one model export as one adapter: their factors on one layer are concatenated (rank r₁ + r₂), so
the adapter adds what applying all of them adds.

What LoRA cannot hold is refused with the reason: a dense change (`Delta.dense`), a change to a
parameter that is not the weight of a linear layer, or `Conv1D` and linear layers in one adapter
(``fan_in_fan_out`` is one flag per adapter). The adapter's safetensors metadata ``lesion_delta``
records each delta's provenance (content hash, method, base model and its fingerprints). The
folder is written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from editors.delta import Delta, DeltaError, applied, verify
from editors.methods.rome import is_conv1d
from interventions.core.atomic import atomic_folder, atomic_path
from interventions.core.errors import LesionError, short

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PREFIX = "base_model.model."


class ExportError(LesionError, ValueError):
    """A delta the target format cannot hold, or an adapter Lesion cannot read; one line, with the reason."""


def _layer(model, name: str) -> tuple[str, torch.nn.Module]:
    """``(module name, module)`` of the parameter `name`, if it is the weight of a linear layer. `model`
    is a module, or a text-to-image pipeline whose parameters are named ``unet.…``, ``text_encoder.…``."""
    module_name, _, leaf = name.rpartition(".")
    module = model
    for part in module_name.split(".") if module_name else ():
        module = getattr(module, part)
    if leaf != "weight" or not (isinstance(module, torch.nn.Linear) or is_conv1d(module)):
        raise ExportError(f"`{name}`: a LoRA adapter holds changes to linear layers' weights only; this is "
                          f"{leaf!r} of {type(module).__name__}")
    return module_name, module


def lora_factors(model: torch.nn.Module, deltas: list[Delta]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], bool]:
    """Per module name ``(lora_A [r, in], lora_B [out, r])`` adding up to the deltas' changes, and
    whether the layers are `Conv1D` (``fan_in_fan_out``)."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    conv = set()
    ids = [d.id for d in deltas]
    for delta in deltas:
        if ids.count(delta.id) > 1:
            raise ExportError(f"`deltas`: delta {delta.id[:12]} ({delta.meta.get('method')}) is given "
                              f"{ids.count(delta.id)} times; an adapter adds each delta once")
        verify(model, delta)
        if delta.dense:
            raise ExportError(f"`{sorted(delta.dense)[0]}`: a dense change (method {delta.meta.get('method')!r}); "
                              "a LoRA adapter holds low-rank factors only")
        for name, (u, v) in delta.factors.items():
            module_name, module = _layer(model, name)
            conv.add(is_conv1d(module))
            a, b = (u.T, v.T) if is_conv1d(module) else (v, u)     # Conv1D: W is [in, out]
            parts.setdefault(module_name, []).append((a, b))
    if len(conv) > 1:
        raise ExportError("`deltas`: they change both Conv1D and linear layers; one LoRA adapter takes one layout "
                          "(fan_in_fan_out); export them separately")
    factors = {m: (torch.cat([a for a, _ in p]).contiguous(), torch.cat([b for _, b in p], dim=1).contiguous())
               for m, p in parts.items()}
    return factors, conv == {True}


def adapter_config(factors: dict, fan_in_fan_out: bool, base_model: str) -> dict:
    """PEFT's LoraConfig fields for `factors`: ``lora_alpha = r`` everywhere (scaling 1)."""
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    r = max(ranks.values())
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(factors), "fan_in_fan_out": fan_in_fan_out, "lora_dropout": 0.0,
            "bias": "none", "use_rslora": False, "use_dora": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None}


def provenance(deltas: list[Delta]) -> list[dict]:
    return [{"content_sha256": d.id, "method": d.meta.get("method"), "base_model": d.meta.get("base_model"),
             "fingerprints": d.meta.get("fingerprints"), "lesion_version": d.meta.get("lesion_version")}
            for d in deltas]


#: The parts of a text-to-image pipeline a delta may change; each gets its own PEFT adapter.
PIPELINE_PARTS = ("unet", "text_encoder")


def export_peft(model, deltas: list[Delta], out: str | Path, *, base_model: str | None = None) -> Path:
    """Write `deltas` (verified against `model` first) as one PEFT LoRA adapter folder at `out`.

    For a text-to-image pipeline, one adapter per part the deltas change, in ``out/unet`` and
    ``out/text_encoder``: `PeftModel.from_pretrained(pipe.unet, out/"unet")` loads the UNet's."""
    factors, fan_in_fan_out = lora_factors(model, deltas)
    base = base_model or deltas[0].meta.get("base_model") or ""
    with atomic_folder(Path(out)) as staging:
        if not isinstance(model, torch.nn.Module):       # a pipeline: its parts are the models PEFT wraps
            for part in PIPELINE_PARTS:
                mine = {m.removeprefix(f"{part}."): f for m, f in factors.items() if m.startswith(f"{part}.")}
                if mine:
                    _write_adapter(staging / part, mine, fan_in_fan_out, f"{base}/{part}", deltas, task_type=None)
        else:
            _write_adapter(staging, factors, fan_in_fan_out, base, deltas, task_type="CAUSAL_LM")
    return Path(out)


def _write_adapter(folder: Path, factors: dict, fan_in_fan_out: bool, base: str, deltas: list[Delta], *,
                   task_type: str | None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.float().contiguous()
    config = {**adapter_config(factors, fan_in_fan_out, base), "task_type": task_type}
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    save_file(tensors, str(folder / WEIGHTS), {"format": "pt", "lesion_delta": json.dumps(provenance(deltas),
                                                                                          sort_keys=True)})


def export_diffusers(pipe, deltas: list[Delta], out: str | Path) -> Path:
    """Write text-to-image `deltas` (UNet and text-encoder layers) as LoRA weights that diffusers'
    ``StableDiffusionPipeline.load_lora_weights(out)`` loads: ``pytorch_lora_weights.safetensors`` with
    keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder.<module>…``. With no
    alphas in the file, diffusers gives every module ``alpha = rank`` (scaling 1), as exported here."""
    from safetensors.torch import save_file

    factors, fan_in_fan_out = lora_factors(pipe, deltas)
    if fan_in_fan_out:
        raise ExportError("`deltas`: Conv1D layers; a diffusers pipeline's LoRA layers are linear")
    tensors = {}
    for module, (a, b) in factors.items():
        if not module.startswith(("unet.", "text_encoder.")):
            raise ExportError(f"`{module}`: diffusers LoRA weights hold the UNet and the text encoder only")
        tensors[f"{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{module}.lora_B.weight"] = b.float().contiguous()
    with atomic_folder(Path(out)) as staging:
        save_file(tensors, str(staging / DIFFUSERS_WEIGHTS),
                  {"format": "pt", "lesion_delta": json.dumps(provenance(deltas), sort_keys=True)})
    return Path(out)


def portable_config(config: dict) -> dict:
    """`config` (a ``config.json`` as transformers 5 writes it) with the RoPE base frequencies also where
    transformers 4.x reads them: 4.x ignores ``rope_parameters`` and silently falls back to its default
    (SmolLM2's 100,000 read as 10,000). Adds top-level ``rope_theta`` (the full-attention layers') and, for
    Gemma 3, ``rope_local_base_freq`` (the sliding-window layers'); transformers 5 reads them consistently."""
    out = dict(config)
    rope = config.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    if "rope_theta" in full and "rope_theta" not in out:
        out["rope_theta"] = full["rope_theta"]
    if "rope_theta" in rope.get("sliding_attention", {}) and "rope_local_base_freq" not in out:
        out["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    return out


def export_merged(model: torch.nn.Module, tokenizer, deltas: list[Delta], out: str | Path) -> Path:
    """The whole edited model (`deltas` applied, verified first) as a Hugging Face folder, its config
    readable by transformers 4.x and 5.x (`portable_config`; the tokenizer named by a class both know);
    the model is reverted afterwards, bit for bit."""
    with applied(model, *deltas), atomic_folder(Path(out)) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config = json.loads((staging / "config.json").read_text())
        config["lesion_deltas"] = provenance(deltas)
        for key in ("text_config",):      # a VLM keeps its language model's RoPE in text_config
            if isinstance(config.get(key), dict):
                config[key] = portable_config(config[key])
        (staging / "config.json").write_text(json.dumps(portable_config(config), indent=2, sort_keys=True))
        tokenizer_config = staging / "tokenizer_config.json"
        if tokenizer_config.is_file():    # transformers 5's generic class name is unknown to 4.x
            data = json.loads(tokenizer_config.read_text())
            if data.get("tokenizer_class") == "TokenizersBackend":
                data["tokenizer_class"] = "PreTrainedTokenizerFast"
                tokenizer_config.write_text(json.dumps(data, indent=2))
    return Path(out)


#: transformers model types llama.cpp serves, and the GGUF architecture that names their tensors.
GGUF_ARCHES = {"llama": "llama", "mistral": "llama", "gemma3_text": "gemma3"}


def _gguf_arch(model) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in GGUF_ARCHES:
        raise ExportError(f"`model`: {model_type!r}; a GGUF adapter is for llama.cpp's Llama-family and Gemma 3 "
                          f"language models ({', '.join(GGUF_ARCHES)})")
    return GGUF_ARCHES[model_type]


def _write_gguf(out: Path, fill) -> Path:
    """Write a GGUF file atomically (`atomic_path`): `fill(path)` returns the writer."""
    with atomic_path(out) as tmp:
        writer = fill(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)


def export_gguf_lora(model: torch.nn.Module, deltas: list[Delta], out: str | Path) -> Path:
    """`deltas` as a llama.cpp LoRA adapter (``--lora FILE``), for a Llama-family or Gemma 3 model.

    Tensors ``blk.N.<name>.weight.lora_a`` ``[r, in]`` and ``.lora_b`` ``[out, r]`` (GGUF lists the
    dimensions reversed), named as llama.cpp names the base weights; ``adapter.lora.alpha`` is 0, which
    llama.cpp reads as scale 1 for every tensor whatever its rank."""
    import gguf

    arch = _gguf_arch(model)
    factors, _ = lora_factors(model, deltas)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)

    def fill(path):
        writer = gguf.GGUFWriter(path, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        writer.add_string("lesion.deltas", json.dumps(provenance(deltas), sort_keys=True))
        for module, (a, b) in factors.items():
            name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
            if name is None:
                raise ExportError(f"`{module}`: llama.cpp has no tensor for this layer of a {arch} model")
            writer.add_tensor(f"{name}.lora_a", a.float().numpy())
            writer.add_tensor(f"{name}.lora_b", b.float().numpy())
        return writer

    return _write_gguf(Path(out), fill)


def export_control_vector(vector, model, out: str | Path) -> Path:
    """A steering vector as a llama.cpp control vector (``--control-vector FILE``, or
    ``--control-vector-scaled FILE COEF`` for `lesion apply --steer ... --coef COEF`).

    llama.cpp adds ``direction.N`` to the residual stream after layer N (N ≥ 1) at every position,
    which is a vector at `block_output` of layer N applied to all positions (`apply_to: all`); other
    sites, and layer 0, are refused. The vector is written unscaled."""
    import gguf

    from interventions.lenses.steering import check_vector

    check_vector(model, vector)
    arch = _gguf_arch(model)
    if vector.site != "block_output":
        raise ExportError(f"`steer`: site {vector.site!r}; a llama.cpp control vector is added to the residual "
                          "stream after a layer (site 'block_output')")
    if 0 in vector.layers:
        raise ExportError("`steer`: layer 0; llama.cpp applies control vectors after layers 1 and up")

    def fill(path):
        writer = gguf.GGUFWriter(path, "controlvector")
        writer.add_string("controlvector.model_hint", arch)
        writer.add_int32("controlvector.layer_count", len(vector.layers))
        writer.add_string("lesion.steer", json.dumps({k: vector.meta.get(k) for k in ("model", "method", "site")},
                                                     sort_keys=True))
        for layer in vector.layers:
            writer.add_tensor(f"direction.{layer}", vector.vectors[layer].float().numpy())
        return writer

    return _write_gguf(Path(out), fill)


def import_peft(model: torch.nn.Module, folder: str | Path, *, base_model: str) -> Delta:
    """A Delta from a PEFT LoRA adapter on linear layers: per module ``scaling · B @ A`` as factors.
    Only what PEFT itself would load with the same meaning is taken: plain LoRA (no DoRA, no biases, no
    other tensors), each module's rank a positive integer equal to its tensors' rank, a finite alpha."""
    folder = Path(folder)
    config, tensors = _read_adapter(folder)
    params = dict(model.named_parameters())
    factors = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")]
        a, b = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        scale = _scaling(config, module, a, b)
        name = f"{module}.weight"
        if name not in params:
            raise ExportError(f"`{name}`: the adapter changes a layer this model does not have")
        _, layer = _layer(model, name)
        if is_conv1d(layer) != bool(config.get("fan_in_fan_out")):
            raise ExportError(f"`{module}`: the adapter's fan_in_fan_out is {bool(config.get('fan_in_fan_out'))}, "
                              f"but the model's layer is a {type(layer).__name__}")
        u, v = (b * scale, a) if not config.get("fan_in_fan_out") else (a.T, (b * scale).T)
        factors[name] = (u.to(params[name].dtype), v.to(params[name].dtype))
    if not factors:
        raise DeltaError(f"`adapter`: {folder} holds no LoRA weights")
    return Delta.from_factors(model, factors, method="peft-lora", base_model=base_model,
                              hyperparameters={"r": config["r"], "lora_alpha": config["lora_alpha"]})


#: The largest adapter_config.json read (PEFT's own are a few KB).
MAX_CONFIG_BYTES = 1_000_000


def _read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's config and tensors, read only from regular files (a FIFO would hang), the config within
    a size bound; every tensor must be a `lora_A` or `lora_B` weight with its partner."""
    from safetensors import safe_open

    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ExportError(f"`adapter`: {short(str(path))} is missing or not a regular file; a PEFT adapter "
                              f"folder holds {CONFIG} and {WEIGHTS}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise ExportError(f"`adapter`: {CONFIG} has {config_path.stat().st_size:,} bytes; at most "
                          f"{MAX_CONFIG_BYTES:,} are read")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        with safe_open(str(weights_path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:   # noqa: BLE001 - json, UTF-8 and safetensors each raise their own errors
        raise ExportError(f"`adapter`: {short(str(folder))} is not a PEFT adapter folder that loads "
                          f"({err.__class__.__name__}: {short(str(err), 200)})") from None
    if not isinstance(config, dict):
        raise ExportError(f"`adapter`: {CONFIG} holds {type(config).__name__}; expected a mapping (a LoraConfig)")
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("bias", "none") != "none":
        raise ExportError(f"`adapter`: {short(str(folder))} is a {short(config.get('peft_type'))} adapter"
                          f"{' with DoRA' if config.get('use_dora') else ''}"
                          f"{' with biases' if config.get('bias', 'none') != 'none' else ''}; "
                          "only plain LoRA on linear layers maps to a Delta")
    for key in tensors:
        partner = key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else key.replace(".lora_B.", ".lora_A.")
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ExportError(f"`adapter`: tensor {short(key)} is not a plain LoRA weight (a DoRA magnitude, a "
                              "bias or another module's weights would be dropped); refused")
        if partner not in tensors:
            raise ExportError(f"`adapter`: tensor {short(key)} has no partner {short(partner)}")
    return config, tensors


def _scaling(config: dict, module: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """PEFT's scaling for `module`, alpha / r (alpha / sqrt(r) with rsLoRA), once the config's rank is a
    positive integer equal to the tensors' and alpha a finite number, as PEFT's loading requires."""
    rank = (config.get("rank_pattern") or {}).get(module, config.get("r"))
    alpha = (config.get("alpha_pattern") or {}).get(module, config.get("lora_alpha"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ExportError(f"`r` (module {short(module)}): got {short(rank)}; expected a positive integer")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise ExportError(f"`r` (module {short(module)}): {rank}, but its lora_A is {tuple(a.shape)} and lora_B "
                          f"{tuple(b.shape)}; PEFT would not load these weights with this rank")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ExportError(f"`lora_alpha` (module {short(module)}): got {short(alpha)}; expected a finite number")
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
