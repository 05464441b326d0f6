"""The number format a loaded model runs inference in: `--dtype fp32|bf16|int8|auto`.

One rule decides it (`resolve_inference_dtype`), one function converts a loaded model
(`to_inference_dtype`), and `load_model(spec, dtype=...)` calls both, so `dtl generate`, `ask`,
`chat`, `eval` and `serve` (and the library) get the same model for the same flag.

- fp32: the weights as trained; exact, the reference the others are measured against.
- bf16: every weight, activation and the KV cache in bfloat16 (8 bits of mantissa). On a CPU
  with native bf16 (AVX512-BF16 or AMX, `dtl.device.cpu_has_native_bf16`) oneDNN runs its
  products in hardware and each decode step streams half the bytes; elsewhere torch emulates
  it through fp32 and it only costs.
- int8: the blocks' linear layers and the vocabulary head quantized dynamically (weights int8,
  one scale per output channel; each call quantizes its input rows to 8 bits on the fly, so
  no calibration data is needed), with torch's eager `quantize_dynamic` (fbgemm). Embeddings,
  LayerNorms, attention and the KV cache stay fp32. CPU only.
- auto: `AUTO_ON_NATIVE_BF16` (int8) on a CPU with native bf16, fp32 everywhere else. On the
  AVX512-BF16 box DTL is measured on, int8 decoded fastest in every run (then bf16, then fp32)
  and cost no more perplexity than bf16 (docs/benchmarks.md has the figures and the
  reasoning). Elsewhere nothing was measured, so auto keeps the exact format.

Whatever the format, the logits come out in fp32 (`TransformerLM.forward` casts them up), so
sampling, log-probabilities and perplexity sums are computed in fp32.

Why torch's deprecated eager API for int8: torch 2.13 warns that `torch.ao.quantization` is
deprecated in favour of torchao, but torchao 0.18's int8 configs (dynamic activation + int8
weight, and weight-only) ran the small preset's vocabulary head 5-6x *slower* than fp32 in
eager mode on this CPU (they need `torch.compile` to be fast), while fbgemm's dynamic linear
is the fastest product measured here. The warning is silenced where DTL calls it, once.

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> resolve_inference_dtype("int8", torch.device("cpu"))
'int8'
>>> model = to_inference_dtype(TransformerLM(ModelConfig.preset("tiny", vocab_size=100)), "bf16")
>>> inference_dtype_of(model), model(torch.tensor([[1, 2, 3]])).dtype  # logits stay fp32
('bf16', torch.float32)
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from dtl.errors import DtlError

DTYPES = ("auto", "fp32", "bf16", "int8")
# what auto means on a CPU with native bf16 (AVX512-BF16 / AMX, which all have AVX512-VNNI's
# int8 dot products too): the fastest format measured there within its quality bound
AUTO_ON_NATIVE_BF16 = "int8"


def resolve_inference_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """The format `name` (one of `DTYPES`) means on `device`: "fp32", "bf16" or "int8".

    auto -> `AUTO_ON_NATIVE_BF16` (int8) on a CPU with native bf16
    (`dtl.device.cpu_has_native_bf16`), else fp32.
    int8 runs on the CPU only (fbgemm's kernels); asking for it elsewhere is a DtlError.
    """
    from dtl import device as devices  # looked up at call time: tests fake the detection

    if name not in DTYPES:
        raise DtlError(f"--dtype {name}: not a format; choose one of {', '.join(DTYPES)}")
    kind = torch.device(device).type
    if name == "auto":
        return AUTO_ON_NATIVE_BF16 if kind == "cpu" and devices.cpu_has_native_bf16() else "fp32"
    if name == "int8" and kind != "cpu":
        raise DtlError(f"--dtype int8 runs on the CPU only (fbgemm); use --device cpu, or "
                       f"--dtype bf16 on {kind}")  # fmt: skip
    return name


def dtype_line(asked: str, dtype: str) -> str:
    """What a verb prints (stderr, after the thread line) about the format it runs in.

    >>> dtype_line("auto", "int8")
    'dtype: int8 (auto: fastest on a CPU with native bf16; --dtype fp32 for exact fp32)'
    """
    if asked != "auto":
        return f"dtype: {dtype} (--dtype {asked})"
    if dtype != "fp32":
        return (f"dtype: {dtype} (auto: fastest on a CPU with native bf16; --dtype fp32 for "
                "exact fp32)")  # fmt: skip
    return "dtype: fp32 (auto: no native bf16 on this device; --dtype int8 may be faster)"


def to_inference_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """Convert a loaded model (in eval mode, in place) to "fp32", "bf16" or "int8"; returns it.

    Inference only: an int8 model has no trainable weights and a bf16 one no fp32 copy.
    A model's decode plan (`dtl.generate.decode`) follows: it is laid out from the converted
    weights on its next use.

    >>> model = to_inference_dtype(load_model("runs/tiny")[0], "int8")  # doctest: +SKIP
    """
    if dtype == "fp32":
        return model
    if dtype == "bf16":
        return model.to(torch.bfloat16)
    if dtype != "int8":
        raise ValueError(f"dtype must be fp32, bf16 or int8, got {dtype!r}")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch 2.13's deprecation notice: see the module docs
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        # every nn.Linear: the blocks' Q, K, V, W_O, the feed-forward pair and the head
        return quantize_dynamic(
            model.eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
            inplace=True,
        )  # fmt: skip


def is_int8_linear(module: nn.Module) -> bool:
    """A linear layer `to_inference_dtype(..., "int8")` made (packed int8 weights, no
    parameters: `module.weight()` / `module.bias()` are methods)."""
    return isinstance(module, torch.ao.nn.quantized.dynamic.Linear)


def fuse_int8_linears(layers: list[nn.Module]) -> nn.Module:
    """One int8 layer computing `layers` (int8 linear layers of one input size) side by side,
    outputs concatenated: the decode plan fuses Q, K and V this way. Their int8 values and
    per-channel scales are stacked as they are, so each output is the same as its layer's."""
    weights = [m.weight() for m in layers]  # (out_i, in) qint8, a scale per output channel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        packed = torch._make_per_channel_quantized_tensor(
            torch.cat([w.int_repr() for w in weights]),
            torch.cat([w.q_per_channel_scales() for w in weights]),
            torch.cat([w.q_per_channel_zero_points() for w in weights]),
            0,
        )
        fused = torch.ao.nn.quantized.dynamic.Linear(
            packed.size(1), packed.size(0), dtype=torch.qint8
        )
        fused.set_weight_bias(packed, torch.cat([m.bias() for m in layers]))
    return fused


def inference_dtype_of(model: nn.Module) -> str:
    """"int8", "bf16" or "fp32": the format `model` runs in (what eval and serve report)."""
    if any(is_int8_linear(m) for m in model.modules()):
        return "int8"
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return "bf16"
    return "fp32"
