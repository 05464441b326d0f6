"""Many processes through PyTorch's own engine: `torchrun --nproc_per_node N -m dtl train ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` joins the process group (NCCL on
GPUs, gloo on CPU) and gives each rank its device. Only rank 0 logs and saves. Without
torchrun everything here is a no-op for a world of one.

`wrap(..., fsdp=True)` shards the model with PyTorch's FSDP2 (`fully_shard`: each
TransformerBlock, then the root), on GPUs (NCCL) and on CPU (gloo) alike; its parameters stay
the module's own, under their own names, as DTensors. `full_state_dict` /
`full_optimizer_state` gather them into what an unsharded model and optimizer hold, so a
checkpoint is the same whichever way the model was trained.

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
from torch.nn.parallel import DistributedDataParallel

from dtl.device import resolve_device
from dtl.errors import DtlError
from dtl.model.transformer import TransformerBlock

# The FSDP-only modules (torch.distributed.device_mesh, .checkpoint.state_dict and
# fully_shard, whose home moved between torch versions) are imported where they are used:
# they take ~0.4 s to import, which runs without --fsdp need not pay.


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
    """DDP (or FSDP) around `module` for a world of more than one; the module itself else.

    With `fsdp` the module is sharded in place (FSDP2) and returned: each TransformerBlock is
    a unit of its own (gathered for its forward and backward only), the rest is the root's.
    """
    if fsdp:
        check_fsdp(dist)
    if not dist.enabled:
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        fully_shard, _ = _fsdp2()
        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        for block in [m for m in module.modules() if isinstance(m, TransformerBlock)]:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def check_fsdp(dist: DistInfo) -> None:
    """--fsdp shards over torchrun's processes: a world of one has nothing to shard over."""
    if not dist.enabled:
        raise DtlError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
    _fsdp2()  # this torch has it


def _fsdp2():
    """PyTorch's `fully_shard` and the class it gives sharded modules."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # torch >= 2.6
    except ImportError:
        try:  # torch 2.4, 2.5
            from torch.distributed._composable.fsdp import FSDPModule, fully_shard
        except ImportError:
            raise DtlError(
                f"--fsdp needs PyTorch's fully_shard (FSDP2, torch >= 2.4); this is "
                f"torch {torch.__version__}. Drop --fsdp to train with DDP"
            ) from None
    return fully_shard, FSDPModule


def _reshard(module: nn.Module) -> None:
    """Register every sharded parameter again. A forward without a backward (evaluation)
    leaves the root's parameters gathered, and the state-dict helpers match the optimizer's
    parameters (the shards) with the module's by identity."""
    _, fsdp_module = _fsdp2()
    for m in module.modules():
        if isinstance(m, fsdp_module):
            m.reshard()


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights of a sharded `module` on CPU, on rank 0 ({} on the others).

    Collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    _reshard(module)
    return get_model_state_dict(module, options=_full_options(cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load unsharded weights (every rank holds all of `state`) into a sharded `module`."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    _reshard(module)
    set_model_state_dict(module, state, options=_full_options())


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of a sharded `module` as an unsharded `optimizer.state_dict()`
    (parameters numbered in param-group order, full tensors on CPU), on rank 0; {} on the
    others. Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _reshard(module)
    state = get_optimizer_state_dict(module, optimizer, options=_full_options(cpu_offload=True))
    if not state:
        return {}
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def load_full_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load an unsharded `optimizer.state_dict()` (every rank holds all of it) into the
    optimizer of a sharded `module`."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    _reshard(module)
    names = {id(p): name for name, p in module.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    saved = state["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g) for g in groups]:
        raise DtlError(
            "the saved optimizer state does not match this model's parameter groups "
            f"({[len(g['params']) for g in saved]} vs {[len(g) for g in groups]} parameters); "
            "was it saved with a different --decay-all or model?"
        )
    order = [name for g in groups for name in g]
    by_name = {
        "state": {order[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": names_} for g, names_ in zip(saved, groups, strict=True)],
    }
    set_optimizer_state_dict(module, optimizer, by_name, options=_full_options())


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


def broadcast_from_main(value: float, dist: DistInfo) -> float:
    """Rank 0's `value` on every rank: one clock for all (a --max-time run's ranks take rank
    0's training time, so they agree on the lr and on the step they stop at).

    >>> broadcast_from_main(1.5, DistInfo())  # a single process: its own value
    1.5
    """
    if not dist.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=dist.device)
    td.broadcast(tensor, src=0)
    return float(tensor.item())
