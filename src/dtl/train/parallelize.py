"""The model as the loop calls it: its loss as the forward, activation checkpointing,
DDP or FSDP over torchrun's processes, torch.compile; and the model and optimizer state back
out of the wrapping, whole, for a checkpoint (and into it, on resume).

>>> net, forward = parallelize(model, cfg, dist)  # doctest: +SKIP
>>> loss = forward(input_ids, targets)            # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dtl.model.transformer import TransformerLM
from dtl.train import distributed
from dtl.train.config import TrainConfig


class LossModel(nn.Module):
    """`forward` = `model.loss`, so DDP/FSDP/compile see the loss as the module's forward
    (DDP only synchronises gradients of what runs through its forward)."""

    def __init__(self, model: TransformerLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, targets: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        return self.model.loss(input_ids, targets, attention_mask)


def enable_activation_checkpointing(model: TransformerLM) -> None:
    """Recompute each block's activations in backward instead of keeping them.

    The block's `forward` is replaced on the instance, so parameter names (and therefore
    checkpoints) are unchanged.
    """
    for block in model.transformer_blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def parallelize(
    model: TransformerLM, cfg: TrainConfig, dist: distributed.DistInfo
) -> tuple[nn.Module, Callable[..., Tensor]]:
    """(net, forward): `net` is the wrapped LossModel (DDP's no_sync, FSDP's state dicts),
    `forward` is what the loop calls, `net` itself or its compiled form.

    FSDP shards `model`'s own parameters in place (DTensors under their own names), so an
    optimizer built on `model` is the same either way.
    """
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    net = distributed.wrap(LossModel(model), dist, fsdp=cfg.fsdp)
    forward = torch.compile(net) if cfg.compile else net
    return net, forward


# ---------------------------------------------------------------------- whole state, for checkpoints
def full_model(
    net: nn.Module, model: TransformerLM, dist: distributed.DistInfo, fsdp: bool
) -> TransformerLM | None:
    """The model with all its weights (under FSDP gathered on rank 0, collective); None on
    the other ranks under FSDP, which do not save."""
    if not fsdp:
        return model
    full = distributed.full_state_dict(net)  # {} off rank 0
    if not dist.is_main:
        return None
    whole = TransformerLM(model.config)
    whole.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
    return whole


def load_full_model(
    net: nn.Module, model: TransformerLM, path: str | os.PathLike, device: torch.device, fsdp: bool
) -> None:
    """Load a saved model dir's weights; under FSDP every rank reads all of them (on CPU)
    and keeps its shard."""
    weights = TransformerLM.from_pretrained(path, device="cpu" if fsdp else device).state_dict()
    if fsdp:
        distributed.load_full_state_dict(net, {f"model.{k}": v for k, v in weights.items()})
    else:
        model.load_state_dict(weights)


def optimizer_state_dict(net: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimizer's state_dict; under FSDP gathered unsharded on rank 0 (collective), in
    the same layout, so either kind of run resumes from either kind of checkpoint."""
    if fsdp:
        return distributed.full_optimizer_state(net, optimizer)
    return optimizer.state_dict()


def load_optimizer_state_dict(
    net: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool
) -> None:
    if fsdp:
        distributed.load_full_optimizer_state(net, optimizer, state)
    else:
        optimizer.load_state_dict(state)
