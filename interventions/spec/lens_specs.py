"""The lenses' specs: `kind: lens`, `kind: knockout` and `kind: probe`, on language and
vision-language models."""

from __future__ import annotations

from typing import ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from interventions.spec.base_specs import (
    DEFAULT_MODEL,
    VLM_MODEL,
    Float,
    Int,
    LanguageSpec,
    Name,
    Position,
    Seed,
    SpecModel,
    Text,
    VisionLanguageSpec,
    check_names,
    sites_field,
)


class LensPrompt(SpecModel):
    """A prompt whose states are read through a lens (or knocked out): `target` defaults to the model's
    own top-1 answer at the last position."""

    prompt: Text
    target: Text | None = Field(default=None, description="The answer whose probability is read, tokenized as "
                                "written (' Paris'); default: the model's top-1 at the last position.")
    subject: Text | None = Field(default=None, description="Substring of `prompt`; needed by `subject*` "
                                 "positions and by `block: [subject]`.")


class VLMLensPrompt(SpecModel):
    """An image (optional) and the text after it, read through a lens (or knocked out)."""

    image: Text | None = Field(default=None, description="`flag:<Country>[@<seed>]` or an image file; none: a "
                               "text-only prompt.")
    prompt: Text
    target: Text | None = Field(default=None, description="As for a language model's lens prompt.")
    constraint: Text | None = Field(default=None, description="Words of `prompt` (the question's constraint); "
                                    "needed by `block: [constraint]`.")


class _LensCore(SpecModel):
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


class LensSpec(_Lens, LanguageSpec):
    """The logit lens (nostalgebraist 2020) and the tuned lens (Belrose et al. 2023): each layer's residual
    state, read through the model's own final norm and unembedding (after a learned affine translator
    for the tuned lens), at every layer x position."""

    model: Name = Field(default=DEFAULT_MODEL, description=(
        "A built-in language model (`smollm2-135m`, `gemma3-270m`), a local Hugging Face folder, or a hub"
        " id (online only)."))
    prompts: tuple[LensPrompt, ...] = Field(min_length=1, description=(
        "The prompts whose states are read (or whose attention edges are cut)."))
    positions: tuple[Position, ...] = Field(
        default=("all",), min_length=1, description="Columns: `all` is one column per token; a selector naming "
        "several tokens (`subject`) reads the last of them.")


class VLMLensSpec(_Lens, VisionLanguageSpec):
    """The logit and tuned lens over a VLM's language model: what each image token and text token
    'says' at each layer. Columns are every position (image tokens one each)."""

    model: Name = Field(description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.", default=VLM_MODEL)
    prompts: tuple[VLMLensPrompt, ...] = Field(min_length=1, description=(
        "Each an image (or none) and the text after it."))
    tower: bool = Field(default=False, description=(
        "Read the vision tower instead: each tower layer's patch states go to the projector in place of the feature "
        "layer's, and p(target) is the language model's answer (grid `tower_lens`, one column per prompt). Every "
        "prompt needs an image; `layers` and `tuned` do not apply."))

    @model_validator(mode="after")
    def _tower_reads(self):
        if self.tower and (self.tuned is not None or self.layers != "all"):
            raise ValueError("`tower: true` reads every tower layer through the model itself: leave `tuned` and "
                             "`layers` out")
        return self


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
        return check_names(v, cls.SOURCES, "position set")


class KnockoutSpec(_Knockout, LanguageSpec):
    """Attention knockout (Geva et al. 2023): block the attention edges from a set of positions to the
    target position over a window of layers, and read p(answer). One grid per blocked set."""

    SOURCES: ClassVar[tuple[str, ...]] = KNOCKOUT_SOURCES
    model: Name = Field(default=DEFAULT_MODEL, description=(
        "A built-in language model (`smollm2-135m`, `gemma3-270m`), a local Hugging Face folder, or a hub"
        " id (online only)."))
    prompts: tuple[LensPrompt, ...] = Field(min_length=1, description=(
        "The prompts whose states are read (or whose attention edges are cut)."))
    block: tuple[str, ...] = sites_field(("subject", "others", "self"), KNOCKOUT_SOURCES, description=(
        "Edges cut, one grid each: from the `subject` tokens, from every `others` position (neither subject "
        "nor target), from the target to itself (`self`), or from `all` positions."))


    @model_validator(mode="after")
    def _subjects(self):
        for i, p in enumerate(self.prompts):
            if "subject" in self.block and p.subject is None:
                raise ValueError(f"`block: [subject]` needs `prompts[{i}].subject`")
        return self


class VLMKnockoutSpec(_Knockout, VisionLanguageSpec):
    """Attention knockout in a VLM's language model: cut the edges from the image tokens, the question's
    constraint or the other positions to the last token (Basu et al. 2024)."""

    SOURCES: ClassVar[tuple[str, ...]] = VLM_KNOCKOUT_SOURCES
    model: Name = Field(description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.", default=VLM_MODEL)
    prompts: tuple[VLMLensPrompt, ...] = Field(min_length=1, description=(
        "Each an image (or none) and the text after it."))
    block: tuple[str, ...] = sites_field(("image", "constraint", "others", "self"), VLM_KNOCKOUT_SOURCES,
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


def concept_file(label: str) -> str:
    """The file a probe writes a label's concept vector to: ASCII letters and digits kept, the rest `_`."""
    return "concept_" + "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in label) + ".safetensors"


def example_group(example) -> str:
    """An example's group for the control task and the `groups` split: its `group`, else its image,
    else its prompt."""
    return example.group or getattr(example, "image", None) or example.prompt


class ProbeExample(SpecModel):
    """A labelled input: its states are the probe's features."""

    prompt: Text
    label: Text = Field(max_length=64, description="The example's class; its concept vector is saved as "
                        "`concept_<label>.safetensors` (characters other than ASCII letters and digits as `_`).")
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
    site: Literal["block_output", "block_input", "mlp_output", "attention_output"] = Field(
        default="block_output", description=(
        "Which state is read (and, for a vector, where it is added)."))
    heldout: Float = Field(default=0.3, gt=0, lt=1, description="Share held out (stratified by label) for the "
                           "accuracy.")
    split: Literal["examples", "groups"] = Field(
        default="examples", description="Hold out examples (a group's other examples may be trained on), or whole "
        "groups (the probe must generalise to inputs of unseen types; the control task is then at chance).")
    l2: Float = Field(default=1.0, gt=0, description="L2 penalty on the weights (scikit-learn's 1/C), on "
                      "standardized features.")
    control: bool = Field(default=True, description="Also fit the control task (Hewitt & Liang 2019): each "
                          "`group` gets a random label; selectivity = accuracy - control accuracy.")
    seed: Seed = Field(default=0, description="Seeds every random draw (noise, sampling, splits).")

    @model_validator(mode="after")
    def _labels(self):
        labels = sorted({e.label for e in self.examples})
        if len(labels) < 2:
            raise ValueError("`examples` need at least two different labels")
        for label in labels:
            units = {example_group(e) if self.split == "groups" else i
                     for i, e in enumerate(self.examples) if e.label == label}
            if len(units) < 2:
                raise ValueError(f"`examples`: label {label!r} needs at least two "
                                 f"{'groups' if self.split == 'groups' else 'examples'} (one to train on, one held "
                                 "out to test)")
        files: dict[str, str] = {}
        for label in labels:
            other = files.setdefault(concept_file(label), label)
            if other != label:
                raise ValueError(f"`examples`: labels {other!r} and {label!r} would share the concept vector file "
                                 f"{concept_file(label)}; rename one")
        return self


class ProbeSpec(_Probe, LanguageSpec):
    """Linear probes (multinomial logistic regression) on a site's states, per layer x position, with held-out
    accuracy and a control task; each label's probe direction is saved as a concept vector (TCAV-style)
    in the steering-vector format."""

    model: Name = Field(default=DEFAULT_MODEL, description=(
        "A built-in language model (`smollm2-135m`, `gemma3-270m`), a local Hugging Face folder, or a hub"
        " id (online only)."))
    examples: tuple[ProbeExample, ...] = Field(min_length=4, description=(
        "The labelled examples the probe is trained and tested on (at least 4)."))

    @model_validator(mode="after")
    def _text_only(self):
        if "image" in self.positions:
            raise ValueError("`positions: [image]` is for a vision-language model (examples with `image`)")
        return self


class VLMProbeSpec(_Probe, VisionLanguageSpec):
    """Linear probes on a VLM's language-model states (image tokens included)."""

    model: Name = Field(description="`llava-flags-smollm2` (the testbed) or a local LLaVA folder.", default=VLM_MODEL)
    examples: tuple[VLMProbeExample, ...] = Field(min_length=4, description=(
        "The labelled examples the probe is trained and tested on (at least 4)."))
