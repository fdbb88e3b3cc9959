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
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator, AllowInfNan, BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, TypeAdapter,
    ValidationError, field_validator, model_validator,
)

from interventions.core.errors import SpecError, one_of, short
from interventions.spec.messages import Catalogue, expected, problems, tag_problem
from interventions.spec.file import load_yaml, read_spec_text

#: Limits on what a spec may hold (stated in the README). A prompt or other text is at most
#: MAX_TEXT characters; a model name or file path at most MAX_NAME.
MAX_TEXT = 10_000
MAX_NAME = 1_024


def _text(limit: int, blank: bool = False):
    def check(v: str) -> str:
        if len(v) > limit:
            raise ValueError(f"at most {limit:,} characters, got {len(v):,}")
        if not blank and not v.strip():
            raise ValueError("a non-empty text (not only spaces)")
        return v
    return check


#: An integer: true/false and 2.0 are refused, not read as 1 and 2.
Int = Annotated[int, Strict()]
#: A finite number: nan, inf and true/false are refused.
Float = Annotated[float, Strict(), AllowInfNan(False)]
#: A prompt, subject or answer: not empty, not only spaces, at most MAX_TEXT characters.
Text = Annotated[str, Strict(), AfterValidator(_text(MAX_TEXT))]
#: A model name or a file path: not empty, at most MAX_NAME characters.
Name = Annotated[str, Strict(), AfterValidator(_text(MAX_NAME))]
#: A short text that may be empty (an erase guide: '' means "the prompt without the concept").
Short = Annotated[str, Strict(), AfterValidator(_text(MAX_TEXT, blank=True))]

#: Position selectors. An integer (negative counts from the end) or a name.
POSITION_NAMES = ("last", "subject", "subject_first", "subject_last", "all")
Position = Union[Int, Literal["last", "subject", "subject_first", "subject_last", "all"]]

#: Site names every language-model family table provides.
SITE_NAMES = ("embed", "block_input", "block_output", "mlp_output", "attention_output", "mlp_key")
#: The site kinds a causal trace restores, and the site each one means.
TRACE_SITES = {"hidden": "block_output", "mlp": "mlp_output", "attention": "attention_output"}
METRICS = ("prob", "logit_diff", "kl")

DEFAULT_MODEL = "smollm2-135m"
VLM_MODEL = "llava-flags-smollm2"
DIFFUSION_MODEL = "shapes-diffusion"
#: What kind of model a spec is for. It is part of the spec: written as `modality:`, or implied by
#: the spec's own fields (`image:` means vision-language; `kind: erase` and `kind: daam` mean text-to-image), never
#: read from the model's name or from files on disk.
MODALITIES = ("language", "vision-language", "text-to-image")


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, allow_inf_nan=False)


class _Language(_Spec):
    modality: Literal["language"] = Field(default="language", description="A language model (the default).")


class _VisionLanguage(_Spec):
    modality: Literal["vision-language"] = Field(
        default="vision-language", description="A LLaVA-style model; implied by `image:`.")


class _TextToImage(_Spec):
    modality: Literal["text-to-image"] = Field(
        default="text-to-image", description="A text-to-image pipeline; implied by `kind: erase` or `daam`, required "
                                             "for `trace` and `apply` on one.")


class TracePrompt(_Spec):
    """One fact to trace: `prompt` contains `subject`; `target` defaults to the clean top-1 token."""

    prompt: Text
    subject: Text
    target: Text | None = None
    counterfactual_subject: Text | None = Field(
        default=None, min_length=1,
        description="For `corruption: swap`: replaces `subject` in the corrupted run; must give as many tokens.")


class PatchPrompt(_Spec):
    """A base prompt patched with states from an aligned `source` prompt."""

    base: Text
    source: Text
    target: Text | None = Field(
        default=None, description="Token whose metric is read; default: the source's top-1.")
    counterfactual_target: Text | None = Field(
        default=None, description="For `logit_diff`; default: the base's top-1.")
    subject: Text | None = Field(
        default=None, description="Substring of `base`; needed by `subject*` positions.")


def _sites_field(default: tuple[str, ...], allowed, description: str = ""):
    """A `sites:` list checked by `_check_names` (for its messages), with its names listed in the schema."""
    return Field(default=default, min_length=1, description=description or None,
                 json_schema_extra={"items": {"type": "string", "enum": list(allowed)}, "uniqueItems": True})


def _check_names(values: tuple[str, ...], allowed: tuple[str, ...] | dict, what: str = "site") -> tuple[str, ...]:
    for v in values:
        if v not in allowed:
            hint = f"; {v!r} is a text-to-image site: add `modality: text-to-image`" if v in DIFFUSION_TRACE_SITES \
                else f"; {v!r} is for a vision-language model: give the prompts an `image`" \
                if what == "position set" and v in ("image", "constraint") else ""
            raise ValueError(f"unknown {what} {short(v)}; expected {one_of(v, allowed)}{hint}")
    if len(set(values)) != len(values):
        raise ValueError(f"{what}s must not repeat, got {list(values)}")
    return values


class _GridCore(_Spec):
    """What every trace and patch grid takes, whatever the model."""

    model: Name = Field(default=DEFAULT_MODEL, description=(
        "`smollm2-135m`, `gemma3-270m`, a local Hugging Face directory, or a hub id (online only)."))
    layers: Literal["all"] | tuple[Int, ...] = Field(
        default="all", description="`all`, or layer indices (negative counts from the end).")
    window: Int = Field(default=1, ge=1)
    max_batch_rows: Int = Field(default=48, ge=1, description="Rows per forward pass (a memory bound).")
    method: Literal["exact", "attribution"] = Field(
        default="exact", description="`exact`: one patched run per cell; `attribution`: the first-order "
                                     "approximation of every cell from one forward and backward pass per prompt.")
    steps: Int = Field(default=1, ge=1, le=256, description=(
        "`method: attribution`: average the gradients at this many points on the straight path from the base "
        "(corrupted) input embeddings to the source (clean) ones, as EAP-IG does; 1 is plain attribution patching."))

    @model_validator(mode="after")
    def _steps_need_attribution(self):
        if self.steps > 1 and self.method != "attribution":
            raise ValueError(f"`steps: {self.steps}` is for `method: attribution` (exact patching has no gradient)")
        if self.method == "attribution" and getattr(self, "metric", None) == "kl":
            raise ValueError("`method: attribution` cannot estimate `metric: kl` (its gradient at the base run "
                             "is zero); use 'prob' or 'logit_diff'")
        return self

    @field_validator("layers")
    @classmethod
    def _layers_nonempty(cls, v):
        if v != "all" and len(v) == 0:
            raise ValueError("layers must be 'all' or a non-empty list of integers")
        return v


class _Grid(_GridCore, _Language):
    positions: tuple[Position, ...] = Field(
        default=("all",), min_length=1,
        description="Columns of the grid: `all` expands to one column per token; `subject` restores "
                    "all subject tokens together in one column.")


class TraceSpec(_Grid):
    """Causal tracing (Meng et al. 2022): corrupt the subject, restore one clean state at a time."""

    kind: Literal["trace"] = "trace"
    prompts: tuple[TracePrompt, ...] = Field(min_length=1)
    corruption: Literal["noise", "swap"] = "noise"
    noise: Float = Field(default=3.0, gt=0, description="Noise scale in units of `sigma`.")
    sigma: Float | None = Field(
        default=None, gt=0, description="Embedding std; default: the std of all subject-token embeddings.")
    samples: Int = Field(default=10, ge=1, description="Noise draws per cell (1 is used for `swap`).")
    seed: Int = 0
    sites: tuple[str, ...] = _sites_field(("hidden", "mlp", "attention"), TRACE_SITES)
    window: Int = Field(default=10, ge=1, description="Layers restored together for `mlp` and `attention`.")

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return _check_names(v, tuple(TRACE_SITES))


class PatchSpec(_Grid):
    """Activation patching: copy source states into the base run, one cell at a time."""

    kind: Literal["patch"] = "patch"
    prompts: tuple[PatchPrompt, ...] = Field(min_length=1)
    sites: tuple[str, ...] = _sites_field(("block_output",), SITE_NAMES)
    metric: Literal["prob", "logit_diff", "kl"] = "prob"

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return _check_names(v, SITE_NAMES)


class EditRequestSpec(_Spec):
    """One fact to rewrite, CounterFact-style: `prompt` holds ``{}`` where `subject` goes."""

    prompt: Text
    subject: Text
    target_new: Text
    target_true: Text = Field(description="The current answer (for efficacy and neighbourhood).")
    paraphrases: tuple[Text, ...] = Field(default=(), description="Other prompts (subject included) about the fact.")
    neighbours: tuple[Text, ...] = Field(
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
    window: Int = Field(default=10, ge=1, description="MLP layers restored together around each layer (ROME: 10).")
    samples: Int = Field(default=10, ge=1)
    noise: Float = Field(default=3.0, gt=0)
    sigma: Float | None = Field(default=None, gt=0, description="As in `kind: trace`; default: the std of "
                                "the requests' subject-token embeddings.")
    seed: Int = 0
    span: Int = Field(default=5, ge=1, description="MEMIT: how many consecutive layers `layers: auto` takes.")


class _OptimiserHyperparameters(_Spec):
    """What ROME's v* and MEMIT's z optimisations share; a field left out keeps the method's default."""

    v_steps: Int | None = Field(default=None, ge=1, description="Gradient steps (ROME 20, MEMIT 25).")
    v_lr: Float | None = Field(default=None, gt=0, description="Learning rate (0.5).")
    v_weight_decay: Float | None = Field(default=None, ge=0, description="Weight decay (0.5).")
    clamp_norm_factor: Float | None = Field(default=None, gt=0, description="Bound on the change's norm, as a "
                                            "multiple of the original's (ROME 4, MEMIT 0.75).")
    kl_factor: Float | None = Field(default=None, ge=0, description="Weight of the essence KL term (0.0625).")
    context_templates: tuple[tuple[Int, Int], ...] | None = Field(
        default=None, description="Generated prefixes behind the prompt, as [tokens, how many] pairs (ROME "
        "[[5, 10], [10, 10]]; MEMIT, AlphaEdit [[10, 5]]); [] for the plain prompt only.")
    seed: Int | None = None

    @field_validator("context_templates")
    @classmethod
    def _templates(cls, v):
        if v is not None and any(length < 1 or count < 1 for length, count in v):
            raise ValueError(f"`context_templates` must be [tokens, how many] pairs of positive integers, got "
                             f"{[list(x) for x in v]}")
        return v


class RomeHyperparameters(_OptimiserHyperparameters):
    """Overrides of ROME's and r-ROME's defaults (``editors.methods.rome.RomeHyperParams``)."""

    mom2_ridge: Float | None = Field(default=None, ge=0, description="Ridge added to C, x its mean eigenvalue.")


class EmmetHyperparameters(RomeHyperparameters):
    """Overrides of EMMET's defaults (``editors.methods.emmet.EmmetHyperParams``)."""

    equality_ridge: Float | None = Field(default=None, ge=0, description="Ridge on K^T C^-1 K, x its mean "
                                         "diagonal (0.001); 0: the exact equalities.")


class MemitHyperparameters(_OptimiserHyperparameters):
    """Overrides of MEMIT's defaults (``editors.methods.memit.MemitHyperParams``)."""

    mom2_update_weight: Float | None = Field(default=None, ge=0, description="lambda: weight of C (15,000).")


class AlphaEditHyperparameters(_OptimiserHyperparameters):
    """Overrides of AlphaEdit's defaults (``editors.methods.memit.AlphaEditHyperParams``)."""

    nullspace_threshold: Float | None = Field(default=None, gt=0, description="Eigenvalues of C below this "
                                              "span the null space the update lives in (0.02).")
    l2: Float | None = Field(default=None, gt=0, description="Ridge on the update (1).")


#: The typed hyperparameters of each edit method; `validate` catches a typo such as `v_stpes`.
HYPERPARAMETERS = {"rome": RomeHyperparameters, "r-rome": RomeHyperparameters, "emmet": EmmetHyperparameters,
                   "memit": MemitHyperparameters, "alphaedit": AlphaEditHyperparameters}
#: Edit methods that edit one layer (`layer:`); the others spread the edit over `layers:`.
ONE_LAYER_METHODS = ("rome", "r-rome", "emmet")
#: Edit methods that compute a whole batch of requests at once; ROME and r-ROME take one at a time.
BATCH_METHODS = ("emmet", "memit", "alphaedit")


def check_hyperparameters(method: str, values: dict) -> dict:
    """`values` checked against `method`'s typed hyperparameters; the same dict back, or a ValueError
    naming the first bad key."""
    model = HYPERPARAMETERS[method]
    try:
        model.model_validate(values)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            raise ValueError(f"unknown hyperparameter {key!r} for `method: {method}`; expected "
                             f"{one_of(key, model.model_fields)}") from None
        raise ValueError(f"`{key}` must be {expected(e)}") from None
    return values


def _hyperparameters_field(*methods: str):
    schemas = [HYPERPARAMETERS[m].model_json_schema() for m in methods]
    extra = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return Field(default_factory=dict, json_schema_extra=extra, description=(
        f"Overrides of the method's defaults ({', '.join(methods)}): typed, so a misspelt name is refused."))


class RequestsFile(_Spec):
    """Edit requests read from a file, so that thousands need not sit in the spec: CounterFact's JSON
    (``requested_rewrite`` records, as `recipes/train/make_facts.py` writes them), zsRE's JSON (``src``,
    ``subject``, ``alt``, ``answers``, ``rephrase``; no neighbourhood prompts), or YAML/JSON lists of
    `requests` entries. Read by `editors.editor.resolve_requests`."""

    path: Name
    split: Literal["all", "tune", "eval"] = Field(default="all", description="Only the records of this `split` "
                                                  "(records without one count as `eval`).")
    offset: Int = Field(default=0, ge=0, description="Skip this many records (after the split).")
    limit: Int | None = Field(default=None, ge=1, description="Then take at most this many.")


class SequentialSpec(_Spec):
    """Sequential editing: the requests in batches, each computed on the model with the earlier batches
    applied, measured as it goes (`editors.sequential`)."""

    batch_size: Int = Field(default=1, ge=1, description="Requests per batch (ROME and r-ROME: 1).")
    eval_every: Int = Field(default=1, ge=1, description="Measure after every this many batches (and after "
                            "the last).")
    eval_at: tuple[Int, ...] = Field(default=(), description="Also measure once this many edits are done "
                                     "(e.g. [10] with ROME's batches of one).")
    sample: Int = Field(default=200, ge=1, description="Paraphrase and neighbourhood prompts are measured on "
                        "at most this many of the edits so far, evenly spaced (efficacy on all of them).")
    fluency_prompts: Int = Field(default=8, ge=1, description="Fluency: generations from the subjects of the "
                                 "run's first this many requests.")
    heldout: Name | None = Field(default=None, description="A JSON file with `heldout_known` facts (prompt, "
                                 "answer) never edited; default: the `requests_from` file's (set when it is read).")
    text: Name | None = Field(default=None, description="A held-out text whose perplexity is tracked; default: "
                              "the one shipped with the fact sets.")
    resume: Name | None = Field(default=None, description="The folder of an interrupted run of this same spec "
                                "(its `.NAME.partial-*` staging folder): continue from its last checkpoint.")


class EditSpec(_Language):
    """A weight edit (ROME, r-ROME, EMMET, MEMIT or AlphaEdit) written as a Delta, with CounterFact-style
    metrics."""

    kind: Literal["edit"] = "edit"
    model: Name = Field(default=DEFAULT_MODEL)
    method: Literal["rome", "r-rome", "emmet", "memit", "alphaedit"] = "rome"
    layer: Int | Literal["auto"] | None = Field(
        default=None, description="ROME, r-ROME, EMMET: the MLP layer whose output projection is edited, or "
                                  "`auto` (from a trace).")
    layers: tuple[Int, ...] | Literal["auto"] | None = Field(
        default=None, description="MEMIT, AlphaEdit: the increasing range of MLP layers, or `auto` (from a trace).")
    locate: LocateSpec = Field(default_factory=LocateSpec, description="The trace behind `auto`.")
    requests: tuple[EditRequestSpec, ...] = Field(default=(), description="The facts to rewrite (and/or "
                                                  "`requests_from`).")
    requests_from: RequestsFile | None = Field(default=None, description="More requests, read from a file.")
    hyperparameters: dict[str, Int | Float | tuple[tuple[Int, Int], ...]] = _hyperparameters_field(
        "rome", "emmet", "memit", "alphaedit")
    sequential: SequentialSpec | None = Field(default=None, description="Edit in batches, each on the model "
                                              "with the earlier ones applied, measuring after each.")
    corpus: tuple[Name, ...] = Field(
        default=(), description="Text files for the key statistics; empty: text sampled from the model itself.")
    mom2_tokens: Int = Field(default=20_000, ge=100)
    fluency_prompts: tuple[Text, ...] = Field(default=(), description="Generation prompts for the fluency metric; "
                                             "default: each request's subject.")

    @field_validator("hyperparameters")
    @classmethod
    def _hyperparameters(cls, v, info):
        return check_hyperparameters(info.data.get("method", "rome"), v)

    @model_validator(mode="after")
    def _layers_for_method(self):
        if not self.requests and self.requests_from is None:
            raise ValueError("give `requests` (a list of facts) and/or `requests_from` (a file of them)")
        if self.method in ("rome", "r-rome") and self.sequential is not None and self.sequential.batch_size != 1:
            raise ValueError(f"`sequential.batch_size`: got {self.sequential.batch_size}; `method: {self.method}` edits "
                             "one request at a time, so it takes 1 (`eval_every` sets how often it is measured)")
        if self.method in ONE_LAYER_METHODS:
            if self.layer is None or self.layers is not None:
                raise ValueError(f"`method: {self.method}` takes `layer: <int>` (and no `layers`)")
            if self.layer != "auto" and self.layer < 0:
                raise ValueError(f"`layer` must be a non-negative integer or 'auto', got {self.layer}")
            return self
        if self.layers is None or self.layer is not None:
            raise ValueError(f"`method: {self.method}` takes `layers: [<int>, ...]` or `layers: auto` (and no `layer`)")
        if self.layers == "auto":
            return self
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or min(self.layers) < 0:
            raise ValueError(f"`layers` must be increasing non-negative integers, got {list(self.layers)}")
        return self

    @property
    def edit_layers(self) -> list[int]:
        """The layers the edit writes (resolved specs only)."""
        return [self.layer] if self.method in ONE_LAYER_METHODS else list(self.layers)


#: Where a steering vector is read and added (the residual stream by default).
STEER_SITES = ("block_output", "block_input", "mlp_output", "attention_output")
#: Which positions a steering vector is added at during generation (see interventions.lenses.steering).
APPLY_TO = ("all", "prompt", "generated")


class SteerPair(_Spec):
    positive: Text
    negative: Text


class SteerSpec(_Language):
    """A steering vector (CAA / ActAdd mean difference, or RepE's PCA of paired differences):
    estimated from contrastive prompts, saved, and added during generation at each coefficient."""

    kind: Literal["steer"] = "steer"
    model: Name = Field(default=DEFAULT_MODEL)
    pairs: tuple[SteerPair, ...] = Field(default=(), description="Contrastive pairs (needed by `pca`).")
    positive: tuple[Text, ...] = Field(default=(), description="Or: a positive set ...")
    negative: tuple[Text, ...] = Field(default=(), description="... and a negative set (`mean_diff` only).")
    method: Literal["mean_diff", "pca"] = "mean_diff"
    layers: tuple[Int, ...] = Field(min_length=1, description="One vector per layer, each added at its layer.")
    site: Literal["block_output", "block_input", "mlp_output", "attention_output"] = "block_output"
    read: Literal["last", "mean"] = Field(default="last", description="Read the states at the last token, "
                                          "or averaged over each prompt's tokens.")
    coefficients: tuple[Float, ...] = Field(default=(0.0, 1.0, 2.0, 4.0, 8.0), min_length=1)
    apply_to: Literal["all", "prompt", "generated"] = Field(
        default="all", description="Add at every position (prompt and generated), the prompt only, or the "
                                   "generated tokens only.")
    prompts: tuple[Text, ...] = Field(min_length=1, description="Test prompts to generate from.")
    max_new_tokens: Int = Field(default=40, ge=1)
    temperature: Float = Field(default=0.0, ge=0, description="0: greedy; otherwise sampled with `seed`.")
    samples: Int = Field(default=1, ge=1, description="Generations per prompt and coefficient (sampling only).")
    seed: Int = 0
    lexicon: tuple[Text, ...] = Field(default=(), description="Metric: the share of generated words in this list.")
    targets: tuple[Text, ...] = Field(default=(), description="Metric: mean log-probability of these continuations.")

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


class ApplySpec(_Language):
    """Load deltas (verified against the base) and/or a steering vector, and generate with and without."""

    kind: Literal["apply"] = "apply"
    model: Name = Field(default=DEFAULT_MODEL)
    deltas: tuple[Name, ...] = Field(default=(), description="Delta files, applied in this order.")
    steer: Name | None = Field(default=None, description="A steering vector file (from `kind: steer`).")
    coef: Float = Field(default=4.0, description="The steering vector's coefficient.")
    apply_to: Literal["all", "prompt", "generated"] = "all"
    prompts: tuple[Text, ...] = Field(min_length=1)
    max_new_tokens: Int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _something(self):
        if not self.deltas and self.steer is None:
            raise ValueError("give `deltas` (edits) and/or `steer` (a steering vector)")
        return self


#: Sites of a diffusion trace: the text encoder's states (per layer x token) and the UNet's
#: cross-attention layers (a window of them gets the clean prompt, LocoGen-style).
DIFFUSION_TRACE_SITES = ("text_hidden", "text_mlp", "text_attention", "cross_attention")


class _Images(_TextToImage):
    images: Int = Field(default=32, ge=1, description="Images per prompt (or per cell): one per seed.")
    seed: Int = Field(default=0, description="The first seed; image j uses seed + j.")
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
    corruption: Literal["swap", "noise"] = "swap"
    noise: Float = Field(default=3.0, gt=0)
    sigma: Float | None = Field(default=None, gt=0)
    samples: Int = Field(default=4, ge=1, description="Noise draws (`corruption: noise`); images cycle over them.")
    sites: tuple[str, ...] = _sites_field(DIFFUSION_TRACE_SITES, DIFFUSION_TRACE_SITES)
    layers: Literal["all"] | tuple[Int, ...] = Field(default="all", description="Text-encoder layers.")
    positions: Literal["all", "prompt"] = Field(
        default="all", description="`all`: every token the UNet sees (padding included); `prompt`: up to <eos>.")
    window: Int = Field(default=1, ge=1, description="Text-encoder layers restored together for mlp/attention.")
    attn_window: Int = Field(default=2, ge=1, description="Consecutive cross-attention layers given the clean "
                                                          "prompt together.")

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return _check_names(v, DIFFUSION_TRACE_SITES)


class EraseConcept(_Spec):
    concept: Text = Field(description="The words to erase (or remap), e.g. `red`.")
    guide: Short = Field(default="", description="What the concept becomes: another concept (`blue`), or '' "
                                               "(the prompt without it).")


class AttackSpec(_Spec):
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
    seed: Int = Field(default=0, description="Seeds the initial tokens and every draw.")


class EraseSpec(_Images):
    """Concept erasure in a text-to-image model, written as a Delta and judged on the edit's own templates,
    on held-out paraphrases and under an adversarial prompt search: UCE, TIME, a RECE-style closed-form
    iteration, Diff-QuickFix (`edit: text_encoder`) and an ESD-x fine-tuning baseline."""

    kind: Literal["erase"] = "erase"
    model: Name = Field(default=DIFFUSION_MODEL)
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
    concepts: tuple[EraseConcept, ...] = Field(min_length=1)
    preserve: tuple[Text, ...] = Field(default=(), description="Concepts whose keys and values must not move.")
    templates: tuple[Text, ...] = Field(default=("{}",), min_length=1, description="Contexts in which each "
                                       "concept is encoded, each with one '{}' (e.g. 'a {} circle').")
    lam: Float = Field(default=0.1, gt=0, description="Weight of staying close to the base projection.")
    preserve_scale: Float = Field(default=1.0, ge=0)
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
    attack: AttackSpec = Field(default_factory=AttackSpec)
    seed: Int = 1_000_000

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
    model: Name = Field(default=DIFFUSION_MODEL)
    deltas: tuple[Name, ...] = Field(min_length=1)
    prompts: tuple[Text, ...] = Field(min_length=1)
    images: Int = Field(default=8, ge=1)


class VLMTracePrompt(_Spec):
    """One image and a question about it: the text follows the image tokens. Without `image`, a text-only
    prompt (tokenized as a language-model prompt is)."""

    image: Text | None = Field(default=None, description="`flag:<Country>` (the testbed's synthetic flag) or an "
                               "image file; none: a text-only prompt.")
    prompt: Text = Field(description="The text after the image, e.g. ' The capital of this country is'.")
    target: Text = Field(description="The answer whose probability is traced, tokenized as written (' Paris').")
    counterfactual_image: Name | None = Field(default=None, description="For `corruption: swap`.")
    constraint: Text | None = Field(default=None, description="For `corruption: text`: the words of `prompt` whose "
                                   "token embeddings get the noise (the question's constraint, e.g. 'capital').")


class VLMPatchPrompt(_Spec):
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


class _VLMGrid(_GridCore, _VisionLanguage):
    model: Name = Field(default=VLM_MODEL, description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.")
    image_cells: Literal["each", "block", "both"] = _IMAGE_CELLS


class VLMTraceSpec(_VLMGrid):
    """Causal tracing in a vision-language model: corrupt the image (noise on its tokens, or a
    counterfactual image) or the text constraint (noise on its token embeddings), and restore the
    language model's states over image and text positions. Runs on the same engine as `TraceSpec`."""

    kind: Literal["trace"] = "trace"
    prompts: tuple[VLMTracePrompt, ...] = Field(min_length=1)
    corruption: Literal["noise", "swap", "text"] = "noise"
    noise: Float = Field(default=3.0, gt=0, description="In units of `sigma`.")
    sigma: Float | None = Field(default=None, gt=0, description="Default: the std, over all prompts, of the clean "
                                "image tokens (`noise`) or of the constraint's token embeddings (`text`).")
    samples: Int = Field(default=10, ge=1, description="Noise draws per cell (1 is used for `swap`).")
    seed: Int = 0
    sites: tuple[str, ...] = _sites_field(("hidden", "mlp", "attention"), TRACE_SITES)
    window: Int = Field(default=10, ge=1, description="Layers restored together for `mlp` and `attention`.")

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return _check_names(v, tuple(TRACE_SITES))

    @model_validator(mode="after")
    def _corruption_inputs(self):
        for i, p in enumerate(self.prompts):
            if self.corruption in ("noise", "swap") and p.image is None:
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
    prompts: tuple[VLMPatchPrompt, ...] = Field(min_length=1)
    sites: tuple[str, ...] = _sites_field(("block_output",), VLM_PATCH_SITES)
    metric: Literal["prob", "logit_diff", "kl"] = "prob"

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return _check_names(v, VLM_PATCH_SITES)


class VLMLocateSpec(_Spec):
    """How a VLM edit's `layer: auto` is found: an image-noise trace of the edit questions (answer:
    `target_true`), MLP windows restored at all image tokens at once; the layer whose window
    restores the most."""

    window: Int = Field(default=10, ge=1, description="MLP layers restored together around each layer.")
    samples: Int = Field(default=5, ge=1)
    noise: Float = Field(default=3.0, gt=0)
    seed: Int = 0


class VLMEditSpec(_VisionLanguage):
    """ROME in a vision-language model with the key read at the image tokens: questions about
    `image` get `target_new`; written as a Delta, with efficacy, paraphrase and other-image metrics."""

    kind: Literal["edit"] = "edit"
    model: Name = Field(default=VLM_MODEL, description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.")
    method: Literal["rome"] = "rome"
    layer: Int | Literal["auto"] = Field(description="The LM's MLP layer whose output projection is edited, or "
                                         "`auto` (from an image-noise trace; needs `target_true`).")
    image: Text = Field(description="`flag:<Country>` or an image file: the subject of the edit.")
    questions: tuple[Text, ...] = Field(min_length=1, description="The text after the image that the edit answers "
                                       "with `target_new`; k* is the mean key over their image tokens.")
    target_new: Text
    target_true: Text | None = Field(default=None, description="The answer before the edit (reported; the trace "
                                    "target of `layer: auto`).")
    paraphrases: tuple[Text, ...] = Field(default=(), description="Held-out questions about the same image "
                                         "(generalisation; never used by the edit).")
    other_images: tuple[Name, ...] = Field(default=(), description="Other images whose top-1 answers to the "
                                          "questions and paraphrases should not change (specificity).")
    kl_prompt: Text = Field(default=" This is a picture of", description="Text after the image "
                           "whose next-token distribution v*'s KL term keeps where it was.")
    locate: VLMLocateSpec = Field(default_factory=VLMLocateSpec, description="The trace behind `layer: auto`.")
    hyperparameters: dict[str, Int | Float] = _hyperparameters_field("rome")
    corpus: tuple[Name, ...] = Field(
        default=(), description="Text files for the key statistics; empty: text sampled from the model itself.")
    mom2_tokens: Int = Field(default=20_000, ge=100)
    image_corpus: tuple[Name, ...] = Field(
        default=(), description="Images whose image-token keys join the key statistics: C = C_text + "
        "`image_corpus_weight` × C_images. Image files, folders of them, `flag:<Country>@<seed>` or `flag:*@<seed>` "
        "(every testbed flag, jittered). Empty: text statistics only, as ROME.")
    image_corpus_weight: Float = Field(default=1.0, ge=0)

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


class LensPrompt(_Spec):
    """A prompt whose states are read through a lens (or knocked out): `target` defaults to the model's
    own top-1 answer at the last position."""

    prompt: Text
    target: Text | None = Field(default=None, description="The answer whose probability is read, tokenized as "
                                "written (' Paris'); default: the model's top-1 at the last position.")
    subject: Text | None = Field(default=None, description="Substring of `prompt`; needed by `subject*` "
                                 "positions and by `block: [subject]`.")


class VLMLensPrompt(_Spec):
    """An image (optional) and the text after it, read through a lens (or knocked out)."""

    image: Text | None = Field(default=None, description="`flag:<Country>[@<seed>]` or an image file; none: a "
                               "text-only prompt.")
    prompt: Text
    target: Text | None = Field(default=None, description="As for a language model's lens prompt.")
    constraint: Text | None = Field(default=None, description="Words of `prompt` (the question's constraint); "
                                    "needed by `block: [constraint]`.")


class _LensCore(_Spec):
    layers: Literal["all"] | tuple[Int, ...] = Field(
        default="all", description="`all`, or layer indices (negative counts from the end).")
    max_batch_rows: Int = Field(default=48, ge=1, description="Rows per forward pass (a memory bound).")

    @field_validator("layers")
    @classmethod
    def _layers_nonempty(cls, v):
        if v != "all" and len(v) == 0:
            raise ValueError("layers must be 'all' or a non-empty list of integers")
        return v


class _Lens(_LensCore):
    kind: Literal["lens"] = "lens"
    top_k: Int = Field(default=5, ge=1, le=100, description="Tokens listed per cell, most probable first.")
    tuned: Name | None = Field(default=None, description="A tuned lens file (`lesion train-lens`): its grid "
                               "`tuned_lens` is read next to the logit lens.")


class LensSpec(_Lens, _Language):
    """The logit lens (nostalgebraist 2020) and the tuned lens (Belrose et al. 2023): each layer's residual
    state, read through the model's own final norm and unembedding (after a learned affine translator
    for the tuned lens), at every layer x position."""

    model: Name = Field(default=DEFAULT_MODEL)
    prompts: tuple[LensPrompt, ...] = Field(min_length=1)
    positions: tuple[Position, ...] = Field(
        default=("all",), min_length=1, description="Columns: `all` is one column per token; a selector naming "
        "several tokens (`subject`) reads the last of them.")


class VLMLensSpec(_Lens, _VisionLanguage):
    """The logit and tuned lens over a VLM's language model: what each image token and text token
    'says' at each layer. Columns are every position (image tokens one each)."""

    model: Name = Field(default=VLM_MODEL)
    prompts: tuple[VLMLensPrompt, ...] = Field(min_length=1)


#: What attention knockout may block: edges from these positions to the target position.
KNOCKOUT_SOURCES = ("subject", "others", "self", "all")
VLM_KNOCKOUT_SOURCES = ("image", "constraint", "others", "self", "all")


class _Knockout(_LensCore):
    kind: Literal["knockout"] = "knockout"
    SOURCES: ClassVar[tuple[str, ...]] = ()      # the position sets `block` may name
    window: Int = Field(default=9, ge=1, description="Layers blocked together, centred on each layer (Geva et "
                        "al. 2023 use 9), by the same window rule as a trace's.")
    targets: tuple[Position, ...] = Field(
        default=("last",), min_length=1, description="The positions whose attention is cut (the grid's columns).")

    @field_validator("block", check_fields=False)
    @classmethod
    def _block(cls, v):
        return _check_names(v, cls.SOURCES, "position set")


class KnockoutSpec(_Knockout, _Language):
    """Attention knockout (Geva et al. 2023): block the attention edges from a set of positions to the
    target position over a window of layers, and read p(answer). One grid per blocked set."""

    SOURCES: ClassVar[tuple[str, ...]] = KNOCKOUT_SOURCES
    model: Name = Field(default=DEFAULT_MODEL)
    prompts: tuple[LensPrompt, ...] = Field(min_length=1)
    block: tuple[str, ...] = _sites_field(("subject", "others", "self"), KNOCKOUT_SOURCES, description=(
        "Edges cut, one grid each: from the `subject` tokens, from every `others` position (neither subject "
        "nor target), from the target to itself (`self`), or from `all` positions."))


    @model_validator(mode="after")
    def _subjects(self):
        for i, p in enumerate(self.prompts):
            if "subject" in self.block and p.subject is None:
                raise ValueError(f"`block: [subject]` needs `prompts[{i}].subject`")
        return self


class VLMKnockoutSpec(_Knockout, _VisionLanguage):
    """Attention knockout in a VLM's language model: cut the edges from the image tokens, the question's
    constraint or the other positions to the last token (Basu et al. 2024)."""

    SOURCES: ClassVar[tuple[str, ...]] = VLM_KNOCKOUT_SOURCES
    model: Name = Field(default=VLM_MODEL)
    prompts: tuple[VLMLensPrompt, ...] = Field(min_length=1)
    block: tuple[str, ...] = _sites_field(("image", "constraint", "others", "self"), VLM_KNOCKOUT_SOURCES,
                                          description="As for a language model, with `image` and `constraint`.")


    @model_validator(mode="after")
    def _sources(self):
        for i, p in enumerate(self.prompts):
            if "image" in self.block and p.image is None:
                raise ValueError(f"`block: [image]` needs `prompts[{i}].image`")
            if "constraint" in self.block and (p.constraint is None or p.constraint not in p.prompt):
                raise ValueError(f"`block: [constraint]` needs `prompts[{i}].constraint`: words of the prompt "
                                 f"{p.prompt!r}, got {p.constraint!r}")
        return self


class ProbeExample(_Spec):
    """A labelled input: its states are the probe's features."""

    prompt: Text
    label: Text
    group: Text | None = Field(default=None, description="The input's type for the control task: examples of "
                               "one group share a random control label (default: the image, else the prompt).")


class VLMProbeExample(ProbeExample):
    """A labelled image (optional) and the text after it."""

    image: Text | None = Field(default=None, description="`flag:<Country>[@<seed>]` or an image file.")


#: Positions a probe reads: a token selector, or (VLMs) the mean over the image tokens.
PROBE_POSITIONS = ("last", "image")


class _Probe(_LensCore):
    kind: Literal["probe"] = "probe"
    positions: tuple[Union[Int, Literal["last", "image"]], ...] = Field(
        default=("last",), min_length=1, description="Where the states are read: `last`, an index, or `image` "
                                                     "(the mean over the image tokens).")
    site: Literal["block_output", "block_input", "mlp_output", "attention_output"] = "block_output"
    heldout: Float = Field(default=0.3, gt=0, lt=1, description="Share held out (stratified by label) for the "
                           "accuracy.")
    split: Literal["examples", "groups"] = Field(
        default="examples", description="Hold out examples (a group's other examples may be trained on), or whole "
        "groups (the probe must generalise to inputs of unseen types; the control task is then at chance).")
    l2: Float = Field(default=1.0, gt=0, description="L2 penalty on the weights (scikit-learn's 1/C), on "
                      "standardized features.")
    control: bool = Field(default=True, description="Also fit the control task (Hewitt & Liang 2019): each "
                          "`group` gets a random label; selectivity = accuracy - control accuracy.")
    seed: Int = 0

    @model_validator(mode="after")
    def _labels(self):
        if len({e.label for e in self.examples}) < 2:
            raise ValueError("`examples` need at least two different labels")
        return self


class ProbeSpec(_Probe, _Language):
    """Linear probes (multinomial logistic regression) on a site's states, per layer x position, with held-out
    accuracy and a control task; each label's probe direction is saved as a concept vector (TCAV-style)
    in the steering-vector format."""

    model: Name = Field(default=DEFAULT_MODEL)
    examples: tuple[ProbeExample, ...] = Field(min_length=4)

    @model_validator(mode="after")
    def _text_only(self):
        if "image" in self.positions:
            raise ValueError("`positions: [image]` is for a vision-language model (examples with `image`)")
        return self


class VLMProbeSpec(_Probe, _VisionLanguage):
    """Linear probes on a VLM's language-model states (image tokens included)."""

    model: Name = Field(default=VLM_MODEL)
    examples: tuple[VLMProbeExample, ...] = Field(min_length=4)


class DaamSpec(_Images):
    """Cross-attention attribution maps (DAAM, Tang et al. 2023): for each word of the prompt, the UNet's
    cross-attention to its tokens summed over steps, layers and heads, upscaled to the image and overlaid
    on it. On the shapes testbed each map is scored against the object's mask (IoU)."""

    kind: Literal["daam"] = "daam"
    model: Name = Field(default=DIFFUSION_MODEL)
    prompts: tuple[Text, ...] = Field(min_length=1)
    words: tuple[Text, ...] = Field(default=(), description="The words mapped; default: every word of each prompt.")
    layers: Literal["all"] | tuple[Int, ...] = Field(
        default="all", description="The cross-attention (`attn2`) layers summed, as indices in the UNet's order "
                                   "(down, mid, up blocks); `all` is DAAM's choice.")
    images: Int = Field(default=8, ge=1)
    threshold: Float = Field(default=0.4, gt=0, lt=1, description="A map's pixels above this share of its maximum "
                             "form its region (DAAM's tau).")


#: The spec classes by (kind, modality): the discriminator of `Spec`.
SPEC_CLASSES = {
    ("trace", "language"): TraceSpec, ("patch", "language"): PatchSpec, ("edit", "language"): EditSpec,
    ("steer", "language"): SteerSpec, ("apply", "language"): ApplySpec,
    ("trace", "vision-language"): VLMTraceSpec, ("patch", "vision-language"): VLMPatchSpec,
    ("edit", "vision-language"): VLMEditSpec,
    ("trace", "text-to-image"): DiffusionTraceSpec, ("erase", "text-to-image"): EraseSpec,
    ("apply", "text-to-image"): DiffusionApplySpec,
    ("lens", "language"): LensSpec, ("lens", "vision-language"): VLMLensSpec,
    ("knockout", "language"): KnockoutSpec, ("knockout", "vision-language"): VLMKnockoutSpec,
    ("probe", "language"): ProbeSpec, ("probe", "vision-language"): VLMProbeSpec,
    ("daam", "text-to-image"): DaamSpec,
}
KINDS = ("trace", "patch", "edit", "steer", "apply", "erase", "lens", "knockout", "probe", "daam")


def modality_of(data: dict) -> Any:
    """A spec's modality from what it says: `modality:` if given; else `kind: erase` or `daam` means text-to-image,
    and an `image:` (on the edit, or on any trace prompt) means vision-language; else language.
    Neither the model's name nor any file is consulted."""
    if "modality" in data:
        return data["modality"]
    if data.get("kind") in ("erase", "daam"):
        return "text-to-image"
    has_image = "image" in data or any(
        isinstance(rows, (list, tuple)) and any(isinstance(p, dict) and "image" in p for p in rows)
        for rows in (data.get("prompts"), data.get("examples")))
    return "vision-language" if has_image else "language"


def _tag(value) -> str | None:
    if not isinstance(value, dict):    # an already built spec object
        return f"{value.kind}:{value.modality}"
    return f"{value.get('kind')}:{modality_of(value)}"


Spec = Annotated[Union[tuple(Annotated[cls, Tag(f"{k}:{m}")] for (k, m), cls in SPEC_CLASSES.items())],
                 Discriminator(_tag)]
_ADAPTER: TypeAdapter = TypeAdapter(Spec)
#: Every field name of every spec class, for "did you mean" on an unknown field.
_FIELDS = sorted({name for cls in (*SPEC_CLASSES.values(), TracePrompt, PatchPrompt, EditRequestSpec, LocateSpec,
                                   SteerPair, EraseConcept, VLMTracePrompt, VLMPatchPrompt, VLMLocateSpec,
                                   LensPrompt, VLMLensPrompt, VLMProbeExample, RequestsFile, SequentialSpec, AttackSpec)
                  for name in cls.model_fields})


_CATALOGUE = Catalogue(SPEC_CLASSES, _FIELDS, KINDS, modality_of)


def parse_spec(data: Any):
    """Validate a plain mapping (as from YAML) into a spec, or raise `SpecError`."""
    if not isinstance(data, dict):
        raise SpecError("spec", data, "a mapping with a `kind:` field")
    if "kind" not in data:
        raise SpecError("kind", None, one_of("", KINDS))
    if _tag(data) not in _CATALOGUE.tags:
        raise SpecError.many([tag_problem(data, _CATALOGUE)])
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise SpecError.many(problems(err, data, _CATALOGUE)) from None
    except RecursionError:
        raise SpecError("spec", "<deeply nested value>", "a spec nested at most a few levels deep") from None


def load_spec(path: str | Path):
    """Read and validate a YAML spec file (UTF-8, within the size, depth and alias limits of `specfile`)."""
    return parse_spec(load_yaml(read_spec_text(path), source=str(path)))


def spec_to_dict(spec) -> dict:
    """All fields, defaults included, as plain JSON-able data (`kind` first)."""
    data = spec.model_dump(mode="json")
    return {"kind": data.pop("kind"), **data}


def dump_spec(spec) -> str:
    """YAML text that `parse_spec(load_yaml(...))` turns back into an equal spec.

    Text is written as UTF-8 where that reads back the same; PyYAML writes some characters (U+0085,
    U+2028, U+2029) raw although YAML reads them as line breaks, so such a spec is written escaped."""
    import yaml

    data = spec_to_dict(spec)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text) != data:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=False)
    return text


def spec_schema() -> dict:
    """The JSON Schema of every spec class: exactly one `oneOf` branch matches a valid spec.

    `kind` is required in every branch; `modality` is required where the spec's fields do not imply
    it (trace and apply on a text-to-image model)."""
    schema = _ADAPTER.json_schema()
    schema["title"] = "Lesion spec"
    defs = schema.get("$defs", {})
    for (kind, modality), cls in SPEC_CLASSES.items():
        branch = defs.get(cls.__name__)
        if branch is None:
            continue
        required = set(branch.get("required", [])) | {"kind"}
        if modality == "text-to-image" and kind not in ("erase", "daam"):
            required.add("modality")
        branch["required"] = sorted(required)
        if modality == "vision-language":    # as `modality_of`: said, or implied by an image somewhere
            props = branch.get("properties", {})
            implied = [{"required": ["modality"]}] + ([{"required": ["image"]}] if "image" in props else [])
            implied += [{"required": [rows], "properties": {rows: {"contains": {"required": ["image"]}}}}
                        for rows in ("prompts", "examples") if rows in props]
            branch["anyOf"] = implied
    return schema
