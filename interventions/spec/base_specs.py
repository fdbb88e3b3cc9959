"""What every spec is made of: the strict value types and their limits, the base classes per
modality, and the names of sites, positions and metrics."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, AllowInfNan, BaseModel, ConfigDict, Field, Strict

from interventions.core.errors import one_of, short

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
#: A random seed: an integer in [0, 2^62), what torch, Python and image j (seed + j) all accept.
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**62)]
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
MODALITIES = ("language", "vision-language", "text-to-image", "contrastive")


class SpecModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, allow_inf_nan=False)


class LanguageSpec(SpecModel):
    modality: Literal["language"] = Field(default="language", description="A language model (the default).")


class VisionLanguageSpec(SpecModel):
    modality: Literal["vision-language"] = Field(
        default="vision-language", description="A LLaVA-style model; implied by `image:`.")


class TextToImageSpec(SpecModel):
    modality: Literal["text-to-image"] = Field(
        default="text-to-image", description="A text-to-image pipeline; implied by `kind: erase` or `daam`, required "
                                             "for `trace` and `apply` on one.")


#: Sites of a diffusion trace: the text encoder's states (per layer x token) and the UNet's
#: cross-attention layers (a window of them gets the clean prompt, LocoGen-style).
DIFFUSION_TRACE_SITES = ("text_hidden", "text_mlp", "text_attention", "cross_attention")


def sites_field(default: tuple[str, ...], allowed, description: str = ""):
    """A `sites:` list checked by `check_names` (for its messages), with its names listed in the schema."""
    return Field(default=default, min_length=1, description=description or None,
                 json_schema_extra={"items": {"type": "string", "enum": list(allowed)}, "uniqueItems": True})


def check_names(values: tuple[str, ...], allowed: tuple[str, ...] | dict, what: str = "site") -> tuple[str, ...]:
    for v in values:
        if v not in allowed:
            hint = f"; {v!r} is a text-to-image site: add `modality: text-to-image`" if v in DIFFUSION_TRACE_SITES \
                else f"; {v!r} is for a vision-language model: give the prompts an `image`" \
                if what == "position set" and v in ("image", "constraint") else ""
            raise ValueError(f"unknown {what} {short(v)}; expected {one_of(v, allowed)}{hint}")
    if len(set(values)) != len(values):
        raise ValueError(f"{what}s must not repeat, got {list(values)}")
    return values
