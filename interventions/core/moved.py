"""Where modules went when the flat folders became sub-packages (Lesion 0.1 -> the layout of floors).

An old import path fails with one line naming the new one, rather than a bare "No module named":

>>> import interventions
>>> import interventions.vlm
Traceback (most recent call last):
ModuleNotFoundError: `interventions.vlm` moved to `interventions.modalities.vision_language.llava`; import it from there

The finder answers only for the names in `MOVED`, which no module has any more, so it can never shadow a
module that exists. It goes first in `sys.meta_path` because three old names (`recipes.edit`,
`recipes.steer`, `recipes.lenses`) are now folders of YAML recipes, which Python would otherwise import
as empty namespace packages.
"""

from __future__ import annotations

import importlib.abc
import sys

#: old module -> new module (modules that kept their name as a package, such as `interventions.engine`,
#: forward their old names from the package face instead)
MOVED = {
    "interventions.errors": "interventions.core.errors",
    "interventions.units": "interventions.core.units",
    "interventions.atomic": "interventions.core.atomic",
    "interventions.tagged": "interventions.core.tagged",
    "interventions.conventions": "interventions.core.conventions",
    "interventions.metrics": "interventions.core.metrics",
    "interventions.memory": "interventions.core.memory",
    "interventions.distributed": "interventions.core.distributed",
    "interventions.prompts": "interventions.core.prompts",
    "interventions.plot": "interventions.core.plot",
    "interventions.specfile": "interventions.spec.file",
    "interventions.messages": "interventions.spec.messages",
    "interventions.sites": "interventions.models.sites",
    "interventions.plan": "interventions.engine.plan",
    "interventions.pv": "interventions.engine.pv",
    "interventions.attribution": "interventions.engine.attribution",
    "interventions.result": "interventions.engine.result",
    "interventions.compare": "interventions.engine.compare",
    "interventions.vlm": "interventions.modalities.vision_language.llava",
    "interventions.diffusion": "interventions.modalities.text_to_image.pipeline",
    "interventions.diffusion_trace": "interventions.modalities.text_to_image.trace",
    "interventions.daam": "interventions.modalities.text_to_image.daam",
    "interventions.adversarial": "interventions.modalities.text_to_image.adversarial",
    "interventions.lens": "interventions.lenses.lens",
    "interventions.knockout": "interventions.lenses.knockout",
    "interventions.probe": "interventions.lenses.probe",
    "interventions.steer": "interventions.lenses.steering",
    "interventions.shapes": "interventions.testbeds.shapes",
    "interventions.scenes": "interventions.testbeds.scenes",
    "interventions.flags": "interventions.testbeds.flags",
    "editors.rome": "editors.methods.rome",
    "editors.emmet": "editors.methods.emmet",
    "editors.memit": "editors.methods.memit",
    "editors.vlm_rome": "editors.methods.rome_vision_language",
    "editors.erase": "editors.methods.erase",
    "recipes.edit": "editors.editor",
    "recipes.sequential": "editors.sequential",
    "recipes.requests": "editors.requests",
    "recipes.runners": "recipes.cli.runners",
    "recipes.checks": "recipes.jobs.flag_checks",
    "recipes.compile_checks": "recipes.cli.compile_checks",
    "recipes.lenses": "recipes.jobs.run_lenses",
    "recipes.steer": "recipes.jobs.run_steer",
    "recipes.diffusion": "recipes.jobs.run_text_to_image",
    "recipes.vlm": "recipes.jobs.run_vision_language",
    "recipes.manifest": "recipes.train.manifest",
    "recipes.bench_edit": "recipes.bench.bench_edit",
    "recipes.bench_erase": "recipes.bench.bench_erase",
    "recipes.bench_patch": "recipes.bench.bench_patch",
    "recipes.bench_serve": "recipes.bench.bench_serve",
    "recipes.bench_steer": "recipes.bench.bench_steer",
    "recipes.bench_trace": "recipes.bench.bench_trace",
    "recipes.attribution_steps": "recipes.studies.attribution_steps",
    "recipes.eval_edits": "recipes.studies.eval_edits",
    "recipes.tune_edit": "recipes.studies.tune_edit",
    "recipes.erase_methods": "recipes.studies.erase_methods",
    "recipes.edit_curves": "recipes.studies.edit_curves",
    "recipes.trace_flags": "recipes.studies.trace_flags",
    "recipes.edit_flag": "recipes.studies.edit_flag",
    "recipes.train_flags": "recipes.train.train_flags",
    "recipes.train_lens": "recipes.train.train_lens",
    "recipes.train_scenes": "recipes.train.train_scenes",
    "recipes.train_shapes": "recipes.train.train_shapes",
    "recipes.make_facts": "recipes.train.make_facts",
}


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is not None:
            raise ModuleNotFoundError(f"`{fullname}` moved to `{new}`; import it from there", name=fullname)
        return None


def install() -> None:
    """Add the finder once per process (each package face calls this)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


def forward(child: str):
    """A package face's module `__getattr__` that gives the names of `child`, the module the package
    used to be (so `from interventions.engine import run_plan` still works)."""
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        module = importlib.import_module(child)
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(f"module {child.rpartition('.')[0]!r} has no attribute {name!r}") from None
    return __getattr__
