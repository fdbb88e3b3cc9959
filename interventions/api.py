"""The front door: a trace or patch spec of any modality, compiled and run on the model the caller has.

The engine knows one thing, the engine's `Prompt`s; each modality knows how to make them from its
spec (tokens; or images, image-token positions and merged embeddings). This table picks the maker
for `spec.modality`, so neither the engine nor the model loader names a modality.

>>> sorted(PREPARERS)
['language', 'vision-language']
>>> from interventions import load_spec, load_model
>>> spec = load_spec("recipes/trace/trace_eiffel.yaml")          # doctest: +SKIP
>>> model, tokenizer = load_model(spec.model)                   # doctest: +SKIP
>>> run(spec, model, tokenizer).grids["hidden"].values.shape    # doctest: +SKIP
torch.Size([1, 30, 10])
"""

from __future__ import annotations

from interventions.core.errors import SpecError
from interventions.engine import execute, plan
from interventions.modalities.vision_language.llava import vlm_prompts

#: spec.modality -> the function that turns the spec's prompts into the engine's prompts
PREPARERS = {"language": plan.language_prompts, "vision-language": vlm_prompts}


def preparer(spec):
    """The prompt preparer for `spec.modality`."""
    try:
        return PREPARERS[spec.modality]
    except KeyError:
        raise SpecError("modality", spec.modality, f"one of {sorted(PREPARERS)} for a grid on the one engine "
                                                   "(text-to-image traces run in their own loop)") from None


def compile_spec(spec, model, tokenizer, **options) -> plan.Plan:
    """`interventions.engine.plan.compile_spec` with the preparer for the spec's modality."""
    return plan.compile_spec(spec, model, tokenizer, prepare=preparer(spec), **options)


def run(spec, model, tokenizer, **options):
    """`interventions.engine.execute.run` with the preparer for the spec's modality: the `Result`."""
    return execute.run(spec, model, tokenizer, prepare=preparer(spec), **options)
