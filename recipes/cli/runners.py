"""What `lesion run` (and `validate --compile`) does with each kind of spec: one table, keyed by (kind, modality).

>>> sorted(RUNNERS)[:3]
[('apply', 'language'), ('apply', 'text-to-image'), ('daam', 'text-to-image')]
>>> sorted(RUNNERS[("trace", "language")].flags)
['device_map', 'max_batch_rows', 'memory', 'offload_folder']
>>> RUNNERS[("trace", "language")].job
'run_grid:grid_job'

A runner's job is named `module:function` in `recipes.jobs` and imported when it runs, so the CLI starts
without torch. A job gets the spec, the parsed arguments and `out`: a staging folder that becomes
``--out`` only once the job has returned (see `interventions.core.atomic.atomic_folder`), or None for
kinds that write nothing. It prints its own summary and returns what a `--checkpoint` ships (the
manifest entry's fields), or None. Optional flags a runner does not list in `flags` are refused before
anything loads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from interventions.core.errors import SpecError
from recipes.cli import compile_checks as checks


@dataclass(frozen=True)
class Runner:
    job: str                              # "module:function" in recipes.jobs
    check: Callable[..., str]             # `validate --compile`: the spec against its model (compile_checks)
    flags: frozenset[str] = frozenset()   # optional `lesion run` flags it takes
    writes: bool = True                   # needs --out
    distributed: bool = False             # may run under torchrun

    def function(self) -> Callable:
        module, name = self.job.split(":")
        return getattr(importlib.import_module(f"recipes.jobs.{module}"), name)

    def run(self, spec, args, out) -> dict | None:
        return self.function()(spec, args, out)


_GRID = frozenset({"device_map", "offload_folder", "memory", "max_batch_rows"})
_ROWS = frozenset({"max_batch_rows"})
RUNNERS: dict[tuple[str, str], Runner] = {
    ("trace", "language"): Runner("run_grid:grid_job", checks.check_grid, _GRID, distributed=True),
    ("patch", "language"): Runner("run_grid:grid_job", checks.check_grid, _GRID, distributed=True),
    ("edit", "language"): Runner("run_edit:edit_job", checks.check_edit, frozenset({"checkpoint"})),
    ("steer", "language"): Runner("run_steer:steer_job", checks.check_steer),
    ("apply", "language"): Runner("run_edit:apply_job", checks.check_apply, writes=False),
    ("trace", "vision-language"): Runner("run_grid:grid_job", checks.check_grid, _GRID, distributed=True),
    ("patch", "vision-language"): Runner("run_grid:grid_job", checks.check_grid, _GRID, distributed=True),
    ("edit", "vision-language"): Runner("run_vision_language:edit_job", checks.check_vlm_edit, frozenset({"checkpoint"})),
    ("trace", "text-to-image"): Runner("run_text_to_image:trace_job", checks.check_diffusion_trace),
    ("erase", "text-to-image"): Runner("run_text_to_image:erase_job", checks.check_erase, frozenset({"checkpoint"})),
    ("apply", "text-to-image"): Runner("run_text_to_image:apply_job", checks.check_diffusion_apply, frozenset({"out"}),
                                       writes=False),
    ("lens", "language"): Runner("run_lenses:lens_job", checks.check_reading, _ROWS),
    ("lens", "vision-language"): Runner("run_lenses:lens_job", checks.check_reading, _ROWS),
    ("knockout", "language"): Runner("run_lenses:knockout_job", checks.check_reading, _ROWS),
    ("knockout", "vision-language"): Runner("run_lenses:knockout_job", checks.check_reading, _ROWS),
    ("probe", "language"): Runner("run_lenses:probe_job", checks.check_reading),
    ("probe", "vision-language"): Runner("run_lenses:probe_job", checks.check_reading),
    ("daam", "text-to-image"): Runner("run_lenses:daam_job", checks.check_daam),
    ("features", "language"): Runner("run_features:features_job", checks.check_features),
    ("features", "vision-language"): Runner("run_features:features_job", checks.check_features),
    ("trace", "contrastive"): Runner("run_grid:grid_job", checks.check_grid, _GRID, distributed=True),
    ("patch", "contrastive"): Runner("run_grid:grid_job", checks.check_grid, _GRID, distributed=True),
    ("decompose", "contrastive"): Runner("run_contrastive:decompose_job", checks.check_decompose),
    ("lens", "contrastive"): Runner("run_lenses:lens_job", checks.check_reading, _ROWS),
}
#: The optional flags of `lesion run`, as argparse names them, and how the user spells them.
OPTIONAL_FLAGS = {"device_map": "--device-map", "offload_folder": "--offload-folder", "memory": "--memory",
                  "max_batch_rows": "--max-batch-rows", "checkpoint": "--checkpoint", "out": "--out"}


def runner_for(spec, args) -> Runner:
    """The spec's runner, after refusing every flag it does not take."""
    runner = RUNNERS[(spec.kind, spec.modality)]
    takes = runner.flags | ({"out"} if runner.writes else set())
    for name, flag in OPTIONAL_FLAGS.items():
        if getattr(args, name, None) is not None and name not in takes:
            raise SpecError(flag, getattr(args, name), f"nothing: `kind: {spec.kind}` with `modality: "
                            f"{spec.modality}` does not take {flag}")
    return runner


def compile_check(spec) -> str:
    """One line saying what was checked; raises on the first problem."""
    from recipes.jobs.flag_checks import check_spec_files

    check_spec_files(spec)
    return f"ok: {spec.kind} spec ({spec.modality}), {RUNNERS[(spec.kind, spec.modality)].check(spec)}"
