"""The TransformerLM of the spec (`DTL-ARCHITECTURE.md`), one class per box, in its order.

    input_ids (B, T)
      -> Embedding (x sqrt(d_model)) -> PositionalEncoding (+ sinusoid) -> Dropout
      -> TransformerBlock x N:  x = LayerNorm(x + Dropout(MultiHeadAttention(x)))
                                x = LayerNorm(x + Dropout(FeedForward(x)))
      -> LayerNorm (ln_f) -> Linear head (d_model -> vocab_size)
      -> logits (B, T, vocab_size)

Parameter names follow the original DTL training scripts so their checkpoints load as they are.

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=1000))
>>> model(torch.tensor([[1, 45, 234, 512]])).shape
torch.Size([1, 4, 1000])
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtl.errors import DtlError
from dtl.fileio import atomic_write, atomic_write_text
from dtl.model.config import ModelConfig
from dtl.model.dtype import is_int8_linear
from dtl.model.head_loss import IGNORE_INDEX, linear_cross_entropy, module_cross_entropy
from dtl.model.kv_cache import KVCache
from dtl.model.legacy import read_legacy_checkpoint

__all__ = ["IGNORE_INDEX", "KVCache", "TransformerLM"]  # IGNORE_INDEX = -100: not scored


class PositionalEncoding(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    A fixed table, kept as a non-persistent buffer: it is not a parameter and is not saved.
    """

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (L, 1)
        inv_freq = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model)
        )  # (ceil(d/2),) = 1 / 10000^(2i/d)
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * inv_freq)
        pe[:, 1::2] = torch.cos(position * inv_freq)[:, : d_model // 2]
        self.register_buffer("pe", pe.float(), persistent=False)  # (L, d_model)

    def forward(self, x: Tensor, position_ids: Tensor | None = None, start: int = 0) -> Tensor:
        # x: (B, T, d); position_ids: (B, T) or None for positions start .. start+T-1
        if position_ids is None:
            return x + self.pe[start : start + x.size(1)].to(x.dtype)
        return x + self.pe[position_ids].to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Q, K, V projections -> (B, n_heads, T, d_k) -> softmax(QK^T / sqrt(d_k)) V -> W_O."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        layout=None,
    ) -> Tensor:
        # x: (B, T, d); attn_mask: (B, 1, T, S) bool, True = may attend, or None = causal
        # cache: this forward's `KVCache`, of which this is layer `layer`
        # layout: this block's weights laid out for one-token steps (`dtl.generate.decode`):
        # the same products, Q, K and V fused into one, or None for the nn.Linear layers
        B, T, D = x.shape
        if layout is None:
            q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # each (B, T, d)
        else:
            q, k, v = layout.qkv(x.reshape(B * T, D)).view(B, T, 3 * D).split(D, dim=-1)
        q = q.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, H, T, d_k)
        k = k.view(B, T, self.n_heads, self.d_k).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.d_k).transpose(1, 2)
        if cache is not None:  # incremental decoding: append to the cache, attend to all
            k, v = cache.append(layer, k, v)  # (B, H, S, d_k)
        # Without a cache or a mask this is plain causal attention (the fused kernel's fast
        # path). With a cache and no mask, T == 1 and the one query may see every key.
        is_causal = attn_mask is None and cache is None
        if _attention_in_fp32(q):  # (B, H, T, d_k) each: small next to the projections
            out = F.scaled_dot_product_attention(  # the cache's keys are fp32 already
                q.float(), k.float(), v.float(), attn_mask=attn_mask, is_causal=is_causal
            ).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(B, T, D)  # concatenate heads
        if layout is None:
            return self.w_o(out)
        return layout.w_o(out.view(B * T, D)).view(B, T, D)


def _attention_in_fp32(q: Tensor) -> bool:
    """Whether bf16 attention on a CPU runs its kernel in fp32 (and a bf16 model's KV cache
    is fp32, `attention_dtype`). torch 2.13's CPU attention is slower in bf16 than in fp32
    at d_k 32, both ways: training (fwd + bwd, 1 thread: 14.4 against 4.7 ms at B=8, H=4,
    T=128; 40.5 against 32.0 at B=8, H=8, T=256) and a decode step (one query against 80
    cached keys, H=8, 2 threads: 26 against 9 us a layer), and fp32 inside a bf16 model
    loses nothing. Autocast (FSDP's bf16) keeps bf16: it would cast fp32 inputs back. The
    memory plan counts the fp32 copies (`dtl.train.memory._activation_bytes`).

    >>> _attention_in_fp32(torch.zeros(1, dtype=torch.bfloat16))
    True
    """
    return (
        q.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")  # autocast would cast it back to bf16
    )


def attention_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a model whose activations are in `weight`'s dtype attends in, so its KV
    cache's: fp32 for bf16 on a CPU (`_attention_in_fp32`: a decode step then casts only its
    new keys and values, never the cache), else the activations' own.

    >>> attention_dtype(torch.zeros(1, dtype=torch.bfloat16))
    torch.float32
    """
    return torch.float32 if _attention_in_fp32(weight) else weight.dtype


class FeedForward(nn.Module):
    """Linear (d_model -> d_ff) -> ReLU -> Linear (d_ff -> d_model), position by position."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor, layout=None) -> Tensor:
        if layout is None:
            return self.linear2(F.relu(self.linear1(x)))
        B, T, D = x.shape  # the block's weights laid out for one-token steps, as above
        return layout.linear2(layout.up(x.view(B * T, D))).view(B, T, D)  # up: linear1, ReLU


class Dropout(nn.Module):
    """`nn.Dropout` (zero each value with probability p, scale the rest by 1 / (1 - p)) with,
    on a CPU, its mask drawn 16 bits a value from 64-bit random words.

    torch's CPU dropout draws its mask with `bernoulli_`, one number at a time on one thread
    unless MKL runs it (on Intel CPUs only): 3.1 ms for one (8, 256, 256) activation of the
    small preset on this AMD box, 13 times a training step, against 0.9 ms here
    (docs/benchmarks.md). p is rounded to a multiple of 1/65536 (0.1 -> 0.100006) and the
    kept values are scaled by 1 / (1 - that), so every value's expectation is unchanged; the
    same seed gives the same masks on any CPU. Backward keeps the mask as bools, as torch's.
    On other devices (CUDA) this is torch's own dropout.

    >>> Dropout(0.1).eval()(torch.ones(3)).tolist()  # evaluation: the identity
    [1.0, 1.0, 1.0]
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        dropped = min(round(self.p * 65536), 65535)  # of the 65536 values of 16 random bits
        words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-(2**63), None)
        keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 32768
        return _MaskedScale.apply(x, keep, 65536 / (65536 - dropped))


class _MaskedScale(torch.autograd.Function):
    """y = x * keep * scale, and the same of the gradient: torch's dropout's own kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


class TransformerBlock(nn.Module):
    """Post-norm block: x = LN(x + Dropout(MHA(x))); x = LN(x + Dropout(FFN(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(config.d_model, config.n_heads)
        self.feed_forward = FeedForward(config.d_model, config.d_ff)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.dropout = Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        layout=None,
    ) -> Tensor:
        x = self.norm1(x + self.dropout(self.attention(x, attn_mask, cache, layer, layout)))
        return self.norm2(x + self.dropout(self.feed_forward(x, layout)))


def attention_mask_and_positions(
    start: int, n_new: int, key_valid: Tensor | None = None, device: torch.device | None = None
) -> tuple[Tensor, Tensor | None]:
    """Which keys each of `n_new` new tokens may attend to, and the new tokens' positions: the
    one rule of the model's forward and of its ONNX graph (`dtl.export.onnx`).

    start: tokens before the new ones (cached); key_valid: (B, start + n_new) bool over all
    keys, False at padding, or None when there is none. Returns the mask (B or 1, 1, n_new,
    start + n_new), True = may attend, and position ids (B, n_new) (None without padding:
    positions are then start .. start + n_new - 1).

    >>> mask, pos = attention_mask_and_positions(0, 3, torch.tensor([[False, True, True]]))
    >>> mask[0, 0].int().tolist(), pos.tolist()
    ([[1, 0, 0], [0, 1, 0], [0, 1, 1]], [[0, 0, 1]])
    """
    if key_valid is not None:
        device = key_valid.device
    q_pos = torch.arange(n_new, device=device) + start  # the queries' slots
    k_pos = torch.arange(start + n_new, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if key_valid is None:
        return causal[None, None], None
    # Each query may always see itself, so a padding query (whose result is never used)
    # never has an all-masked row, which would give NaN.
    allowed = (causal[None] & key_valid[:, None, :]) | (k_pos[None, :] == q_pos[:, None])
    # Real tokens count from 0 after left padding: position = real tokens before it.
    positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, start:]  # (B, T)
    return allowed.unsqueeze(1), positions


class TransformerLM(nn.Module):
    """A decoder-only transformer language model, exactly as the spec draws it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_encoding = PositionalEncoding(config.d_model, config.max_seq_length)
        self.dropout = Dropout(config.dropout)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(config) for _ in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)  # untied, with bias
        self.embed_scale = math.sqrt(config.d_model)  # "Attention Is All You Need" section 3.4
        self.apply(_init_weights)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        last_only: bool = False,
        layout=None,
    ) -> Tensor:
        """Logits (B, T, vocab_size), or (B, 1, vocab_size) for the last position only.

        attention_mask: (B, T) of 1 (token) / 0 (padding). Padded positions are never attended
        to, and real tokens are numbered from 0 after any left padding, so a padded row gives
        the same logits for its real tokens as the row alone.
        cache: a `KVCache`; the new tokens are appended to it and attend to all it holds.
        layout: the weights laid out for matrix-vector products (`dtl.generate.decode`, CPU
        generation): they stand in for the blocks' linear layers in a one-token step through
        the cache, and for the head of the last position. The maths is the same.
        """
        if layout is not None:  # the layout for this many rows (one row, or several)
            layout = layout.for_rows(input_ids.size(0))
        step = cache is not None and input_ids.size(1) == 1 and attention_mask is None
        hidden = self.hidden_states(
            input_ids, attention_mask, cache=cache, layout=layout if step else None
        )
        if last_only and layout is not None:
            logits = layout.head(hidden[:, -1]).unsqueeze(1)  # (B, 1, V)
        else:
            logits = self.head(hidden[:, -1:] if last_only else hidden)
        # a bf16 model's logits come out in fp32 (a no-op for fp32 and int8): sampling,
        # log-probabilities and perplexity are computed in fp32 whatever the weights' format
        return logits.float()

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        layout=None,
    ) -> Tensor:
        """The final-LayerNorm output (B, T, d_model): everything but the vocabulary head."""
        self._check_inputs(input_ids, attention_mask, cache)
        T = input_ids.size(1)
        start = 0 if cache is None else cache.length
        new_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        # which keys are real tokens: (B, start + T), or None where none is padding
        key_valid = new_mask if cache is None else cache.write_mask(new_mask, T)
        if key_valid is None and (cache is None or T == 1):
            # the fast paths: plain causal attention, or one new token that sees every key
            attn_mask, position_ids = None, None
        else:
            attn_mask, position_ids = attention_mask_and_positions(
                start, T, key_valid, input_ids.device
            )

        x = self.embedding(input_ids) * self.embed_scale  # (B, T, d)
        # into the blocks' dtype: a no-op unless the embedding alone is fp32 (training's bf16
        # weight copies share the fp32 master embedding: `dtl.train.precision.WeightCopies`)
        x = x.to(self.ln_f.weight.dtype)
        x = self.dropout(self.pos_encoding(x, position_ids, start))
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, attn_mask, cache, i, None if layout is None else layout.blocks[i])
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def loss(
        self,
        input_ids: Tensor,
        targets: Tensor,
        attention_mask: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Next-token cross-entropy over targets that are not IGNORE_INDEX (-100): their mean,
        or with reduction="sum" their sum (what evaluation adds up over windows).

        >>> model.loss(ids, targets)  # training's loss                      # doctest: +SKIP
        >>> model.loss(ids, targets, reduction="sum") / n_scored            # doctest: +SKIP
        """
        if targets.shape != input_ids.shape:
            raise DtlError(
                f"targets shape {tuple(targets.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, d)
        if not isinstance(self.head, nn.Linear):  # an int8 head (`dtl.model.dtype`): eval only
            return module_cross_entropy(
                hidden.reshape(-1, hidden.size(-1)), self.head, targets.reshape(-1), reduction
            )
        # The head and the loss together, a chunk of tokens at a time: no (B*T, vocab) logits.
        return linear_cross_entropy(
            hidden.reshape(-1, hidden.size(-1)),
            self.head.weight,
            self.head.bias,
            targets.reshape(-1),
            reduction=reduction,
        )

    # ------------------------------------------------------------------ checks
    def _check_inputs(
        self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None
    ) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype.is_floating_point:
            raise DtlError("input_ids must be an integer tensor of token ids, shape (batch, seq)")
        if input_ids.dim() != 2:
            raise DtlError(
                f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}; "
                "for a single sequence use input_ids.unsqueeze(0)"
            )
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise DtlError(f"empty batch: input_ids has shape {(B, T)}; give at least one token")
        past = 0 if cache is None else cache.length
        limit = self.config.max_seq_length if cache is None else cache.max_len
        if cache is not None and past + T > limit:
            raise DtlError(
                f"the KV cache is full: {past} + {T} tokens exceed its {limit} positions (the "
                f"model's max_seq_length is {self.config.max_seq_length})"
            )
        if past + T > limit:
            raise DtlError(
                f"sequence of {past + T} tokens is longer than the model's max_seq_length "
                f"({limit}); truncate the input or use a model with a longer context"
            )
        # `--compile`: reading the ids' range would break the graph (a host sync); an id out of
        # range still fails in the embedding
        if not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(input_ids)
            if int(lo) < 0 or int(hi) >= self.config.vocab_size:
                raise DtlError(
                    f"token ids must be in [0, {self.config.vocab_size}), got ids from {int(lo)} "
                    f"to {int(hi)}; was the text encoded with a tokenizer of another vocabulary?"
                )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise DtlError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{(B, T)}"
            )
        if cache is not None and cache.batch_size != B:
            raise DtlError(f"KV cache holds {cache.batch_size} rows but the batch has {B}")

    # ------------------------------------------------------------------ conveniences
    def num_parameters(self) -> int:
        n = sum(p.numel() for p in self.parameters())
        # an int8 model's linear layers (`dtl.model.dtype`) hold packed weights, not parameters
        for m in self.modules():
            if is_int8_linear(m):
                n += m.weight().numel() + m.bias().numel()
        return n

    def allocate_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device, in the dtype it attends in
        (`attention_dtype` of its activations', the embedding's: an int8 model's head has no
        float weight)."""
        p = self.embedding.weight
        return KVCache.allocate(self.config, batch_size, max_len, p.device, attention_dtype(p))

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` and `model.safetensors` (no pickle) into `directory`.

        >>> path = model.save_pretrained("my-model")  # doctest: +SKIP
        >>> TransformerLM.from_pretrained("my-model")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, str(p)))
        config = {"architecture": "dtl.TransformerLM", **self.config.to_dict()}
        atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> TransformerLM:
        """Load a model written by `save_pretrained` (or a DTL checkpoint directory)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise DtlError(
                f"{directory}: no model.safetensors here; a model directory holds config.json "
                "and model.safetensors (written by save_pretrained or dtl train)"
            )
        config = ModelConfig.from_json(directory / "config.json")
        try:
            state = load_file(str(weights), device=str(device))
        except (SafetensorError, OSError) as err:
            raise DtlError(f"{weights}: not a readable safetensors file ({err})") from None
        model = cls(config).to(device)
        model.load_weights(state, source=str(weights))
        return model

    def load_weights(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load a state dict, naming any tensor that is missing, unexpected or mis-shaped."""
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise DtlError(
                f"{source} does not match the model config: "
                + (f"missing tensor(s) {missing[:5]}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected tensor(s) {unexpected[:5]}" if unexpected else "")
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise DtlError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the config "
                    f"needs {tuple(expected[name].shape)}; config.json and the weights disagree"
                )
        self.load_state_dict(state)

    @classmethod
    def from_legacy_checkpoint(
        cls,
        path: str | os.PathLike,
        n_heads: int | None = None,
        max_seq_length: int | None = None,
        device: str | torch.device = "cpu",
    ) -> TransformerLM:
        """Load a `.pt` checkpoint written by the original DTL training scripts (see
        `dtl.model.legacy`: the sizes come from the tensors' shapes; no code from the file runs)."""
        config, state = read_legacy_checkpoint(path, n_heads, max_seq_length)
        model = cls(config)
        model.load_weights(state, source=str(path))
        return model.to(device)


def _init_weights(module: nn.Module) -> None:
    """Linear and Embedding weights ~ N(0, 0.02), biases 0 (LayerNorms keep 1 and 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
