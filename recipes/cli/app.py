"""The `lesion` command line. Each subcommand is one module here, `cmd_<name>.py`, with
`add_parser(sub, parents)` and `main(args)`; `COMMANDS` lists them in `--help` order.

    lesion run recipes/trace/trace_eiffel.yaml --out runs/eiffel
    lesion validate recipes/trace/trace_eiffel.yaml [--compile]
    lesion schema > lesion.schema.json
    lesion apply --model smollm2-135m --delta runs/edit/delta.safetensors --prompt "The Eiffel Tower is in"
    lesion apply --steer runs/steer/vector.safetensors --coef 8 --prompt "I went out yesterday and"
    lesion bench-trace --threads 2
    lesion run recipes/erase/erase_red.yaml --out runs/erase_red           # text-to-image: erase a concept
    lesion apply --model shapes-diffusion --delta runs/erase_red/delta.safetensors --prompt "a red circle" --out g

Errors a user can cause print one clear message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from interventions.core.errors import LesionError, clip
from recipes.cli import (
    cmd_apply,
    cmd_attribution_rules,
    cmd_attribution_steps,
    cmd_bench_dictionary,
    cmd_bench_edit,
    cmd_bench_erase,
    cmd_bench_overhead,
    cmd_bench_patch,
    cmd_bench_serve,
    cmd_bench_steer,
    cmd_bench_trace,
    cmd_compare,
    cmd_docs,
    cmd_edit_flag,
    cmd_eval_edits,
    cmd_export,
    cmd_import,
    cmd_report,
    cmd_run,
    cmd_schema,
    cmd_trace_flags,
    cmd_train_dictionary,
    cmd_train_lens,
    cmd_validate,
)
from recipes.jobs.flag_checks import positive_int

#: the subcommands, in the order `lesion --help` lists them
COMMANDS = (cmd_run, cmd_validate, cmd_report, cmd_export, cmd_import, cmd_apply, cmd_compare, cmd_schema, cmd_docs, cmd_eval_edits,
            cmd_bench_trace, cmd_bench_serve, cmd_bench_patch, cmd_bench_edit, cmd_train_lens, cmd_train_dictionary,
            cmd_bench_dictionary, cmd_bench_steer, cmd_bench_erase, cmd_bench_overhead, cmd_attribution_steps,
            cmd_attribution_rules,
            cmd_trace_flags, cmd_edit_flag)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one `error:` line (exit 2), as every other error is."""

    def error(self, message: str):
        self.exit(2, f"error: {clip(message, 400)} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lesion", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    common = argparse.ArgumentParser(add_help=False)    # --threads may also follow the command
    common.add_argument("--threads", type=positive_int, default=argparse.SUPPRESS,
                        help="torch CPU threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub, [common])
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    finished = False
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        status = args.fn(args)
        finished = True
        return status
    except LesionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (nothing half-written was left behind)", file=sys.stderr)
        return 130
    finally:
        _leave_process_group(finished)


def _leave_process_group(finished: bool) -> None:
    """Under torchrun, every process leaves together after a finished run, and only then tears its group down;
    after an error nobody waits, so a process that failed alone cannot hang the others.

    The meeting is on the launcher's key-value store, not a gloo barrier: a process that left right after a gloo
    collective (the barrier included) while its peer's last message was still queued aborted the peer in gloo
    ("terminate called without an active exception", seen twice in CI; gloo's open issue 155). Once every process
    has written its key, every gloo collective has finished on both sides and nothing is left in flight."""
    dist = sys.modules.get("torch.distributed")   # only if this run imported it
    if dist is not None and dist.is_available() and dist.is_initialized():
        if finished:
            store, rank = dist.distributed_c10d._get_default_store(), dist.get_rank()
            store.set(f"lesion/finished/{rank}", "1")
            store.wait([f"lesion/finished/{r}" for r in range(dist.get_world_size())])
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
