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
        # The logits matmul runs in `low` (the autocast dtype); softmax is always fp32. The two
        # gradient matmuls run in bf16 under bf16, else in fp32: these gradients are computed
        # here, before a GradScaler can scale them, and fp16 (smallest normal 6e-5) would
        # flush most of them (softmax / n_tokens, ~1e-8) to zero.
        grad_dtype = torch.bfloat16 if low == torch.bfloat16 else torch.float32
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
            if grad_dtype == torch.float32:  # accumulate in place, fp32 even inside autocast
                with torch.autocast(device_type, enabled=False):
                    h32 = h if h.dtype == torch.float32 else h.float()
                    torch.mm(dlogits, w_grad, out=grad_hidden[start : start + chunk_size])
                    grad_weight.addmm_(dlogits.t(), h32)
            else:  # bf16: the two matmuls in bf16, accumulated in fp32
                d = dlogits.to(grad_dtype)
                grad_hidden[start : start + chunk_size] = d @ w_grad
                grad_weight += (d.t() @ h.to(grad_dtype)).float()
            del logits, probs, dlogits  # free this chunk before the next one is made
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_out.item() != 1.0:  # e.g. gradient accumulation or a GradScaler
            grad_hidden = grad_hidden * grad_out.to(grad_hidden.dtype)
            grad_weight = grad_weight * grad_out
            grad_bias = None if grad_bias is None else grad_bias * grad_out
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_weight = grad_weight.to(w_dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(b_dtype)
        return grad_hidden.to(h_dtype), grad_weight, grad_bias, None, None, None, None
