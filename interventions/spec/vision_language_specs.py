"""The vision-language specs: `kind: trace`, `kind: patch` and `kind: edit` on a LLaVA model,
with images."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from interventions.spec.base_specs import (
    SITE_NAMES,
    TRACE_SITES,
    VLM_MODEL,
    Float,
    Int,
    Name,
    Seed,
    SpecModel,
    Text,
    VisionLanguageSpec,
    check_names,
    sites_field,
)
from interventions.spec.edit_specs import check_hyperparameters, hyperparameters_field
from interventions.spec.grid_specs import METRIC_DESCRIPTION, SITES_DESCRIPTION, GridCore


class VLMTracePrompt(SpecModel):
    """One image and a question about it: the text follows the image tokens. Without `image`, a text-only
    prompt (tokenized as a language-model prompt is)."""

    image: Text | None = Field(default=None, description="`flag:<Country>` (the testbed's synthetic flag) or an "
                               "image file; none: a text-only prompt.")
    prompt: Text = Field(description="The text after the image, e.g. ' The capital of this country is'.")
    target: Text = Field(description="The answer whose probability is traced, tokenized as written (' Paris').")
    counterfactual_image: Name | None = Field(default=None, description="For `corruption: swap`.")
    constraint: Text | None = Field(default=None, description="For `corruption: text`: the words of `prompt` whose "
                                   "token embeddings get the noise (the question's constraint, e.g. 'capital').")


class VLMPatchPrompt(SpecModel):
    """Image-to-image (and text-to-text) activation patching: states of the run on `source_image` with
    `source` are patched into the run on `image` with `base`. The two must give as many tokens."""

    image: Text = Field(description="The base run's image: `flag:<Country>` or an image file.")
    base: Text = Field(description="The base run's text after the image.")
    source_image: Text | None = Field(default=None, description="The source run's image (default: `image`).")
    source: Text | None = Field(default=None, description="The source run's text (default: `base`).")
    target: Text | None = Field(default=None, description="Token whose metric is read; default: the source's top-1.")
    counterfactual_target: Text | None = Field(default=None, description="For `logit_diff`; default: the base's "
                                               "top-1.")


_IMAGE_CELLS = Field(
    default="both", description="Restore each image token on its own (`each`: the per-patch heatmap), all "
    "image tokens at once (`block`: the aggregated cell; cheap with 576 image tokens), or `both`. Text "
    "positions are always one column each.")


class _VLMGrid(GridCore, VisionLanguageSpec):
    model: Name = Field(default=VLM_MODEL, description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.")
    image_cells: Literal["each", "block", "both"] = _IMAGE_CELLS
    vision_layers: Literal["all"] | tuple[Int, ...] = Field(
        default="all", description="The vision tower's layers for `vision_sites` (`all`, or indices; negative from "
        "the end).")


class VLMTraceSpec(_VLMGrid):
    """Causal tracing in a vision-language model: corrupt the image (noise on its tokens, or a
    counterfactual image) or the text constraint (noise on its token embeddings), and restore the
    language model's states over image and text positions. Runs on the same engine as `TraceSpec`."""

    kind: Literal["trace"] = "trace"
    prompts: tuple[VLMTracePrompt, ...] = Field(min_length=1, description=(
        "Each an image (or none) and the text after it, with the answer traced."))
    corruption: Literal["noise", "swap", "text", "patch_noise"] = Field(default="noise", description=(
        "How the run is corrupted: Gaussian `noise` on the image tokens, a `swap` to "
        "`counterfactual_image`, `text`: noise on the `constraint` words, or `patch_noise`: noise on the vision "
        "tower's patch embeddings (before the tower; CLS keeps its own)."))
    noise: Float = Field(default=3.0, gt=0, description="In units of `sigma`.")
    sigma: Float | None = Field(default=None, gt=0, description="Default: the std, over all prompts, of the clean "
                                "image tokens (`noise`), of the constraint's token embeddings (`text`), or of the patch "
                                "embeddings (`patch_noise`).")
    samples: Int = Field(default=10, ge=1, description="Noise draws per cell (1 is used for `swap`).")
    seed: Seed = Field(default=0, description="Seeds every random draw (noise, sampling, splits).")
    sites: tuple[str, ...] = sites_field(("hidden", "mlp", "attention"), TRACE_SITES,
                                         description=SITES_DESCRIPTION)
    window: Int = Field(default=10, ge=1, description="Layers restored together for `mlp` and `attention`.")
    vision_sites: tuple[str, ...] = Field(default=(), description=(
        "Grids inside the vision tower (`hidden`, `mlp`, `attention`; named `vision_hidden`, ...): its layers × CLS "
        "and each patch, run in one plan with the language model's grids. Needs `corruption: patch_noise` or `swap`."),
        json_schema_extra={"items": {"type": "string", "enum": list(TRACE_SITES)}, "uniqueItems": True})

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return check_names(v, tuple(TRACE_SITES))

    @field_validator("vision_sites")
    @classmethod
    def _vision_sites(cls, v):
        return check_names(v, tuple(TRACE_SITES))

    @model_validator(mode="after")
    def _corruption_inputs(self):
        if self.vision_sites and self.corruption not in ("patch_noise", "swap"):
            raise ValueError(f"`vision_sites` need the image corrupted before the tower: `corruption: patch_noise` or "
                             f"`swap`, got {self.corruption!r}")
        for i, p in enumerate(self.prompts):
            if self.corruption in ("noise", "swap", "patch_noise") and p.image is None:
                raise ValueError(f"`corruption: {self.corruption}` corrupts the image: `prompts[{i}]` needs an "
                                 "`image` (or use `corruption: text`)")
            if self.corruption == "swap" and p.counterfactual_image is None:
                raise ValueError(f"`corruption: swap` needs `prompts[{i}].counterfactual_image`")
            if self.corruption == "text" and (p.constraint is None or p.constraint not in p.prompt):
                raise ValueError(f"`corruption: text` needs `prompts[{i}].constraint`: words of the prompt "
                                 f"{p.prompt!r}, got {p.constraint!r}")
        return self


#: The sites a VLM patch may restore: the language model's, except the embedding lookup, which a VLM
#: prompt's image tokens do not pass through (`block_input` at layer 0 is the embeddings it receives).
VLM_PATCH_SITES = tuple(s for s in SITE_NAMES if s != "embed")


class VLMPatchSpec(_VLMGrid):
    """Activation patching in a vision-language model: copy states of the source run (another image,
    or another question) into the base run, one cell at a time. Runs on the same engine as `PatchSpec`."""

    kind: Literal["patch"] = "patch"
    prompts: tuple[VLMPatchPrompt, ...] = Field(min_length=1, description=(
        "Each a base run (image, text) and a source run whose states are patched in."))
    sites: tuple[str, ...] = sites_field(("block_output",), VLM_PATCH_SITES, description=SITES_DESCRIPTION)
    metric: Literal["prob", "logit_diff", "kl"] = Field(default="prob", description=METRIC_DESCRIPTION)
    vision_sites: tuple[str, ...] = Field(default=(), description=(
        "Grids inside the vision tower (its sites of these names; grids `vision_block_output`, ...): its layers × CLS "
        "and each patch, run in one plan with the language model's grids."),
        json_schema_extra={"items": {"type": "string", "enum": list(VLM_PATCH_SITES)}, "uniqueItems": True})

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return check_names(v, VLM_PATCH_SITES)

    @field_validator("vision_sites")
    @classmethod
    def _vision_sites(cls, v):
        return check_names(v, VLM_PATCH_SITES)


class VLMLocateSpec(SpecModel):
    """How a VLM edit's `layer: auto` is found: an image-noise trace of the edit questions (answer:
    `target_true`), MLP windows restored at all image tokens at once; the layer whose window
    restores the most."""

    window: Int = Field(default=10, ge=1, description="MLP layers restored together around each layer.")
    samples: Int = Field(default=5, ge=1)
    noise: Float = Field(default=3.0, gt=0)
    seed: Seed = 0


class VLMEditSpec(VisionLanguageSpec):
    """ROME in a vision-language model with the key read at the image tokens: questions about
    `image` get `target_new`; written as a Delta, with efficacy, paraphrase and other-image metrics."""

    kind: Literal["edit"] = "edit"
    model: Name = Field(default=VLM_MODEL, description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.")
    method: Literal["rome"] = Field(default="rome", description=(
        "ROME, keyed at the image tokens (the only method for a vision-language edit)."))
    layer: Int | Literal["auto"] = Field(description="The LM's MLP layer whose output projection is edited, or "
                                         "`auto` (from an image-noise trace; needs `target_true`).")
    image: Text = Field(description="`flag:<Country>` or an image file: the subject of the edit.")
    questions: tuple[Text, ...] = Field(min_length=1, description="The text after the image that the edit answers "
                                       "with `target_new`; k* is the mean key over their image tokens.")
    target_new: Text = Field(description="The new answer, tokenized as written (' Rome').")
    target_true: Text | None = Field(default=None, description="The answer before the edit (reported; the trace "
                                    "target of `layer: auto`).")
    paraphrases: tuple[Text, ...] = Field(default=(), description="Held-out questions about the same image "
                                         "(generalisation; never used by the edit).")
    other_images: tuple[Name, ...] = Field(default=(), description="Other images whose top-1 answers to the "
                                          "questions and paraphrases should not change (specificity).")
    kl_prompt: Text = Field(default=" This is a picture of", description="Text after the image "
                           "whose next-token distribution v*'s KL term keeps where it was.")
    locate: VLMLocateSpec = Field(default_factory=VLMLocateSpec, description="The trace behind `layer: auto`.")
    hyperparameters: dict[str, Int | Float] = hyperparameters_field("rome")
    corpus: tuple[Name, ...] = Field(
        default=(), description="Text files for the key statistics; empty: text sampled from the model itself.")
    mom2_tokens: Int = Field(default=20_000, ge=100, description=(
        "Tokens of text behind the key statistics C (the second moment of the edited layer's keys)."))
    image_corpus: tuple[Name, ...] = Field(
        default=(), description="Images whose image-token keys join the key statistics: C = C_text + "
        "`image_corpus_weight` × C_images. Image files, folders of them, `flag:<Country>@<seed>` or `flag:*@<seed>` "
        "(every testbed flag, jittered). Empty: text statistics only, as ROME.")
    image_corpus_weight: Float = Field(default=1.0, ge=0, description=(
        "Weight of the image-token keys of `image_corpus` added to C."))

    @field_validator("hyperparameters")
    @classmethod
    def _hyperparameters(cls, v):
        return check_hyperparameters("rome", v)

    @model_validator(mode="after")
    def _auto_needs_truth(self):
        if self.layer == "auto" and self.target_true is None:
            raise ValueError("`layer: auto` needs `target_true` (the answer the locating trace follows)")
        if self.layer != "auto" and self.layer < 0:
            raise ValueError(f"`layer` must be a non-negative integer or 'auto', got {self.layer}")
        return self
