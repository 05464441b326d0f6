"""The vocabulary head and the cross-entropy loss, fused and chunked.

The plain way, `F.cross_entropy(head(h), targets)`, materialises logits of shape
(B*T, vocab_size) and keeps them, their log-softmax and their gradient for backward: for the
small preset at B=8, T=256 that is 3 x 412 MB of fp32 and several full passes over it. Here the
tokens go through the head a chunk at a time, and each chunk's gradient is computed in the
forward pass while its logits are hot, then the chunk is dropped:

    logits_c = h_c @ W^T + b                  (C, V)
    loss_c   = logsumexp(logits_c) - logits_c[target]
    dlogits  = softmax(logits_c) - onehot     (in place, scaled by 1 / n_valid)
    dh_c     = dlogits @ W                    (C, D)
    dW      += dlogits^T @ h_c                (V, D);   db += dlogits.sum(0)

Backward only scales the stored gradients by the incoming one. Same FLOPs as the plain way
(three matmuls), no (B*T, V) tensor alive, fewer passes over memory. Rows whose target is
IGNORE_INDEX (-100) contribute nothing. Under no_grad (evaluation) only the loss is
computed: no gradient buffers, one matmul per chunk.

>>> import torch
>>> h, w, b = torch.randn(6, 4), torch.randn(10, 4), torch.zeros(10)
>>> t = torch.tensor([1, 2, 3, -100, 5, 6])
>>> torch.allclose(linear_cross_entropy(h, w, b, t),
...                torch.nn.functional.cross_entropy(h @ w.T + b, t))
True
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # ~33M logits (128 MB fp32) per chunk: big matmuls, bounded memory


# `--compile` leaves it eager: its chunk loop reads the number of scored targets (a host
# sync), so dynamo would break its graph there anyway, with a warning each run.
@torch.compiler.disable
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int = 0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, never holding all
    logits. hidden: (N, D), weight: (V, D), bias: (V,) or None, targets: (N,) int64.
    reduction: "mean" over the scored targets (training) or "sum" (evaluation adds the
    windows' sums up itself), as in `F.cross_entropy`."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size <= 0:
        chunk_size = max(1, min(hidden.size(0), CHUNK_ELEMENTS // weight.size(0)))
    # Under no_grad (evaluation) there is no backward, so no gradients to compute ahead of
    # it: inside the Function, needs_input_grad still says True for a model's parameters.
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, reduction, grad)


def module_cross_entropy(
    hidden: Tensor, head: torch.nn.Module, targets: Tensor, reduction: str = "mean"
) -> Tensor:
    """`linear_cross_entropy` for a head that is a module without a weight to fuse (an int8
    one, `dtl.model.dtype`): its logits a chunk of rows at a time, in fp32; no gradient.
    hidden: (N, D), targets: (N,) int64 with IGNORE_INDEX rows left out.

    >>> module_cross_entropy(h, model.head, t, reduction="sum")  # doctest: +SKIP
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, head(hidden[:1]).size(-1)))
    with torch.no_grad():
        for start in range(0, hidden.size(0), chunk):
            logits = head(hidden[start : start + chunk]).float()  # (C, V)
            total += torch.nn.functional.cross_entropy(
                logits, targets[start : start + chunk], ignore_index=IGNORE_INDEX,
                reduction="sum",
            )  # fmt: skip
    if reduction == "mean":
        total = total / max(int((targets != IGNORE_INDEX).sum()), 1)
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, reduction, grad):  # noqa: D102
        need_grad = grad and any(ctx.needs_input_grad[:3])
        valid = targets != IGNORE_INDEX
        n_valid = int(valid.sum())
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            low = torch.get_autocast_dtype(device_type)
        else:
            low = torch.promote_types(hidden.dtype, weight.dtype)
        if low == torch.bfloat16:
            with torch.autocast(device_type, enabled=False):  # dtypes chosen here, by hand
                total, grad_hidden, grad_weight, grad_bias = _bf16_chunks(
                    hidden, weight, bias, targets, valid, chunk_size, scale, need_grad
                )
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
            return total * scale
        # The logits matmul runs in `low` (the autocast dtype, fp32 or fp16); softmax is always
        # fp32. The two gradient matmuls run in fp32: these gradients are computed here, before
        # a GradScaler can scale them, and fp16 (smallest normal 6e-5) would flush most of them
        # (softmax / n_tokens, ~1e-8) to zero.
        grad_dtype = torch.float32
        w_grad = weight if weight.dtype == grad_dtype else weight.to(grad_dtype)  # once
        grad_hidden = None
        if need_grad:
            grad_hidden = torch.empty_like(
                hidden, dtype=torch.promote_types(hidden.dtype, grad_dtype)
            )
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_bias = (
            torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device)
            if need_grad and bias is not None
            else None
        )
        buffer = None
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start : start + chunk_size]  # (C, D)
            t = targets[start : start + chunk_size]  # (C,)
            v = valid[start : start + chunk_size]
            if low == torch.float32:  # reuse one buffer: never two chunks alive at once
                if buffer is None:
                    buffer = hidden.new_empty(min(chunk_size, hidden.size(0)), weight.size(0))
                logits = buffer[: h.size(0)]
                if bias is None:
                    torch.mm(h, weight.t(), out=logits)
                else:
                    torch.addmm(bias, h, weight.t(), out=logits)
            else:
                logits = (
                    h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
                ).float()
            # logits: (C, V) fp32
            t_safe = t.clamp(min=0).unsqueeze(1)
            picked = logits.gather(1, t_safe).squeeze(1)  # (C,) the target's logit
            # logsumexp by hand, in place, so its exp() is reused as the softmax numerator.
            row_max = logits.amax(dim=1, keepdim=True)  # (C, 1)
            probs = logits.sub_(row_max).exp_()  # (C, V) unnormalised
            row_sum = probs.sum(dim=1, keepdim=True)  # (C, 1)
            lse = row_max.squeeze(1) + row_sum.squeeze(1).log()
            total += ((lse - picked) * v).sum()
            if not need_grad:
                del logits, probs
                continue
            # dlogits = (softmax - onehot) / n_valid, zero for ignored rows; computed in place.
            row_scale = v.to(probs.dtype).unsqueeze(1) * scale  # (C, 1)
            dlogits = probs.mul_(row_scale / row_sum)
            dlogits.scatter_add_(1, t_safe, -row_scale)
            if grad_bias is not None:
                grad_bias += dlogits.sum(0)
            with torch.autocast(device_type, enabled=False):  # accumulate in place, in fp32
                h32 = h if h.dtype == torch.float32 else h.float()
                torch.mm(dlogits, w_grad, out=grad_hidden[start : start + chunk_size])
                grad_weight.addmm_(dlogits.t(), h32)
            del logits, probs, dlogits  # free this chunk before the next one is made
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_out.item() != 1.0:  # e.g. gradient accumulation or a GradScaler
            # times the fp32 scalar itself: a bf16 gradient (bf16 weight copies) is scaled in
            # fp32 and rounded once, not by the weight first rounded to bf16
            grad_hidden = grad_hidden * grad_out
            grad_weight = grad_weight * grad_out
            grad_bias = None if grad_bias is None else grad_bias * grad_out
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_weight = grad_weight.to(w_dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(b_dtype)
        return grad_hidden.to(h_dtype), grad_weight, grad_bias, None, None, None, None


def _bf16_chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    valid: Tensor,
    chunk_size: int,
    scale: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The bf16 path: (the loss summed over scored rows, fp32; the gradients of the mean,
    already times `scale`, or None without `need_grad`).

    The three matmuls run in bf16 (fp32 accumulation inside the kernels; the weight is cast
    once per call, not per chunk); the chunks' dW add up in the last matmul's own fp32
    accumulator, rounded to bf16 once per chunk (as one chunk's product always was). The
    softmax, so the loss, is fp32. On a CPU the passes over a (C, V) chunk, not the matmuls,
    are what autocast left slow: each fresh 100 MB tensor costs its page faults and each op a
    full pass. So the chunk lives in two buffers made once per call, every op writes into
    them, one fused row-wise softmax kernel (in place) gives both the loss and the gradient,
    and the 1 / n_valid scale goes on the small (C, D) operands instead of the chunk.

    dW is accumulated transposed, (D, V) = h^T @ dlogits, and turned once at the end: oneDNN
    runs that product 1.25x faster here than (V, D) = dlogits^T @ h (B=8, T=256 on the small
    preset: 35 against 47 ms a chunk; the turn, `_transposed`, costs 4 ms a step).
    """
    bf16, f32 = torch.bfloat16, torch.float32
    n, d = hidden.shape
    vocab = weight.size(0)
    w = weight.to(bf16)  # (V, D), once
    b = None if bias is None else bias.to(bf16)
    # On a CPU the bias rides in the product: one more input column, against a column of
    # ones. oneDNN's addmm first copies the bias into every row of the output (5 ms a chunk
    # of 512 x 50257 here); the 257th column costs 0.2. (CUDA's addmm fuses its bias, and an
    # odd K would slow its tensor cores: it keeps addmm.)
    # Backward likewise: a row of ones under h^T makes the bias's gradient (the column sums
    # of dlogits) one more output row of dW^T's product instead of a pass of its own (6 ms a
    # chunk); it is then rounded to bf16 per chunk, as dW is.
    bias_row = int(b is not None and w.device.type == "cpu")  # 1: db is part's last row
    w_in = torch.cat([w, b[:, None]], 1) if bias_row else w  # (V, D + bias_row)
    chunk_size = -(-n // -(-n // chunk_size))  # equal chunks: 3 x 683 rows, not 3 x 667 + 47
    rows = min(chunk_size, n)
    low = hidden.new_empty(rows, vocab, dtype=bf16)  # a chunk's logits, then its dlogits
    sub = SUB_ROWS if hidden.device.type == "cpu" else rows  # see `_softmax_passes`
    full = hidden.new_empty(min(sub, rows), vocab, dtype=f32)  # rows' probabilities
    total = torch.zeros((), dtype=f32, device=hidden.device)
    grad_hidden = grad_weight = grad_bias = part = None
    if need_grad:
        grad_hidden = hidden.new_empty(n, d, dtype=torch.promote_types(hidden.dtype, bf16))
        if bias is not None and not bias_row:  # summed pass by pass (`_softmax_passes`)
            grad_bias = torch.zeros(vocab, dtype=f32, device=weight.device)
        part = weight.new_empty(d + bias_row, vocab, dtype=bf16)  # dW^T (and db), summed
    for start in range(0, n, chunk_size):
        h = hidden[start : start + chunk_size]  # (C, D)
        t_safe = targets[start : start + chunk_size].clamp(min=0).unsqueeze(1)  # (C, 1)
        v = valid[start : start + chunk_size]  # (C,)
        c = h.size(0)
        h_low = h.to(bf16)
        logits = low[:c]  # (C, V) bf16
        if b is None:
            torch.mm(h_low, w.t(), out=logits)
        elif bias_row:  # the bias as an input column (above)
            torch.mm(torch.cat([h_low, h_low.new_ones(c, 1)], 1), w_in.t(), out=logits)
        else:
            torch.addmm(b, h_low, w.t(), out=logits)
        nll = _softmax_passes(logits, full, t_safe, v, grad_bias, scale, need_grad)
        total += (nll * v).sum()
        if not need_grad:
            continue
        dlogits = logits  # (C, V) bf16, now softmax - onehot
        grad_hidden[start : start + c] = (dlogits @ w).to(f32).mul_(scale)  # (C, D)
        # (D, C): the scale before the one rounding, laid out for the transposed product;
        # (D + 1, C) with the row of ones (unscaled: 1 / n_valid is applied to db in fp32)
        h_scaled_t = (h.to(f32) * scale).to(bf16).t()
        if bias_row:
            h_scaled_t = torch.cat([h_scaled_t, h_scaled_t.new_ones(1, c)])
        h_scaled_t = h_scaled_t.contiguous()
        # (D, V): the chunks' sum in one bf16 buffer (each matmul adds into it in fp32 and
        # rounds once), cast once at the end: no fp32 pass over (V, D) per chunk.
        if start == 0:
            torch.mm(h_scaled_t, dlogits, out=part)
        else:
            part.addmm_(h_scaled_t, dlogits)
    if part is not None:  # a bf16 weight's gradient stays bf16 (backward returns its dtype)
        if bias_row:
            grad_bias = part[d].to(f32).mul_(scale)
        grad_weight = _transposed(part[:d])  # (V, D) bf16: part's first D rows, turned
        if weight.dtype != bf16:  # autocast's fp32 weight: turned in bf16, then cast
            grad_weight = grad_weight.to(f32)
    return total, grad_hidden, grad_weight, grad_bias


def _transposed(x: Tensor) -> Tensor:
    """x (D, V) -> x^T (V, D), contiguous. Through torch's channels-last conversion, a
    blocked transpose: 3.8 ms for the small preset's (256, 50257) bf16 on this CPU, against
    11.9 for `x.t().contiguous()`."""
    d, v = x.shape
    nhwc = x.view(1, d, 1, v).contiguous(memory_format=torch.channels_last)  # memory: (v, d)
    return nhwc.permute(0, 2, 3, 1).reshape(v, d)  # a view, no copy


# Rows of a chunk whose fp32 passes run together on a CPU: 32 x 50257 fp32 (6.4 MB) stays in
# the cache from the copy in to the copy back (measured best of 8 to 128).
SUB_ROWS = 32


def _softmax_passes(
    logits: Tensor,
    full: Tensor,
    t_safe: Tensor,
    valid: Tensor,
    grad_bias: Tensor | None,
    scale: float,
    need_grad: bool,
) -> Tensor:
    """A chunk's loss per row, -log softmax(logits)[target] (C,) fp32; with `need_grad`,
    `logits` (C, V) bf16 is overwritten by its gradient, softmax - onehot (unscaled; 0 on
    rows not `valid`), and `grad_bias` (V,) fp32, where given, gains its column sums times
    `scale`. Each op runs in fp32, in place in `full`, `full.size(0)` rows at a time: on a
    CPU a few rows, so the fp32 copy stays in the cache from the copy in, through the
    softmax, to the copy back (10.5 against 15.8 ms for a chunk of 512 x 50257 at once)."""
    c, step = logits.size(0), full.size(0)
    nll = full.new_empty(c)
    for s in range(0, c, step):
        lg, t, v = logits[s : s + step], t_safe[s : s + step], valid[s : s + step]
        p = full[: lg.size(0)].copy_(lg)  # (r, V) fp32
        if p.device.type == "cpu":
            torch._softmax(p, 1, False, out=p)  # row by row, in place (the CPU kernel allows it)
        else:  # a GPU's allocator caches the new tensor; its kernels are not checked in place
            p = torch.softmax(p, 1)
        nll[s : s + lg.size(0)] = _target_nll(p, lg, t)
        if not need_grad:
            continue
        p.scatter_add_(1, t, p.new_full(t.shape, -1.0))  # softmax - onehot
        if not bool(v.all()):
            p.index_fill_(0, (~v).nonzero().squeeze(1), 0.0)
        if grad_bias is not None:
            grad_bias += p.sum(0).mul_(scale)
        lg.copy_(p)
    return nll


# Below this a target's probability has lost digits to fp32's subnormal range (the smallest
# normal is 1.2e-38): its row's loss is taken from the logits by logsumexp instead.
EXACT_BELOW = 1e-30


def _target_nll(probs: Tensor, logits: Tensor, t_safe: Tensor) -> Tensor:
    """-log p(target) per row (C,), fp32, from a chunk's softmax `probs` (C, V) fp32: a row
    whose target's probability is below `EXACT_BELOW` (a logit gap of ~69 nats or more;
    0 after 104) gets logsumexp(logits) - logit(target) from its `logits` (C, V), the
    values the softmax was taken of, so no loss is ever inf."""
    p_t = probs.gather(1, t_safe).squeeze(1)  # (C,)
    nll = p_t.log().neg_()
    tiny = p_t < EXACT_BELOW
    if bool(tiny.any()):
        rows = tiny.nonzero().squeeze(1)
        x = logits.index_select(0, rows).float()  # (r, V)
        nll[rows] = torch.logsumexp(x, 1) - x.gather(1, t_safe[rows]).squeeze(1)
    return nll
