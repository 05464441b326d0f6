"""`dtl export --format onnx`: the model as an ONNX decoder with past keys and values.

    model.onnx
      inputs   input_ids                 int64 (batch, sequence)
               attention_mask            int64 (batch, past + sequence): 1 token, 0 padding
               past_key_values.N.key     float32 (batch, heads, past, head_dim), N = 0..layers-1
               past_key_values.N.value   (the same); past = 0 for the first call
      outputs  logits                    float32 (batch, sequence, vocab)
               present.N.key / .value    (batch, heads, past + sequence, head_dim): the next
                                         call's past_key_values
    dtl_onnx.json    the sizes, the names above and the end-of-text id
    tokenizer.json + tokenizer_config.json + README.md (as `--format hf` writes them)

Positions count real tokens, as in DTL: a left-padded row gives the logits it gives alone.
The graph is traced with torch.onnx's TorchScript exporter (`dynamo=False`), which needs only
the `onnx` package; batch, sequence and past length are dynamic axes.

>>> import onnxruntime
>>> session = onnxruntime.InferenceSession("tiny-onnx/model.onnx")
>>> tokens = greedy(session, [464, 2068, 286], max_new_tokens=20)  # prompt + up to 20 new
>>> tokens[:3], len(tokens) <= 23
([464, 2068, 286], True)
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dtl.errors import DtlError
from dtl.export.card import model_card, run_facts
from dtl.export.tokenizer import write_hf_tokenizer
from dtl.fileio import atomic_write_text
from dtl.model.transformer import attention_mask_and_positions

DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"
INFO_FILE = "dtl_onnx.json"


def past_names(n_layers: int, prefix: str = "past_key_values") -> list[str]:
    """past_key_values.0.key, past_key_values.0.value, ... (or present.N.key/value)."""
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


class OnnxDecoder(nn.Module):
    """The spec's model in the form the graph takes: the past as inputs, the present as
    outputs, and one explicit mask from `attention_mask` (no fast paths to choose between).
    The same weights and the same maths as `TransformerLM.forward` with a cache."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor):
        m = self.model
        P = past[0].shape[2]  # tokens already cached
        T = input_ids.shape[1]
        valid = attention_mask.to(torch.bool)  # (B, P + T)
        # the model's own rule: (B, 1, T, P + T) mask, positions counting real tokens (B, T)
        allowed, positions = attention_mask_and_positions(P, T, valid)
        x = m.embedding(input_ids) * m.embed_scale + m.pos_encoding.pe[positions]  # (B, T, d)
        presents = []
        for i, block in enumerate(m.transformer_blocks):
            attn, k_v = _attention(block.attention, x, allowed, past[2 * i], past[2 * i + 1])
            presents += k_v
            x = block.norm1(x + attn)
            x = block.norm2(x + block.feed_forward(x))
        logits = m.head(m.ln_f(x))  # (B, T, V)
        return (logits, *presents)


def _attention(mha, x: Tensor, allowed: Tensor, past_k: Tensor, past_v: Tensor):
    """softmax(QK^T / sqrt(d_k)) V over the past and the new keys; returns (out, [k, v])."""
    B, T, D = x.shape
    q = mha.w_q(x).view(B, T, mha.n_heads, mha.d_k).transpose(1, 2)  # (B, H, T, d_k)
    k = mha.w_k(x).view(B, T, mha.n_heads, mha.d_k).transpose(1, 2)
    v = mha.w_v(x).view(B, T, mha.n_heads, mha.d_k).transpose(1, 2)
    k = torch.cat([past_k, k], dim=2)  # (B, H, P + T, d_k)
    v = torch.cat([past_v, v], dim=2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(mha.d_k)  # (B, H, T, P + T)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, T, d_k)
    return mha.w_o(out.transpose(1, 2).reshape(B, T, D)), [k, v]


def export_onnx(model, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace `model` (a TransformerLM) into the ONNX file `path`."""
    try:
        import onnx  # noqa: F401  (the TorchScript exporter writes through it)
    except ImportError:
        raise DtlError(
            "--format onnx needs the onnx package: pip install 'dtl[export]' (onnx, onnxruntime)"
        ) from None
    c = model.config
    model = model.float().cpu().eval()
    inputs = past_names(c.n_layers)
    outputs = past_names(c.n_layers, "present")
    # Trace with a past and a new part of different lengths (2 + 3), so neither is a constant.
    B, P, T = 2, 2, 3
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, P + T, dtype=torch.long)
    past = [torch.zeros(B, c.n_heads, P, c.d_k) for _ in inputs]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"}}
    axes |= {name: {0: "batch", 2: "past"} for name in inputs}
    axes |= {"logits": {0: "batch", 1: "sequence"}}
    axes |= {name: {0: "batch", 2: "total"} for name in outputs}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated in favour of dynamo's, which needs onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            # eval, or the exporter hands it back (and `model` with it) in training mode
            OnnxDecoder(model).eval(),
            (ids, mask, *past),
            str(path),
            input_names=["input_ids", "attention_mask", *inputs],
            output_names=["logits", *outputs],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )


def write_onnx(
    model, tokenizer, directory: Path, source: Path, name: str = "my-model", opset=None
) -> None:
    """Fill `directory` (empty) with model.onnx, dtl_onnx.json, the tokenizer and a card."""
    directory = Path(directory)
    export_onnx(model, directory / MODEL_FILE, opset or DEFAULT_OPSET)
    c = model.config
    info = {
        "format": "dtl-onnx-decoder",
        "model": MODEL_FILE,
        "vocab_size": c.vocab_size,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "head_dim": c.d_k,
        "context": c.context,
        "max_seq_length": c.max_seq_length,
        "eos_token_id": tokenizer.eos_id,
        "inputs": ["input_ids", "attention_mask", *past_names(c.n_layers)],
        "outputs": ["logits", *past_names(c.n_layers, "present")],
        "opset": opset or DEFAULT_OPSET,
    }
    atomic_write_text(directory / INFO_FILE, json.dumps(info, indent=2) + "\n")
    write_hf_tokenizer(tokenizer, directory, c.context)
    card = model_card(name, c, model.num_parameters(), tokenizer.name, run_facts(source), "onnx")
    atomic_write_text(directory / "README.md", card)


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """The past inputs of a first call: (batch, heads, 0, head_dim) zeros for each."""
    feeds = {}
    for node in session.get_inputs():
        if node.name.startswith("past_key_values."):
            heads, head_dim = node.shape[1], node.shape[3]
            feeds[node.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return feeds


def greedy(session, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy decoding with onnxruntime: the prompt in one call, then one token per call with
    the previous call's present keys and values as the past. Returns prompt + new tokens."""
    names = [o.name for o in session.get_outputs()]
    ids = np.array([prompt], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty_past(session, 1)}
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        out = dict(zip(names, session.run(None, feeds), strict=True))
        token = int(out["logits"][0, -1].argmax())
        tokens.append(token)
        if token == eos_id:
            break
        feeds = {
            "input_ids": np.array([[token]], dtype=np.int64),
            "attention_mask": np.ones((1, len(tokens)), dtype=np.int64),
        }
        feeds |= {n.replace("present.", "past_key_values."): out[n] for n in names[1:]}
    return tokens
