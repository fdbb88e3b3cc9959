"""Declarative specs: frozen, typed, validated once, and the same in YAML and Python.

>>> spec = parse_spec({"kind": "trace", "prompts": [
...     {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"}]})
>>> spec.samples, spec.noise, spec.sites
(10, 3.0, ('hidden', 'mlp', 'attention'))
>>> parse_spec(load_yaml(dump_spec(spec))) == spec
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator, model_validator,
)

from .errors import SpecError, one_of

#: Position selectors. An integer (negative counts from the end) or a name.
POSITION_NAMES = ("last", "subject", "subject_first", "subject_last", "all")
Position = Union[int, Literal["last", "subject", "subject_first", "subject_last", "all"]]

#: Site names every language-model family table provides.
SITE_NAMES = ("embed", "block_input", "block_output", "mlp_output", "attention_output", "mlp_key")
#: The site kinds a causal trace restores, and the site each one means.
TRACE_SITES = {"hidden": "block_output", "mlp": "mlp_output", "attention": "attention_output"}
METRICS = ("prob", "logit_diff", "kl")

DEFAULT_MODEL = "smollm2-135m"


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class TracePrompt(_Spec):
    """One fact to trace: `prompt` contains `subject`; `target` defaults to the clean top-1 token."""

    prompt: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    target: str | None = Field(default=None, min_length=1)
    counterfactual_subject: str | None = Field(
        default=None, min_length=1,
        description="For `corruption: swap`: replaces `subject` in the corrupted run; must give as many tokens.")


class PatchPrompt(_Spec):
    """A base prompt patched with states from an aligned `source` prompt."""

    base: str = Field(min_length=1)
    source: str = Field(min_length=1)
    target: str | None = Field(
        default=None, min_length=1, description="Token whose metric is read; default: the source's top-1.")
    counterfactual_target: str | None = Field(
        default=None, min_length=1, description="For `logit_diff`; default: the base's top-1.")
    subject: str | None = Field(
        default=None, min_length=1, description="Substring of `base`; needed by `subject*` positions.")


def _check_names(values: tuple[str, ...], allowed: tuple[str, ...] | dict) -> tuple[str, ...]:
    for v in values:
        if v not in allowed:
            raise ValueError(f"unknown site {v!r}; expected {one_of(v, allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"sites must not repeat, got {list(values)}")
    return values


class _Grid(_Spec):
    model: str = Field(default=DEFAULT_MODEL, min_length=1, description=(
        "`smollm2-135m`, `gemma3-270m`, a local Hugging Face directory, or a hub id (online only)."))
    layers: Literal["all"] | tuple[int, ...] = Field(
        default="all", description="`all`, or layer indices (negative counts from the end).")
    positions: tuple[Position, ...] = Field(
        default=("all",), min_length=1,
        description="Columns of the grid: `all` expands to one column per token; `subject` restores "
                    "all subject tokens together in one column.")
    window: int = Field(default=1, ge=1)
    max_batch_rows: int = Field(default=48, ge=1, description="Rows per forward pass (a memory bound).")
    method: Literal["exact", "attribution"] = Field(
        default="exact", description="`exact`: one patched run per cell; `attribution`: the first-order "
                                     "approximation of every cell from one forward and backward pass per prompt.")

    @field_validator("layers")
    @classmethod
    def _layers_nonempty(cls, v):
        if v != "all" and len(v) == 0:
            raise ValueError("layers must be 'all' or a non-empty list of integers")
        return v


class TraceSpec(_Grid):
    """Causal tracing (Meng et al. 2022): corrupt the subject, restore one clean state at a time."""

    kind: Literal["trace"] = "trace"
    prompts: tuple[TracePrompt, ...] = Field(min_length=1)
    corruption: Literal["noise", "swap"] = "noise"
    noise: float = Field(default=3.0, gt=0, description="Noise scale in units of `sigma`.")
    sigma: float | None = Field(
        default=None, gt=0, description="Embedding std; default: the std of all subject-token embeddings.")
    samples: int = Field(default=10, ge=1, description="Noise draws per cell (1 is used for `swap`).")
    seed: int = 0
    sites: tuple[str, ...] = Field(default=("hidden", "mlp", "attention"), min_length=1)
    window: int = Field(default=10, ge=1, description="Layers restored together for `mlp` and `attention`.")

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return _check_names(v, tuple(TRACE_SITES))


class PatchSpec(_Grid):
    """Activation patching: copy source states into the base run, one cell at a time."""

    kind: Literal["patch"] = "patch"
    prompts: tuple[PatchPrompt, ...] = Field(min_length=1)
    sites: tuple[str, ...] = Field(default=("block_output",), min_length=1)
    metric: Literal["prob", "logit_diff", "kl"] = "prob"

    @model_validator(mode="after")
    def _attribution_metric(self):
        if self.method == "attribution" and self.metric == "kl":
            raise ValueError("`method: attribution` cannot estimate `metric: kl` (its gradient at the base run "
                             "is zero); use 'prob' or 'logit_diff'")
        return self

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return _check_names(v, SITE_NAMES)


class EditRequestSpec(_Spec):
    """One fact to rewrite, CounterFact-style: `prompt` holds ``{}`` where `subject` goes."""

    prompt: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    target_new: str = Field(min_length=1)
    target_true: str = Field(min_length=1, description="The current answer (for efficacy and neighbourhood).")
    paraphrases: tuple[str, ...] = Field(default=(), description="Other prompts (subject included) about the fact.")
    neighbours: tuple[str, ...] = Field(
        default=(), description="Prompts about other subjects whose answer is `target_true` and must stay so.")

    @field_validator("prompt")
    @classmethod
    def _one_slot(cls, v):
        if v.count("{}") != 1:
            raise ValueError("the prompt must contain exactly one '{}' where the subject goes")
        return v


class LocateSpec(_Spec):
    """How `layer: auto` / `layers: auto` is found: a causal trace of the MLP states of the requests'
    prompts (answer: `target_true`), averaged over requests, read at `position`."""

    position: Literal["subject_last", "subject_first", "subject"] = Field(
        default="subject_last", description="Where the MLP is restored: ROME reads its key at `subject_last`.")
    window: int = Field(default=10, ge=1, description="MLP layers restored together around each layer (ROME: 10).")
    samples: int = Field(default=10, ge=1)
    noise: float = Field(default=3.0, gt=0)
    sigma: float | None = Field(default=None, gt=0, description="As in `kind: trace`; default: the std of "
                                "the requests' subject-token embeddings.")
    seed: int = 0
    span: int = Field(default=5, ge=1, description="MEMIT: how many consecutive layers `layers: auto` takes.")


class EditSpec(_Spec):
    """A weight edit (ROME or MEMIT) written as a Delta, with CounterFact-style metrics."""

    kind: Literal["edit"] = "edit"
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    method: Literal["rome", "memit"] = "rome"
    layer: int | Literal["auto"] | None = Field(
        default=None, description="ROME: the MLP layer whose output projection is edited, or `auto` (from a trace).")
    layers: tuple[int, ...] | Literal["auto"] | None = Field(
        default=None, description="MEMIT: the increasing range of MLP layers, or `auto` (from a trace).")
    locate: LocateSpec = Field(default_factory=LocateSpec, description="The trace behind `auto`.")
    requests: tuple[EditRequestSpec, ...] = Field(min_length=1)
    hyperparameters: dict[str, float | int] = Field(
        default_factory=dict, description="Overrides of ROME's defaults, e.g. `v_steps`, `v_lr`, `kl_factor`.")
    corpus: tuple[str, ...] = Field(
        default=(), description="Text files for the key statistics; empty: text sampled from the model itself.")
    mom2_tokens: int = Field(default=20_000, ge=100)
    fluency_prompts: tuple[str, ...] = Field(default=(), description="Generation prompts for the fluency metric; "
                                             "default: each request's subject.")

    @model_validator(mode="after")
    def _layers_for_method(self):
        if self.method == "rome" and (self.layer is None or self.layers is not None):
            raise ValueError("`method: rome` takes `layer: <int>` (and no `layers`)")
        if self.method == "rome" and self.layer != "auto" and self.layer < 0:
            raise ValueError(f"`layer` must be a non-negative integer or 'auto', got {self.layer}")
        if self.method == "memit":
            if self.layers is None or self.layer is not None:
                raise ValueError("`method: memit` takes `layers: [<int>, ...]` or `layers: auto` (and no `layer`)")
            if self.layers == "auto":
                return self
            if not self.layers or list(self.layers) != sorted(set(self.layers)) or min(self.layers) < 0:
                raise ValueError(f"`layers` must be increasing non-negative integers, got {list(self.layers)}")
        return self


#: Where a steering vector is read and added (the residual stream by default).
STEER_SITES = ("block_output", "block_input", "mlp_output", "attention_output")
#: Which positions a steering vector is added at during generation (see interventions.steer).
APPLY_TO = ("all", "prompt", "generated")


class SteerPair(_Spec):
    positive: str = Field(min_length=1)
    negative: str = Field(min_length=1)


class SteerSpec(_Spec):
    """A steering vector (CAA / ActAdd mean difference, or RepE's PCA of paired differences):
    estimated from contrastive prompts, saved, and added during generation at each coefficient."""

    kind: Literal["steer"] = "steer"
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    pairs: tuple[SteerPair, ...] = Field(default=(), description="Contrastive pairs (needed by `pca`).")
    positive: tuple[str, ...] = Field(default=(), description="Or: a positive set ...")
    negative: tuple[str, ...] = Field(default=(), description="... and a negative set (`mean_diff` only).")
    method: Literal["mean_diff", "pca"] = "mean_diff"
    layers: tuple[int, ...] = Field(min_length=1, description="One vector per layer, each added at its layer.")
    site: Literal["block_output", "block_input", "mlp_output", "attention_output"] = "block_output"
    read: Literal["last", "mean"] = Field(default="last", description="Read the states at the last token, "
                                          "or averaged over each prompt's tokens.")
    coefficients: tuple[float, ...] = Field(default=(0.0, 1.0, 2.0, 4.0, 8.0), min_length=1)
    apply_to: Literal["all", "prompt", "generated"] = Field(
        default="all", description="Add at every position (prompt and generated), the prompt only, or the "
                                   "generated tokens only.")
    prompts: tuple[str, ...] = Field(min_length=1, description="Test prompts to generate from.")
    max_new_tokens: int = Field(default=40, ge=1)
    temperature: float = Field(default=0.0, ge=0, description="0: greedy; otherwise sampled with `seed`.")
    samples: int = Field(default=1, ge=1, description="Generations per prompt and coefficient (sampling only).")
    seed: int = 0
    lexicon: tuple[str, ...] = Field(default=(), description="Metric: the share of generated words in this list.")
    targets: tuple[str, ...] = Field(default=(), description="Metric: mean log-probability of these continuations.")

    @model_validator(mode="after")
    def _sources(self):
        if bool(self.pairs) == bool(self.positive or self.negative):
            raise ValueError("give either `pairs` or `positive` and `negative`")
        if not self.pairs and not (self.positive and self.negative):
            raise ValueError("`positive` and `negative` must both be non-empty")
        if self.method == "pca" and not self.pairs and len(self.positive) != len(self.negative):
            raise ValueError("`method: pca` needs paired prompts: `pairs`, or `positive` and `negative` "
                             "of equal length")
        if list(self.layers) != sorted(set(self.layers)) or min(self.layers) < 0:
            raise ValueError(f"`layers` must be increasing non-negative integers, got {list(self.layers)}")
        if not (self.lexicon or self.targets):
            raise ValueError("give a metric: `lexicon` (words) and/or `targets` (continuations)")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("`samples` > 1 needs `temperature` > 0 (greedy decoding gives one output)")
        return self

    def contrast(self) -> tuple[list[str], list[str]]:
        """(positive, negative) prompt lists; paired index by index where the spec pairs them."""
        if self.pairs:
            return [p.positive for p in self.pairs], [p.negative for p in self.pairs]
        return list(self.positive), list(self.negative)


class ApplySpec(_Spec):
    """Load deltas (verified against the base) and/or a steering vector, and generate with and without."""

    kind: Literal["apply"] = "apply"
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    deltas: tuple[str, ...] = Field(default=(), description="Delta files, applied in this order.")
    steer: str | None = Field(default=None, description="A steering vector file (from `kind: steer`).")
    coef: float = Field(default=4.0, description="The steering vector's coefficient.")
    apply_to: Literal["all", "prompt", "generated"] = "all"
    prompts: tuple[str, ...] = Field(min_length=1)
    max_new_tokens: int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _something(self):
        if not self.deltas and self.steer is None:
            raise ValueError("give `deltas` (edits) and/or `steer` (a steering vector)")
        return self


#: Sites of a diffusion trace: the text encoder's states (per layer x token) and the UNet's
#: cross-attention layers (a window of them gets the clean prompt, LocoGen-style).
DIFFUSION_TRACE_SITES = ("text_hidden", "text_mlp", "text_attention", "cross_attention")
DIFFUSION_MODEL = "shapes-diffusion"


class _Images(_Spec):
    images: int = Field(default=32, ge=1, description="Images per prompt (or per cell): one per seed.")
    seed: int = Field(default=0, description="The first seed; image j uses seed + j.")
    steps: int | None = Field(default=None, ge=1, description="DDIM steps; default: the pipeline's (25).")
    guidance: float | None = Field(default=None, ge=0, description="Classifier-free guidance; default: the "
                                   "pipeline's (1.5 for the testbed, 7.5 for Stable Diffusion).")


class DiffusionTraceSpec(_Images):
    """Causal tracing in a text-to-image model: restore clean text-encoder states (Diff-QuickFix) or give
    the clean prompt to a window of UNet cross-attention layers (LocoGen); scored on generated images."""

    kind: Literal["trace"] = "trace"
    model: str = Field(min_length=1, description="`shapes-diffusion` or a local diffusers pipeline folder.")
    prompts: tuple[TracePrompt, ...] = Field(min_length=1, description="`target` (a word the image evaluator "
                                             "names) defaults to the subject.")
    corruption: Literal["swap", "noise"] = "swap"
    noise: float = Field(default=3.0, gt=0)
    sigma: float | None = Field(default=None, gt=0)
    samples: int = Field(default=4, ge=1, description="Noise draws (`corruption: noise`); images cycle over them.")
    sites: tuple[str, ...] = Field(default=("text_hidden", "text_mlp", "text_attention", "cross_attention"),
                                   min_length=1)
    layers: Literal["all"] | tuple[int, ...] = Field(default="all", description="Text-encoder layers.")
    positions: Literal["all", "prompt"] = Field(
        default="all", description="`all`: every token the UNet sees (padding included); `prompt`: up to <eos>.")
    window: int = Field(default=1, ge=1, description="Text-encoder layers restored together for mlp/attention.")
    attn_window: int = Field(default=2, ge=1, description="Consecutive cross-attention layers given the clean "
                                                          "prompt together.")

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return _check_names(v, DIFFUSION_TRACE_SITES)


class EraseConcept(_Spec):
    concept: str = Field(min_length=1, description="The words to erase (or remap), e.g. `red`.")
    guide: str = Field(default="", description="What the concept becomes: another concept (`blue`), or '' "
                                               "(the prompt without it).")


class EraseSpec(_Images):
    """Closed-form concept erasure (UCE), remapping (TIME) or a text-encoder edit (Diff-QuickFix) of a
    text-to-image model, written as a Delta; before/after images and metrics."""

    kind: Literal["erase"] = "erase"
    model: str = Field(default=DIFFUSION_MODEL, min_length=1)
    method: Literal["uce", "time"] = Field(default="uce", description="`uce`: erase towards the guide while "
                                           "preserving `preserve`; `time`: remap, kept close to the base only.")
    edit: Literal["cross_attention", "text_encoder"] = Field(
        default="cross_attention", description="Every UNet `attn2.to_k/to_v`, or the text encoder's "
                                               "self-attention output projection at `layer` (Diff-QuickFix).")
    layer: int | None = Field(default=None, ge=0, description="Text-encoder layer for `edit: text_encoder`.")
    concepts: tuple[EraseConcept, ...] = Field(min_length=1)
    preserve: tuple[str, ...] = Field(default=(), description="Concepts whose keys and values must not move.")
    templates: tuple[str, ...] = Field(default=("{}",), min_length=1, description="Contexts in which each "
                                       "concept is encoded, each with one '{}' (e.g. 'a {} circle').")
    lam: float = Field(default=0.1, gt=0, description="Weight of staying close to the base projection.")
    preserve_scale: float = Field(default=1.0, ge=0)
    prompts: tuple[str, ...] = Field(default=(), description="Prompts for the before/after images; default "
                                     "(testbed): every colour x shape caption.")
    seed: int = 1_000_000

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
        if self.method == "time" and self.preserve:
            raise ValueError("`method: time` has no preserve term; use `method: uce` with `preserve`")
        return self


class DiffusionApplySpec(_Images):
    """Apply deltas to a text-to-image pipeline; images with the same prompts and seeds before and after."""

    kind: Literal["apply"] = "apply"
    model: str = Field(min_length=1)
    deltas: tuple[str, ...] = Field(min_length=1)
    prompts: tuple[str, ...] = Field(min_length=1)
    images: int = Field(default=8, ge=1)


class VLMTracePrompt(_Spec):
    """One image and a question about it: the text follows the image tokens."""

    image: str = Field(min_length=1, description="`flag:<Country>` (the testbed's synthetic flag) or an image file.")
    prompt: str = Field(min_length=1, description="The text after the image, e.g. ' The capital of this country is'.")
    target: str = Field(min_length=1, description="The answer word whose probability is traced.")
    counterfactual_image: str | None = Field(default=None, description="For `corruption: swap`.")
    constraint: str | None = Field(default=None, description="For `corruption: text`: the words of `prompt` whose "
                                   "token embeddings get the noise (the question's constraint, e.g. 'capital').")


class VLMTraceSpec(_Spec):
    """Causal tracing in a vision-language model: corrupt the image (noise on its tokens, or a
    counterfactual image) or the text constraint (noise on its token embeddings), and restore the
    language model's states over image and text positions."""

    kind: Literal["trace"] = "trace"
    model: str = Field(min_length=1, description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.")
    prompts: tuple[VLMTracePrompt, ...] = Field(min_length=1)
    corruption: Literal["noise", "swap", "text"] = "noise"
    noise: float = Field(default=3.0, gt=0, description="In units of `sigma`.")
    sigma: float | None = Field(default=None, gt=0, description="Default: the std of the clean image tokens "
                                "(`noise`) or of the constraint's token embeddings (`text`).")
    image_cells: Literal["each", "block", "both"] = Field(
        default="both", description="Restore each image token on its own (`each`: the per-patch heatmap), all "
        "image tokens at once (`block`: the aggregated cell; cheap with 576 image tokens), or `both`.")
    samples: int = Field(default=10, ge=1)
    seed: int = 0
    sites: tuple[str, ...] = Field(default=("hidden", "mlp", "attention"), min_length=1)
    window: int = Field(default=10, ge=1)
    max_batch_rows: int = Field(default=48, ge=1)

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return _check_names(v, tuple(TRACE_SITES))

    @model_validator(mode="after")
    def _corruption_inputs(self):
        for i, p in enumerate(self.prompts):
            if self.corruption == "swap" and p.counterfactual_image is None:
                raise ValueError(f"`corruption: swap` needs `prompts[{i}].counterfactual_image`")
            if self.corruption == "text" and (p.constraint is None or p.constraint not in p.prompt):
                raise ValueError(f"`corruption: text` needs `prompts[{i}].constraint`: words of the prompt "
                                 f"{p.prompt!r}, got {p.constraint!r}")
        return self


class VLMLocateSpec(_Spec):
    """How a VLM edit's `layer: auto` is found: an image-noise trace of the edit questions (answer:
    `target_true`), MLP windows restored at all image tokens at once; the layer whose window
    restores the most."""

    window: int = Field(default=10, ge=1, description="MLP layers restored together around each layer.")
    samples: int = Field(default=5, ge=1)
    noise: float = Field(default=3.0, gt=0)
    seed: int = 0


class VLMEditSpec(_Spec):
    """ROME in a vision-language model with the key read at the image tokens: questions about
    `image` get `target_new`; written as a Delta, with efficacy, paraphrase and other-image metrics."""

    kind: Literal["edit"] = "edit"
    model: str = Field(min_length=1, description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.")
    method: Literal["rome"] = "rome"
    layer: int | Literal["auto"] = Field(description="The LM's MLP layer whose output projection is edited, or "
                                         "`auto` (from an image-noise trace; needs `target_true`).")
    image: str = Field(min_length=1, description="`flag:<Country>` or an image file: the subject of the edit.")
    questions: tuple[str, ...] = Field(min_length=1, description="The text after the image that the edit answers "
                                       "with `target_new`; k* is the mean key over their image tokens.")
    target_new: str = Field(min_length=1)
    target_true: str | None = Field(default=None, description="The answer before the edit (reported; the trace "
                                    "target of `layer: auto`).")
    paraphrases: tuple[str, ...] = Field(default=(), description="Held-out questions about the same image "
                                         "(generalisation; never used by the edit).")
    other_images: tuple[str, ...] = Field(default=(), description="Other images whose top-1 answers to the "
                                          "questions and paraphrases should not change (specificity).")
    kl_prompt: str = Field(default=" This is a picture of", min_length=1, description="Text after the image "
                           "whose next-token distribution v*'s KL term keeps where it was.")
    locate: VLMLocateSpec = Field(default_factory=VLMLocateSpec, description="The trace behind `layer: auto`.")
    hyperparameters: dict[str, float | int] = Field(
        default_factory=dict, description="Overrides of ROME's defaults, e.g. `v_steps`, `v_lr`, `kl_factor`.")
    corpus: tuple[str, ...] = Field(
        default=(), description="Text files for the key statistics; empty: text sampled from the model itself.")
    mom2_tokens: int = Field(default=20_000, ge=100)
    image_corpus: tuple[str, ...] = Field(
        default=(), description="Images whose image-token keys join the key statistics: C = C_text + "
        "`image_corpus_weight` × C_images. Image files, folders of them, `flag:<Country>@<seed>` or `flag:*@<seed>` "
        "(every testbed flag, jittered). Empty: text statistics only, as ROME.")
    image_corpus_weight: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _auto_needs_truth(self):
        if self.layer == "auto" and self.target_true is None:
            raise ValueError("`layer: auto` needs `target_true` (the answer the locating trace follows)")
        if self.layer != "auto" and self.layer < 0:
            raise ValueError(f"`layer` must be a non-negative integer or 'auto', got {self.layer}")
        return self


def _is_vlm(model) -> bool:
    from .vlm import is_vlm_model

    return isinstance(model, str) and is_vlm_model(model)


def _is_diffusion(model) -> bool:
    from .diffusion import is_diffusion_model

    return isinstance(model, str) and is_diffusion_model(model)


def _tag(value) -> str | None:
    """The spec class: `kind`, with trace/apply on a text-to-image model told apart by their `model`."""
    get = value.get if isinstance(value, dict) else (lambda k, d=None: getattr(value, k, d))
    kind = get("kind")
    if kind in ("trace", "edit") and _is_vlm(get("model")):
        return f"{kind}-vlm"
    if kind == "erase" or (kind in ("trace", "apply") and _is_diffusion(get("model"))):
        return f"{kind}-diffusion" if kind != "erase" else "erase"
    return kind


Spec = Annotated[Union[
    Annotated[TraceSpec, Tag("trace")], Annotated[PatchSpec, Tag("patch")], Annotated[EditSpec, Tag("edit")],
    Annotated[SteerSpec, Tag("steer")], Annotated[ApplySpec, Tag("apply")],
    Annotated[DiffusionTraceSpec, Tag("trace-diffusion")], Annotated[EraseSpec, Tag("erase")],
    Annotated[DiffusionApplySpec, Tag("apply-diffusion")], Annotated[VLMTraceSpec, Tag("trace-vlm")],
    Annotated[VLMEditSpec, Tag("edit-vlm")]],
    Discriminator(_tag)]
_ADAPTER: TypeAdapter = TypeAdapter(Spec)
KINDS = ("trace", "patch", "edit", "steer", "apply", "erase")
_TAGS = (*KINDS, "trace-diffusion", "apply-diffusion", "trace-vlm")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _problems(err: ValidationError, data: Any) -> list[str]:
    problems = []
    for e in err.errors():
        loc = e["loc"]
        if loc and loc[0] in _TAGS and isinstance(data, dict) and str(loc[0]).startswith(str(data.get("kind"))):
            loc = loc[1:]  # the union's tag: the user wrote no such field
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith(("literal[", "tuple["))))
        field = _loc(loc) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            field, value = "kind", data.get("kind")
            msg = f"expected {one_of(value, KINDS)}"
        if e["type"] == "extra_forbidden":
            msg = "unknown field; see `lesion schema` for the fields this kind takes"
        problems.append(f"`{field}`: got {value!r}; {msg}")
    return problems


def parse_spec(data: Any):
    """Validate a plain mapping (as from YAML) into a spec, or raise `SpecError`."""
    if not isinstance(data, dict):
        raise SpecError("spec", data, "a mapping with a `kind:` field")
    if "kind" not in data:
        raise SpecError("kind", None, one_of("", KINDS))
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise SpecError.many(_problems(err, data)) from None


def load_yaml(text: str, *, source: str = "<string>") -> Any:
    """Parse YAML text, turning syntax errors into a `SpecError` with the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(source, f"malformed YAML{where}", f"valid YAML ({problem})") from None


def load_spec(path: str | Path):
    """Read and validate a YAML spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("path", str(path), "an existing YAML file")
    return parse_spec(load_yaml(path.read_text(), source=str(path)))


def spec_to_dict(spec: TraceSpec | PatchSpec) -> dict:
    """All fields, defaults included, as plain JSON-able data (`kind` first)."""
    data = spec.model_dump(mode="json")
    return {"kind": data.pop("kind"), **data}


def dump_spec(spec: TraceSpec | PatchSpec) -> str:
    """YAML text that `parse_spec(load_yaml(...))` turns back into an equal spec."""
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False, allow_unicode=True)


def spec_schema() -> dict:
    """The JSON Schema of every spec kind (for editors that validate YAML)."""
    schema = _ADAPTER.json_schema()
    # `kind: trace` and `kind: apply` each have a language-model and a text-to-image form, told apart
    # by `model` at load time; a minimal spec may fit both, so the schema asks for any, not exactly one.
    schema["anyOf"] = schema.pop("oneOf")
    schema["title"] = "Lesion spec"
    return schema
