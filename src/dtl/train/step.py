"""One optimizer step's arithmetic and the validation loss, as functions of the parts they
use: batches to the device, token-weighted gradient accumulation, clipping, evaluation.

>>> loss, stop = forward_backward(forward, net, batches, prec, scaler, dist)  # doctest: +SKIP
>>> grad_norm = clip_gradients(optimizer, scaler, max_norm=1.0)               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from dtl.model.transformer import IGNORE_INDEX
from dtl.train import distributed, precision

Batch = dict[str, Tensor]  # input_ids, targets, attention_mask: each (B, seq_len)
Forward = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # -> the mean loss, a scalar


def to_device(batch: Batch, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """(input_ids, targets, attention_mask or None), each (B, seq_len), on `device`."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    targets = batch["targets"].to(device, non_blocking=True)
    mask = batch.get("attention_mask")
    if mask is not None:
        # Padding only on the right is invisible to causal attention (a real token never
        # looks ahead) and its targets are -100: passing None keeps the fused kernel.
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        mask = None if right_padded else mask.to(device, non_blocking=True)
    return ids, targets, mask


def forward_backward(
    forward: Forward,
    net: nn.Module,
    batches: list[Batch],
    prec: precision.Precision,
    scaler: torch.amp.GradScaler,
    dist: distributed.DistInfo,
    stop_requested: bool = False,
) -> tuple[float, bool]:
    """Accumulate the micro-batches' gradients as one big batch's: (the step's token-mean
    loss over all ranks, whether any rank asked to stop)."""
    parts = [to_device(b, dist.device) for b in batches]
    counts = torch.tensor([float((t != IGNORE_INDEX).sum()) for _, t, _ in parts])
    total = float(distributed.all_reduce_sum(counts.sum().clone(), dist))
    loss_sum = torch.zeros((), device=dist.device)
    for i, (ids, targets, mask) in enumerate(parts):
        sync = contextlib.nullcontext()
        if dist.enabled and i < len(parts) - 1 and hasattr(net, "no_sync"):
            sync = net.no_sync()  # all-reduce gradients once, after the last micro-batch
        with sync:
            with precision.autocast(prec, dist.device):
                # Always through the wrapped forward, even with nothing scored (the loss is
                # then 0 with zero gradients): DDP's reducer must all-reduce on every rank.
                loss = forward(ids, targets, mask)  # mean over this micro-batch
            # Weight by this micro-batch's share of all scored tokens, times world_size
            # because DDP (and FSDP) average gradients over ranks: the sum is one big
            # batch's mean.
            weight = float(counts[i]) * dist.world_size / max(total, 1.0)
            scaler.scale(loss.float() * weight).backward()
        loss_sum += loss.detach().float() * counts[i]
    stop = torch.tensor([float(stop_requested)], device=dist.device)
    reduced = distributed.all_reduce_sum(torch.cat([loss_sum.view(1), stop]), dist)
    return float(reduced[0]) / max(total, 1.0), bool(reduced[1] > 0)


def clip_gradients(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float
) -> float:
    """Unscale (fp16) and clip the gradients (`max_norm` 0: no clipping); their total norm
    before clipping."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # Under FSDP these are sharded DTensors: their norm is the full gradient's (the shards'
    # norms are reduced over the ranks), so every rank clips by the same factor.
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


@torch.no_grad()
def evaluate_batches(
    forward: Forward,
    net: nn.Module,
    batches: Iterable[Batch],
    prec: precision.Precision,
    dist: distributed.DistInfo,
) -> dict[str, float]:
    """Token-weighted mean loss over `batches` (every rank's), and its perplexity."""
    net.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        ids, targets, mask = to_device(batch, dist.device)
        n = float((targets != IGNORE_INDEX).sum())
        with precision.autocast(prec, dist.device):  # every rank runs every forward:
            loss = forward(ids, targets, mask)  # under FSDP each one is collective
        if n > 0:
            sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    net.train()
    sums = distributed.all_reduce_sum(sums.to(dist.device), dist).cpu()
    val_loss = float(sums[0] / sums[1]) if sums[1] > 0 else math.nan
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
