"""Specs: the typed, frozen objects a YAML file or Python code describes.

One module per family of kinds, lowest first: `base_specs` (value types, limits, site names, the base
classes per modality), `grid_specs` (trace, patch), `edit_specs`, `steer_specs` (steer, apply),
`text_to_image_specs`, `vision_language_specs`, `contrastive_specs`, `lens_specs` (lens, knockout, probe), `feature_specs`, and the
`catalogue` that holds them all in one table (parse, load, dump, schema). `file` reads YAML within
bounds; `messages` turns validation errors into one line each; `reference` writes the field tables.
Everything public is importable from here:

>>> from interventions.spec import parse_spec, dump_spec
>>> spec = parse_spec({"kind": "patch", "prompts": [{"base": "Rome is in", "source": "Oslo is in"}]})
>>> spec.sites, spec.window, spec.metric
(('block_output',), 1, 'prob')
>>> parse_spec(load_yaml(dump_spec(spec))) == spec
True
"""

from interventions.spec.base_specs import (
    DEFAULT_MODEL,
    DIFFUSION_MODEL,
    DIFFUSION_TRACE_SITES,
    MAX_NAME,
    MAX_TEXT,
    METRICS,
    MODALITIES,
    POSITION_NAMES,
    SITE_NAMES,
    TRACE_SITES,
    VLM_MODEL,
    Float,
    Int,
    Name,
    Position,
    Short,
    Text,
)
from interventions.spec.catalogue import (
    KINDS,
    SPEC_CLASSES,
    Spec,
    dump_spec,
    load_spec,
    modality_of,
    parse_spec,
    spec_schema,
    spec_to_dict,
)
from interventions.spec.contrastive_specs import (
    CONTRASTIVE_MODEL,
    SCENE_CLASS_SETS,
    ContrastiveLensPrompt,
    ContrastiveLensSpec,
    ContrastivePatchPrompt,
    ContrastivePatchSpec,
    ContrastiveTracePrompt,
    ContrastiveTraceSpec,
    DecomposeSpec,
)
from interventions.spec.edit_specs import (
    BATCH_METHODS,
    EDIT_METHODS,
    FROM_SPEC,
    HYPERPARAMETERS,
    ONE_LAYER_METHODS,
    PRESERVING_METHODS,
    AlphaEditHyperparameters,
    EditMethod,
    EditRequestSpec,
    EditSpec,
    EmmetHyperparameters,
    EncoreHyperparameters,
    LocateSpec,
    MemitHyperparameters,
    RequestsFile,
    RomeHyperparameters,
    SequentialSpec,
    UltraEditHyperparameters,
    check_hyperparameters,
    overrides_schema,
)
from interventions.spec.feature_specs import FeatureExample, FeaturesSpec, VLMFeatureExample, VLMFeaturesSpec
from interventions.spec.file import load_yaml, read_spec_text
from interventions.spec.grid_specs import FeatureSite, PatchPrompt, PatchSpec, TracePrompt, TraceSpec
from interventions.spec.lens_specs import (
    KNOCKOUT_SOURCES,
    PROBE_POSITIONS,
    VLM_KNOCKOUT_SOURCES,
    KnockoutSpec,
    LensPrompt,
    LensSpec,
    ProbeExample,
    ProbeSpec,
    VLMKnockoutSpec,
    VLMLensPrompt,
    VLMLensSpec,
    VLMProbeExample,
    VLMProbeSpec,
)
from interventions.spec.steer_specs import APPLY_TO, STEER_SITES, ApplySpec, SteerPair, SteerSpec
from interventions.spec.text_to_image_specs import (
    AttackSpec,
    DaamSpec,
    DiffusionApplySpec,
    DiffusionTraceSpec,
    EraseConcept,
    EraseSpec,
)
from interventions.spec.vision_language_specs import (
    VLM_PATCH_SITES,
    VLMEditSpec,
    VLMLocateSpec,
    VLMPatchPrompt,
    VLMPatchSpec,
    VLMTracePrompt,
    VLMTraceSpec,
)

__all__ = [
    "DEFAULT_MODEL", "DIFFUSION_MODEL", "DIFFUSION_TRACE_SITES", "MAX_NAME", "MAX_TEXT", "METRICS",
    "MODALITIES", "POSITION_NAMES", "SITE_NAMES", "TRACE_SITES", "VLM_MODEL", "Float", "Int", "Name",
    "Position", "Short", "Text", "KINDS", "SPEC_CLASSES", "Spec", "dump_spec", "load_spec", "modality_of",
    "parse_spec", "spec_schema", "spec_to_dict", "BATCH_METHODS", "PRESERVING_METHODS", "EDIT_METHODS", "FROM_SPEC",
    "HYPERPARAMETERS", "ONE_LAYER_METHODS", "AlphaEditHyperparameters", "EncoreHyperparameters",
    "UltraEditHyperparameters", "EditMethod", "EditRequestSpec",
    "EditSpec", "EmmetHyperparameters", "LocateSpec", "MemitHyperparameters", "RequestsFile",
    "RomeHyperparameters", "SequentialSpec", "check_hyperparameters", "overrides_schema", "load_yaml",
    "read_spec_text", "FeatureSite", "PatchPrompt", "PatchSpec", "TracePrompt", "TraceSpec", "KNOCKOUT_SOURCES",
    "PROBE_POSITIONS", "VLM_KNOCKOUT_SOURCES", "KnockoutSpec", "LensPrompt", "LensSpec", "ProbeExample",
    "ProbeSpec", "VLMKnockoutSpec", "VLMLensPrompt", "VLMLensSpec", "VLMProbeExample", "VLMProbeSpec",
    "FeatureExample", "FeaturesSpec", "VLMFeatureExample", "VLMFeaturesSpec", "APPLY_TO", "STEER_SITES", "ApplySpec", "SteerPair", "SteerSpec", "AttackSpec", "DaamSpec",
    "DiffusionApplySpec", "DiffusionTraceSpec", "EraseConcept", "EraseSpec", "VLM_PATCH_SITES", "VLMEditSpec",
    "VLMLocateSpec", "VLMPatchPrompt", "VLMPatchSpec", "VLMTracePrompt", "VLMTraceSpec", "CONTRASTIVE_MODEL",
    "SCENE_CLASS_SETS", "ContrastivePatchPrompt", "ContrastivePatchSpec", "ContrastiveTracePrompt",
    "ContrastiveTraceSpec", "DecomposeSpec", "ContrastiveLensPrompt", "ContrastiveLensSpec",
]
