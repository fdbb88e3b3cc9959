"""Data-parallel sweeps with torch.distributed (launched by `torchrun`); no scheduler of our own.

    torchrun --nproc_per_node 2 -m recipes.cli run recipes/trace/trace_eiffel.yaml --out runs/eiffel

Every process loads the model and compiles the same plan. Each runs the clean pass and the
baseline chunks (cheap; every cell chunk needs its baseline's key/value cache), then every
`world_size`-th cell chunk, round robin. The per-cell sums are added across processes with one
`all_reduce` (gloo, on CPU tensors), so every process ends with the whole result; only rank 0
writes it. Each cell is computed by exactly one process, so the merged result equals a
single-process run (tested with two CPU processes).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group `torchrun` describes in the environment (no-op when not launched so)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return True


def local_device(default: str) -> str:
    """`cuda:LOCAL_RANK` for CUDA under torchrun, else `default`."""
    if default.startswith("cuda") and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return default


def all_sum(tensors) -> None:
    """Sum CPU tensors across processes, in place (no-op in a single process)."""
    if world()[1] == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
