"""The one-token decode step on the CPU: `TransformerLM`'s cached forward for T == 1, with
every weight matrix laid out for a matrix-vector product.

Decoding one token multiplies a single row (B = 1) by every weight of the blocks and the
vocabulary head, so it is bound by how fast those weights stream from memory. On the CPU,
MKL's matrix-vector kernel behind `F.linear` runs on one core at a fraction of the memory
bandwidth (8-30 GB/s here, slowest where the contiguous axis is short), while the same
product cut into p blocks and run as one batched product (`torch.baddbmm` / `torch.bmm`)
streams the blocks on every core. `benchmarks/bench_decode_layouts.py` measures each shape
(small preset, 2 cores, weights from memory): the head's (256 x 50257) product 6.1 ms with
`F.linear` -> 1.2 ms in 2 column blocks; the feed-forward up-projection 181 -> 67 us in 2
row blocks; the down-projection 111 -> 62 us in 8 column blocks.

So a `DecodePlan` keeps, per model, a copy of every linear weight cut that way (`split_for`;
Q, K and V fused into one product), rebuilt when any parameter changes. The maths is the
model's own, operation for operation; only the summation kernels differ (results agree with
`model(...)` to float32 rounding, tested). The copy takes as much memory as those weights.

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100)).eval()
>>> cache = model.allocate_cache(1, 8)
>>> logits = model(torch.tensor([[1, 2, 3]]), cache=cache, last_only=True)  # the prompt
>>> decode_step(model, torch.tensor([[4]]), cache).shape  # then one token at a time
torch.Size([1, 100])
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtl.errors import DtlError
from dtl.model.transformer import KVCache, TransformerLM


@dataclass
class SplitLinear:
    """y = x @ W.T + b for x (B, in), as one batched product over p slices of W.

    Two ways to cut W (in, out), chosen by its shape (see `split_for`):
    "cols": p blocks of whole columns (p, in, out/p); each slice gives part of y.
    "rows": p blocks of rows (p, in/p, out) against p chunks of x; y is the slices' sum.
    """

    weight: Tensor  # cols: (p, in, c), c = ceil(out / p), zero-padded; rows: (p, in / p, out)
    bias: Tensor  # cols: (p, 1, c); rows: (out,)
    out_features: int
    by_rows: bool

    @classmethod
    def of(
        cls, weights: list[Tensor], biases: list[Tensor], parts: int, by_rows: bool
    ) -> SplitLinear:
        """From nn.Linear weights (out_i, in) stacked along out (several fuse into one).

        Each block is written straight into its place, transposed a slab of rows at a time
        (`_fill_transposed`): the head of `small` (50257 x 256) lays out in ~25 ms this way,
        against ~110 ms through `cat(...).t()`, a zero-padded copy and a permuted one."""
        weights = [x.detach() for x in weights]
        b = torch.cat([x.detach() for x in biases])  # (out,)
        n_in, out = weights[0].size(1), b.numel()
        if by_rows:
            if n_in % parts:
                raise ValueError(f"in_features {n_in} does not split into {parts} row blocks")
            k = n_in // parts
            w = weights[0].new_empty(parts, k, out)  # block j: rows j*k.. of W^T (in, out)
            for j in range(parts):
                _fill_transposed(w[j], [x[:, j * k : (j + 1) * k] for x in weights], 0)
            return cls(w, b.clone(), out, True)
        c = -(-out // parts)
        w = weights[0].new_empty(parts, n_in, c)  # block j: columns j*c.. of W^T (in, out)
        for j in range(parts):
            filled = _fill_transposed(w[j], weights, j * c)
            w[j, :, filled:].zero_()  # the last block's padding
        bias = b.new_zeros(parts * c)
        bias[:out] = b
        return cls(w, bias.view(parts, 1, c), out, False)

    def __call__(self, x: Tensor) -> Tensor:
        B = x.size(0)
        if self.by_rows:
            p, chunk, out = self.weight.shape
            x_parts = x.view(B, p, chunk).transpose(0, 1)  # (p, B, in / p)
            return torch.bmm(x_parts, self.weight).sum(0).add_(self.bias)  # (B, out)
        p, n_in, c = self.weight.shape
        y = torch.baddbmm(self.bias, x.expand(p, B, n_in), self.weight)  # (p, B, c)
        return y.transpose(0, 1).reshape(B, p * c)[:, : self.out_features]  # (B, out)


SLAB = 256  # rows per transposed copy: fits the cache on both sides, measured fastest


def _fill_transposed(dst: Tensor, weights: list[Tensor], start: int) -> int:
    """dst (k, n)[:, :m] = rows [start, start + n) of `weights` stacked along dim 0, transposed
    (m = the rows there are); returns m. A whole (n, k) -> (k, n) transpose strides through
    memory; a slab of SLAB rows at a time keeps both sides in the cache (~4x faster)."""
    n, offset, filled = dst.size(1), 0, 0
    for w in weights:
        lo, hi = max(start, offset), min(start + n, offset + w.size(0))
        for i in range(lo, hi, SLAB):
            j = min(i + SLAB, hi)
            dst[:, i - start : j - start].copy_(w[i - offset : j - offset].t())
        filled = max(filled, hi - start)
        offset += w.size(0)
    return filled


def split_for(
    weights: list[Tensor], biases: list[Tensor], threads: int, rows: int = 2, cols: int = 8
) -> SplitLinear:
    """Widening products (out > in) cut in `rows` row blocks, narrowing ones in `cols` column
    blocks (both per two threads): what measured fastest on the 2-core box with the weights
    coming from memory (`benchmarks/bench_decode_layouts.py`, docs/benchmarks.md)."""
    out = sum(w.size(0) for w in weights)
    n_in = weights[0].size(1)
    r = rows * threads // 2 or 1
    if out > n_in and n_in % r == 0:
        return SplitLinear.of(weights, biases, r, by_rows=True)
    return SplitLinear.of(weights, biases, max(1, cols * threads // 2), by_rows=False)


@dataclass
class BlockPlan:
    qkv: SplitLinear  # d -> 3d: [q | k | v]
    w_o: SplitLinear
    linear1: SplitLinear
    linear2: SplitLinear
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm


@dataclass
class DecodePlan:
    key: tuple  # (data_ptr, _version, dtype) of every parameter when it was built
    blocks: list[BlockPlan]
    head: SplitLinear  # for one row: a column block per thread
    samples: list[Tensor] = field(default_factory=list)  # see `plan_for`
    batch_head: SplitLinear | None = None  # for several rows, made on first use

    def head_for(self, model: TransformerLM, rows: int) -> SplitLinear:
        """The head's layout for `rows` rows. With several, the product is no longer a
        matrix-vector one, and 8 column blocks per thread ran a batch-8 step 5-13% faster
        than the one-row layout (median, best of 6 A/B runs), which is 8% faster at batch 1:
        generating or serving batches keeps a second copy of the head (51 MB for `small`)."""
        if rows == 1:
            return self.head
        if self.batch_head is None:
            parts = 8 * max(2, torch.get_num_threads())
            self.batch_head = SplitLinear.of([model.head.weight], [_bias(model.head)], parts,
                                             by_rows=False)  # fmt: skip
        return self.batch_head

    @classmethod
    def build(cls, model: TransformerLM, key: tuple, threads: int) -> DecodePlan:
        def split(*linears: nn.Linear) -> SplitLinear:
            return split_for([x.weight for x in linears], [_bias(x) for x in linears], threads)

        blocks = []
        for block in model.transformer_blocks:
            a, ff = block.attention, block.feed_forward
            blocks.append(BlockPlan(
                split(a.w_q, a.w_k, a.w_v), split(a.w_o), split(ff.linear1), split(ff.linear2),
                block.norm1, block.norm2,
            ))  # fmt: skip
        # the head (vocab x d) for one row: whole columns per core measured fastest here
        head = SplitLinear.of([model.head.weight], [_bias(model.head)], threads, by_rows=False)
        return cls(key, blocks, head)


def _bias(linear: nn.Linear) -> Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def uses_fast_path(model: nn.Module) -> bool:
    """The plan serves CPU models in eval mode (or without dropout): its step has no dropout."""
    return (
        isinstance(model, TransformerLM)
        and model.head.weight.device.type == "cpu"
        and (not model.training or model.config.dropout == 0.0)
    )


def _samples(model: TransformerLM) -> list[Tensor]:
    """32 evenly spaced values of every parameter: what a plan checks besides versions."""
    return [p.detach().reshape(-1)[:: max(1, p.numel() // 32)] for p in model.parameters()]


def plan_for(model: TransformerLM) -> DecodePlan:
    """The model's decode plan, rebuilt when any parameter changed since it was built.

    A change is seen by the parameter's storage and version counter, and, since some writes
    bump no counter (CPU fused AdamW's step, anything through `p.data`), by 32 sampled values
    of each parameter (an optimizer step or a weight load changes them all). A sparse edit
    through `.data` (a few rows) can slip past the samples: call `forget(model)` after one.
    """
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())
    plan = _PLANS.get(model)
    if plan is not None and plan.key == key:
        samples = _samples(model)
        if len(samples) == len(plan.samples) and all(
            torch.equal(a, b) for a, b in zip(samples, plan.samples, strict=True)
        ):
            return plan
    plan = DecodePlan.build(model, key, threads=max(2, torch.get_num_threads()))
    plan.samples = [x.clone() for x in _samples(model)]
    _PLANS[model] = plan
    return plan


def plan_if_fast(model: nn.Module) -> DecodePlan | None:
    """`plan_for(model)` where the fast path serves it; else None, and any plan it had is
    dropped (say it moved to a GPU: no CPU copy of its weights is kept)."""
    if uses_fast_path(model):
        return plan_for(model)
    forget(model)
    return None


def forget(model: nn.Module) -> None:
    """Drop the model's decode plan (and its copy of the weights); the next use rebuilds it."""
    _PLANS.pop(model, None)


@torch.no_grad()
def decode_step(
    model: TransformerLM, tokens: Tensor, cache: KVCache, plan: DecodePlan | None = None
) -> Tensor:
    """Logits (B, vocab) of the next token after `tokens` (B, 1), appended to `cache`.

    Equal to `model(tokens, cache=cache, last_only=True)[:, -1]` to float32 rounding.
    `plan`: `plan_for(model)`, which a loop should fetch once (it checks every parameter).
    """
    B, T = tokens.shape
    start = cache.length
    if T != 1 or B != cache.batch_size:
        raise DtlError(f"decode_step takes (batch={cache.batch_size}, 1) tokens, got {(B, T)}")
    if start + 1 > cache.max_len:
        raise DtlError(
            f"the KV cache is full ({cache.max_len} positions); the model's max_seq_length is "
            f"{model.config.max_seq_length}"
        )
    plan = plan_for(model) if plan is None else plan
    cfg = model.config
    H, d_k = cfg.n_heads, cfg.d_k
    attn_mask, position_ids = model._mask_and_positions(tokens, None, cache)  # None unpadded
    x = F.embedding(tokens[:, 0], model.embedding.weight) * model.embed_scale  # (B, d)
    pe = model.pos_encoding.pe
    x = x + (pe[start] if position_ids is None else pe[position_ids[:, 0]])
    end = start + 1
    for i, block in enumerate(plan.blocks):
        q, k, v = block.qkv(x).reshape(B, 3, H, 1, d_k).unbind(1)  # each (B, H, 1, d_k)
        keys, values = cache.keys[i], cache.values[i]  # (B, H, max_len, d_k)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        out = F.scaled_dot_product_attention(
            q, keys[:, :, :end], values[:, :, :end], attn_mask=attn_mask
        )  # (B, H, 1, d_k); one query sees every cached key (the mask drops padding)
        x = block.norm1(x + block.w_o(out.reshape(B, cfg.d_model)))
        x = block.norm2(x + block.linear2(block.linear1(x).relu_()))
    cache.length = end
    return plan.head_for(model, B)(model.ln_f(x))  # (B, vocab)
