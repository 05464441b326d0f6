"""Mixed precision for `dtl train` (the device comes from `dtl.device`).

`auto` picks:
- on CUDA, bf16 autocast where the GPU supports it, else fp16 autocast with a GradScaler
  (weights, gradients and optimizer state stay fp32: the spec's "float16 for forward and
  backward, float32 for the weight updates");
- on a CPU with native bf16 units (AVX512-BF16 or AMX: `cpu_native_bf16`), bf16, whose matmuls
  run ~3x faster than fp32 there. On a CPU (without FSDP) that is not autocast but the way
  the field trains in bf16: the model runs on bf16 copies of its weights, and its activations
  stay bf16 between the ops (`WeightCopies`), while the optimizer keeps the fp32 master weights,
  which are what checkpoints hold. Autocast would cast each activation to bf16 before every
  matmul and back after it; here only the embedding (a lookup, its gradient summed in fp32)
  stays fp32, and the vocabulary head and loss take their own bf16 path
  (`dtl.model.head_loss`, with the loss and its logsumexp in fp32);
- fp32 on other CPUs (where a bf16 matmul is emulated and slower than fp32) and on MPS.
fp16 on a CPU is refused: it has no fast kernels there (~100x slower than fp32).
`--precision fp32` always gives exact fp32 back.

>>> p = resolve_precision("auto", torch.device("cpu"))
>>> p.name in ("fp32", "bf16"), p.why  # doctest: +SKIP
(True, 'auto: AVX512-BF16 on this CPU; --precision fp32 for exact fp32')
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from dtl.device import cpu_native_bf16  # the one detection, shared with --dtype
from dtl.errors import DtlError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    dtype: torch.dtype | None  # the autocast dtype, None for plain fp32
    use_scaler: bool  # fp16 needs loss scaling so small gradients do not flush to zero
    why: str = ""  # what `auto` saw ("auto: this CPU has AVX512-BF16"); "" when named
    # bf16 weight copies with fp32 masters (`WeightCopies`) instead of autocast: set by
    # `with_weight_copies`, which knows the run's device and sharding
    weight_copies: bool = False


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The one rule for what `--precision NAME` means on `device` (see the module docs)."""
    if name not in PRECISIONS:
        raise DtlError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            return dataclasses.replace(resolve_precision(name, device), why=f"auto: CUDA {name}")
        if device.type == "cpu":
            units = cpu_native_bf16()
            if units is not None:
                why = f"auto: {units} on this CPU; --precision fp32 for exact fp32"
                return Precision("bf16", torch.bfloat16, False, why)
            why = "auto: no AVX512-BF16 or AMX on this CPU"
            if os.environ.get("DTL_CPU_BF16", "").strip() == "0":
                why = "auto: DTL_CPU_BF16=0"
            return Precision("fp32", None, False, why)
        return Precision("fp32", None, False, f"auto: {device.type}")
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if device.type == "cpu":
        raise DtlError(
            "--precision fp16 needs a GPU (CPU autocast runs bf16 or fp32); use --precision "
            "fp32 or bf16 on CPU"
        )
    return Precision("fp16", torch.float16, device.type == "cuda")


def fit_precisions(device_type: str) -> tuple[str, ...]:
    """The precisions `dtl info --fit` weighs on a device, preferred first: those `auto`
    could pick there, and fp32.

    >>> fit_precisions("cuda")
    ('bf16', 'fp16', 'fp32')
    """
    if device_type == "cuda":
        return ("bf16", "fp16", "fp32")
    if device_type == "cpu" and cpu_native_bf16() is not None:
        return ("bf16", "fp32")
    return ("fp32",)


def uses_weight_copies(name: str, device_type: str, fsdp: bool = False) -> bool:
    """Whether a run in precision `name` (resolved) on `device_type` trains bf16 weight copies
    of fp32 masters (`WeightCopies`) rather than autocast: bf16 on a CPU, unsharded (FSDP
    shards the masters itself, so it keeps autocast). The one rule; the memory plan asks too.

    >>> uses_weight_copies("bf16", "cpu"), uses_weight_copies("bf16", "cuda")
    (True, False)
    """
    return name == "bf16" and device_type == "cpu" and not fsdp


def with_weight_copies(precision: Precision, device: torch.device, fsdp: bool) -> Precision:
    """`precision` with `weight_copies` set where the run trains on bf16 copies of its weights
    (`uses_weight_copies`), and what it chose added to `why`, the first log line's note.

    >>> with_weight_copies(Precision("bf16", torch.bfloat16, False), torch.device("cpu"), False).why
    'bf16 weights and activations, fp32 master weights'
    """
    if not uses_weight_copies(precision.name, device.type, fsdp):
        return precision
    note = "bf16 weights and activations, fp32 master weights"
    why = f"{precision.why}; {note}" if precision.why else note
    return dataclasses.replace(precision, weight_copies=True, why=why)


class WeightCopies:
    """bf16 copies of an fp32 model's weights, for training in bf16 (mixed precision as in
    Micikevicius et al. 2018: the forward and backward in 16 bits, the update in fp32).

    `model` is the copy the forward runs: the master's structure with every parameter in bf16
    except the token embedding, which it shares (a lookup costs nothing to keep in fp32, and
    its gradient, a scatter-add over repeated tokens, is best summed in fp32). The optimizer
    and the checkpoints hold the master's fp32 parameters; once per optimizer step
    `grads_to_master` hands the copies' gradients to them and, after the step, `refresh`
    rounds the updated masters into the copies, so a copy always equals its rounded master.

    >>> copies = WeightCopies(master)          # doctest: +SKIP
    >>> loss = copies.model.loss(ids, targets); loss.backward()     # doctest: +SKIP
    >>> copies.grads_to_master(); optimizer.step(); copies.refresh()  # doctest: +SKIP
    """

    def __init__(self, master: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        # deepcopy's memo gives each parameter its bf16 copy (or, for the embedding, itself),
        # so no second fp32 model is ever made
        memo = {
            id(p): p if _kept_fp32(name) else nn.Parameter(p.detach().to(dtype), p.requires_grad)
            for name, p in master.named_parameters()
        }
        self.model = copy.deepcopy(master, memo)
        self.pairs = [  # (fp32 master, bf16 copy) in the masters' order
            (m, c)
            for m, c in zip(master.parameters(), self.model.parameters(), strict=True)
            if c is not m
        ]

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Each copy's gradient, in fp32, as its master's (None where there is none)."""
        for master, low in self.pairs:
            master.grad = None if low.grad is None else low.grad.to(master.dtype)
            low.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Round the masters into the copies (after every optimizer step and every load):
        one foreach copy over all of them, not one call per tensor."""
        if self.pairs:
            lows, masters = zip(*[(low, master) for master, low in self.pairs], strict=True)
            torch._foreach_copy_(list(lows), list(masters))


def _kept_fp32(name: str) -> bool:
    """Parameters a bf16 copy shares with its fp32 master: the token embedding."""
    return name.startswith("embedding.")


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast context (a no-op for fp32, and for bf16 weight copies,
    where the model runs in its weights' dtype)."""
    if precision.dtype is None or precision.weight_copies:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 on CUDA (disabled it passes everything through)."""
    return torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
