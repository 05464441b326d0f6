"""Parameter counts and memory estimates, computed from a ModelConfig alone.

The counts are exact (a test checks them against the built model). The memory estimate
counts what training really keeps alive, tensor by tensor, for DTL's own implementation:

- weights, gradients and AdamW's two moments (fp32 master weights in every precision);
- per block and token, the activations autograd saves: the block input, Q, K and V, the
  attention output, the two LayerNorm inputs and the FFN's ReLU output (8 x d_model + d_ff
  values), the attention's log-sum-exp (n_heads), LayerNorm statistics (4), and the dropout
  masks (a byte a value: `dtl.model.transformer.Dropout`); under autocast the matmul outputs are 16-bit; with bf16
  weight copies (bf16 on a CPU: `dtl.train.precision.WeightCopies`) all of them are;
  with activation checkpointing only each block's input, plus one block being recomputed;
- the fused head + loss (`dtl.model.head_loss`): one chunk of logits at a time instead of all
  (B x T x vocab) of them, plus the head's gradient held from the forward pass.

When a run does run out of memory, `is_oom` recognises it and `oom_advice` says what to lower.

>>> parameter_breakdown(ModelConfig.preset("small"))["total"]
30520913
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from dtl.model.config import ModelConfig
from dtl.model.head_loss import CHUNK_ELEMENTS, SUB_ROWS
from dtl.train.precision import uses_weight_copies

PRECISIONS = ("fp32", "bf16", "fp16")
GIB = 1024**3
MIB = 1024**2


def parameter_breakdown(config: ModelConfig) -> dict[str, int]:
    """Exact parameter counts, in the spec's layout ("Parameter Count Example")."""
    D, F, V, L = config.d_model, config.d_ff, config.vocab_size, config.n_layers
    attention = 4 * (D * D + D)  # W_Q, W_K, W_V, W_O with biases
    feed_forward = (D * F + F) + (F * D + D)  # linear1, linear2 with biases
    norms = 2 * (2 * D)  # norm1, norm2: weight and bias each
    block = attention + feed_forward + norms
    out = {
        "embedding": V * D,
        "positional_encoding": 0,  # fixed sinusoid: a buffer, not a parameter
        "attention_per_block": attention,
        "feed_forward_per_block": feed_forward,
        "norms_per_block": norms,
        "per_block": block,
        "blocks": L * block,
        "final_norm": 2 * D,
        "head": D * V + V,
    }
    out["total"] = out["embedding"] + out["blocks"] + out["final_norm"] + out["head"]
    return out


def _activation_bytes(
    config: ModelConfig,
    tokens: int,
    precision: str,
    checkpointing: bool,
    device: str,
    weight_copies: bool | None = None,
) -> tuple[int, int]:
    """(bytes kept from the forward pass, bytes of one block recomputed in backward).
    `weight_copies`: the run trains bf16 weight copies, not autocast (None: what the run
    would, `uses_weight_copies`)."""
    D, F, H, L = config.d_model, config.d_ff, config.n_heads, config.n_layers
    if weight_copies is None:
        weight_copies = uses_weight_copies(precision, device)
    if weight_copies:
        # Everything after the embedding's lookup is bf16: per block the 8 x D + F values
        # above, the LayerNorm statistics (4) in bf16 too, the log-sum-exp (H) in fp32 and
        # the two dropout masks (bools); outside, ln_f's input and statistics, the token ids and
        # the embedding dropout's mask. Attention runs in fp32 there (`_attention_in_fp32`):
        # it keeps fp32 Q, K, V and output (+2 bytes each over bf16's) and the output projection
        # its own bf16 copy of the output (+2): 10 x D more.
        mask = 1 if config.dropout > 0 else 0
        block = (8 * D + F + 4) * 2 + 10 * D + H * 4 + 2 * D * mask
        outside = D * 2 + 4 + 8 + D * mask
        if checkpointing:
            return tokens * (L * D * 2 + outside), tokens * block
        return tokens * (L * block + outside), 0
    mixed = precision != "fp32"
    half = 2 if mixed else 4
    # Dropout masks: one byte (bool) a value, on every device (`Dropout`).
    mask = 1 if config.dropout > 0 else 0
    # Per block and token. fp32: input, Q, K, V, attention out, LN1 in, LN2 in (7 x D) + ReLU
    # out (F), all 4 bytes. Mixed: 16-bit copies of the matmul inputs and outputs (autocast
    # casts the block input once per projection: 3 copies; Q, K, V, attention out, LN1 out,
    # ReLU out) while the LayerNorm inputs stay fp32.
    if mixed:
        block = (8 * D + F) * half + 2 * D * 4
    else:
        block = (8 * D + F) * 4
    block += (H + 4) * 4 + 2 * D * mask  # log-sum-exp, LN mean/rstd, two dropout masks
    # ln_f input and stats, token ids, the embedding dropout's mask.
    outside = D * 4 + 8 + 8 + D * mask
    if checkpointing:  # only block inputs are kept; one block is recomputed at a time
        return tokens * (L * D * 4 + outside), tokens * block
    return tokens * (L * block + outside), 0


def estimate_memory(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    device: str = "cpu",
    grad_accum: int = 1,
) -> dict[str, int]:
    """Bytes a training step and inference need, by component.

    The peak (`train_total`) comes at the end of the forward pass: weights, AdamW moments,
    the activations, the head's workspace and the head's gradient (computed in the forward);
    the other gradients appear in backward as the activations are freed, except with
    gradient accumulation, where all gradients live through the next micro-batch's forward.

    >>> est = estimate_memory(ModelConfig.preset("small"), batch_size=8, seq_len=256)
    >>> est["train_total"] > est["weights"] > 0
    True
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    params = parameter_breakdown(config)["total"]
    tokens = batch_size * seq_len
    V, D = config.vocab_size, config.d_model
    weights = params * 4  # fp32 master weights
    gradients = params * 4
    optimizer = params * 8  # AdamW exp_avg and exp_avg_sq
    # A 16-bit copy of every weight but the embedding: autocast's, made during the step, or
    # the bf16 weight copies a CPU run keeps (`dtl.train.precision.WeightCopies`).
    weight_casts = (
        (params - parameter_breakdown(config)["embedding"]) * 2 if precision != "fp32" else 0
    )
    copies = uses_weight_copies(precision, device)
    activations, recomputed = _activation_bytes(
        config, tokens, precision, activation_checkpointing, device, copies
    )
    chunk_rows = max(1, min(tokens, CHUNK_ELEMENTS // V))
    # One chunk of fp32 logits and d(hidden); in mixed precision the chunk is 16-bit, and the
    # fp32 passes over it take it whole (CUDA) or `SUB_ROWS` rows at a time (a CPU's bf16).
    fp32_rows = chunk_rows
    if precision != "fp32" and device == "cpu":
        fp32_rows = min(chunk_rows, SUB_ROWS)
    low_rows = chunk_rows if precision != "fp32" else 0
    head_workspace = (fp32_rows * 4 + low_rows * 2) * V + tokens * D * 4
    # The peak is at the forward's end (the head's gradient is made there; all gradients when
    # accumulating) or in backward (all gradients, plus a recomputed block with checkpointing).
    head = parameter_breakdown(config)["head"]
    head_gradient = head * 4
    if precision == "bf16":  # dW^T is summed in a bf16 buffer, then turned into a second
        # bf16 one (both alive at the turn): that is the gradient of the bf16 weight copies;
        # under autocast it is then cast to fp32 as well
        head_gradient = head * 2 * 2 + (0 if copies else head * 4)
    at_forward_end = (gradients if grad_accum > 1 else head_gradient) + activations + head_workspace
    in_backward = gradients + (activations + recomputed if activation_checkpointing else 0)
    train_total = weights + optimizer + weight_casts + max(at_forward_end, in_backward)

    infer_bytes = 4 if precision == "fp32" else 2
    # a bf16 model on a CPU keeps an fp32 cache: it attends in fp32 (`attention_dtype`)
    kv_bytes = 4 if device == "cpu" else infer_bytes
    kv_cache = 2 * config.n_layers * seq_len * D * kv_bytes * batch_size
    inference_weights = params * infer_bytes
    decode_copy = 0
    if device == "cpu":  # DTL's step kernel keeps every product's weights in its own layout
        from dtl.generate.step_kernel import copy_bytes

        decode_copy = copy_bytes(config, infer_bytes)
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "weight_casts": weight_casts,
        "activations": activations,
        "head_workspace": head_workspace,
        "train_total": train_total,
        "inference_weights": inference_weights,
        "kv_cache": kv_cache,
        "decode_copy": decode_copy,
        # + one logits row
        "inference_total": inference_weights + kv_cache + decode_copy + batch_size * V * 4,
    }


@dataclass(frozen=True)
class FitOption:
    precision: str
    activation_checkpointing: bool
    micro_batch: int
    grad_accum: int
    bytes: int


# What a CUDA process spends beyond its tensors: the context (~0.5 GB) and allocator slack.
CUDA_CONTEXT_BYTES = 512 * MIB
ALLOCATOR_SLACK = 1.10


def fit_options(
    config: ModelConfig,
    budget_bytes: int,
    seq_len: int,
    target_batch: int,
    precisions: tuple[str, ...] = ("bf16", "fp16", "fp32"),
    device: str = "cuda",
) -> list[FitOption]:
    """For each precision and checkpointing choice, the largest power-of-two micro-batch (up
    to `target_batch`) whose estimated training memory fits the budget, with the gradient
    accumulation that reaches the target batch. Options that fit nothing are left out."""
    overhead = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    options = []
    for precision in precisions:
        for ckpt in (False, True):
            best = None
            micro = 1
            while micro <= target_batch:
                accum = math.ceil(target_batch / micro)
                need = estimate_memory(config, micro, seq_len, precision, ckpt, device, accum)
                total = int(need["train_total"] * ALLOCATOR_SLACK) + overhead
                if total > budget_bytes:
                    break
                best = FitOption(precision, ckpt, micro, accum, total)
                micro *= 2
            if best is not None:
                options.append(best)
    return options


def recommend(options: list[FitOption]) -> FitOption | None:
    """The option with the fewest accumulation steps; ties go to no checkpointing (faster)
    and then to the earlier precision in the list (bf16 before fp16 before fp32)."""
    if not options:
        return None
    return min(options, key=lambda o: (o.grad_accum, o.activation_checkpointing))


def is_oom(err: BaseException) -> bool:
    """Whether `err` is an out-of-memory error (CUDA's, or a CPU allocation's)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


def oom_advice(batch_size: int, grad_accum: int, seq_len: int | None, preset: str) -> str:
    """What to change after running out of memory (`seq_len`: the resolved one, if known)."""
    rows = f"--batch-size {batch_size}" + (f" x --seq-len {seq_len}" if seq_len else "")
    return (
        f"out of memory with {rows} (preset {preset}): lower "
        f"--batch-size (and raise --grad-accum to keep the effective batch "
        f"{batch_size * grad_accum}), lower --seq-len, add --activation-checkpointing, "
        "or on a GPU use --precision bf16/fp16; `dtl info --fit` suggests settings that fit"
    )


def available_memory(
    device: torch.device, meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup"
) -> int | None:
    """Bytes a run on `device` can still take: the GPU's free memory (CUDA), else the
    machine's MemAvailable, capped by this container's cgroup (v2) limit; None when unknown
    (MPS, or no /proc/meminfo and no psutil).

    >>> available_memory(torch.device("cpu")) > 0  # doctest: +SKIP
    True
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    found = _meminfo_available(meminfo)
    if found is None:
        try:  # not Linux: psutil, when it is installed
            import psutil

            found = int(psutil.virtual_memory().available)
        except ImportError:
            return None
    left = _cgroup_left(cgroup)
    return found if left is None else min(found, left)


def _meminfo_available(path: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_left(root: str) -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or None without a limit."""
    try:
        limit = open(f"{root}/memory.max").read().strip()
        used = int(open(f"{root}/memory.current").read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" or not limit.isdigit() else max(0, int(limit) - used)


def training_need(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    precision: str,
    activation_checkpointing: bool,
    device: str,
    grad_accum: int = 1,
) -> int:
    """Bytes one training process needs by the plan: `estimate_memory`'s peak, the
    micro-batches of token ids (inputs and targets, int64) and, on CUDA, allocator slack."""
    est = estimate_memory(
        config, batch_size, seq_len, precision, activation_checkpointing, device, grad_accum
    )
    batches = grad_accum * batch_size * seq_len * 2 * 8
    slack = ALLOCATOR_SLACK if device == "cuda" else 1.0
    return int((est["train_total"] + batches) * slack)


def memory_refusal(
    need: int, available: int, batch_size: int, grad_accum: int, seq_len: int, where: str
) -> str:
    """The one line that refuses a run whose plan does not fit (`where`: e.g. "fp32 on cpu")."""
    return (
        f"not enough memory: the memory plan (dtl info) needs about {format_bytes(need)} to "
        f"train with --batch-size {batch_size} x --seq-len {seq_len} ({where}) but "
        f"{format_bytes(available)} is available; lower --batch-size (raise --grad-accum to "
        f"keep the effective batch {batch_size * grad_accum}) or --seq-len, or add "
        "--activation-checkpointing (`dtl info --fit SIZE` suggests settings); "
        "--no-memory-check tries anyway"
    )


def format_bytes(n: int) -> str:
    """'812 MiB', '3.4 GiB', '1,490,116.1 GiB'."""
    return f"{n / MIB:,.0f} MiB" if n < GIB else f"{n / GIB:,.1f} GiB"


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux VmHWM from /proc/self/status: unlike
    ru_maxrss, which Linux carries over from the parent across fork + exec (so a child of a
    large process would report the parent's peak), it belongs to this process image."""
    import resource  # Unix only: imported where it is the fallback

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def parse_size(text: str) -> int:
    """'8GB', '8GiB', '7.5G', '300MB', '1024' (bytes) -> bytes. GB here means GiB, as GPU
    makers' 8 GB cards hold 8 GiB."""
    s = text.strip().upper().replace(" ", "")
    for suffix, mult in (
        ("GIB", GIB),
        ("GB", GIB),
        ("G", GIB),
        ("MIB", MIB),
        ("MB", MIB),
        ("M", MIB),
    ):
        if s.endswith(suffix):
            try:
                value = float(s[: -len(suffix)])
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * mult)
    if s.isdigit() and int(s) > 0:
        return int(s)
    raise ValueError(f"cannot read memory size {text!r}; write it like 8GB, 7.5GB or 300MB")
