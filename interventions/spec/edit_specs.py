"""`kind: edit` on language models: the requests, the layer location, each method's typed
hyperparameters, requests files and sequential editing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from interventions.core.errors import one_of
from interventions.spec.base_specs import DEFAULT_MODEL, Float, Int, LanguageSpec, Name, Seed, SpecModel, Text
from interventions.spec.messages import expected


class EditRequestSpec(SpecModel):
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


class LocateSpec(SpecModel):
    """How `layer: auto` / `layers: auto` is found: a causal trace of the MLP states of the requests'
    prompts (answer: `target_true`), averaged over requests, read at `position`."""

    position: Literal["subject_last", "subject_first", "subject"] = Field(
        default="subject_last", description="Where the MLP is restored: ROME reads its key at `subject_last`.")
    window: Int = Field(default=10, ge=1, description="MLP layers restored together around each layer (ROME: 10).")
    samples: Int = Field(default=10, ge=1)
    noise: Float = Field(default=3.0, gt=0)
    sigma: Float | None = Field(default=None, gt=0, description="As in `kind: trace`; default: the std of "
                                "the requests' subject-token embeddings.")
    seed: Seed = 0
    span: Int = Field(default=5, ge=1, description="MEMIT: how many consecutive layers `layers: auto` takes.")


_V_STEPS = "Gradient steps of the target optimisation (ROME 20, MEMIT 25)."
_V_LR = "Its learning rate."
_DECAY = "Its weight decay."
_CLAMP = "Bound on the change's norm, as a multiple of the original's (ROME 4, MEMIT 0.75)."
_KL = "Weight of the essence KL term."
_TEMPLATES = ("Generated prefixes behind the prompt, as [tokens, how many] pairs (ROME [[5, 10], [10, 10]]; MEMIT, "
              "AlphaEdit [[10, 5]]); [] for the plain prompt only.")
_MOM2 = "Tokens behind the key statistics C (the spec's `mom2_tokens`)."
#: How a request's target optimisation stops early: below an NLL of 0.05 (ROME, MEMIT), or as soon as every
#: target token is the most probable one at every prompt row (ENCORE's most-probable early stopping, MPES).
EARLY_STOPS = ("nll", "mpes")
_EARLY_STOP = ("`nll`: stop a request's target optimisation once its NLL is below 0.05 (ROME); `mpes`: as soon "
               "as each target token is the top-1 prediction at every prompt row (ENCORE's most-probable early "
               "stopping).")
_MAX_UPDATE = ("Bound on each batch's update of each edited matrix: ||dW||_F <= this x ||W0||_F (W0 the base "
               "weight); a larger update is scaled down to it. 0: no bound.")


class _Bounded(SpecModel):
    """What every method's hyperparameters share: the update norm bound (applied by
    `editors.editor.Editor` to each batch), one-line errors, and how a Delta records them. One class per
    method holds its hyperparameters: the spec's `hyperparameters:` overrides them (typed, so `v_stpes`
    is refused when the spec is read), and the editors run on the same object. `layer`/`layers` and
    `mom2_tokens` come from the spec's own fields, not from `hyperparameters:`."""

    max_update_norm: Float = Field(default=0.0, ge=0, description=_MAX_UPDATE)

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as err:      # one line, naming the field, as every other error
            e = err.errors()[0]
            raise ValueError(f"`{'.'.join(str(p) for p in e['loc'])}` must be {expected(e)}") from None

    def recorded(self, **extra) -> dict:
        """As a Delta's metadata records them: tuples as lists, `extra` added."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, tuple) else v
        return {**{k: plain(v) for k, v in self.model_dump().items()}, **extra}


class _Optimiser(_Bounded):
    """What ROME's v* and MEMIT's z optimisations share."""

    @field_validator("context_templates", check_fields=False)
    @classmethod
    def _templates(cls, v):
        if any(length < 1 or count < 1 for length, count in v):
            raise ValueError(f"`context_templates` must be [tokens, how many] pairs of positive integers, got "
                             f"{[list(x) for x in v]}")
        return v


class RomeHyperparameters(_Optimiser):
    """ROME's and r-ROME's hyperparameters; the defaults are ROME's GPT-2 XL values."""

    layer: Int = Field(ge=0, description="The edited layer (the spec's `layer`).")
    v_steps: Int = Field(default=20, ge=1, description=_V_STEPS)
    v_lr: Float = Field(default=0.5, gt=0, description=_V_LR)
    v_weight_decay: Float = Field(default=0.5, ge=0, description=_DECAY)
    clamp_norm_factor: Float = Field(default=4.0, gt=0, description=_CLAMP)
    kl_factor: Float = Field(default=0.0625, ge=0, description=_KL)
    context_templates: tuple[tuple[Int, Int], ...] = Field(default=((5, 10), (10, 10)), description=_TEMPLATES)
    mom2_tokens: Int = Field(default=20_000, ge=1, description=_MOM2)
    mom2_ridge: Float = Field(default=1e-4, ge=0, description="Ridge added to C, x its mean eigenvalue.")
    early_stop: Literal[EARLY_STOPS] = Field(default="nll", description=_EARLY_STOP)
    seed: Seed = 0


class EmmetHyperparameters(RomeHyperparameters):
    """ROME's hyperparameters plus EMMET's ridge on Kᵀ C⁻¹ K (0: the exact equalities)."""

    equality_ridge: Float = Field(default=1e-3, ge=0, description="Ridge on K^T C^-1 K, x its mean diagonal; "
                                  "0: the exact equalities.")


class _MemitFamily(_Optimiser):
    """What MEMIT and AlphaEdit share; defaults follow MEMIT's GPT-J settings where they carry over."""

    layers: tuple[Int, ...] = Field(description="The edited layers, increasing (the spec's `layers`).")
    v_steps: Int = Field(default=25, ge=1, description=_V_STEPS)
    v_lr: Float = Field(default=0.5, gt=0, description=_V_LR)
    v_weight_decay: Float = Field(default=0.5, ge=0, description=_DECAY)
    clamp_norm_factor: Float = Field(default=0.75, gt=0, description=_CLAMP)
    kl_factor: Float = Field(default=0.0625, ge=0, description=_KL)
    context_templates: tuple[tuple[Int, Int], ...] = Field(default=((10, 5),), description=_TEMPLATES)
    mom2_tokens: Int = Field(default=20_000, ge=1, description=_MOM2)
    early_stop: Literal[EARLY_STOPS] = Field(default="nll", description=_EARLY_STOP)
    norm_penalty: Float = Field(default=0.0, ge=0, description="ENCORE's Frobenius norm constraint: the weight "
                                "of ||dW||_F^2 in each layer's least-squares objective (0: none).")
    preserve_scale: Float = Field(default=1.0, ge=0, description="w of the term w||dW K_s||^2 over the keys of "
                                   "`preserve_from`'s subjects (unused without it).")
    norm_anchor: Int = Field(default=0, ge=0, description="NAS (Liu et al. 2026), norm-anchor scaling: the "
                             "targets of this many of the spec's requests (evenly spaced) are solved on the unedited "
                             "model, and the mean norm of their MLP values v* = v0 + delta (the largest 5% dropped) "
                             "is the anchor; every batch's solved v* is rescaled to it, and a request whose v* is "
                             "over twice the anchor is not edited (0: off).")
    seed: Seed = 0

    @field_validator("layers")
    @classmethod
    def _increasing(cls, v):
        if not v or list(v) != sorted(set(v)):
            raise ValueError(f"`layers` must be a non-empty increasing list, got {list(v)}")
        return v

    def z_hyperparameters(self) -> RomeHyperparameters:
        """The target optimisation's settings, as ROME's, at the last edited layer."""
        return RomeHyperparameters(layer=self.layers[-1], v_steps=self.v_steps, v_lr=self.v_lr,
                                   v_weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                                   kl_factor=self.kl_factor, context_templates=self.context_templates,
                                   early_stop=self.early_stop, seed=self.seed)


class MemitHyperparameters(_MemitFamily):
    """MEMIT's hyperparameters."""

    mom2_update_weight: Float = Field(default=15_000.0, ge=0, description="lambda: the weight of C.")


class AlphaEditHyperparameters(_MemitFamily):
    """AlphaEdit (Fang et al. 2025): MEMIT's targets and layers, each layer's update projected onto the
    null space of its preserved keys (no lambda: the projection takes its place)."""

    nullspace_threshold: Float = Field(default=2e-2, gt=0, description="Eigenvalues of C below this span the "
                                       "null space the update lives in (AlphaEdit: 0.02).")
    l2: Float = Field(default=1.0, gt=0, description="Ridge on the update (AlphaEdit: 10 on Llama-3, 1 elsewhere).")


class EncoreHyperparameters(MemitHyperparameters):
    """ENCORE (Gupta et al. 2025): MEMIT with most-probable early stopping of the target optimisation and a
    Frobenius norm constraint on each update."""

    early_stop: Literal[EARLY_STOPS] = Field(default="mpes", description=_EARLY_STOP)
    norm_penalty: Float = Field(default=10.0, ge=0, description="The weight of ||dW||_F^2 in each layer's "
                                "least-squares objective (ENCORE's norm constraint).")


class UltraEditHyperparameters(_Bounded):
    """UltraEdit (Gu et al. 2025): no target optimisation and no key statistics. Each edited projection's
    inputs (keys) at the answer tokens and the loss gradient at its outputs, normalised by running statistics
    over every edit so far (lifelong normalisation), give pseudo-values −lr ‖k̂‖² ĝ; a ridge regression from
    the raw keys to them is the closed-form update (`editors.methods.ultraedit`)."""

    layers: tuple[Int, ...] = Field(description="The edited layers, increasing (the spec's `layers`).")
    lr: Float = Field(default=1e-4, gt=0, description="η of the pseudo-values −η ‖k̂‖² ĝ: the step along the "
                      "normalised negative gradient (1e-4 is the smallest tried that edits SmolLM2 at all; the "
                      "authors use 1e-6 on 27B models).")
    ridge: Float = Field(default=1.0, gt=0, description="λ of the ridge regression from the raw keys (the authors' 1).")
    mom2_tokens: Int = Field(default=20_000, ge=1, description="Unused: UltraEdit keeps no key statistics.")

    _increasing = field_validator("layers")(_MemitFamily._increasing.__func__)


@dataclass(frozen=True)
class EditMethod:
    """What the spec knows of an edit method: its hyperparameters, and whether it edits one layer
    (`layer:`) and takes a whole batch of requests at once. How it computes is `editors.methods.STEPS`."""

    hyperparameters: type[_Bounded]
    one_layer: bool
    batch: bool
    statistics: bool = True        # does it need the key statistics C of its layers


#: The edit methods a spec may name.
EDIT_METHODS = {
    "rome": EditMethod(RomeHyperparameters, one_layer=True, batch=False),
    "r-rome": EditMethod(RomeHyperparameters, one_layer=True, batch=False),
    "emmet": EditMethod(EmmetHyperparameters, one_layer=True, batch=True),
    "memit": EditMethod(MemitHyperparameters, one_layer=False, batch=True),
    "alphaedit": EditMethod(AlphaEditHyperparameters, one_layer=False, batch=True),
    "encore": EditMethod(EncoreHyperparameters, one_layer=False, batch=True),
    "ultraedit": EditMethod(UltraEditHyperparameters, one_layer=False, batch=True, statistics=False),
}
EditMethodName = Literal[tuple(EDIT_METHODS)]
#: Read from EDIT_METHODS: each method's hyperparameter class, the one-layer methods, the batch methods.
HYPERPARAMETERS = {name: m.hyperparameters for name, m in EDIT_METHODS.items()}
ONE_LAYER_METHODS = tuple(name for name, m in EDIT_METHODS.items() if m.one_layer)
BATCH_METHODS = tuple(name for name, m in EDIT_METHODS.items() if m.batch)
#: The methods that take `preserve_from`: MEMIT's family, whose layer objectives it adds a term to.
PRESERVING_METHODS = tuple(name for name, m in EDIT_METHODS.items() if issubclass(m.hyperparameters, _MemitFamily))
#: Hyperparameters set by the spec's own fields, never by `hyperparameters:`.
FROM_SPEC = ("layer", "layers", "mom2_tokens")


def check_hyperparameters(method: str, values: dict) -> dict:
    """`values` (a spec's `hyperparameters:`) checked against `method`'s class; the same dict back, or a
    ValueError naming the first bad key."""
    model = HYPERPARAMETERS[method]
    allowed = [f for f in model.model_fields if f not in FROM_SPEC]
    for key in values:
        if key not in allowed:
            raise ValueError(f"unknown hyperparameter {key!r} for `method: {method}`; expected {one_of(key, allowed)}")
    where = {"layer": 0} if "layer" in model.model_fields else {"layers": (0,)}
    try:
        model.model_validate({**where, **values})
    except ValidationError as err:
        e = err.errors()[0]
        raise ValueError(f"`{'.'.join(str(p) for p in e['loc'])}` must be {expected(e)}") from None
    return values


def overrides_schema(method: str) -> dict:
    """The JSON Schema of `hyperparameters:` for `method`: its class's fields, all optional, less FROM_SPEC."""
    schema = HYPERPARAMETERS[method].model_json_schema()
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in FROM_SPEC}
    schema.pop("required", None)
    return schema


def hyperparameters_field(*methods: str):
    schemas = [overrides_schema(m) for m in methods]
    extra = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return Field(default_factory=dict, json_schema_extra=extra, description=(
        f"Overrides of the method's defaults ({', '.join(methods)}): typed, so a misspelt name is refused."))


class RequestsFile(SpecModel):
    """Edit requests read from a file, so that thousands need not sit in the spec: CounterFact's JSON
    (``requested_rewrite`` records, as `recipes/train/make_facts.py` writes them), zsRE's JSON (``src``,
    ``subject``, ``alt``, ``answers``, ``rephrase``; no neighbourhood prompts), or YAML/JSON lists of
    `requests` entries. Read by `editors.editor.resolve_requests`."""

    path: Name = Field(description="The file; a name ending in .gz is read gzip-compressed.")
    split: Literal["all", "tune", "eval"] = Field(default="all", description="Only the records of this `split` "
                                                  "(records without one count as `eval`).")
    offset: Int = Field(default=0, ge=0, description="Skip this many records (after the split).")
    limit: Int | None = Field(default=None, ge=1, description="Then take at most this many.")


class SequentialSpec(SpecModel):
    """Sequential editing: the requests in batches, each computed on the model with the earlier batches
    applied, measured as it goes (`editors.sequential`)."""

    batch_size: Int = Field(default=1, ge=1, description="Requests per batch (ROME and r-ROME: 1).")
    eval_every: Int = Field(default=1, ge=1, description="Measure after every this many batches (and after "
                            "the last).")
    eval_at: tuple[Int, ...] = Field(default=(), description="Also measure once this many edits are done "
                                     "(e.g. [10] with ROME's batches of one).")
    sample: Int = Field(default=200, ge=1, description="Paraphrase and neighbourhood prompts are measured on "
                        "at most this many of the edits so far, evenly spaced (teacher-forced efficacy on all of them; the "
                        "generation-based metrics on these only).")
    fluency_prompts: Int = Field(default=8, ge=1, description="Fluency: generations from the subjects of the "
                                 "run's first this many requests.")
    generation: bool = Field(default=True, description="Also judge every measurement by what the model writes: "
                             "greedy continuations of the (sampled) edit, paraphrase, neighbour and held-out prompts "
                             "must state their answer, and continuations of the fluency prompts are scored for "
                             "n-gram entropy and perplexity under the unedited model.")
    heldout: Name | None = Field(default=None, description="A JSON file (gzip-compressed if its name ends in "
                                 ".gz) with `heldout_known` facts (prompt, answer) never edited; default: the `requests_from` file's (set when it is read).")
    text: Name | None = Field(default=None, description="A held-out text whose perplexity is tracked; default: "
                              "the one shipped with the fact sets.")
    resume: Name | None = Field(default=None, description="The folder of an interrupted run of this same spec "
                                "(its `.NAME.partial-*` staging folder): continue from its last checkpoint.")


class EditSpec(LanguageSpec):
    """A weight edit (ROME, r-ROME, EMMET, MEMIT, AlphaEdit, ENCORE or UltraEdit) written as a Delta, with CounterFact-style
    metrics."""

    kind: Literal["edit"] = "edit"
    model: Name = Field(default=DEFAULT_MODEL, description=(
        "A built-in language model (`smollm2-135m`, `gemma3-270m`), a local Hugging Face folder, or a hub"
        " id (online only)."))
    method: EditMethodName = Field(default="rome", description=(
        "The edit method: `rome`, `r-rome`, `emmet`, `memit`, `alphaedit`, `encore` or `ultraedit`."))
    layer: Int | Literal["auto"] | None = Field(
        default=None, description="ROME, r-ROME, EMMET: the MLP layer whose output projection is edited, or "
                                  "`auto` (from a trace).")
    layers: tuple[Int, ...] | Literal["auto"] | None = Field(
        default=None, description="MEMIT, AlphaEdit, ENCORE, UltraEdit: the increasing range of MLP layers, or `auto` (from a trace).")
    locate: LocateSpec = Field(default_factory=LocateSpec, description="The trace behind `auto`.")
    requests: tuple[EditRequestSpec, ...] = Field(default=(), description="The facts to rewrite (and/or "
                                                  "`requests_from`).")
    requests_from: RequestsFile | None = Field(default=None, description="More requests, read from a file.")
    preserve_from: RequestsFile | None = Field(default=None, description=(
        "MEMIT, AlphaEdit, ENCORE: requests (only their prompts and subjects are used) about subjects that are not "
        "edited, whose keys every update must leave alone: a term w||dW K_s||^2 in each layer's objective "
        "(w: `hyperparameters.preserve_scale`). Lesion's own option; e.g. the tuning split's subjects."))
    hyperparameters: dict[str, Int | Float | Literal[EARLY_STOPS] | tuple[tuple[Int, Int], ...]] = \
        hyperparameters_field("rome", "emmet", "memit", "alphaedit", "encore", "ultraedit")
    sequential: SequentialSpec | None = Field(default=None, description="Edit in batches, each on the model "
                                              "with the earlier ones applied, measuring after each.")
    corpus: tuple[Name, ...] = Field(
        default=(), description="Text files for the key statistics; empty: text sampled from the model itself.")
    mom2_tokens: Int = Field(default=20_000, ge=100, description=(
        "Tokens of text behind the key statistics C (the second moment of the edited layer's keys)."))
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
        if self.preserve_from is not None and self.method not in PRESERVING_METHODS:
            raise ValueError(f"`preserve_from` works with `method:` {', '.join(PRESERVING_METHODS)}; "
                             f"`method: {self.method}` does not take it")
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
