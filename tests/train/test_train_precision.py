"""Device and precision choices: what `auto` means here, and clear errors for the impossible."""

from __future__ import annotations

import pytest
import torch

from dtl.device import resolve_device
from dtl.errors import DtlError
from dtl.train.precision import autocast, grad_scaler, resolve_precision

CPU = torch.device("cpu")


def test_auto_on_cpu_is_plain_fp32():
    p = resolve_precision("auto", CPU)
    assert (p.name, p.dtype, p.use_scaler) == ("fp32", None, False)
    assert not grad_scaler(p, CPU).is_enabled()


def test_bf16_autocast_on_cpu_really_computes_in_bf16():
    p = resolve_precision("bf16", CPU)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(p, CPU):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
def test_gpu_only_choices_fail_clearly_without_a_gpu():
    with pytest.raises(DtlError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(DtlError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    assert resolve_device("auto").type in ("cpu", "mps")


def test_unknown_names():
    with pytest.raises(DtlError, match="auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU)
    with pytest.raises(DtlError, match="auto, cpu, cuda, mps"):
        resolve_device("tpu")
