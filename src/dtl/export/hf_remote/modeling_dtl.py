"""DTL's decoder-only transformer in transformers (written by `dtl export --format hf`).

This file travels with the exported folder and imports torch and transformers only, never dtl.
It computes what DTL's `TransformerLM` computes, step for step:

    input_ids (B, T)
      -> Embedding x sqrt(d_model) -> + sinusoidal position table -> Dropout
      -> DtlBlock x n_layers:  x = LayerNorm(x + Dropout(Attention(x)))     (post-LN)
                               x = LayerNorm(x + Dropout(FeedForward(x)))  (ReLU)
      -> final LayerNorm -> lm_head (Linear with bias, not tied to the embedding)

>>> from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
>>> model = AutoModelForCausalLM.from_pretrained("my-export", trust_remote_code=True)
>>> tok = PreTrainedTokenizerFast.from_pretrained("my-export")  # tokenizer.json: no code
>>> ids = tok("The history of", return_tensors="pt").input_ids
>>> tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0])  # doctest: +ELLIPSIS
'The history of...'

Positions: real tokens are numbered from 0 after any left padding (from `attention_mask`), so
a padded row gives the same logits for its tokens as the row alone, as in DTL.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_dtl import DtlConfig

# transformers 5 names the cache `cache` (in and out); 4.x named it `past_key_values`.
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
_CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def sinusoid_table(max_len: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...): (max_len, d) float32.

    Built in float64 on the CPU and then rounded, as DTL builds its table, so the values are
    the same bits (and no float64 is asked of a device without it, such as MPS).
    """
    position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model)
    )  # (ceil(d/2),)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * inv_freq)
    pe[:, 1::2] = torch.cos(position * inv_freq)[:, : d_model // 2]
    return pe.float()


class DtlAttention(nn.Module):
    """Q, K, V projections -> (B, H, T, d_k) -> softmax(QK^T / sqrt(d_k)) V -> w_o."""

    def __init__(self, config: DtlConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.d_k = config.d_model // config.n_heads
        d = config.d_model
        self.w_q = nn.Linear(d, d)
        self.w_k = nn.Linear(d, d)
        self.w_v = nn.Linear(d, d)
        self.w_o = nn.Linear(d, d)

    def forward(self, x, attn_mask, cache, is_causal):
        # x: (B, T, d); attn_mask: (B, 1, T, S) bool (True = may attend) or None
        B, T, D = x.shape
        q = self.w_q(x).view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, H, T, d_k)
        k = self.w_k(x).view(B, T, self.n_heads, self.d_k).transpose(1, 2)
        v = self.w_v(x).view(B, T, self.n_heads, self.d_k).transpose(1, 2)
        if cache is not None:  # append this step's keys and values; attend to all of them
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, S, d_k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.w_o(out.transpose(1, 2).reshape(B, T, D))


class DtlFeedForward(nn.Module):
    """Linear (d_model -> d_ff) -> ReLU -> Linear (d_ff -> d_model)."""

    def __init__(self, config: DtlConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(config.d_model, config.d_ff)
        self.linear2 = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x):
        return self.linear2(F.relu(self.linear1(x)))


class DtlBlock(nn.Module):
    """Post-norm block: x = LN(x + Dropout(Attention(x))); x = LN(x + Dropout(FFN(x)))."""

    def __init__(self, config: DtlConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = DtlAttention(config, layer_idx)
        self.feed_forward = DtlFeedForward(config)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask, cache, is_causal):
        x = self.norm1(x + self.dropout(self.attention(x, attn_mask, cache, is_causal)))
        return self.norm2(x + self.dropout(self.feed_forward(x)))


class DtlPreTrainedModel(PreTrainedModel):
    config_class = DtlConfig
    base_model_prefix = "model"
    _no_split_modules = ["DtlBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # DTL's initialisation (only used for a fresh model; exported weights overwrite it)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class DtlModel(DtlPreTrainedModel):
    """Everything but the vocabulary head: the final LayerNorm's output (B, T, d_model)."""

    def __init__(self, config: DtlConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DtlBlock(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.embed_scale = math.sqrt(config.d_model)
        # A fixed table, not a weight: kept off the state dict and built on first use, so
        # nothing depends on how transformers materialises the module when it loads.
        self._pe: torch.Tensor | None = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    def position_table(self, device: torch.device) -> torch.Tensor:
        """The sinusoidal table (max_seq_length, d_model) on `device`."""
        if self._pe is None or self._pe.device != device:
            table = sinusoid_table(self.config.max_seq_length, self.config.d_model)
            self._pe = table.to(device)
        return self._pe

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        B, T = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "DtlModel takes a 2-D attention_mask (batch, past + new tokens) of 1/0; "
                "use the default dynamic cache (static caches pass 4-D masks)"
            )
        if past + T > self.config.max_seq_length:
            raise ValueError(
                f"{past + T} tokens exceed the model's {self.config.max_seq_length} positions"
            )
        attn_mask, is_causal, positions = _mask_and_positions(input_ids, attention_mask, past)
        if position_ids is None:
            position_ids = positions
        x = self.embedding(input_ids) * self.embed_scale  # (B, T, d)
        pe = self.position_table(x.device)[position_ids].to(x.dtype)  # (B, T, d)
        x = self.dropout(x + pe)
        for block in self.layers:
            x = block(x, attn_mask, cache, is_causal)
        return self.ln_f(x)


def _mask_and_positions(input_ids, attention_mask, past):
    """(boolean mask (B, 1, T, S) or None, is_causal, position ids (B, T)) for T new tokens
    after `past` cached ones; attention_mask is (B, past + T) of 1 (token) / 0 (padding)."""
    B, T = input_ids.shape
    device = input_ids.device
    padded = attention_mask is not None and bool((attention_mask == 0).any())
    if not padded:
        positions = torch.arange(past, past + T, device=device).expand(B, T)
        if past == 0:
            return None, True, positions  # plain causal attention
        if T == 1:
            return None, False, positions  # one new token sees every key
    q_pos = torch.arange(past, past + T, device=device)
    k_pos = torch.arange(past + T, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (T, S) causal
    if not padded:
        return allowed[None, None].expand(B, 1, T, past + T), False, positions
    if attention_mask.dim() != 2 or attention_mask.size(1) != past + T:
        raise ValueError(
            f"attention_mask must be (batch, past + new tokens) = ({B}, {past + T}), "
            f"got {tuple(attention_mask.shape)}"
        )
    key_valid = attention_mask.to(torch.bool)  # (B, S)
    # A padding query may always see itself, so no row is all masked (which would give NaN).
    allowed = (allowed[None] & key_valid[:, None, :]) | (k_pos[None, :] == q_pos[:, None])
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
    return allowed.unsqueeze(1), False, positions


class DtlForCausalLM(DtlPreTrainedModel, GenerationMixin):
    """DtlModel and the vocabulary head: logits (B, T, vocab_size)."""

    def __init__(self, config: DtlConfig) -> None:
        super().__init__(config)
        self.model = DtlModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)  # untied, with bias
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embedding

    def set_input_embeddings(self, value):
        self.model.embedding = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        return_dict=None,
        **kwargs,
    ):
        if input_ids is None:
            raise ValueError("DtlForCausalLM takes input_ids (inputs_embeds is not supported)")
        cache = cache if cache is not None else past_key_values  # transformers 5 / 4.x name
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if isinstance(cache, (tuple, list)):
            raise ValueError("pass the cache as a transformers Cache (e.g. DynamicCache)")
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:  # next-token cross-entropy; -100 is not scored
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        out = {"loss": loss, "logits": logits, _CACHE_FIELD: cache if use_cache else None}
        return CausalLMOutputWithPast(**out)


__all__ = ["DtlForCausalLM", "DtlModel", "DtlPreTrainedModel"]
