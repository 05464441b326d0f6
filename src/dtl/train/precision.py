"""Mixed precision for `dtl train` (the device comes from `dtl.device`).

`auto` picks bf16 autocast on CUDA devices that support it, else fp16 autocast with a
GradScaler (weights, gradients and optimizer state stay fp32: the spec's "float16 for forward
and backward, float32 for the weight updates"), and plain fp32 on CPU and MPS: on common CPUs
without native bf16 units a bf16 matmul runs ~60x slower than an fp32 one.

>>> p = resolve_precision("auto", torch.device("cpu"))
>>> p.name, p.dtype, p.use_scaler
('fp32', None, False)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dtl.errors import DtlError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    dtype: torch.dtype | None  # the autocast dtype, None for plain fp32
    use_scaler: bool  # fp16 needs loss scaling so small gradients do not flush to zero


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name not in PRECISIONS:
        raise DtlError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type != "cuda":
            return Precision("fp32", None, False)
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if device.type == "cpu":
        raise DtlError(
            "--precision fp16 needs a GPU (CPU autocast runs bf16 or fp32); use --precision "
            "fp32 on CPU"
        )
    return Precision("fp16", torch.float16, device.type == "cuda")


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast context (a no-op for fp32)."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 on CUDA (disabled it passes everything through)."""
    return torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
