"""DTL's own decode-step kernel (`step_kernel.c`): a whole one-token step of a CPU model, every
block, the final LayerNorm and the head, in one call and one OpenMP parallel region; a short
prompt's prefill too (`StepKernel.run`: T new tokens per row; `kernel_fits` says which calls).

The eager step (`dtl.generate.decode.decode_step`) makes ~190 calls into torch per token, each
with a fixed cost of a few microseconds; on the `small` preset that is about a third of a step
(docs/benchmarks.md). The kernel makes one. It keeps its own copy of the model's linear
weights in their format (fp32, bf16, or an int8 model's int8 values and per-output scales),
packed in panels of 32 outputs (`panels`), writes the new keys and values into the same
`KVCache` the eager step uses, and returns fp32 logits, so the token loop, the sampler and
the cache's row bookkeeping are unchanged. Measured against the eager step in one process
(small preset, 2 threads, `benchmarks/bench_decode_step.py`): fp32 1.3x at batch 1 and 1.8x
at batch 8, bf16 3.2x and 1.5x, int8 3.2x and 1.4x (docs/benchmarks.md).

It is built the first time it is needed, with the machine's C compiler (`cc`, or `$CC`) and
`-O3 -march=native -fopenmp`, into DTL's cache folder (`kernel_dir`), keyed by the source, the
compiler and the CPU's feature flags (a few seconds, said on stderr); every later process
loads the built library. A compiler that refuses `-fopenmp` (Apple's clang) or
`-march=native` builds it without them (without OpenMP a step runs on one thread). Where there
is no compiler, or the build fails, or a model is not one it runs (a GPU model, a layout it
does not know), `step_for(model)` returns None and the eager step runs: the same model, only
slower. `DTL_STEP_KERNEL=0` turns it off. `dtl info` says which one runs.

Numerics: every product sums in fp32, whatever the weights' format; the residual stream, the
LayerNorms, attention and the KV cache are fp32 too. So an fp32 model's logits match the eager
step's to float rounding (the sums run in another order), a bf16 model's are closer to fp32's
than the eager bf16 step's (which rounds activations to bf16), and an int8 model's products are
int8 weights times fp32 activations (the eager fbgemm path also rounds each input row to 8 bits).

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100)).eval()
>>> step = step_for(model)  # None where no compiler is found
>>> cache = model.allocate_cache(1, 8)
>>> logits = model(torch.tensor([[1, 2, 3]]), cache=cache, last_only=True)
>>> (step(torch.tensor([4]), cache) if step else model(torch.tensor([[4]]), cache=cache,
...     last_only=True)[:, -1]).shape
torch.Size([1, 100])
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dtl.errors import DtlError
from dtl.model.dtype import is_int8_linear
from dtl.model.kv_cache import KVCache
from dtl.model.transformer import TransformerLM

SOURCE = Path(__file__).with_name("step_kernel.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
# Where a compiler refuses a flag, the build is tried again without it, in this order: Apple's
# clang has no -fopenmp (the kernel then runs on one thread), and some compilers for ARM take
# no -march=native.
OPTIONAL_FLAGS = ("-fopenmp", "-march=native")
W_F32, W_BF16, W_I8 = 0, 1, 2

P = ctypes.c_void_p
I32, I64, F32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("w", P), ("scale", P), ("bias", P), ("out", I32), ("in_", I32)]


class _Block(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("wo", _Linear), ("up", _Linear), ("down", _Linear),
                ("ln1_w", P), ("ln1_b", P), ("ln2_w", P), ("ln2_b", P),
                ("eps1", F32), ("eps2", F32)]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", I32), ("d", I32), ("n_heads", I32), ("d_k", I32), ("d_ff", I32),
                ("vocab", I32), ("n_pos", I32), ("wtype", I32), ("emb_bf16", I32),
                ("embed_scale", F32), ("eps_f", F32), ("embedding", P), ("pe", P),
                ("blocks", ctypes.POINTER(_Block)), ("head", _Linear),
                ("lnf_w", P), ("lnf_b", P)]  # fmt: skip


class _Cache(ctypes.Structure):
    _fields_ = [("keys", ctypes.POINTER(P)), ("values", ctypes.POINTER(P)),
                ("sb", I64), ("sh", I64)]  # fmt: skip


def kernel_dir() -> Path:
    """Where built kernels are kept: `$DTL_CACHE_DIR/kernels`, else `$XDG_CACHE_HOME/dtl/kernels`,
    else `~/.cache/dtl/kernels`."""
    if os.environ.get("DTL_CACHE_DIR"):
        return Path(os.environ["DTL_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dtl" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (a build with -march=native runs only where they are the same)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


@dataclass
class _Build:
    library: ctypes.CDLL | None = None
    why_not: str = ""  # when library is None: what a user reads in `dtl info`


_BUILD: _Build | None = None


def _compile() -> _Build:
    if os.environ.get("DTL_STEP_KERNEL", "1") == "0":
        return _Build(why_not="off (DTL_STEP_KERNEL=0)")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return _Build(why_not="no C compiler found (install gcc, or set CC)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return _Build(why_not=f"{cc} does not run ({e})")
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = kernel_dir() / f"step_kernel-{key}.so"
    failed = target.with_suffix(".failed")  # a failed build's message: not tried again
    if failed.exists():
        return _Build(why_not=failed.read_text(encoding="utf-8", errors="replace"))
    if not target.exists():
        print(f"building DTL's decode-step kernel for this CPU into {target.parent} (once, a "
              "few seconds)", file=sys.stderr, flush=True)  # fmt: skip
        why_not = _build(cc, target)
        if why_not:
            print(f"could not build it: {why_not}\ndecoding runs on torch's ops instead "
                  "(slower); `dtl info` says why", file=sys.stderr, flush=True)  # fmt: skip
            with contextlib.suppress(OSError):
                failed.write_text(why_not, encoding="utf-8")
            return _Build(why_not=why_not)
    try:
        library = ctypes.CDLL(str(target))
    except OSError as e:
        return _Build(why_not=f"could not load {target} ({e})")
    library.dtl_has_openmp.restype = I32
    library.dtl_decode_step.restype = I32
    library.dtl_decode_step.argtypes = [P, P, I32, I32, I32, P, P, I64, P, P, I32]
    return _Build(library)


def _build(cc: str, target: Path) -> str:
    """Compile the kernel into `target` (with `FLAGS`, else without the optional ones the
    compiler refused, one at a time); "" when built, else why not (the first error)."""
    flags, first_error = list(FLAGS), ""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            for dropped in (None, *OPTIONAL_FLAGS):
                if dropped is not None:
                    flags.remove(dropped)
                done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built), "-lm"],
                                      capture_output=True, text=True, timeout=300)  # fmt: skip
                if done.returncode == 0:
                    os.replace(built, target)  # atomic: a concurrent build leaves one whole file
                    return ""
                first_error = first_error or f"{cc} failed: {done.stderr.strip()[-300:]}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not build in {target.parent} ({e})"
    return first_error


def kernel_library() -> _Build:
    """The built kernel (built or loaded once per process), or why there is none."""
    global _BUILD
    if _BUILD is None:
        _BUILD = _compile()
    return _BUILD


def kernel_status() -> str:
    """One line for `dtl info`: whether decoding runs DTL's step kernel, and if not, why."""
    build = kernel_library()
    if build.library is None:
        return f"torch's ops, eager: {build.why_not}"
    if not build.library.dtl_has_openmp():
        return "DTL's step kernel (C, one thread: the compiler has no OpenMP)"
    return "DTL's step kernel (C, OpenMP)"


PANEL = 32  # outputs per panel (step_kernel.c)


def panel_shape(out: int, n_in: int) -> tuple[int, int, int]:
    """The shape `panels` lays an (out, in) weight out in: (ceil(out / 32), in, 32)."""
    return -(-out // PANEL), n_in, PANEL


def panels(weight: Tensor, out: Tensor | None = None) -> Tensor:
    """nn.Linear's weight (out, in) as the kernel streams it: (ceil(out / 32), in, 32), panel p
    holding outputs 32p.. as rows of 32 (zero-padded), so one input value multiplies a row;
    written into `out` where given.

    >>> panels(torch.arange(6.0).view(3, 2))[0, :, :4]  # outputs 0-2 of inputs 0 and 1
    tensor([[0., 2., 4., 0.],
            [1., 3., 5., 0.]])
    """
    n_out, n_in = weight.shape
    n_panels = panel_shape(n_out, n_in)[0]
    padded = weight.new_zeros(n_panels * PANEL, n_in)
    padded[:n_out] = weight
    laid = padded.view(n_panels, PANEL, n_in).transpose(1, 2)
    return laid.contiguous() if out is None else out.view_as(laid).copy_(laid)


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux's madvise advice


class _Arena:
    """One block of memory for all of a kernel's weight panels, 2 MB-aligned and advised to
    the kernel as transparent huge pages (Linux, where THP is `madvise`, most distributions'
    default, or `always`): a step streams every panel once, and with 4 kB pages that is a TLB
    miss every 4 kB (17,000 a step for `small` in fp32)."""

    def __init__(self, nbytes: int) -> None:
        raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # untouched yet: no pages
        start = -raw.data_ptr() % HUGE_PAGE
        self.memory, self.used = raw[start : start + nbytes], 0
        if nbytes and sys.platform == "linux":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise(ctypes.c_void_p(self.memory.data_ptr()), ctypes.c_size_t(nbytes),
                             MADV_HUGEPAGE)  # fmt: skip  (advice only: a refusal changes nothing)
            except (OSError, AttributeError):
                pass

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The next `shape` of `dtype`, 64-byte aligned."""
        n = dtype.itemsize * int(torch.Size(shape).numel())
        start = -(-self.used // 64) * 64
        self.used = start + n
        return self.memory[start : start + n].view(dtype).view(shape)


def _linear_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of every product the kernel keeps, in its order: per block Q|K|V, W_O, the
    feed-forward pair; then the head."""
    d, f = config.d_model, config.d_ff
    return [(3 * d, d), (d, d), (f, d), (d, f)] * config.n_layers + [(config.vocab_size, d)]


def copy_bytes(config, itemsize: int) -> int:
    """The bytes of weights the kernel keeps for a model of `config` whose weights take
    `itemsize` bytes each (4 fp32, 2 bf16, 1 int8): every product in panels of 32 outputs.

    >>> from dtl import ModelConfig
    >>> copy_bytes(ModelConfig.preset("small"), 4) / 2**20  # MiB
    67.09375
    """
    return sum(math.prod(panel_shape(o, i)) * itemsize for o, i in _linear_shapes(config))


def _f32(t: Tensor) -> Tensor:
    return t.detach().float().contiguous()


@dataclass
class StepKernel:
    """A model's weights as the kernel reads them, and its calls: `step(tokens, cache)`."""

    library: ctypes.CDLL
    model: _Model  # its sizes (`model.d`, `model.vocab`, ...) too
    keep: list = field(default_factory=list)  # every tensor / array the structs point into
    _seen: tuple | None = None  # (weakref to the last cache, its first key's address, its struct)

    @classmethod
    def of(cls, model: TransformerLM, library: ctypes.CDLL) -> StepKernel | None:
        """The kernel's view of `model`, or None where it cannot run it."""
        c = model.config
        weight = model.embedding.weight
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        int8 = is_int8_linear(model.head)
        wtype = W_I8 if int8 else (W_BF16 if model.head.weight.dtype == torch.bfloat16 else W_F32)
        keep: list = []
        itemsize = 1 if int8 else (2 if wtype == W_BF16 else 4)
        shapes = _linear_shapes(c)
        arena = _Arena(copy_bytes(c, itemsize) + 64 * len(shapes))  # + each one's alignment
        keep.append(arena.memory)

        def ptr(t: Tensor) -> int:
            keep.append(t)
            return t.data_ptr()

        def linear(layers: list[nn.Module]) -> _Linear:
            if int8:
                ws = [m.weight() for m in layers]
                if any(w.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine)
                       or bool(w.q_per_channel_zero_points().ne(0).any()) for w in ws):  # fmt: skip
                    raise _Unsupported
                w = torch.cat([x.int_repr() for x in ws]).contiguous()
                scale = torch.cat([x.q_per_channel_scales() for x in ws]).float().contiguous()
                bias = torch.cat([_f32(m.bias()) for m in layers])
            else:
                w = torch.cat([m.weight.detach() for m in layers])
                if w.dtype != (torch.bfloat16 if wtype == W_BF16 else torch.float32):
                    raise _Unsupported
                scale = None
                bias = torch.cat([_f32(m.bias) for m in layers])
            out, n_in = w.shape
            laid = panels(w, arena.take(panel_shape(out, n_in), w.dtype))
            return _Linear(laid.data_ptr(), ptr(scale) if scale is not None else None, ptr(bias),
                           out, n_in)  # fmt: skip

        try:
            blocks = (_Block * c.n_layers)()
            for i, blk in enumerate(model.transformer_blocks):
                a, ff = blk.attention, blk.feed_forward
                blocks[i] = _Block(
                    linear([a.w_q, a.w_k, a.w_v]), linear([a.w_o]), linear([ff.linear1]),
                    linear([ff.linear2]), ptr(_f32(blk.norm1.weight)), ptr(_f32(blk.norm1.bias)),
                    ptr(_f32(blk.norm2.weight)), ptr(_f32(blk.norm2.bias)),
                    blk.norm1.eps, blk.norm2.eps,
                )  # fmt: skip
            head = linear([model.head])
        except _Unsupported:
            return None
        keep.append(blocks)
        emb = weight.detach().contiguous()
        pe = _f32(model.pos_encoding.pe.reshape(-1, c.d_model))
        m = _Model(
            c.n_layers, c.d_model, c.n_heads, c.d_k, c.d_ff, c.vocab_size, pe.size(0), wtype,
            int(emb.dtype == torch.bfloat16), model.embed_scale, model.ln_f.eps, ptr(emb),
            ptr(pe), blocks, head, ptr(_f32(model.ln_f.weight)), ptr(_f32(model.ln_f.bias)),
        )  # fmt: skip
        return cls(library, m, keep)

    def takes(self, cache: KVCache) -> bool:
        """Whether the kernel can step `cache`: fp32 keys and values in (B, H, slots, d_k)
        rows, as `allocate_cache` makes them on a CPU (a cache made otherwise takes the eager
        step)."""
        return self._cache_struct(cache) is not None

    def _cache_struct(self, cache: KVCache) -> _Cache | None:
        """The cache's per-layer pointers (None: a layout the kernel does not read), rebuilt
        when the step meets another cache."""
        seen = self._seen  # read once: another thread may step another cache meanwhile
        if seen is not None and seen[0]() is cache and seen[1] == cache.keys[0].data_ptr():
            return seen[2]
        k0 = cache.keys[0]
        if cache.key_mask.stride(1) != 1 or any(
            t.dtype != torch.float32 or t.stride(3) != 1 or t.stride(2) != t.size(3)
            or t.stride() != k0.stride() or t.device.type != "cpu"
            for t in (*cache.keys, *cache.values)
        ):  # fmt: skip
            return None
        keys = (P * self.model.n_layers)(*[t.data_ptr() for t in cache.keys])
        values = (P * self.model.n_layers)(*[t.data_ptr() for t in cache.values])
        struct = _Cache(keys, values, k0.stride(0), k0.stride(1))
        self._seen = (weakref.ref(cache), k0.data_ptr(), struct)
        return struct

    def __call__(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """The next-token logits (B, V), fp32, after one new token per row (`tokens` (B,))
        through `cache` (which it appends to and advances, as the eager step does)."""
        return self.run(tokens[:, None], cache)

    def run(self, tokens: Tensor, cache: KVCache, attention_mask: Tensor | None = None) -> Tensor:
        """The next-token logits (B, V), fp32, after each row's last of `tokens` (B, T) (left
        padded where `attention_mask` (B, T) has zeros) through `cache`: what the model's
        `forward(tokens, attention_mask, cache=cache, last_only=True)[:, -1]` computes, a
        prompt's prefill or a step. Checks what the forward checks, and changes nothing on a
        bad input."""
        struct = self._cache_struct(cache)
        if struct is None:
            raise DtlError("the step kernel reads an fp32 KV cache of (B, H, slots, d_k) rows; "
                           "this one is not (check `takes(cache)` first)")  # fmt: skip
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise DtlError(f"tokens must have shape (batch, new tokens), got {tuple(tokens.shape)}")
        (B, T), L = tokens.shape, cache.length
        if B != cache.batch_size:
            raise DtlError(f"KV cache holds {cache.batch_size} rows but the batch has {B}")
        if L + T > cache.max_len:
            raise DtlError(f"the KV cache is full: {L} + {T} tokens exceed its {cache.max_len} "
                           "positions")  # fmt: skip
        if L + T > self.model.n_pos:
            raise DtlError(f"{L} + {T} tokens are more than the model's {self.model.n_pos} "
                           "positions")  # fmt: skip
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise DtlError(f"attention_mask shape {tuple(attention_mask.shape)} must equal the "
                           f"tokens' {(B, T)}")  # fmt: skip
        tokens = tokens.to(torch.int64).contiguous()
        if T > 1 or attention_mask is not None:  # before the cache's mask changes (a step's
            self._check_ids(tokens)  # ids are checked in the kernel, without a host sync)
        new_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        key_valid = cache.write_mask(new_mask, T)
        threads = torch.get_num_threads()
        # per call: callers on several threads may share one model
        d, f = self.model.d, self.model.d_ff
        work = torch.empty(B * T * (6 * d + f) + B * d + threads * cache.max_len)
        logits = torch.empty(B, self.model.vocab)
        mask = cache.key_mask if key_valid is not None else None
        bad = self.library.dtl_decode_step(
            ctypes.addressof(self.model), ctypes.addressof(struct), B, T, L,
            tokens.data_ptr(), mask.data_ptr() if mask is not None else None,
            mask.stride(0) if mask is not None else 0, logits.data_ptr(),
            work.data_ptr(), threads,
        )  # fmt: skip
        if bad:
            self._check_ids(tokens)
        cache.advance(T)
        return logits

    def _check_ids(self, tokens: Tensor) -> None:
        bad = ((tokens < 0) | (tokens >= self.model.vocab)).nonzero()
        if len(bad):
            b, t = (int(i) for i in bad[0])
            where = f"row {b}" if tokens.size(1) == 1 else f"row {b}, position {t}"
            raise DtlError(f"token id {int(tokens[b, t])} ({where}) is outside the model's "
                           f"vocabulary of {self.model.vocab}")  # fmt: skip


# The most rows a call gives the kernel: beyond them the products are compute-bound and
# torch's (oneDNN / MKL) matrix kernels win. Measured (small preset, 2 threads, A/B in one
# process): steps of 16 rows 1.17-1.30x the eager step, of 32 rows 0.88-1.03x; prompts of 64
# tokens 1.38-1.57x the forward, of 128 tokens 0.85-1.10x, of 256 0.46-0.82x.
STEP_ROWS = 16
PREFILL_TOKENS = 64


def kernel_fits(rows: int, new_tokens: int) -> bool:
    """Whether a call of `rows` rows of `new_tokens` new tokens each runs the kernel (else
    torch's ops): steps (one new token) of up to STEP_ROWS rows, prompts of up to
    PREFILL_TOKENS tokens in all."""
    if new_tokens == 1:
        return rows <= STEP_ROWS
    return rows * new_tokens <= PREFILL_TOKENS


class _Unsupported(Exception):
    """A model the kernel does not run (the eager step does)."""


def step_for(model: nn.Module) -> StepKernel | None:
    """The kernel's step for `model` (a CPU `TransformerLM` in fp32, bf16 or int8), or None
    where it cannot run here (no compiler, off, another kind of model)."""
    if not isinstance(model, TransformerLM):
        return None
    library = kernel_library().library
    return StepKernel.of(model, library) if library is not None else None
