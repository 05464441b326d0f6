"""Mixed precision for `dtl train` (the device comes from `dtl.device`).

`auto` picks:
- on CUDA, bf16 autocast where the GPU supports it, else fp16 autocast with a GradScaler
  (weights, gradients and optimizer state stay fp32: the spec's "float16 for forward and
  backward, float32 for the weight updates");
- on a CPU with native bf16 units (AVX512-BF16 or AMX: `cpu_native_bf16`), bf16 autocast, whose
  matmuls run ~3x faster than fp32 there (the vocabulary head and loss take their own bf16
  path, `dtl.model.head_loss`, with the loss and its logsumexp in fp32);
- fp32 on other CPUs (where a bf16 matmul is emulated and slower than fp32) and on MPS.
fp16 on a CPU is refused: it has no fast kernels there (~100x slower than fp32).
`--precision fp32` always gives exact fp32 back.

>>> p = resolve_precision("auto", torch.device("cpu"))
>>> p.name in ("fp32", "bf16"), p.why  # doctest: +SKIP
(True, 'auto: AVX512-BF16 on this CPU; --precision fp32 for exact fp32')
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

from dtl.device import cpu_native_bf16  # the one detection, shared with --dtype
from dtl.errors import DtlError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    dtype: torch.dtype | None  # the autocast dtype, None for plain fp32
    use_scaler: bool  # fp16 needs loss scaling so small gradients do not flush to zero
    why: str = ""  # what `auto` saw ("auto: this CPU has AVX512-BF16"); "" when named


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


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast context (a no-op for fp32)."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 on CUDA (disabled it passes everything through)."""
    return torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
