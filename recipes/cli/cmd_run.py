"""`lesion run`: run a spec; the runner for its kind and modality (`recipes.cli.runners`) writes the result to `--out`."""

from __future__ import annotations

from interventions.core.atomic import check_out
from interventions.core.errors import SpecError
from recipes.jobs.flag_checks import check_spec_files, device_flag, load_spec_for, parse_device_map, positive_int


def add_parser(sub, parents) -> None:
    r = sub.add_parser("run", parents=parents, help="run a spec: trace/patch write result.json, result.safetensors, heatmap.png, "
                                   "spec.yaml; edit writes delta.safetensors and metrics.json")
    r.add_argument("spec")
    r.add_argument("--out", default=None, help="output folder (not needed for `kind: apply`)")
    r.add_argument("--model", default=None, help="override the spec's `model`")
    r.add_argument("--max-batch-rows", type=positive_int, default=None, help="override the spec's `max_batch_rows`")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--device-map", default=None, metavar="MAP",
                   help="trace/patch: spread the model over devices with accelerate: auto, balanced, sequential, "
                        "or a JSON object of module -> device (\"disk\" offloads); --device is then ignored")
    r.add_argument("--offload-folder", default=None, help="where --device-map puts \"disk\" weights")
    r.add_argument("--memory", default=None, metavar="SIZE",
                   help="trace/patch: bound the sweep's memory beyond the weights, e.g. 512MB or 2GiB; "
                        "chunks and prompt blocks are sized to fit, and the measured peak is reported")
    r.add_argument("--device", type=device_flag, default="cpu", help="cpu, cuda, cuda:1 ... (under torchrun: cuda means each "
                                                   "process's LOCAL_RANK device)")
    r.add_argument("--checkpoint", default=None, metavar="NAME",
                   help="edit specs: also copy the delta to checkpoints/NAME.safetensors and list it in the manifest")
    r.set_defaults(fn=main)


def main(args) -> int:
    """Everything a user can get wrong is checked before the model loads; the result is written to a
    staging folder that becomes `--out` only when the run has finished."""
    from contextlib import nullcontext

    from interventions.core.atomic import atomic_folder
    from interventions.core.units import parse_bytes
    from recipes.cli.runners import runner_for
    from recipes.train.manifest import check_name

    spec = load_spec_for(args.spec, args.model)
    runner = runner_for(spec, args)
    check_spec_files(spec)
    parse_device_map(args.device_map)
    if args.memory:
        parse_bytes(args.memory, "--memory")
    if args.checkpoint:
        check_name(args.checkpoint)
    out = check_out(args.out, runner.writes, f"a `kind: {spec.kind}` spec")
    from interventions.core.distributed import init_from_env, world  # torch: only once the flags are known good

    if init_from_env() and not runner.distributed:
        raise SpecError("kind", spec.kind, "'trace' or 'patch' on a language model under torchrun (other kinds "
                                           "run in one process)")
    with (atomic_folder(out) if out is not None and world()[0] == 0 else nullcontext(None)) as staging:
        shipping = runner.run(spec, args, staging)
    if args.checkpoint and shipping is not None:
        _ship(args, spec, shipping)
    return 0


def _ship(args, spec, shipping: dict) -> None:
    from pathlib import Path

    from recipes.train.manifest import register

    row = register(Path(args.out) / "delta.safetensors", f"{args.checkpoint}.safetensors", kind="delta",
                   recipe=args.spec, command=" ".join(["lesion"] + (args.argv or [])), base_model=spec.model,
                   **shipping)
    print(f"shipped checkpoints/{row['path']} ({row['bytes']} bytes, sha256 {row['sha256'][:12]}…) "
          f"and its manifest entry")
