"""The grid specs on language models: `kind: trace` (causal tracing) and `kind: patch`
(activation patching), and their prompts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from interventions.spec.base_specs import (
    DEFAULT_MODEL,
    SITE_NAMES,
    TRACE_SITES,
    Float,
    Int,
    LanguageSpec,
    Name,
    Position,
    Seed,
    SpecModel,
    Text,
    check_names,
    sites_field,
)

#: What a patch spec's `metric` and a grid's `sites` mean, for every modality's patch spec.
METRIC_DESCRIPTION = ("`prob`: p(target); `logit_diff`: logit(target) - logit(counterfactual_target); `kl`: "
                      "KL(source run || patched run).")
SITES_DESCRIPTION = "Which states the grid restores or patches, one grid per site."


class TracePrompt(SpecModel):
    """One fact to trace: `prompt` contains `subject`; `target` defaults to the clean top-1 token."""

    prompt: Text
    subject: Text
    target: Text | None = None
    counterfactual_subject: Text | None = Field(
        default=None, min_length=1,
        description="For `corruption: swap`: replaces `subject` in the corrupted run; must give as many tokens.")


class PatchPrompt(SpecModel):
    """A base prompt patched with states from an aligned `source` prompt."""

    base: Text
    source: Text
    target: Text | None = Field(
        default=None, description="Token whose metric is read; default: the source's top-1.")
    counterfactual_target: Text | None = Field(
        default=None, description="For `logit_diff`; default: the base's top-1.")
    subject: Text | None = Field(
        default=None, description="Substring of `base`; needed by `subject*` positions.")


#: The most features one grid may have rows for.
MAX_GRID_FEATURES = 512


class FeatureSite(SpecModel):
    """A grid whose rows are a dictionary's features: each cell restores one feature's source (clean)
    activation at the column's positions, at the dictionary's own site and layer, and keeps everything
    else of the base run's state, the dictionary's reconstruction error included."""

    dictionary: Name = Field(description="A SAELens dictionary folder (from `lesion train-dictionary`, or "
                             "made elsewhere) at a residual, MLP or attention output of this model.")
    features: Literal["all"] | tuple[Int | tuple[Int, ...], ...] = Field(
        min_length=1, max_length=MAX_GRID_FEATURES, description=(
            f"The grid's rows, at most {MAX_GRID_FEATURES}: a feature (an index into the dictionary), or a list of "
            "features restored together in one row; or `all` with `method: attribution`, every feature, each "
            "estimated from one backward pass per prompt."))
    name: Name = Field(default="features", description="The grid's name in the result (not a site name).")
    edit: Literal["restore", "zero", "clamp", "add"] = Field(default="restore", description=(
        "What a cell does to its features: `restore` the source (clean) run's activation, `zero` (ablate), "
        "`clamp` to `value`, or `add` `value`; the rest of the base state is kept either way."))
    value: Float | None = Field(default=None, description="The activation `clamp` sets, or what `add` adds.")

    @model_validator(mode="after")
    def _value(self):
        if (self.value is None) != (self.edit in ("restore", "zero")):
            raise ValueError(f"`value` is given with `edit: clamp` or `add`, and only then (edit: {self.edit})")
        return self

    @field_validator("features")
    @classmethod
    def _features(cls, v):
        if v == "all":
            return v
        groups = [g if isinstance(g, tuple) else (g,) for g in v]
        if any(not g for g in groups):
            raise ValueError("a row's list of features must hold at least one feature")
        if any(f < 0 for g in groups for f in g):
            raise ValueError(f"feature indices are at least 0, got {min(f for g in groups for f in g)}")
        if any(len(set(g)) != len(g) for g in groups) or len({tuple(sorted(g)) for g in groups}) != len(groups):
            raise ValueError(f"features must not repeat, in a row or as rows, got {[list(g) if isinstance(g, tuple) else g for g in v]}")
        return v


class GridCore(SpecModel):
    """What every trace and patch grid takes, whatever the model."""

    model: Name = Field(default=DEFAULT_MODEL, description=(
        "`smollm2-135m`, `gemma3-270m`, a local Hugging Face directory, or a hub id (online only)."))
    layers: Literal["all"] | tuple[Int, ...] = Field(
        default="all", description="`all`, or layer indices (negative counts from the end).")
    window: Int = Field(default=1, ge=1, description=(
        "Layers patched together, centred on each cell's layer (ROME's clipped window); it widens every "
        "site."))
    max_batch_rows: Int = Field(default=48, ge=1, description="Rows per forward pass (a memory bound).")
    method: Literal["exact", "attribution"] = Field(
        default="exact", description="`exact`: one patched run per cell; `attribution`: the first-order "
                                     "approximation of every cell from one forward and backward pass per prompt.")
    steps: Int = Field(default=1, ge=1, le=256, description=(
        "`method: attribution`: average the gradients at this many points on the straight path from the base "
        "(corrupted) input embeddings to the source (clean) ones, as EAP-IG does; 1 is plain attribution patching."))
    rule: Literal["gradient", "relp", "qk-fix", "atp-star"] = Field(default="gradient", description=(
        "`method: attribution`: `gradient` (attribution patching); `relp` (RelP: the backward pass carries LRP's "
        "rules, forward values unchanged); `qk-fix` (AtP*'s QK fix: each restored state's next attention pattern "
        "taken exactly); `atp-star` (the QK fix and GradDrop, magnitudes; one backward per layer)."))

    features: FeatureSite | None = Field(default=None, description=(
        "A grid of a dictionary's features beside the site grids: one row per feature, restored alone "
        "(see `FeatureSite`)."))

    @model_validator(mode="after")
    def _feature_grid(self):
        if self.features is None:
            return self
        if self.features.name in (*SITE_NAMES, *TRACE_SITES, *getattr(self, "sites", ())):
            raise ValueError(f"`features.name`: {self.features.name!r} names a site grid; give the feature grid "
                             "another name")
        if self.features.features == "all" and self.method != "attribution":
            raise ValueError("`features.features: all` is for `method: attribution` (exact patching would run one "
                             f"row per feature and cell); name at most {MAX_GRID_FEATURES} features for `method: exact`")
        return self

    @model_validator(mode="after")
    def _steps_need_attribution(self):
        if self.steps > 1 and self.method != "attribution":
            raise ValueError(f"`steps: {self.steps}` is for `method: attribution` (exact patching has no gradient)")
        if self.rule != "gradient" and self.method != "attribution":
            raise ValueError(f"`rule: {self.rule}` is for `method: attribution` (exact patching has no gradient)")
        if self.steps > 1 and self.rule in ("qk-fix", "atp-star"):
            raise ValueError(f"`steps: {self.steps}` is for `rule: gradient` or `relp`; `rule: {self.rule}` takes "
                             "the gradient at the base run only")
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


class _Grid(GridCore, LanguageSpec):
    positions: tuple[Position, ...] = Field(
        default=("all",), min_length=1,
        description="Columns of the grid: `all` expands to one column per token; `subject` restores "
                    "all subject tokens together in one column.")


class TraceSpec(_Grid):
    """Causal tracing (Meng et al. 2022): corrupt the subject, restore one clean state at a time."""

    kind: Literal["trace"] = "trace"
    prompts: tuple[TracePrompt, ...] = Field(min_length=1, description=(
        "The facts to trace: the prompt, its subject, and optionally the answer."))
    corruption: Literal["noise", "swap"] = Field(default="noise", description=(
        "How the subject is corrupted: Gaussian `noise` on its token embeddings, or a `swap` for the "
        "prompt's `counterfactual_subject`."))
    noise: Float = Field(default=3.0, gt=0, description="Noise scale in units of `sigma`.")
    sigma: Float | None = Field(
        default=None, gt=0, description="Embedding std; default: the std of all subject-token embeddings.")
    samples: Int = Field(default=10, ge=1, description="Noise draws per cell (1 is used for `swap`).")
    seed: Seed = Field(default=0, description="Seeds every random draw (noise, sampling, splits).")
    sites: tuple[str, ...] = sites_field(("hidden", "mlp", "attention"), TRACE_SITES,
                                         description=SITES_DESCRIPTION)
    window: Int = Field(default=10, ge=1, description="Layers restored together for `mlp` and `attention`.")

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return check_names(v, tuple(TRACE_SITES))


class PatchSpec(_Grid):
    """Activation patching: copy source states into the base run, one cell at a time."""

    kind: Literal["patch"] = "patch"
    prompts: tuple[PatchPrompt, ...] = Field(min_length=1, description=(
        "Aligned base and source prompts (the same number of tokens)."))
    sites: tuple[str, ...] = sites_field(("block_output",), SITE_NAMES, description=SITES_DESCRIPTION)
    metric: Literal["prob", "logit_diff", "kl"] = Field(default="prob", description=METRIC_DESCRIPTION)

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return check_names(v, SITE_NAMES)
