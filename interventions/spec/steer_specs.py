"""`kind: steer` (steering vectors) and `kind: apply` (saved deltas and vectors at inference) on
language models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from interventions.spec.base_specs import DEFAULT_MODEL, Float, Int, LanguageSpec, Name, Seed, SpecModel, Text

STEER_SITES = ("block_output", "block_input", "mlp_output", "attention_output")
#: Which positions a steering vector is added at during generation (see interventions.lenses.steering).
APPLY_TO = ("all", "prompt", "generated")


class SteerPair(SpecModel):
    positive: Text
    negative: Text


class SteerSpec(LanguageSpec):
    """A steering vector (CAA / ActAdd mean difference, or RepE's PCA of paired differences):
    estimated from contrastive prompts, saved, and added during generation at each coefficient."""

    kind: Literal["steer"] = "steer"
    model: Name = Field(default=DEFAULT_MODEL, description=(
        "A built-in language model (`smollm2-135m`, `gemma3-270m`), a local Hugging Face folder, or a hub"
        " id (online only)."))
    pairs: tuple[SteerPair, ...] = Field(default=(), description="Contrastive pairs (needed by `pca`).")
    positive: tuple[Text, ...] = Field(default=(), description="Or: a positive set ...")
    negative: tuple[Text, ...] = Field(default=(), description="... and a negative set (`mean_diff` only).")
    method: Literal["mean_diff", "pca", "feature"] = Field(default="mean_diff", description=(
        "`mean_diff`: the mean difference of the pairs' states (CAA/ActAdd); `pca`: their first principal"
        " direction (RepE); `feature`: one feature of a `dictionary`, its decoder direction times how much more "
        "it is active on the positive prompts than on the negative ones (AxBench's SAE baseline)."))
    dictionary: Name | None = Field(default=None, description=(
        "`method: feature`: a SAELens dictionary folder at the spec's one layer and `site`."))
    feature: Int | None = Field(default=None, ge=0, description=(
        "`method: feature`: the feature; default: the one whose activation differs most between the positive "
        "and negative prompts' read states."))
    layers: tuple[Int, ...] = Field(min_length=1, description="One vector per layer, each added at its layer.")
    site: Literal["block_output", "block_input", "mlp_output", "attention_output"] = Field(
        default="block_output", description=(
        "Which state is read (and, for a vector, where it is added)."))
    read: Literal["last", "mean"] = Field(default="last", description="Read the states at the last token, "
                                          "or averaged over each prompt's tokens.")
    coefficients: tuple[Float, ...] = Field(default=(0.0, 1.0, 2.0, 4.0, 8.0), min_length=1, description=(
        "The coefficients the vector is added with; one generation per coefficient and prompt."))
    apply_to: Literal["all", "prompt", "generated"] = Field(
        default="all", description="Add at every position (prompt and generated), the prompt only, or the "
                                   "generated tokens only.")
    prompts: tuple[Text, ...] = Field(min_length=1, description="Test prompts to generate from.")
    max_new_tokens: Int = Field(description="Tokens generated per prompt.", default=40, ge=1)
    temperature: Float = Field(default=0.0, ge=0, description="0: greedy; otherwise sampled with `seed`.")
    samples: Int = Field(default=1, ge=1, description="Generations per prompt and coefficient (sampling only).")
    seed: Seed = Field(default=0, description="Seeds every random draw (noise, sampling, splits).")
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
        if (self.method == "feature") != (self.dictionary is not None) or (self.feature is not None
                                                                          and self.method != "feature"):
            raise ValueError("`method: feature` takes a `dictionary` (and optionally a `feature`); the other methods "
                             "take neither")
        if self.method == "feature" and len(self.layers) != 1:
            raise ValueError(f"`method: feature` steers at the dictionary's one layer; got layers {list(self.layers)}")
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


class ApplySpec(LanguageSpec):
    """Load deltas (verified against the base) and/or a steering vector, and generate with and without."""

    kind: Literal["apply"] = "apply"
    model: Name = Field(default=DEFAULT_MODEL, description=(
        "A built-in language model (`smollm2-135m`, `gemma3-270m`), a local Hugging Face folder, or a hub"
        " id (online only)."))
    deltas: tuple[Name, ...] = Field(default=(), description="Delta files, applied in this order.")
    steer: Name | None = Field(default=None, description="A steering vector file (from `kind: steer`).")
    coef: Float = Field(default=4.0, description="The steering vector's coefficient.")
    apply_to: Literal["all", "prompt", "generated"] = Field(default="all", description=(
        "Where the steering vector is added: `all` positions, the `prompt` only, or the `generated` "
        "tokens only."))
    prompts: tuple[Text, ...] = Field(min_length=1, description=(
        "The prompts to generate from (or to draw, on a text-to-image model)."))
    max_new_tokens: Int = Field(description="Tokens generated per prompt.", default=20, ge=1)

    @model_validator(mode="after")
    def _something(self):
        if not self.deltas and self.steer is None:
            raise ValueError("give `deltas` (edits) and/or `steer` (a steering vector)")
        return self


#: Sites of a diffusion trace: the text encoder's states (per layer x token) and the UNet's
#: cross-attention layers (a window of them gets the clean prompt, LocoGen-style).
