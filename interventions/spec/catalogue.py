"""Every spec kind in one table, and reading, writing and describing specs: parse, load, dump, schema.

>>> spec = parse_spec({"kind": "trace", "prompts": [
...     {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"}]})
>>> spec.samples, spec.noise, spec.sites
(10, 3.0, ('hidden', 'mlp', 'attention'))
>>> parse_spec(load_yaml(dump_spec(spec))) == spec
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from interventions.core.errors import SpecError, one_of
from interventions.spec.contrastive_specs import (
    ContrastiveLensPrompt,
    ContrastiveLensSpec,
    ContrastivePatchPrompt,
    ContrastivePatchSpec,
    ContrastiveTracePrompt,
    ContrastiveTraceSpec,
    DecomposeSpec,
)
from interventions.spec.edit_specs import EditRequestSpec, EditSpec, LocateSpec, RequestsFile, SequentialSpec
from interventions.spec.feature_specs import FeatureExample, FeaturesSpec, VLMFeatureExample, VLMFeaturesSpec
from interventions.spec.file import load_yaml, read_spec_text
from interventions.spec.grid_specs import FeatureSite, PatchPrompt, PatchSpec, TracePrompt, TraceSpec
from interventions.spec.lens_specs import (
    KnockoutSpec,
    LensPrompt,
    LensSpec,
    ProbeSpec,
    VLMKnockoutSpec,
    VLMLensPrompt,
    VLMLensSpec,
    VLMProbeExample,
    VLMProbeSpec,
)
from interventions.spec.messages import Catalogue, problems, tag_problem
from interventions.spec.steer_specs import ApplySpec, SteerPair, SteerSpec
from interventions.spec.text_to_image_specs import (
    AttackSpec,
    DaamSpec,
    DiffusionApplySpec,
    DiffusionTraceSpec,
    EraseConcept,
    EraseSpec,
)
from interventions.spec.vision_language_specs import (
    VLMEditSpec,
    VLMLocateSpec,
    VLMPatchPrompt,
    VLMPatchSpec,
    VLMTracePrompt,
    VLMTraceSpec,
)

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
    ("daam", "text-to-image"): DaamSpec, ("features", "language"): FeaturesSpec,
    ("features", "vision-language"): VLMFeaturesSpec,
    ("trace", "contrastive"): ContrastiveTraceSpec, ("patch", "contrastive"): ContrastivePatchSpec,
    ("decompose", "contrastive"): DecomposeSpec, ("lens", "contrastive"): ContrastiveLensSpec,
}
KINDS = ("trace", "patch", "edit", "steer", "apply", "erase", "lens", "knockout", "probe", "daam", "features",
         "decompose")


def modality_of(data: dict) -> Any:
    """A spec's modality from what it says: `modality:` if given; else `kind: erase` or `daam` means text-to-image,
    `kind: decompose` contrastive, and an `image:` (on the edit, or on any trace prompt) means vision-language;
    else language.
    Neither the model's name nor any file is consulted."""
    if "modality" in data:
        return data["modality"]
    if data.get("kind") in ("erase", "daam"):
        return "text-to-image"
    if data.get("kind") == "decompose":
        return "contrastive"
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
                                   LensPrompt, VLMLensPrompt, VLMProbeExample, RequestsFile, SequentialSpec, AttackSpec,
                                   FeatureExample, VLMFeatureExample, FeatureSite, ContrastiveTracePrompt,
                                   ContrastivePatchPrompt, ContrastiveLensPrompt)
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
        if (modality == "text-to-image" and kind not in ("erase", "daam")) or (modality == "contrastive"
                                                                                and kind != "decompose"):
            required.add("modality")
        branch["required"] = sorted(required)
        if modality == "vision-language":    # as `modality_of`: said, or implied by an image somewhere
            props = branch.get("properties", {})
            implied = [{"required": ["modality"]}] + ([{"required": ["image"]}] if "image" in props else [])
            implied += [{"required": [rows], "properties": {rows: {"contains": {"required": ["image"]}}}}
                        for rows in ("prompts", "examples") if rows in props]
            branch["anyOf"] = implied
    return schema
