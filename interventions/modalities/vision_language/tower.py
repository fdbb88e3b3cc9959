"""Grids that reach from a VLM's first vision layer, through the projector, into its language model.

`ImageToAnswer` runs a LLaVA model from an image's patch embeddings: its input sequence is the tower's (CLS
and the patches, `towers.patch_sequence`), and its `context` is the text's token ids (``[lead] <image>×n
question``). It runs the tower's own modules (pre-norm, encoder layers), picks the feature layer and drops
CLS as the model's config says, projects, puts the features in place of the image tokens and runs the
language model: the answer's logits equal ``LlavaForConditionalGeneration``'s own (a test checks it). Its
sites (`interventions.models.sites.LLAVA_IMAGE`) are the tower's (``vision_*``, positions CLS and patches) and
the language model's (positions its tokens: the context's). The projector's output is the language model's
layer-0 input at the image tokens (``block_input`` at layer 0).

A spec uses it when it names `vision_sites`, or corrupts with `patch_noise` (noise on the patch embeddings,
before the tower); otherwise a VLM grid runs on merged embeddings as before
(`interventions.modalities.vision_language.llava.vlm_prompts`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from interventions.core.conventions import answer_id, pixels_identity
from interventions.core.errors import SpecError
from interventions.core.prompts import check_aligned
from interventions.engine.plan import Prompt
from interventions.modalities.towers import patch_columns, patch_sequence
from interventions.modalities.vision_language.llava import (
    image_columns,
    image_positions,
    image_prompt,
    load_image,
    vlm_prompts,
)


@dataclass
class Output:
    logits: torch.Tensor


class ImageToAnswer(nn.Module):
    """A LLaVA model as one function of an image's patch embeddings, given the text (see the module)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm
        self.patches = nn.Identity()            # the `embed` site: the patch embeddings, where patch noise is added
        self.config = copy.copy(vlm.config)
        self.config.model_type = "llava_image"

    @property
    def device(self) -> torch.device:
        return self.vlm.device

    @property
    def tower(self):
        return self.vlm.model.vision_tower

    def get_input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.vlm.get_output_embeddings()

    @torch.no_grad()
    def patch_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(n, 1 + patches, d_vision)``: the tower's input sequence for ``pixels (n, 3, H, W)``."""
        weight = self.tower.embeddings.patch_embedding.weight
        return self.tower.embeddings(pixels.to(weight.device, weight.dtype))

    def image_features(self, embeds: torch.Tensor, feature_layer: int | None = None) -> torch.Tensor:
        """``(n, image tokens, d_text)``: the projected features, as the model's own `get_image_features` makes them;
        `feature_layer`: read the tower's states after that layer instead of the configured one (the tower lens)."""
        h = self.tower.pre_layrnorm(self.patches(embeds))
        hidden = [h]
        for layer in self.tower.encoder.layers:
            h = layer(h, None)
            hidden.append(h)
        cfg = self.vlm.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise SpecError("model", cfg.vision_feature_layer, "a LLaVA model reading one vision feature layer")
        chosen = hidden[cfg.vision_feature_layer if feature_layer is None else feature_layer + 1]
        if cfg.vision_feature_select_strategy == "default":
            chosen = chosen[:, 1:]
        return self.vlm.model.multi_modal_projector(chosen)

    def forward(self, inputs_embeds: torch.Tensor, context_ids: torch.Tensor, context_mask: torch.Tensor,
                attention_mask: torch.Tensor | None = None, feature_layer: int | None = None, **_) -> Output:
        """The answer's logits ``(batch, positions, vocab)``, the same at every position of the image sequence (the
        engine reads a row's last): the next-token logits after each row's last text token."""
        features = self.image_features(inputs_embeds, feature_layer)
        text = self.vlm.get_input_embeddings()(context_ids)
        where = (context_ids == self.vlm.config.image_token_id)[..., None].expand_as(text)
        text = text.masked_scatter(where, features.to(text.dtype))
        out = self.vlm.model.language_model(inputs_embeds=text, attention_mask=context_mask, use_cache=False)
        rows = torch.arange(len(text), device=text.device)
        logits = self.vlm.lm_head(out.last_hidden_state[rows, context_mask.sum(1) - 1])
        return Output(logits[:, None].expand(-1, inputs_embeds.shape[1], -1))


def uses_tower(spec) -> bool:
    """Whether a VLM grid spec reaches into the vision tower: it names `vision_sites` or corrupts the patches."""
    return bool(getattr(spec, "vision_sites", ())) or getattr(spec, "corruption", None) == "patch_noise"


def runnable(spec, vlm, tokenizer):
    """The engine's model for a VLM spec: `ImageToAnswer` around the LLaVA model when the spec uses the tower."""
    if uses_tower(spec) and not isinstance(vlm, ImageToAnswer):
        return ImageToAnswer(vlm).eval(), tokenizer
    return vlm, tokenizer


def vision_language_prompts(spec, model, tokenizer, processor=None) -> list[Prompt]:
    """The engine's prompts for a VLM trace or patch: over the image's patches and its text (`ImageToAnswer`), or
    over merged embeddings (`llava.vlm_prompts`)."""
    if not isinstance(model, ImageToAnswer):
        return vlm_prompts(spec, model, tokenizer, processor)
    return [_tower_prompt(spec, model, tokenizer, processor, i, p) for i, p in enumerate(spec.prompts)]


vision_language_prompts.modality = "vision-language"


def _tower_prompt(spec, model: ImageToAnswer, tokenizer, processor, i: int, p) -> Prompt:
    where = f"prompts[{i}]"
    vlm, config = model.vlm, model.vlm.config.vision_config
    if p.image is None:
        raise SpecError(f"{where}.image", None, "an image: vision-tower grids need one on every prompt")

    def sequence(ref, field, text):
        pixels = load_image(ref, vlm, processor, field=field)
        ids = tuple(image_prompt(tokenizer, vlm, text))
        return patch_sequence(text, config, model.patch_embeddings(pixels[None])[0], ids), pixels

    if spec.kind == "trace":
        source, pixels = sequence(p.image, f"{where}.image", p.prompt)
        base = source
        if spec.corruption == "swap":
            base = sequence(p.counterfactual_image, f"{where}.counterfactual_image", p.prompt)[0]
        target, counterfactual = answer_id(tokenizer, p.target, field=f"{where}.target"), None
        identity = (p.prompt, source.subject, pixels_identity(pixels))
        record = {"label": p.image, "target": p.target, "corruption": spec.corruption,
                  "counterfactual_image": p.counterfactual_image}
    else:
        base, _ = sequence(p.image, f"{where}.image", p.base)
        source, _ = sequence(p.source_image or p.image, f"{where}.source_image",
                             p.source if p.source is not None else p.base)
        check_aligned(*(replace(e, ids=e.context, tokens=tuple(tokenizer.decode([t]) for t in e.context))
                        for e in (base, source)), f"{where}.source")
        target = None if p.target is None else answer_id(tokenizer, p.target, field=f"{where}.target")
        counterfactual = None if p.counterfactual_target is None else answer_id(
            tokenizer, p.counterfactual_target, field=f"{where}.counterfactual_target")
        identity, record = (), {"label": p.image, "source_image": p.source_image or p.image}
    tokens = tuple(tokenizer.decode([t]) for t in base.context)
    img = image_positions(list(base.context), vlm)
    columns, context_columns = patch_columns(base.tokens, spec.image_cells), image_columns(tokens, img, spec.image_cells)
    record.update(image_positions=img, patch_positions=list(base.subject), context_tokens=list(tokens),
                  image_column=_block(context_columns), patch_column=_block(columns))
    return Prompt(base, source, columns, target_id=target, counterfactual_id=counterfactual, identity=identity,
                  record=record, context_columns=context_columns)


def _block(columns) -> int | None:
    return next((c for c, (_, pos) in enumerate(columns) if len(pos) > 1), None)


@torch.no_grad()
def tower_lens(spec, vlm, tokenizer, processor=None):
    """`kind: lens` with `tower: true`: for each tower layer, its patch states go to the projector in place of the
    feature layer's and the language model answers; grids ``tower_lens`` (p(target)) and ``tower_lens_rank``,
    ``Float[Tensor, "prompt layer 1"]``, with the top-k answers per layer. The feature layer's own row is the model."""
    from interventions.engine.result import Grid, Result

    model = ImageToAnswer(vlm).eval()
    n = len(model.tower.encoder.layers)
    values, ranks, records = torch.zeros(len(spec.prompts), n, 1), torch.zeros(len(spec.prompts), n, 1), []
    for i, p in enumerate(spec.prompts):
        if p.image is None:
            raise SpecError(f"prompts[{i}].image", None, "an image: the tower lens reads the vision tower")
        pixels = load_image(p.image, vlm, processor, field=f"prompts[{i}].image")
        ids = torch.tensor([image_prompt(tokenizer, vlm, p.prompt)], device=model.device)
        embeds = model.patch_embeddings(pixels[None])
        final = model(embeds, ids, torch.ones_like(ids)).logits[0, -1].float().log_softmax(-1)
        target = answer_id(tokenizer, p.target, field=f"prompts[{i}].target") if p.target else int(final.argmax())
        top = []
        for layer in range(n):
            logp = model(embeds, ids, torch.ones_like(ids), feature_layer=layer).logits[0, -1].float().log_softmax(-1)
            values[i, layer, 0], ranks[i, layer, 0] = logp[target].exp(), (logp > logp[target]).sum()
            best = logp.topk(spec.top_k)
            top.append([[[tokenizer.decode([int(t)]), round(float(v.exp()), 4)]          # one column: the answer
                         for t, v in zip(best.indices, best.values)]])
        top1 = (ranks[i, :, 0] == 0).tolist()
        settled = next((k for k in range(n) if all(top1[k:])), None)
        records.append({"prompt": p.prompt, "image": p.image, "target": tokenizer.decode([target]), "target_id": target,
                        "answer": tokenizer.decode([int(final.argmax())]), "clean_prob": float(final[target].exp()),
                        "columns": ["answer"], "positions": [len(ids[0]) - 1], "tower_lens_top_k": top,
                        "tower_lens_first_top1_layer": next((k for k, t in enumerate(top1) if t), None),
                        "tower_lens_settled_layer": settled})
    grids = {"tower_lens": Grid("tower_lens", "vision_block_output", "prob", list(range(n)), values, [1] * len(records)),
             "tower_lens_rank": Grid("tower_lens_rank", "vision_block_output", "rank", list(range(n)), ranks,
                                     [1] * len(records))}
    return Result("lens", spec.model, spec, records, grids, {"layers": list(range(n)), "top_k": spec.top_k,
                                                              "reader": "tower"})
