"""Where a model runs: `--device` names, for every verb that loads or trains one.

>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

import os

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
# nothing; with them oneDNN's bf16 kernels run. Training's `--precision auto`
# (`dtl.train.precision`) and inference's `--dtype auto` (`dtl.model.dtype`) both ask here.
NATIVE_BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}


def cpu_native_bf16(cpuinfo: str | None = None) -> str | None:
    """The CPU's native bf16 units ("AMX" or "AVX512-BF16"), or None when it has none.

    With `cpuinfo` (the text of Linux's /proc/cpuinfo), from its flags alone. Without it: the
    environment variable DTL_CPU_BF16=0 (or 1) decides when set (the test suite sets 0, so
    results do not depend on the machine); else PyTorch's own checks (the ones its oneDNN
    kernels go by) where it has them; else /proc/cpuinfo; else None (macOS, Windows).

    >>> cpu_native_bf16("flags : fpu avx2 avx512f avx512_bf16")
    'AVX512-BF16'
    >>> cpu_native_bf16("flags : fpu avx2") is None
    True
    """
    if cpuinfo is None:
        forced = os.environ.get("DTL_CPU_BF16", "").strip()
        if forced in ("0", "1"):
            return "DTL_CPU_BF16=1" if forced == "1" else None
        cpu = getattr(torch, "cpu", None)
        amx = getattr(cpu, "_is_amx_tile_supported", None)
        avx = getattr(cpu, "_is_avx512_bf16_supported", None)
        if amx is not None and avx is not None:
            return "AMX" if amx() else "AVX512-BF16" if avx() else None
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return next((name for flag, name in NATIVE_BF16_FLAGS.items() if flag in flags), None)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (`cpu_native_bf16` is not None).

    >>> cpu_has_native_bf16("flags : fpu amx_bf16 amx_tile")
    True
    """
    return cpu_native_bf16(cpuinfo) is not None
