"""Feature dictionaries (sparse autoencoders) over one site of a model, in SAELens's on-disk format.

A dictionary maps a state ``x`` (``Float[Tensor, "... d_in"]``) to sparse feature activations and back:

    f = act((x - b_dec · apply_b_dec_to_input) W_enc + b_enc)        W_enc: [d_in, d_sae]
    x̂ = f W_dec + b_dec                                              W_dec: [d_sae, d_in]

with ``act`` one of SAELens's architectures: ``standard`` (ReLU), ``topk`` (the k largest
pre-activations, ReLU'd, the rest zero; Gao et al. 2024) and ``jumprelu`` (ReLU where the
pre-activation exceeds a per-feature ``threshold``; Gemma Scope). An intervention changes the
features and keeps the reconstruction error: ``x' = x + (f' - f) W_dec``, so a change that
changes nothing leaves ``x`` bit for bit (`Dictionary.edit`).

On disk (SAELens 6): a folder with ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``dtype``,
``device``, ``apply_b_dec_to_input``, ``normalize_activations: none``, ``k`` for TopK, and
``metadata`` with ``hook_name`` such as ``blocks.6.hook_resid_post``) and ``sae_weights.safetensors``
(``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, and ``threshold`` for JumpReLU). SAELens's
``SAE.load_from_disk`` reads what `Dictionary.save` writes; `load_dictionary` reads SAELens folders
made elsewhere too. Lesion adds its seal (content and integrity hashes) to the weights' safetensors
metadata, which SAELens ignores; a sealed file is checked against it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from interventions.core.atomic import atomic_folder
from interventions.core.errors import SpecError, short
from interventions.core.reading import read_json, read_safetensors
from interventions.core.tagged import broken_seal, seal

ARCHITECTURES = ("standard", "topk", "jumprelu")
CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
#: Lesion's site names and the TransformerLens hook names SAELens files use for them.
HOOKS = {"block_output": "hook_resid_post", "block_input": "hook_resid_pre", "mlp_output": "hook_mlp_out",
         "attention_output": "hook_attn_out"}
#: The largest dictionary Lesion reads (features × width), so a header cannot ask for terabytes.
MAX_PARAMETERS = 2_000_000_000


@dataclass(frozen=True)
class Where:
    """Where a dictionary reads: a Lesion site at a layer (or at the VLM's image positions, or a
    text-to-image conditioning site), and the model it was trained on."""

    site: str
    layer: int | None
    model: str = ""

    @property
    def hook_name(self) -> str:
        hook = HOOKS.get(self.site, self.site)
        return f"blocks.{self.layer}.{hook}" if self.layer is not None else hook

    @classmethod
    def from_hook_name(cls, name: str, model: str = "") -> "Where":
        m = re.fullmatch(r"blocks\.(\d+)\.(\w+)", name)
        if m and m.group(2) in HOOKS.values():
            site = next(s for s, h in HOOKS.items() if h == m.group(2))
            return cls(site, int(m.group(1)), model)
        return cls(name, None, model)


class Dictionary(nn.Module):
    """A sparse autoencoder at one site; see the module docstring."""

    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", *, k: int | None = None,
                 apply_b_dec_to_input: bool = True, where: Where | None = None, meta: dict | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {architecture!r}; expected one of {ARCHITECTURES}")
        self.d_in, self.d_sae, self.architecture, self.k = d_in, d_sae, architecture, k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.where = where or Where("block_output", None)
        self.meta = dict(meta or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "topk":
            values, index = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, index, values.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``Float[Tensor, "... d_sae"]`` feature activations of states ``Float[Tensor, "... d_in"]``."""
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x̂ (without the error term)."""
        return self.decode(self.encode(x))

    def edit(self, x: torch.Tensor, change) -> torch.Tensor:
        """``x + (change(f) - f) W_dec`` in `x`'s dtype: the features changed, the error kept. When
        `change` returns `f` unchanged the result is `x` itself (bit for bit)."""
        f = self.encode(x)
        new = change(f)
        if new is f:
            return x
        return x + ((new - f) @ self.W_dec).to(x.dtype)

    # ------------------------------------------------------------------ SAELens format
    def config(self, dtype: str = "float32") -> dict:
        cfg = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": dtype,
               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "none",
               "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0",
                            "model_name": self.where.model, "hook_name": self.where.hook_name,
                            "lesion": {"site": self.where.site, "layer": self.where.layer, **self.meta}}}
        if self.architecture == "topk":
            cfg.update(k=self.k, rescale_acts_by_decoder_norm=False)
        return cfg

    def tensors(self, dtype: str = "float32") -> dict[str, torch.Tensor]:
        return {k: v.detach().to(getattr(torch, dtype)).contiguous().cpu() for k, v in self.state_dict().items()}

    def save(self, folder: str | Path, dtype: str = "float32") -> Path:
        """Write the SAELens folder atomically (``cfg.json`` and the sealed weights), the weights stored as
        `dtype` (``float32`` or ``float16``: half the size; Lesion computes in float32 either way)."""
        from safetensors.torch import save_file

        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype: {dtype!r}; expected 'float32' or 'float16'")
        tensors = self.tensors(dtype)
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise SpecError("dictionary", str(folder), "finite weights (training diverged: nan or inf)")
        with atomic_folder(folder) as staging:
            (staging / CONFIG).write_text(json.dumps(self.config(dtype), indent=1))
            save_file(tensors, str(staging / WEIGHTS), {"lesion_dictionary": json.dumps(seal({}, tensors))})
        return Path(folder)


def load_dictionary(folder: str | Path, field: str = "dictionary") -> Dictionary:
    """A SAELens folder (Lesion's or one made elsewhere), checked: a known architecture without
    activation normalisation, weights of the shapes the config states, finite; a Lesion seal if any."""
    folder = Path(folder).expanduser()
    what = f"a SAELens dictionary folder ({CONFIG} and {WEIGHTS})"
    cfg = read_json(folder / CONFIG, field, what)
    d_in, d_sae, arch = _config_fields(cfg, folder, field)
    tensors, sealed = _read_weights(folder / WEIGHTS, field, what)
    if sealed is not None:
        broken = broken_seal(sealed, tensors)
        if broken:
            raise SpecError(field, str(folder), f"{what} as Lesion wrote it; {broken}")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    lesion = meta.get("lesion") if isinstance(meta.get("lesion"), dict) else {}
    where = (Where(lesion["site"], lesion.get("layer"), str(meta.get("model_name") or ""))
             if isinstance(lesion.get("site"), str) else Where.from_hook_name(str(meta.get("hook_name") or ""),
                                                                               str(meta.get("model_name") or "")))
    dictionary = Dictionary(d_in, d_sae, arch, k=cfg.get("k"), apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
                            where=where, meta={k: v for k, v in lesion.items() if k not in ("site", "layer")})
    expected = {name: tuple(p.shape) for name, p in dictionary.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:
        raise SpecError(field, str(folder), f"{what} whose tensors match its config: expected {expected}, got {got}")
    if not all(t.is_floating_point() and bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise SpecError(field, str(folder), f"{what} with finite floating-point weights")
    dictionary.load_state_dict({k: v.float() for k, v in tensors.items()})
    return dictionary.eval()


def _config_fields(cfg, folder: Path, field: str) -> tuple[int, int, str]:
    if not isinstance(cfg, dict):
        raise SpecError(field, str(folder), f"a {CONFIG} holding a JSON object")
    arch, d_in, d_sae = cfg.get("architecture", "standard"), cfg.get("d_in"), cfg.get("d_sae")
    if arch not in ARCHITECTURES:
        raise SpecError(field, str(folder), f"an architecture Lesion applies ({', '.join(ARCHITECTURES)}); "
                        f"{CONFIG} says {short(arch)}")
    if not all(type(n) is int and n > 0 for n in (d_in, d_sae)) or d_in * d_sae > MAX_PARAMETERS:
        raise SpecError(field, str(folder), f"positive integers d_in and d_sae, d_in × d_sae at most "
                        f"{MAX_PARAMETERS:,}; {CONFIG} says d_in {short(d_in)}, d_sae {short(d_sae)}")
    if arch == "topk" and not (type(cfg.get("k")) is int and 1 <= cfg["k"] <= d_sae):
        raise SpecError(field, str(folder), f"a TopK k in [1, d_sae]; {CONFIG} says k {short(cfg.get('k'))}")
    if cfg.get("normalize_activations", "none") != "none" or cfg.get("reshape_activations", "none") != "none" \
            or cfg.get("rescale_acts_by_decoder_norm", False) is not False:
        raise SpecError(field, str(folder), "a dictionary without activation normalisation, reshaping or decoder-"
                        "norm rescaling (normalize_activations: none)")
    cfg.setdefault("apply_b_dec_to_input", True)
    if not isinstance(cfg["apply_b_dec_to_input"], bool):
        raise SpecError(field, str(folder), f"apply_b_dec_to_input true or false in {CONFIG}")
    return d_in, d_sae, arch


def _read_weights(path: Path, field: str, what: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    meta, tensors = read_safetensors(path, field, what)
    raw = meta.get("lesion_dictionary")
    if raw is None:
        return tensors, None
    try:
        sealed = json.loads(raw)
    except ValueError:
        sealed = None
    if not isinstance(sealed, dict):
        raise SpecError(field, str(path), f"{what}; its `lesion_dictionary` metadata is not a JSON object")
    return tensors, sealed
