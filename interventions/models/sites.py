"""Site tables: one small table per model family mapping site names to module paths.

Algorithm code asks for ``table.component("mlp_output", 5)`` and never spells a
module path itself. Paths are pyvene raw component strings, so they compile
directly into `IntervenableModel` configs.

>>> LLAMA.component("mlp_output", 5)
'model.layers[5].mlp.output'
>>> LLAMA.component("mlp_key", 2)
'model.layers[2].mlp.down_proj.input'
>>> GPT2.component("embed")
'transformer.wte.output'
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from interventions.core.errors import SpecError, one_of, suggest


@dataclass(frozen=True)
class SiteTable:
    """Where each site lives in one model family.

    `sites` maps a name to ``(module path template, "input" | "output")``;
    ``{}`` in a template is the layer index. `causal`: whether a position sees only the positions before
    it (a decoder; not an image encoder). `noise_at`: the node where prompts that run as embeddings get
    their noise, which is the tensor they enter with. `context_sites` index a prompt's second sequence (its
    `context`: a VLM's text, when the prompt is its image's patches), whose layers are `context_layers`.
    `mlp_in_residual`: whether `mlp_output` is added to the residual stream as it is (not behind a norm).
    """

    family: str
    layers: str
    sites: dict[str, tuple[str, str]] = field(default_factory=dict)
    final_norm: str = "model.norm"     # the norm between the last block and the unembedding
    causal: bool = True
    noise_at: tuple[str, int | None] = ("block_input", 0)
    context_layers: str | None = None
    context_sites: frozenset[str] = frozenset()
    mlp_in_residual: bool = True     # `mlp_output` is what the block adds to the residual stream (no norm between)

    def is_layer_output(self, site: str) -> bool:
        """Whether `site` is the output of a layer of `layers` itself (the residual stream after it)."""
        return self.sites.get(site) == (self.layers + "[{}]", "output")

    def in_context(self, site: str) -> bool:
        """Whether `site`'s positions index the prompt's context sequence."""
        return site in self.context_sites

    def component(self, site: str, layer: int | None = None) -> str:
        """The pyvene component string of `site` at `layer`."""
        if site not in self.sites:
            raise SpecError("sites", site, f"{one_of(site, self.sites)} for the {self.family} family")
        template, hook = self.sites[site]
        path = template.format(layer) if "{}" in template else template
        return f"{path}.{hook}"

    def is_layered(self, site: str) -> bool:
        return "{}" in self.sites[site][0]

    def module(self, model: torch.nn.Module, site: str, layer: int | None = None) -> torch.nn.Module:
        """The module whose input or output `site` names."""
        return get_module(model, self.component(site, layer).rsplit(".", 1)[0])

    def num_layers(self, model: torch.nn.Module, site: str | None = None) -> int:
        """The layers of the model's (primary) sequence, or of the sequence `site` indexes."""
        return len(get_module(model, self.context_layers if site and self.in_context(site) else self.layers))

    def readout(self, model: torch.nn.Module):
        """``h -> logits``: the model's own final norm, unembedding and (Gemma) logit soft-capping, applied
        to a residual state (the logit lens). On the last block's output it gives the model's logits."""
        norm, head = get_module(model, self.final_norm), model.get_output_embeddings()
        config = getattr(model.config, "text_config", model.config)
        cap = getattr(config, "final_logit_softcapping", None)

        def logits(h: torch.Tensor) -> torch.Tensor:
            out = head(norm(h))
            return out if cap is None else torch.tanh(out / cap) * cap
        return logits


_PART = re.compile(r"([A-Za-z_][A-Za-z_0-9]*)((?:\[\d+\])*)")


@contextmanager
def layers_through(model: torch.nn.Module, table: "SiteTable", last: int):
    """Within the block, `model` runs its decoder layers 0..`last` only (the final norm and head then read
    layer `last`'s output): what collects states up to `last` need not compute the layers after it. The
    layer list is restored on exit; the layer modules themselves are the same objects."""
    parent_path, _, name = table.layers.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    full = getattr(parent, name)
    setattr(parent, name, torch.nn.ModuleList(list(full)[:last + 1]))
    try:
        yield
    finally:
        setattr(parent, name, full)


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Resolve ``"model.layers[3].mlp"`` against `model`."""
    obj = model
    for part in path.split("."):
        m = _PART.fullmatch(part)
        if m is None:
            raise LookupError(f"malformed module path {path!r} at {part!r}")
        obj = getattr(obj, m.group(1))
        for idx in re.findall(r"\[(\d+)\]", m.group(2)):
            obj = obj[int(idx)]
    return obj


_DECODER = {
    "embed": ("model.embed_tokens", "output"),
    "block_input": ("model.layers[{}]", "input"),
    "block_output": ("model.layers[{}]", "output"),
    "mlp_output": ("model.layers[{}].mlp", "output"),
    "attention_output": ("model.layers[{}].self_attn", "output"),
    "mlp_key": ("model.layers[{}].mlp.down_proj", "input"),
}

GPT2 = SiteTable("gpt2", "transformer.h", {
    "embed": ("transformer.wte", "output"),
    "block_input": ("transformer.h[{}]", "input"),
    "block_output": ("transformer.h[{}]", "output"),
    "mlp_output": ("transformer.h[{}].mlp", "output"),
    "attention_output": ("transformer.h[{}].attn", "output"),
    "mlp_key": ("transformer.h[{}].mlp.c_proj", "input"),
}, final_norm="transformer.ln_f")
LLAMA = SiteTable("llama", "model.layers", dict(_DECODER))
# Gemma 3 scales its embeddings inside the embedding module, so `embed` is the scaled value;
# `mlp_output` is the MLP before the post-feed-forward norm.
GEMMA3 = SiteTable("gemma3", "model.layers", dict(_DECODER), mlp_in_residual=False)

# LLaVA (transformers 5 paths): the language model's decoder sites, the vision tower and the projector.
_LM = "model.language_model"
LLAVA = SiteTable("llava", f"{_LM}.layers", {
    **{name: (path.replace("model.", f"{_LM}.", 1), hook) for name, (path, hook) in _DECODER.items()},
    "vision_block_output": ("model.vision_tower.encoder.layers[{}]", "output"),
    "projector_output": ("model.multi_modal_projector", "output"),
}, final_norm=f"{_LM}.norm")

# A CLIP image tower inside `interventions.modalities.contrastive.clip.ZeroShot`: its input is the patch
# embeddings (CLS first), `embed` the identity they pass through; the encoder is bidirectional.
_VIT = "clip.vision_model.encoder.layers[{}]"
CLIP = SiteTable("clip", "clip.vision_model.encoder.layers", {
    "embed": ("patches", "output"),
    "block_input": (_VIT, "input"),
    "block_output": (_VIT, "output"),
    "mlp_output": (_VIT + ".mlp", "output"),
    "attention_output": (_VIT + ".self_attn", "output"),
    "mlp_key": (_VIT + ".mlp.fc2", "input"),
}, final_norm="clip.vision_model.post_layernorm", causal=False, noise_at=("embed", None))

# A LLaVA model run from its image's patch embeddings (`interventions.modalities.vision_language.tower.ImageToAnswer`):
# the sequence is the tower's (CLS and patches; `vision_*` sites), the language model's sites index the text, its context.
_TOWER = "vlm.model.vision_tower.encoder.layers[{}]"
_TEXT = {name: (path.replace("model.", "vlm.model.language_model.", 1), hook)
         for name, (path, hook) in _DECODER.items() if name != "embed"}
LLAVA_IMAGE = SiteTable("llava-image", "vlm.model.vision_tower.encoder.layers", {
    "embed": ("patches", "output"),
    "vision_block_input": (_TOWER, "input"),
    "vision_block_output": (_TOWER, "output"),
    "vision_mlp_output": (_TOWER + ".mlp", "output"),
    "vision_attention_output": (_TOWER + ".self_attn", "output"),
    "vision_mlp_key": (_TOWER + ".mlp.fc2", "input"),
    **_TEXT,
}, final_norm="vlm.model.language_model.norm", causal=False, noise_at=("embed", None),
    context_layers="vlm.model.language_model.layers", context_sites=frozenset(_TEXT))

FAMILIES: dict[str, SiteTable] = {t.family: t for t in (GPT2, LLAMA, GEMMA3, LLAVA, CLIP, LLAVA_IMAGE)}
#: transformers `config.model_type` -> family
MODEL_TYPES = {
    "gpt2": "gpt2",
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "olmo": "llama",
    "gemma3_text": "gemma3",
    "llava": "llava",
    "clip_zero_shot": "clip",
    "llava_image": "llava-image",
}


def site_table(model: torch.nn.Module) -> SiteTable:
    """The site table for `model`, from its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        known = ", ".join(f"{t} ({f})" for t, f in MODEL_TYPES.items())
        raise SpecError("model", model_type,
                        f"a model type with a site table: {known}{suggest(model_type or '', MODEL_TYPES)}")
    return FAMILIES[MODEL_TYPES[model_type]]
