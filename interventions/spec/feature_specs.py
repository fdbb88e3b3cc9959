"""`kind: features`: describe a dictionary's features and a layer's MLP neurons on a set of inputs, and
score them against the concepts the inputs are labelled with."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from interventions.spec.base_specs import (
    DEFAULT_MODEL,
    VLM_MODEL,
    Float,
    Int,
    LanguageSpec,
    Name,
    Seed,
    SpecModel,
    Text,
)


class FeatureExample(SpecModel):
    """An input, and the concepts it holds (for scoring; none: only described)."""

    prompt: Text
    concepts: tuple[Text, ...] = Field(default=(), description="The concepts this input holds (e.g. `red`, "
                                       "`circle`); every concept named anywhere is scored on every example.")


class FeaturesSpec(LanguageSpec):
    """Describe units on a set of inputs: the top features at each token, the inputs that activate each
    chosen feature and neuron most (their tokens marked), and, when the inputs carry concepts, each
    concept's best feature set beside its best single MLP neuron (detection F1 on a held-out split)."""

    kind: Literal["features"] = "features"
    model: Name = Field(default=DEFAULT_MODEL, description=(
        "A built-in language model (`smollm2-135m`, `gemma3-270m`), a local Hugging Face folder, or a hub"
        " id (online only)."))
    dictionary: Name | None = Field(default=None, description="A SAELens dictionary folder (from `lesion "
                                    "train-dictionary`, or made elsewhere) at a site of this model; none: neurons only.")
    layer: Int | None = Field(default=None, ge=0, description="The layer whose MLP neurons are described (the "
                              "inputs of its down projection); default: the dictionary's layer.")
    neurons: bool = Field(default=True, description="Describe and score the MLP neurons too.")
    examples: tuple[FeatureExample, ...] = Field(min_length=1, description="The inputs.")
    top: Int = Field(default=5, ge=1, le=100, description="Features listed per token.")
    describe: Int = Field(default=10, ge=1, le=1000, description="Units described by their top inputs: the most "
                          "often active features (and the neurons with the largest activations).")
    max_examples: Int = Field(default=5, ge=1, le=100, description="Top inputs shown per described unit.")
    heldout: Float = Field(default=0.5, gt=0, lt=1, description="Share of the examples the concept scores are "
                           "reported on (thresholds and the best unit are chosen on the rest).")
    seed: Seed = Field(default=0, description="Seeds the split.")
    pool: Literal["max", "last"] = Field(default="max", description="An example's activation of a unit for "
                                         "scoring: its largest over the tokens after the first, or the last token's.")

    @model_validator(mode="after")
    def _units(self):
        if self.dictionary is None and not self.neurons:
            raise ValueError("`dictionary`: give a dictionary, or keep `neurons: true`; there is nothing to describe")
        if self.dictionary is None and self.layer is None:
            raise ValueError("`layer`: give the layer whose neurons are described (there is no dictionary to take it from)")
        concepts = {c for e in self.examples for c in e.concepts}
        if concepts and len(self.examples) < 4:
            raise ValueError("`examples`: scoring concepts needs at least 4 examples (two to fit, two to test)")
        return self


class VLMFeatureExample(FeatureExample):
    """An image, the text after it, and the concepts the image holds."""

    image: Text = Field(description="`flag:<Country>[@<seed>]` or an image file.")


class VLMFeaturesSpec(FeaturesSpec):
    """`kind: features` on a vision-language model's language model: the units are read at the image
    tokens (or at every token), each example's image placed before its prompt."""

    modality: Literal["vision-language"] = Field(default="vision-language", description=(
        "A LLaVA-style model; implied by the examples' `image:`."))
    model: Name = Field(default=VLM_MODEL, description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.")
    examples: tuple[VLMFeatureExample, ...] = Field(min_length=1, description="The inputs: an image and the text "
                                                    "after it each.")
    positions: Literal["image", "all"] = Field(default="image", description=(
        "Which tokens are read: the image tokens (an example's activation of a unit is then its largest, or with "
        "`pool: last` the last image token's), or every token (as for a language model)."))
