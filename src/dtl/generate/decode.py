"""The CPU decode plan: every weight matrix of a `TransformerLM` laid out for the
matrix-vector products of a one-token step, which the model's own forward then uses.

Where DTL's step kernel is built (`dtl.generate.step_kernel`: C and OpenMP, the whole step in
one call), `DecodePlan.step` and `DecodePlan.last_logits` run it for steps and short prompts,
and what follows serves the rest: the model's forward (long prompts) and the eager step
(`eager_step`: steps of many rows, and every step where the kernel is not built).

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
Q, K and V fused into one product), rebuilt when any parameter changes. The model takes it as
its forward's `layout`: a one-token step through the cache runs the model's own blocks with
these products in place of its nn.Linear layers, and the last position's head uses the plan's
(results agree with the plain forward to float32 rounding, tested). The copy takes as much
memory as those weights.

Several rows (a batch) make each product a small matrix-matrix one, where the split layouts
lose: MKL's kernel runs the batch-8 head at ~17 GFLOP/s a core here (12 ms on one thread,
against onnxruntime's 4 ms for the same product). So the first step of more than one row
lays the weights out a second way (`DecodePlan.for_rows`): packed once in oneDNN's blocked
format (`PackedLinear`), the FFN's ReLU fused into its up-projection (a batch-8 step 2x
faster, docs/benchmarks.md). Where this torch has no oneDNN, several rows use the one-row
layout with the head in 8 column blocks per thread.

Without the kernel, the token loop runs each step through `eager_step` (`decode_step`): the
forward's kernels for that one case (one new token per row through the cache), in the same
order, so the logits are the same bit for bit, without what the general forward needs and a
step does not (module calls, input checks with their host syncs, (B, T, d) views, dropout
calls): a third fewer dispatcher calls per step (docs/benchmarks.md).

The plan is in the model's dtype (`dtl.model.dtype`, `--dtype`): a bf16 model's products are
bf16 weights packed for oneDNN (`PackedLinear`, one layout for any rows), and an int8 model's plan is its own packed
int8 layers (Q, K and V fused; one layout for any rows), so a step runs the quantized weights, never an fp32 copy.

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100)).eval()
>>> plan, cache = plan_for(model), model.allocate_cache(1, 8)
>>> logits = model(torch.tensor([[1, 2, 3]]), cache=cache, last_only=True, layout=plan)
>>> model(torch.tensor([[4]]), cache=cache, last_only=True, layout=plan).shape  # one token
torch.Size([1, 1, 100])
>>> plan.step(model, torch.tensor([5]), cache).shape  # the loop's step: (B,) -> (B, V)
torch.Size([1, 100])
>>> plan.for_rows(8) is plan.for_rows(1)  # 8 rows: another layout, made on first use
False
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtl.errors import DtlError
from dtl.model.dtype import fuse_int8_linears, is_int8_linear
from dtl.model.kv_cache import KVCache
from dtl.model.transformer import TransformerLM

from .step_kernel import StepKernel, kernel_fits, step_for


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
            # (p, B, in / p); one row needs no transpose (one view op less, the same product)
            x_parts = x.view(p, 1, chunk) if B == 1 else x.view(B, p, chunk).transpose(0, 1)
            return torch.bmm(x_parts, self.weight).sum(0).add_(self.bias)  # (B, out)
        p, n_in, c = self.weight.shape
        y = torch.baddbmm(self.bias, x.expand(p, B, n_in), self.weight)  # (p, B, c)
        y = y.view(1, p * c) if B == 1 else y.transpose(0, 1).reshape(B, p * c)
        return y if p * c == self.out_features else y[:, : self.out_features]  # (B, out)


def packs_bf16() -> bool:
    """Whether oneDNN's bf16 linear runs here (a torch built with it, a CPU it supports)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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


@dataclass
class PackedLinear:
    """y = x @ W.T + b (then ReLU when `relu`) for x (B, in) of several rows: oneDNN's matrix
    product on W packed once in its own blocked layout. For B = 8 it ran the small preset's
    products 1.3-2x faster than the split layouts or MKL (`F.linear`): the head 2.0 ms on two
    threads, against 4.7 in column blocks and 3.2 in MKL's best form (MKL's kernel is slow for
    so few rows on this CPU). A bf16 model's products all go here too, at any B: torch's CPU
    `baddbmm`/`bmm` in bf16 ran a decode step 2.5-3.4x slower than in fp32, while oneDNN's
    prepacked bf16 linear ran the one-row products as fast as the fp32 blocks and the head
    and every batch-8 product faster (`benchmarks/bench_onnx.py`, docs/benchmarks.md). `of`
    gives None where this torch has no oneDNN (the caller keeps another layout).
    """

    weight: Tensor  # oneDNN's packed copy of W (out, in): an opaque `torch._mkldnn` tensor
    bias: Tensor  # (out,)
    relu: bool = False  # fused: the FFN's up-projection and its ReLU in one kernel

    @classmethod
    def of(
        cls, weights: list[Tensor], biases: list[Tensor], relu: bool = False,
        rows: int | None = None,
    ) -> PackedLinear | None:
        """From nn.Linear weights (out_i, in), stacked along out (several fuse into one);
        `rows`: the batch size oneDNN tunes the layout for (any B runs on it)."""
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_linear_pointwise"):
            return None
        w = torch.cat([x.detach() for x in weights])  # (out, in)
        b = torch.cat([x.detach() for x in biases])
        try:
            packed = ops._reorder_linear_weight(w) if rows is None else ops._reorder_linear_weight(w, rows)
            return cls(packed, b, relu)
        except RuntimeError:  # a torch built with oneDNN that cannot pack this dtype
            return None

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, "relu" if self.relu else "none", [], ""
        )  # (B, out)


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
class Int8Linear:
    """An int8 model's linear layer (`dtl.model.dtype`) called as its fbgemm op: what the
    layer's forward calls, less the module call around it (a few us, 25 times a step), and
    with the FFN's ReLU fused into its up-projection (the same values: ReLU is exact)."""

    packed: object  # the layer's packed int8 weight and fp32 bias (a torch ScriptObject)
    reduce_range: bool  # as the layer calls it: its version 4+ quantizes inputs to 7 bits
    relu: bool = False

    @classmethod
    def of(cls, layer: nn.Module, relu: bool = False) -> Int8Linear:
        return cls(layer._packed_params._packed_params, (layer.version or 0) >= 4, relu)

    def __call__(self, x: Tensor) -> Tensor:
        ops = torch.ops.quantized
        op = ops.linear_relu_dynamic if self.relu else ops.linear_dynamic
        return op(x, self.packed, reduce_range=self.reduce_range)  # (B, out), fp32


# Threads for a step's blocks (their products, attention and LayerNorms), by the plan's
# weights, for one row and for several (None: all of torch's), where idle OpenMP threads
# sleep (`OMP_WAIT_POLICY=PASSIVE`, what `import dtl` sets): there int8's fbgemm and bf16's
# oneDNN products of one row are fixed-cost calls too short for the wake-up of a second
# thread to pay; fp32's one-row blocks are cut to stream on every core (`split_for`). Where
# idle threads spin a while (the decode verbs, `dtl.threads.DECODE_VERBS`), a second thread
# comes at once and every block keeps every thread. The head always runs on every thread.
# Measured in `benchmarks/bench_onnx.py --block-threads` (docs/benchmarks.md).
ONE_ROW_BLOCK_THREADS: dict[str, int | None] = {"fp32": None, "bf16": 1, "int8": 1}
SEVERAL_ROWS_BLOCK_THREADS: dict[str, int | None] = {"fp32": None, "bf16": None, "int8": None}


def block_threads(table: dict[str, int | None], dtype: str) -> int | None:
    """The threads for a step's blocks (`table`'s, where idle threads sleep; else None)."""
    return table[dtype] if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else None

# x (B, in) -> (B, out): a `SplitLinear` (fp32), a `PackedLinear` (several fp32 rows, bf16),
# or an `Int8Linear`
Product = Callable[[Tensor], Tensor]


@dataclass
class ReluAfter:
    """A product followed by ReLU (in place): the FFN's up-projection where its kernel does
    not fuse it (the one-row fp32 blocks)."""

    product: Product

    def __call__(self, x: Tensor) -> Tensor:
        return self.product(x).relu_()


@dataclass
class BlockPlan:
    """One block's linear layers, laid out (`MultiHeadAttention` / `FeedForward` take it)."""

    qkv: Product  # d -> 3d: [q | k | v]
    w_o: Product
    up: Product  # FFN up-projection (linear1) and its ReLU: d -> d_ff
    linear2: Product


@dataclass
class Layout:
    """Every product of the model laid out one way: what its forward takes as `layout`.

    `block_threads`: the threads a decode step runs the blocks on (None: torch's setting).
    One row's block products are a few microseconds each, too short to share: a second thread
    costs more in wake-ups than it saves (`ONE_ROW_BLOCK_THREADS`); the head, the one large
    product, still runs on every thread."""

    blocks: list[BlockPlan]
    head: Product  # the vocabulary head: hidden (B, d) -> logits (B, V)
    block_threads: int | None = None

    def for_rows(self, rows: int) -> Layout:
        return self


@dataclass
class DecodePlan:
    """The model's weights laid out for one row (`one_row`) and for several (`several`), each
    made on its first use, and DTL's step kernel (`kernel`, its own copy, made on the first
    call). The plan itself is a layout too: the model's forward asks it `for_rows(B)`. Where
    the kernel runs, the layouts serve only what it does not take (`kernel_fits`: prompts of
    more than 64 tokens in all, steps of more than 16 rows), so an fp32 model generating
    short prompts keeps one copy of its weights beside its own (the kernel's, 70 MB for
    `small`), and one more per layout such calls make."""

    key: tuple  # (data_ptr, _version, dtype) of every parameter when it was built
    built_one_row: Layout | None  # None: `one_row` lays it out on first use
    linears: list[list[nn.Linear]]  # per block: [q, k, v], [w_o], [linear1], [linear2]
    head_linear: nn.Linear
    threads: int = 2  # the one-row blocks are cut for this many
    samples: list[Tensor] = field(default_factory=list)  # see `plan_for`
    several: Layout | None = None
    frame: StepFrame | None = None  # what `step` reads of the model, made on its first call
    kernel: StepKernel | bool | None = None  # DTL's step kernel (False: none here), ditto

    @property
    def one_row(self) -> Layout:
        """The layout for one row (an fp32 model's: cut into blocks, `split_for`)."""
        if self.built_one_row is None:
            self.built_one_row = self._one_row()
        return self.built_one_row

    @property
    def blocks(self) -> list[BlockPlan]:
        return self.one_row.blocks

    def head(self, hidden: Tensor) -> Tensor:
        """The vocabulary head: hidden (B, d) -> logits (B, V)."""
        return self.for_rows(hidden.size(0)).head(hidden)

    def step(self, model: TransformerLM, tokens: Tensor, cache: KVCache) -> Tensor:
        """The next-token logits (B, V), fp32, after one new token per row (`tokens` (B,))
        through `cache`: DTL's step kernel where it runs (`dtl.generate.step_kernel`: one
        call for the whole step, the same logits to float rounding), else `eager_step`."""
        kernel = self._kernel_for(model, tokens.size(0), 1, cache)
        return kernel(tokens, cache) if kernel else self.eager_step(model, tokens, cache)

    def _kernel_for(
        self, model: TransformerLM, rows: int, new: int, cache: KVCache
    ) -> StepKernel | None:
        """DTL's step kernel (made on the first call) where it takes a call of `rows` rows of
        `new` tokens through `cache` (`kernel_fits`), else None."""
        if self.kernel is None:
            self.kernel = step_for(model) or False
        if self.kernel and kernel_fits(rows, new) and self.kernel.takes(cache):
            return self.kernel
        return None

    def last_logits(
        self, model: TransformerLM, input_ids: Tensor, attention_mask: Tensor | None,
        cache: KVCache,
    ) -> Tensor:
        """The next-token logits (B, V), fp32, after `input_ids` (B, T) (left-padded where
        `attention_mask` has zeros) through `cache`: a prompt's prefill or one step. DTL's step
        kernel where it runs and the call is small enough to gain (`kernel_fits`), else the
        eager step for one token per row, else the model's forward on this plan's layouts."""
        kernel = self._kernel_for(model, *input_ids.shape, cache) if input_ids.dim() == 2 else None
        if kernel:
            if attention_mask is not None or input_ids.size(1) != 1:
                model._check_inputs(input_ids, attention_mask, cache)  # the forward's checks
            return kernel.run(input_ids, cache, attention_mask)  # (a step's: in the kernel)
        if attention_mask is None and input_ids.size(1) == 1:
            return self.eager_step(model, input_ids[:, 0], cache)
        return model(input_ids, attention_mask, cache=cache, last_only=True, layout=self)[:, -1]

    def eager_step(self, model: TransformerLM, tokens: Tensor, cache: KVCache) -> Tensor:
        """`step` in torch's kernels: `model(tokens[:, None], cache=cache, last_only=True,
        layout=self)`, bit for bit, in a third of its dispatcher calls (`decode_step`)."""
        if self.frame is None:
            self.frame = StepFrame.of(model)
        return decode_step(self.frame, self.for_rows(tokens.size(0)), tokens, cache)

    def for_rows(self, rows: int) -> Layout:
        """The layout for steps of `rows` rows: one row, or several (made on first use)."""
        if rows == 1:
            return self.one_row
        if self.several is None:
            self.several = self._several()
        return self.several

    def _several(self) -> Layout:
        """oneDNN-packed products (`PackedLinear`), or without oneDNN the one-row blocks and
        the head in 8 column blocks per thread (5-13% faster than one row's at batch 8)."""
        def packed(linears: list[nn.Linear], relu: bool = False) -> PackedLinear | None:
            return PackedLinear.of([x.weight for x in linears], [_bias(x) for x in linears], relu)

        head = packed([self.head_linear])
        blocks = [BlockPlan(packed(qkv), packed(w_o), packed(up, relu=True), packed(down))
                  for qkv, w_o, up, down in self.linears] if head is not None else []  # fmt: skip
        threads = block_threads(SEVERAL_ROWS_BLOCK_THREADS, "fp32")
        if head is None or any(p is None for b in blocks for p in vars(b).values()):
            parts = 8 * max(2, torch.get_num_threads())
            h = self.head_linear
            return Layout(self.one_row.blocks,
                          SplitLinear.of([h.weight], [_bias(h)], parts, by_rows=False),
                          threads)  # fmt: skip
        return Layout(blocks, head, threads)

    @classmethod
    def build(cls, model: TransformerLM, key: tuple, threads: int) -> DecodePlan:
        """The plan of `model`'s weights in their own dtype: fp32 cut into blocks for one
        row (and packed for several, on first use), bf16 packed for oneDNN (`bf16_plan`;
        blocks too where oneDNN's bf16 is missing), an int8 model's packed layers as they are
        (`int8_plan`)."""
        if is_int8_linear(model.head):
            return cls.int8_plan(model, key)
        if model.head.weight.dtype == torch.bfloat16 and packs_bf16():
            return cls.bf16_plan(model, key)
        linears = []
        for block in model.transformer_blocks:
            a, ff = block.attention, block.feed_forward
            linears.append([[a.w_q, a.w_k, a.w_v], [a.w_o], [ff.linear1], [ff.linear2]])
        return cls(key, None, linears, model.head, threads)

    def _one_row(self) -> Layout:
        """An fp32 model's one-row layout: every product cut into blocks (`split_for`)."""

        def split(linears: list[nn.Linear]) -> SplitLinear:
            weights, biases = [x.weight for x in linears], [_bias(x) for x in linears]
            return split_for(weights, biases, self.threads)

        blocks = [BlockPlan(split(qkv), split(w_o), ReluAfter(split(up)), split(down))
                  for qkv, w_o, up, down in self.linears]  # fmt: skip
        # the head (vocab x d) for one row: whole columns per core measured fastest here
        h = self.head_linear
        head = SplitLinear.of([h.weight], [_bias(h)], self.threads, by_rows=False)
        return Layout(blocks, head, block_threads(ONE_ROW_BLOCK_THREADS, "fp32"))

    @classmethod
    def bf16_plan(cls, model: TransformerLM, key: tuple) -> DecodePlan:
        """A bf16 model's plan: every product (Q, K and V fused, the head too) a
        `PackedLinear`, for one row and several alike."""

        def pack(*linears: nn.Linear, relu: bool = False) -> PackedLinear:
            packed = PackedLinear.of(
                [x.weight for x in linears], [_bias(x) for x in linears], relu, rows=1
            )
            assert packed is not None  # `packs_bf16()` said oneDNN packs bf16 here
            return packed

        blocks = []
        for block in model.transformer_blocks:
            a, ff = block.attention, block.feed_forward
            blocks.append(BlockPlan(
                pack(a.w_q, a.w_k, a.w_v), pack(a.w_o), pack(ff.linear1, relu=True),
                pack(ff.linear2),
            ))  # fmt: skip
        several = block_threads(SEVERAL_ROWS_BLOCK_THREADS, "bf16")
        layout = Layout(blocks, pack(model.head), several)
        one_row = Layout(blocks, layout.head, block_threads(ONE_ROW_BLOCK_THREADS, "bf16"))
        return cls(key, one_row, [], model.head, several=layout)

    @classmethod
    def int8_plan(cls, model: TransformerLM, key: tuple) -> DecodePlan:
        """An int8 model's plan (`dtl.model.dtype`): the step runs on its int8 weights, in
        fbgemm's packed layout (there is no int8 batched product to cut them into blocks
        for, and fbgemm's kernel already streams a quarter of fp32's bytes). Q, K and V are
        fused into one int8 layer of their own int8 values and scales."""
        blocks = []
        for block in model.transformer_blocks:
            a, ff = block.attention, block.feed_forward
            qkv = fuse_int8_linears([a.w_q, a.w_k, a.w_v])
            blocks.append(BlockPlan(
                Int8Linear.of(qkv), Int8Linear.of(a.w_o), Int8Linear.of(ff.linear1, relu=True),
                Int8Linear.of(ff.linear2),
            ))  # fmt: skip
        several = block_threads(SEVERAL_ROWS_BLOCK_THREADS, "int8")
        layout = Layout(blocks, Int8Linear.of(model.head), several)
        one_row = Layout(blocks, layout.head, block_threads(ONE_ROW_BLOCK_THREADS, "int8"))
        return cls(key, one_row, [], model.head, several=layout)


@dataclass
class StepFrame:
    """What a decode step reads of the model besides its products, looked up once per plan:
    each LayerNorm's (weight, bias, eps), the positional table in the activations' dtype
    (the forward casts its rows every step), the sizes."""

    embedding: Tensor  # (V, d)
    scale: float
    pe: Tensor  # (max_seq_length, d), in the embedding's dtype
    norms: list[tuple[tuple, tuple]]  # per block: norm1's and norm2's (weight, bias, eps)
    ln_f: tuple
    n_heads: int
    d_k: int

    @classmethod
    def of(cls, model: TransformerLM) -> StepFrame:
        def norm(ln: nn.LayerNorm) -> tuple:
            return ln.weight, ln.bias, ln.eps

        weight = model.embedding.weight
        return cls(
            weight, model.embed_scale, model.pos_encoding.pe.to(weight.dtype),
            [(norm(b.norm1), norm(b.norm2)) for b in model.transformer_blocks], norm(model.ln_f),
            model.config.n_heads, model.config.d_k,
        )  # fmt: skip


def decode_step(frame: StepFrame, layout: Layout, tokens: Tensor, cache: KVCache) -> Tensor:
    """One token per row through the cache: the next-token logits (B, V) in fp32.

    The model's forward for this case (`TransformerLM.forward` with T = 1, no new padding and
    a layout), kernel for kernel, so the logits are the same bit for bit (tested): the same
    products, `scaled_dot_product_attention` on the same keys and mask, the same LayerNorms.
    What goes is what a general forward needs and a step does not: the module calls, the
    input checks (two host syncs: the loop feeds its own sampler's tokens), the (B, T, d)
    views and transposes around every product, the dropout calls (a no-op in eval), the
    per-step cast of the positional rows. A batch-1 fp32 step of `small` went from 280
    top-level operator calls to 187, a batch-8 one from 211 to 118
    (`benchmarks/bench_decode_step.py`); each is a few us of Python and dispatch on this CPU.

    tokens: (B,) ids, the sampler's (checked only against the cache's size and room).
    """
    B, L = tokens.size(0), cache.length
    if B != cache.batch_size:
        raise DtlError(f"KV cache holds {cache.batch_size} rows but the batch has {B}")
    if L >= cache.max_len:
        raise DtlError(f"the KV cache is full: its {cache.max_len} positions are all used")
    key_valid = cache.write_mask(None, 1)  # (B, L + 1), or None without padding
    x = torch.embedding(frame.embedding, tokens).mul_(frame.scale)  # (B, d)
    if key_valid is None:  # every row at position L; the new token may see every key
        x = x + frame.pe[L]
        mask = None
    else:  # a row's position: the real tokens before it (the forward's rule, for T = 1)
        x = x + frame.pe.index_select(0, key_valid.narrow(1, 0, L).sum(1))
        mask = key_valid[:, None, None]  # (B, 1, 1, L + 1): the new slot is always True
    H, d_k = frame.n_heads, frame.d_k
    d = H * d_k
    threads = layout.block_threads and torch.get_num_threads()  # torch's, to restore
    if layout.block_threads:
        torch.set_num_threads(layout.block_threads)
    try:
        for i, (p, (n1, n2)) in enumerate(zip(layout.blocks, frame.norms, strict=True)):
            q, k, v = p.qkv(x).view(B, 3, H, 1, d_k).unbind(1)  # each (B, H, 1, d_k)
            keys, values = cache.append(i, k, v)  # (B, H, L + 1, d_k), the cache's dtype
            if keys.dtype == q.dtype:
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            else:  # a bf16 model attends in its fp32 cache's dtype, as its forward does
                a = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask)
                a = a.to(x.dtype)  # (B, H, 1, d_k)
            x = torch.layer_norm(x + p.w_o(a.reshape(B, d)), (d,), *n1)
            x = torch.layer_norm(x + p.linear2(p.up(x)), (d,), *n2)
    finally:
        if layout.block_threads:
            torch.set_num_threads(threads)
    cache.advance(1)
    return layout.head(torch.layer_norm(x, (d,), *frame.ln_f)).float()  # (B, V)


def _bias(linear: nn.Linear) -> Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def uses_fast_path(model: nn.Module) -> bool:
    """The plan serves CPU models in eval mode (or without dropout): its step has no dropout."""
    return (
        isinstance(model, TransformerLM)
        and model.embedding.weight.device.type == "cpu"
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
