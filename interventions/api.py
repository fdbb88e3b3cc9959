"""The front door: a trace or patch spec of any modality, compiled and run on the model the caller has.

The engine knows one thing, the engine's `Prompt`s; each modality knows how to make them from its
spec (tokens; or images, image-token positions and merged embeddings). This table picks the maker
for `spec.modality`, so neither the engine nor the model loader names a modality.

>>> sorted(PREPARERS)
['contrastive', 'language', 'vision-language']
>>> from interventions import load_spec, load_model
>>> spec = load_spec("recipes/trace/trace_eiffel.yaml")          # doctest: +SKIP
>>> model, tokenizer = load_model(spec.model)                   # doctest: +SKIP
>>> run(spec, model, tokenizer).grids["hidden"].values.shape    # doctest: +SKIP
torch.Size([1, 30, 10])
"""

from __future__ import annotations

from interventions.core.errors import SpecError
from interventions.core.runtime import input_device
from interventions.engine import execute, plan
from interventions.features.dictionary import load_dictionary
from interventions.features.readout import check_dictionary
from interventions.modalities.contrastive.inputs import contrastive_prompts, load_clip, runnable
from interventions.modalities.vision_language import tower
from interventions.modalities.vision_language.llava import load_vlm
from interventions.models.loading import load_model

#: spec.modality -> the function that turns the spec's prompts into the engine's prompts
PREPARERS = {"language": plan.language_prompts, "vision-language": tower.vision_language_prompts,
             "contrastive": contrastive_prompts}
#: spec.modality -> ``(spec, model, tokenizer) -> (model, tokenizer)`` the engine runs, where the loaded model is not
#: itself that (a CLIP model becomes a zero-shot classifier over the spec's classes; a VLM whose grid reaches into
#: its vision tower runs from the image's patch embeddings)
RUNNABLE = {"contrastive": runnable, "vision-language": tower.runnable}
#: spec.modality -> ``(name, **placement) -> (model, tokenizer, image processor or None)``
LOADERS = {"language": lambda name, **placement: (*load_model(name, **placement), None),
           "vision-language": load_vlm, "contrastive": load_clip}


def load_for(modality: str, name: str, **placement):
    """``(model, tokenizer, image processor or None)`` for a spec's `modality` and `model` name; `placement`
    (device, device_map, offload_folder) as `interventions.models.load_model` takes it."""
    return LOADERS[modality](name, **placement)


def preparer(spec):
    """The prompt preparer for `spec.modality`."""
    try:
        return PREPARERS[spec.modality]
    except KeyError:
        raise SpecError("modality", spec.modality, f"one of {sorted(PREPARERS)} for a grid on the one engine "
                                                   "(text-to-image traces run in their own loop)") from None


def unit_axes(spec, model) -> tuple[plan.UnitAxis, ...]:
    """The spec's feature grid (`features:`), its dictionary loaded and checked against `model`; () without one."""
    site = getattr(spec, "features", None)
    if site is None:
        return ()
    d = load_dictionary(site.dictionary, "features.dictionary")
    check_dictionary(d, model, "features.dictionary")
    units = tuple(range(d.d_sae)) if site.features == "all" else site.features
    axis = plan.UnitAxis(site.name, d.where.site, d.where.layer, units, d.requires_grad_(False).to(input_device(model)),
                         site.edit, site.value or 0.0)
    for i, row in enumerate(axis.rows()):
        for f in row:
            if f >= d.d_sae:
                raise SpecError(f"features.features[{i}]", f, f"a feature of the dictionary, in [0, {d.d_sae - 1}]")
    return (axis,)


def engine_model(spec, model, tokenizer):
    """The model and tokenizer the engine runs for `spec` (`RUNNABLE`; most modalities run the loaded model)."""
    wrap = RUNNABLE.get(spec.modality)
    return wrap(spec, model, tokenizer) if wrap else (model, tokenizer)


def compile_spec(spec, model, tokenizer, **options) -> plan.Plan:
    """`interventions.engine.plan.compile_spec` with the preparer for the spec's modality and its feature grid."""
    model, tokenizer = engine_model(spec, model, tokenizer)
    return plan.compile_spec(spec, model, tokenizer, prepare=preparer(spec), units=unit_axes(spec, model), **options)


def run(spec, model, tokenizer, **options):
    """`interventions.engine.execute.run` with the preparer for the spec's modality and its feature grid: the
    `Result`."""
    model, tokenizer = engine_model(spec, model, tokenizer)
    return execute.run(spec, model, tokenizer, prepare=preparer(spec), units=unit_axes(spec, model), **options)
