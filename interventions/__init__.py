"""Lesion's analysis layer: specs, model sites, compiling to pyvene, the batched engine, results.

>>> from interventions import load_spec, load_model, run
>>> spec = load_spec("recipes/trace_eiffel.yaml")              # doctest: +SKIP
>>> model, tokenizer = load_model(spec.model)                  # doctest: +SKIP
>>> result = run(spec, model, tokenizer)                       # doctest: +SKIP
>>> result.save("runs/eiffel")                                 # doctest: +SKIP
"""

__version__ = "0.1.0"

from .errors import LesionError, ModelNotAvailable, SpecError  # noqa: E402
from .spec import (  # noqa: E402
    PatchPrompt, PatchSpec, TracePrompt, TraceSpec, dump_spec, load_spec, load_yaml, parse_spec, spec_schema,
)
from .models import load_model  # noqa: E402
from .sites import FAMILIES, SiteTable, site_table  # noqa: E402
from .plan import Plan, compile_spec  # noqa: E402
from .engine import run, run_plan  # noqa: E402
from .result import Grid, Result  # noqa: E402

__all__ = [
    "LesionError", "ModelNotAvailable", "SpecError", "PatchPrompt", "PatchSpec", "TracePrompt", "TraceSpec",
    "dump_spec", "load_spec", "load_yaml", "parse_spec", "spec_schema", "load_model", "FAMILIES", "SiteTable",
    "site_table", "Plan", "compile_spec", "run", "run_plan", "Grid", "Result",
]
