"""Lesion's analysis layer: specs, model sites, compiling to pyvene, the batched engine, results.

>>> from interventions import load_spec, load_model, run
>>> spec = load_spec("recipes/trace/trace_eiffel.yaml")              # doctest: +SKIP
>>> model, tokenizer = load_model(spec.model)                  # doctest: +SKIP
>>> result = run(spec, model, tokenizer)                       # doctest: +SKIP
>>> result.save("runs/eiffel")                                 # doctest: +SKIP

The names below are imported on first use: reading, checking and printing specs
(`interventions.spec`, `interventions.core.errors`) never imports torch or pyvene, so
`lesion validate` and `lesion schema` start in a fraction of a second.
"""

from __future__ import annotations

import importlib

from interventions.core import __version__
from interventions.core.moved import install

install()

#: public name -> the module that defines it
_EXPORTS = {
    "LesionError": "core.errors", "ModelNotAvailable": "core.errors", "SpecError": "core.errors",
    "PatchPrompt": "spec", "PatchSpec": "spec", "TracePrompt": "spec", "TraceSpec": "spec",
    "dump_spec": "spec", "load_spec": "spec", "load_yaml": "spec", "parse_spec": "spec",
    "spec_schema": "spec", "load_model": "models.loading", "FAMILIES": "models.sites",
    "SiteTable": "models.sites", "site_table": "models.sites", "Plan": "engine.plan", "compile_spec": "api",
    "run": "api", "run_plan": "engine.execute", "Grid": "engine.result", "Result": "engine.result",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'interventions' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
