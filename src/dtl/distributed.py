"""Many processes through PyTorch's own engine: `torchrun --nproc_per_node N -m dtl train ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` joins the process group (NCCL on
GPUs, gloo on CPU) and gives each rank its device. Only rank 0 logs and saves. Without
torchrun everything here is a no-op for a world of one.

>>> dist = setup("cpu")   # a single process: rank 0 of 1
>>> dist.world_size, dist.is_main
(1, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch import nn

from dtl.errors import DtlError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun, and pick this rank's device."""
    from dtl.precision import resolve_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DtlError(
                f"rank {rank} wants GPU {local_rank} but only {torch.cuda.device_count()} are "
                "visible; lower --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DtlError(f"distributed training on {device.type} is not supported; use cpu or cuda")
    if not td.is_initialized():
        td.init_process_group(backend=backend)
    return DistInfo(rank, local_rank, world_size, device)


def teardown() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def wrap(module: nn.Module, dist: DistInfo, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP) around `module` for a world of more than one; the module itself else."""
    if not dist.enabled:
        if fsdp:
            raise DtlError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
        return module
    if fsdp:
        if dist.device.type != "cuda":
            raise DtlError("--fsdp needs GPUs (PyTorch's FSDP has no CPU path); on CPU drop "
                           "--fsdp to train data-parallel (DDP, gloo)")
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(
            module, use_orig_params=True, device_id=dist.device
        )
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def all_reduce_sum(value: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum a tensor over all ranks (in place; returned for chaining)."""
    if dist.enabled:
        td.all_reduce(value, op=td.ReduceOp.SUM)
    return value


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        td.barrier()


def gather_objects(obj, dist: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.enabled:
        return [obj]
    out = [None] * dist.world_size
    td.all_gather_object(out, obj)
    return out

