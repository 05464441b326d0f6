"""Where a model runs: `--device` names, for every verb that loads or trains one.

>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

import torch

from dtl.errors import DtlError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else mps, else cpu; an explicit name must be usable here
    (a device this machine lacks, or a CUDA index past its GPUs, is a DtlError)."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise DtlError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DtlError(
            "--device cuda asked for, but PyTorch sees no CUDA GPU (a CPU-only build, or no "
            "driver); use --device cpu or install a CUDA build of PyTorch"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise DtlError("--device mps asked for, but MPS is not available here; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch refuses the name, e.g. cuda:x
        raise DtlError(
            f"--device {name}: not a device name; use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise DtlError(
                f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    return device


# CPU flags that mean bf16 arithmetic in hardware: AVX512-BF16 (Cooper Lake, Zen 4 and later)
# and AMX (Sapphire Rapids and later). Without them torch emulates bf16 through fp32 and gains
# nothing; with them oneDNN's bf16 kernels run (`dtl.model.dtype` decides from this).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (a `NATIVE_BF16_FLAGS` flag in Linux's
    /proc/cpuinfo; False where that file is missing, as on macOS and Windows).

    >>> cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_bf16")
    True
    >>> cpu_has_native_bf16("flags : fpu avx2")
    False
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)
