"""The contrastive specs: `kind: trace` and `kind: patch` inside a CLIP image tower, where the metric is the
zero-shot probability of a class among captions (or its scaled similarity)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from interventions.spec.base_specs import (
    SITE_NAMES,
    TRACE_SITES,
    Float,
    Int,
    Name,
    Seed,
    SpecModel,
    Text,
    check_names,
    sites_field,
)
from interventions.spec.grid_specs import SITES_DESCRIPTION, GridCore

CONTRASTIVE_MODEL = "scenes-clip"
#: The testbed's zero-shot questions, each a class set with prompt-ensembled captions.
SCENE_CLASS_SETS = ("scenes:colour", "scenes:shape", "scenes:size", "scenes:position", "scenes:count")
#: The most classes a spec may name.
MAX_CLASSES = 1000

IMAGE_DESCRIPTION = ("`scene:<colour> <shape> [small|large] [left|middle|right][, <colour> <shape> ...][@<seed>]` (a "
                     "render of the scenes world; a seed jitters it), or an image file.")
CLASSES_DESCRIPTION = (
    "The zero-shot classes: a list of captions (each its own class, named by its text), a mapping from a class "
    "name to its captions (their normalised text embeddings averaged: CLIP's prompt ensembling), or one of "
    f"{', '.join(SCENE_CLASS_SETS)} (the testbed's questions, as its manifest's accuracy uses them).")
CONTRASTIVE_METRIC = ("`prob`: the zero-shot probability of `target` among the classes; `logit_diff`: its scaled "
                      "similarity minus `counterfactual_target`'s; `kl`: KL(source run || patched run) over the classes.")


class ContrastiveSpec(SpecModel):
    modality: Literal["contrastive"] = Field(default="contrastive", description=(
        "A contrastive image-text model (CLIP); written on every contrastive spec but `kind: decompose`."))


class ContrastiveTracePrompt(SpecModel):
    """One image and the class whose zero-shot probability is traced."""

    image: Text = Field(description=IMAGE_DESCRIPTION)
    target: Text = Field(description="The class traced (a name of `classes`).")
    counterfactual_image: Text | None = Field(default=None, description="For `corruption: swap`.")


class ContrastivePatchPrompt(SpecModel):
    """States of the run on `source_image` patched into the run on `image`."""

    image: Text = Field(description=IMAGE_DESCRIPTION)
    source_image: Text = Field(description="The source run's image.")
    target: Text | None = Field(default=None, description="The class whose metric is read; default: the source's top-1.")
    counterfactual_target: Text | None = Field(default=None, description="For `logit_diff`; default: the base's top-1.")


_CELLS = Field(default="both", description=(
    "Restore each patch on its own (`each`: the per-patch heatmap), all patches at once (`block`), or `both`. "
    "CLS is always a column of its own."))


class _ContrastiveGrid(GridCore, ContrastiveSpec):
    model: Name = Field(default=CONTRASTIVE_MODEL, description="`scenes-clip` (the testbed) or a local CLIP folder.")
    classes: Literal[SCENE_CLASS_SETS] | tuple[Text, ...] | dict[Text, tuple[Text, ...]] = Field(
        description=CLASSES_DESCRIPTION)
    image_cells: Literal["each", "block", "both"] = _CELLS

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        if isinstance(v, str):
            return v
        names = list(v)
        if not 2 <= len(names) <= MAX_CLASSES:
            raise ValueError(f"between 2 and {MAX_CLASSES} classes, got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError("class names must not repeat")
        if isinstance(v, dict) and any(not captions for captions in v.values()):
            raise ValueError("every class needs at least one caption")
        return v

    @model_validator(mode="after")
    def _no_features(self):
        if self.features is not None:
            raise ValueError("`features:` grids run on language models and VLMs; a contrastive grid has none")
        return self


class ContrastiveTraceSpec(_ContrastiveGrid):
    """Causal tracing inside a CLIP image tower: corrupt the image (noise on its patch embeddings, or another
    image) and restore the tower's clean states at CLS and each patch, layer by layer."""

    kind: Literal["trace"] = "trace"
    prompts: tuple[ContrastiveTracePrompt, ...] = Field(min_length=1, description="Each an image and its class.")
    corruption: Literal["noise", "swap"] = Field(default="noise", description=(
        "Gaussian `noise` on the patch embeddings (CLS keeps its own), or a `swap` to `counterfactual_image`."))
    noise: Float = Field(default=3.0, gt=0, description="In units of `sigma`.")
    sigma: Float | None = Field(default=None, gt=0, description="Default: the std, over all prompts, of the clean "
                                "patch embeddings.")
    samples: Int = Field(default=10, ge=1, description="Noise draws per cell (1 is used for `swap`).")
    seed: Seed = Field(default=0, description="Seeds every noise draw.")
    sites: tuple[str, ...] = sites_field(("hidden", "mlp", "attention"), TRACE_SITES, description=SITES_DESCRIPTION)
    window: Int = Field(default=1, ge=1, description="Layers restored together for `mlp` and `attention`.")

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return check_names(v, tuple(TRACE_SITES))

    @model_validator(mode="after")
    def _swap_images(self):
        for i, p in enumerate(self.prompts):
            if self.corruption == "swap" and p.counterfactual_image is None:
                raise ValueError(f"`corruption: swap` needs `prompts[{i}].counterfactual_image`")
        return self


class ContrastivePatchSpec(_ContrastiveGrid):
    """Activation patching inside a CLIP image tower: copy states of the source image's run into the base
    image's, one cell (layer, CLS or patch) at a time."""

    kind: Literal["patch"] = "patch"
    prompts: tuple[ContrastivePatchPrompt, ...] = Field(min_length=1, description="Each a base and a source image.")
    sites: tuple[str, ...] = sites_field(("block_output",), SITE_NAMES, description=SITES_DESCRIPTION)
    metric: Literal["prob", "logit_diff", "kl"] = Field(default="prob", description=CONTRASTIVE_METRIC)

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return check_names(v, SITE_NAMES)


#: The most images a decomposition may hold.
MAX_DECOMPOSE_IMAGES = 20_000


class DecomposeSpec(ContrastiveSpec):
    """Text-span decomposition of a CLIP image embedding: every head's direct contribution per image, the
    mean-ablation check over layers, each head explained by the texts of a bank that span its outputs
    (TextSpan), per-head ablation scores, and the heads the texts name for each attribute, ablated together."""

    kind: Literal["decompose"] = "decompose"
    model: Name = Field(default=CONTRASTIVE_MODEL, description="`scenes-clip` (the testbed) or a local CLIP folder.")
    images: tuple[Text, ...] = Field(min_length=1, description=(
        "The images decomposed: `scene:` renders or image files, and `scenes:random:<n>@<seed>` (n new scenes of "
        f"one object, drawn with that seed). At most {MAX_DECOMPOSE_IMAGES:,} in all."))
    texts: Literal["scenes:bank"] | tuple[Text, ...] = Field(default="scenes:bank", description=(
        "The text bank TextSpan chooses from: `scenes:bank` (descriptions of the scenes world, each stating one "
        "attribute, so that heads are named by attribute), or a list of texts."))
    questions: tuple[Literal[SCENE_CLASS_SETS] | dict[Text, tuple[Text, ...]], ...] = Field(
        default=SCENE_CLASS_SETS, min_length=1, description=(
            "The zero-shot questions the ablations are scored on: testbed class sets, or a mapping from class name "
            "to captions (named `question<i>`). Scored against the truth for `scene:` images, else against the "
            "unablated model's own answer."))
    spans: Int = Field(default=5, ge=1, le=64, description="Texts TextSpan chooses per head.")
    components: Int = Field(default=16, ge=1, le=4096, description=(
        "Principal directions of a head's outputs the texts are projected onto before choosing."))
    top_heads: Literal["named"] | Int = Field(default="named", description=(
        "Heads ablated together per attribute: `named`, every head TextSpan names for it (its texts of that attribute "
        "explain at least half of the head's variance, more than any other attribute's); or the given number of heads "
        "whose texts of that attribute carry the most variance."))

    @field_validator("top_heads")
    @classmethod
    def _top_heads(cls, v):
        if v != "named" and not 1 <= v <= 4096:
            raise ValueError(f"`named` or a number of heads in [1, 4096], got {v}")
        return v
    batch: Int = Field(default=64, ge=1, le=4096, description="Images per forward pass.")

    @field_validator("images")
    @classmethod
    def _images(cls, v):
        total = 0
        for ref in v:
            if ref.startswith("scenes:random:"):
                n, _, seed = ref[len("scenes:random:"):].partition("@")
                if not (n.isascii() and n.isdigit() and seed.isascii() and seed.isdigit() and 1 <= int(n)):
                    raise ValueError(f"`scenes:random:<n>@<seed>` with n ≥ 1 and a seed, got {ref!r}")
                total += int(n)
            else:
                total += 1
        if total > MAX_DECOMPOSE_IMAGES:
            raise ValueError(f"at most {MAX_DECOMPOSE_IMAGES:,} images in all, got {total:,}")
        return v


class ContrastiveLensPrompt(SpecModel):
    """One image read through the lens; `target` defaults to the model's own zero-shot answer."""

    image: Text = Field(description=IMAGE_DESCRIPTION)
    target: Text | None = Field(default=None, description="The class whose probability is read (a name of `classes`).")


class ContrastiveLensSpec(ContrastiveSpec):
    """The logit lens of a ViT: each layer's state at CLS (and at each patch) read through the model's own
    post-norm and visual projection as zero-shot class probabilities, at every layer × position."""

    kind: Literal["lens"] = "lens"
    model: Name = Field(default=CONTRASTIVE_MODEL, description="`scenes-clip` (the testbed) or a local CLIP folder.")
    classes: Literal[SCENE_CLASS_SETS] | tuple[Text, ...] | dict[Text, tuple[Text, ...]] = Field(
        description=CLASSES_DESCRIPTION)
    prompts: tuple[ContrastiveLensPrompt, ...] = Field(min_length=1, description="The images read.")
    layers: Literal["all"] | tuple[Int, ...] = Field(
        default="all", description="`all`, or layer indices (negative counts from the end).")
    top_k: Int = Field(default=5, ge=1, le=100, description="Classes listed per cell, most probable first.")
    max_batch_rows: Int = Field(default=48, ge=1, description="Images per forward pass (a memory bound).")

    _classes = field_validator("classes")(_ContrastiveGrid._classes.__func__)
