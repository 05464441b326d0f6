"""The optimizer and learning-rate schedules of `dtl train`.

Weight decay goes on weight matrices only (the Linear layers): biases, LayerNorm parameters
and the token embedding are left alone, as in GPT-2/nanoGPT, because shrinking a norm's gain
or a rarely seen token's row towards zero only hurts.

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100))
>>> opt = build_optimizer(model, lr=3e-4, weight_decay=0.1)
>>> round(lr_at(0, lr=3e-4, min_lr=3e-5, warmup_steps=10, max_steps=100), 12)  # warmup step 0
3e-05
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dtl.errors import DtlError

SCHEDULES = ("cosine", "linear", "constant", "wsd")
# wsd's decay phase, the last share of the run (modded-nanogpt cools down over ~0.4 too):
# 0.4 measured 0.013-0.027 bits/byte better than 0.2 on both bench_quality workloads at T/2
DECAY_FRACTION = 0.4


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Two AdamW groups: weight matrices (decayed) and everything else (not decayed).

    `decay_all=True` puts every parameter in the decayed group (the spec's plain recipe,
    kept for the quality benchmark's comparison).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A weight matrix of a Linear layer; the embedding table is 2-D too but is a lookup.
        # Under FSDP (fully_shard) a parameter is a DTensor with its own name and its full
        # shape, so it is told apart the same way.
        is_matrix = p.dim() >= 2 and "embedding" not in name
        (decay if decay_all or is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    decay_all: bool = False,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused (one kernel over all tensors: ~6x faster than the
    foreach path on CPU for the small preset) where PyTorch has it, else foreach."""
    groups = param_groups(model, weight_decay, decay_all)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int,
    schedule: str = "cosine",
    decay_fraction: float = DECAY_FRACTION,
) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Linear warmup over the first `warmup_steps` steps (step 0 gets lr/warmup, so no step
    runs at lr 0), then `cosine` or `linear` decay to `min_lr` at `max_steps`, or `constant`,
    or `wsd` (warmup-stable-decay, as nanochat and modded-nanogpt train): `lr` until the last
    `decay_fraction` of the run, then linear to `min_lr` at `max_steps`.

    >>> [lr_at(s, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10, schedule="wsd")
    ...  for s in (0, 5, 6, 7, 8, 9)]  # the last 0.4 of 10 steps decays
    [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if schedule not in SCHEDULES:
        raise DtlError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        return _wsd(step, lr, min_lr, warmup_steps, max_steps, decay_fraction)
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)  # 0 -> 1 over the decay phase
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _wsd(
    step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int, decay_fraction: float
) -> float:
    """The stable and decay phases of `wsd`: the decay starts at max_steps * (1 - fraction)
    (a point of the run's progress, not a step count), never inside the warmup."""
    decay_start = max(float(warmup_steps), max_steps * (1.0 - decay_fraction))
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1.0, max_steps - decay_start))
    return lr + (min_lr - lr) * progress


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Every group's lr for this step: `value` (the schedule's) times the group's `lr_ratio`
    (Muon's groups peak at --muon-lr, not --lr; AdamW groups have none: 1)."""
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_ratio", 1.0)


def make_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    muon_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    decay_all: bool = False,
    muon_options: dict | None = None,
    precision: str = "fp32",
) -> torch.optim.Optimizer:
    """The optimizer `--optimizer` names: `adamw` (build_optimizer) or `muon` (muon.build_muon,
    with `muon_options`: its groups' lrs and momentum warmup, `TrainConfig.muon_options`;
    `precision`, the run's resolved one, sets the dtype Muon orthogonalises in).

    >>> from dtl import ModelConfig, TransformerLM
    >>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100))
    >>> type(make_optimizer(model, "muon", 1e-3, 0.02, 0.1, (0.9, 0.95))).__name__
    'Muon'
    """
    if name == "muon":
        from dtl.train.muon import build_muon, ns_dtype_for

        return build_muon(
            model,
            lr,
            muon_lr=muon_lr,
            weight_decay=weight_decay,
            betas=betas,
            ns_dtype=ns_dtype_for(precision),
            **(muon_options or {}),
        )
    if name != "adamw":
        raise DtlError(f"unknown optimizer {name!r}; choose adamw or muon")
    return build_optimizer(model, lr, weight_decay, betas, decay_all=decay_all)
