"""The text-to-image specs: `kind: trace`, `kind: erase`, `kind: apply` and `kind: daam` on a
diffusers pipeline."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from interventions.spec.base_specs import (
    DIFFUSION_MODEL,
    DIFFUSION_TRACE_SITES,
    Float,
    Int,
    Name,
    Seed,
    Short,
    SpecModel,
    Text,
    TextToImageSpec,
    check_names,
    sites_field,
)
from interventions.spec.grid_specs import TracePrompt


class _Images(TextToImageSpec):
    images: Int = Field(default=32, ge=1, description="Images per prompt (or per cell): one per seed.")
    seed: Seed = Field(default=0, description="The first seed; image j uses seed + j.")
    steps: Int | None = Field(default=None, ge=1, description="DDIM steps; default: the pipeline's (25).")
    guidance: Float | None = Field(default=None, ge=0, description="Classifier-free guidance; default: the "
                                   "pipeline's (1.5 for the testbed, 7.5 for Stable Diffusion).")


class DiffusionTraceSpec(_Images):
    """Causal tracing in a text-to-image model: restore clean text-encoder states (Diff-QuickFix) or give
    the clean prompt to a window of UNet cross-attention layers (LocoGen); scored on generated images."""

    kind: Literal["trace"] = "trace"
    model: Name = Field(default=DIFFUSION_MODEL, description="`shapes-diffusion` or a local diffusers pipeline folder.")
    prompts: tuple[TracePrompt, ...] = Field(min_length=1, description="`target` (a word the image evaluator "
                                             "names) defaults to the subject.")
    corruption: Literal["swap", "noise"] = Field(default="swap", description=(
        "How the prompt is corrupted: a `swap` of the subject for `counterfactual_subject`, or Gaussian "
        "`noise` on the subject's text embeddings."))
    noise: Float = Field(description="Noise scale in units of `sigma`.", default=3.0, gt=0)
    sigma: Float | None = Field(default=None, gt=0, description=(
        "Noise std; default: the std of the corrupted text-encoder embeddings."))
    samples: Int = Field(default=4, ge=1, description="Noise draws (`corruption: noise`); images cycle over them.")
    sites: tuple[str, ...] = sites_field(DIFFUSION_TRACE_SITES, DIFFUSION_TRACE_SITES, description=(
        "Which states the grid restores or patches, one grid per site."))
    layers: Literal["all"] | tuple[Int, ...] = Field(default="all", description="Text-encoder layers.")
    positions: Literal["all", "prompt"] = Field(
        default="all", description="`all`: every token the UNet sees (padding included); `prompt`: up to <eos>.")
    window: Int = Field(default=1, ge=1, description="Text-encoder layers restored together for mlp/attention.")
    attn_window: Int = Field(default=2, ge=1, description="Consecutive cross-attention layers given the clean "
                                                          "prompt together.")

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return check_names(v, DIFFUSION_TRACE_SITES)


class EraseConcept(SpecModel):
    concept: Text = Field(description="The words to erase (or remap), e.g. `red`.")
    guide: Short = Field(default="", description="What the concept becomes: another concept (`blue`), or '' "
                                               "(the prompt without it).")


class AttackSpec(SpecModel):
    """The adversarial prompt search that judges an erasure, in the manner of UnlearnDiffAtk and P4D:
    `tokens` tokens put before a concept prompt are optimised so that the *edited* model denoises the
    unedited model's images of the concept, then images are generated from the result."""

    prompts: Int = Field(default=4, ge=0, description="Concept prompts attacked (the edit's template prompts, "
                         "in order, cycling over the concepts); 0: no search (`erased_rate.adversarial` is null).")
    tokens: Int = Field(default=4, ge=1, description="Adversarial tokens put before each prompt.")
    steps: Int = Field(default=40, ge=1, description="Optimisation steps per prompt.")
    lr: Float = Field(default=0.1, gt=0, description="Adam's step, in units of the embedding table's mean row norm.")
    batch: Int = Field(default=8, ge=1, description="(image, timestep, noise) draws per step.")
    space: Literal["tokens", "soft"] = Field(default="tokens", description="`tokens`: a token sequence (PEZ: "
                                             "optimised continuously, used projected to the nearest tokens); "
                                             "`soft`: free embedding vectors (a stronger, white-box attack).")
    seed: Seed = Field(default=0, description="Seeds the initial tokens and every draw.")


class EraseSpec(_Images):
    """Concept erasure in a text-to-image model, written as a Delta and judged on the edit's own templates,
    on held-out paraphrases and under an adversarial prompt search: UCE, TIME, a RECE-style closed-form
    iteration, Diff-QuickFix (`edit: text_encoder`) and an ESD-x fine-tuning baseline."""

    kind: Literal["erase"] = "erase"
    model: Name = Field(default=DIFFUSION_MODEL, description=(
        "`shapes-diffusion`, `scenes-smollm2`, or a local diffusers pipeline folder."))
    method: Literal["uce", "time", "rece", "esd-x"] = Field(
        default="uce", description="`uce`: erase towards the guide while preserving `preserve`; `time`: remap, "
        "kept close to the base only; `rece`: UCE, then `rece_rounds` times find in closed form the embeddings that "
        "still bring each concept back under the edited weights and erase those too; `esd-x`: fine-tune the "
        "cross-attention on ESD's negatively guided target (a baseline, not closed form).")
    edit: Literal["cross_attention", "text_encoder"] = Field(
        default="cross_attention", description="Every UNet `attn2.to_k/to_v`, or the text encoder's "
                                               "self-attention output projection at `layer` (Diff-QuickFix).")
    layer: Annotated[Int, Field(ge=0)] | Literal["auto"] | None = Field(
        default=None, description="Text-encoder layer for `edit: text_encoder`; `auto`: the layer whose "
        "self-attention output, restored at the concept's tokens, brings the concept back most (a `kind: trace` "
        "of the first template against the guide, or the first preserved word; needs the testbed's evaluator).")
    concepts: tuple[EraseConcept, ...] = Field(min_length=1, description=(
        "The concepts to erase (or remap, with a `guide`)."))
    preserve: tuple[Text, ...] = Field(default=(), description="Concepts whose keys and values must not move.")
    templates: tuple[Text, ...] = Field(default=("{}",), min_length=1, description="Contexts in which each "
                                       "concept is encoded, each with one '{}' (e.g. 'a {} circle').")
    lam: Float = Field(default=0.1, gt=0, description="Weight of staying close to the base projection.")
    preserve_scale: Float = Field(default=1.0, ge=0, description=(
        "Weight of keeping the `preserve` concepts' keys and values where they were."))
    rece_rounds: Int = Field(default=2, ge=1, description="`rece`: rounds of finding and erasing embeddings.")
    esd_steps: Int = Field(default=200, ge=1, description="`esd-x`: fine-tuning steps.")
    esd_lr: Float = Field(default=1e-4, gt=0, description="`esd-x`: Adam's learning rate.")
    esd_eta: Float = Field(default=1.0, ge=0, description="`esd-x`: negative guidance (ESD's eta).")
    prompts: tuple[Text, ...] = Field(default=(), description="Prompts for the before/after grid; default: the "
                                     "testbed's (every colour x shape caption).")
    heldout: tuple[Text, ...] = Field(default=(), description="Prompts that ask for an erased concept in words the "
                                      "edit never used; default: the testbed's held-out phrasings of it.")
    kept: tuple[Text, ...] = Field(default=(), description="Prompts for the other concepts; default: the "
                                   "testbed's (each other colour and shape, several phrasings).")
    attack: AttackSpec = Field(default_factory=AttackSpec, description=(
        "The adversarial prompt search run against the edited model (`prompts: 0` skips it)."))
    seed: Seed = Field(default=1_000_000, description="Seeds every random draw (noise, sampling, splits).")

    @field_validator("templates")
    @classmethod
    def _templates(cls, v):
        for t in v:
            if t.count("{}") != 1:
                raise ValueError(f"each template must contain exactly one '{{}}', got {t!r}")
        return v

    @model_validator(mode="after")
    def _layer(self):
        if self.edit == "text_encoder" and self.layer is None:
            raise ValueError("`edit: text_encoder` needs `layer: <int>` (Diff-QuickFix edits the causal layer, "
                             "0 in Stable Diffusion's CLIP)")
        if self.edit == "cross_attention" and self.layer is not None:
            raise ValueError("`layer` is only for `edit: text_encoder`; `cross_attention` edits every attn2")
        if self.method in ("time", "esd-x") and self.preserve:
            raise ValueError(f"`method: {self.method}` has no preserve term; use `method: uce` or `rece` with "
                             "`preserve`")
        if self.method in ("rece", "esd-x") and self.edit != "cross_attention":
            raise ValueError(f"`method: {self.method}` edits the cross-attention; `edit: text_encoder` takes "
                             "`method: uce` or `time`")
        return self


class DiffusionApplySpec(_Images):
    """Apply deltas to a text-to-image pipeline; images with the same prompts and seeds before and after."""

    kind: Literal["apply"] = "apply"
    model: Name = Field(default=DIFFUSION_MODEL, description=(
        "`shapes-diffusion`, `scenes-smollm2`, or a local diffusers pipeline folder."))
    deltas: tuple[Name, ...] = Field(description="Delta files to apply, in this order.", min_length=1)
    prompts: tuple[Text, ...] = Field(min_length=1, description=(
        "The prompts to generate from (or to draw, on a text-to-image model)."))
    images: Int = Field(description="Images per prompt: one per seed.", default=8, ge=1)


class DaamSpec(_Images):
    """Cross-attention attribution maps (DAAM, Tang et al. 2023): for each word of the prompt, the UNet's
    cross-attention to its tokens summed over steps, layers and heads, upscaled to the image and overlaid
    on it. On the shapes testbed each map is scored against the object's mask (IoU)."""

    kind: Literal["daam"] = "daam"
    model: Name = Field(default=DIFFUSION_MODEL, description=(
        "`shapes-diffusion`, `scenes-smollm2`, or a local diffusers pipeline folder."))
    prompts: tuple[Text, ...] = Field(min_length=1, description=(
        "The prompts to generate from (or to draw, on a text-to-image model)."))
    words: tuple[Text, ...] = Field(default=(), description="The words mapped; default: every word of each prompt.")
    layers: Literal["all"] | tuple[Int, ...] = Field(
        default="all", description="The cross-attention (`attn2`) layers summed, as indices in the UNet's order "
                                   "(down, mid, up blocks); `all` is DAAM's choice.")
    images: Int = Field(description="Images per prompt: one per seed.", default=8, ge=1)
    threshold: Float = Field(default=0.4, gt=0, lt=1, description="A map's pixels above this share of its maximum "
                             "form its region (DAAM's tau).")


#: The spec classes by (kind, modality): the discriminator of `Spec`.
