"""TransformerLM against independent oracles: PyTorch's own encoder layer, a hand-written
reference of the original DTL model, hand-computed counts and the plain cross-entropy."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtl import DtlError, ModelConfig, TransformerLM
from dtl.model import TransformerBlock
from dtl.model.head_loss import linear_cross_entropy
from dtl.model.transformer import MultiHeadAttention
from dtl.train.memory import parameter_breakdown

TINY = dict(vocab_size=97, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_length=40)


def tiny_model(dropout: float = 0.0, **overrides) -> TransformerLM:
    model = TransformerLM(ModelConfig(**{**TINY, **overrides}, dropout=dropout))
    with torch.no_grad():  # non-zero biases and norms, so the tests see them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def encoder_layer_from_block(block: TransformerBlock, d_model: int, n_heads: int, d_ff: int):
    ref = nn.TransformerEncoderLayer(
        d_model, n_heads, d_ff, dropout=0.0, activation="relu", batch_first=True, norm_first=False
    )
    a = block.attention
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.w_q.weight, a.w_k.weight, a.w_v.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.w_q.bias, a.w_k.bias, a.w_v.bias]))
        ref.self_attn.out_proj.weight.copy_(a.w_o.weight)
        ref.self_attn.out_proj.bias.copy_(a.w_o.bias)
        for ours, theirs in (
            (block.feed_forward.linear1, ref.linear1),
            (block.feed_forward.linear2, ref.linear2),
            (block.norm1, ref.norm1),
            (block.norm2, ref.norm2),
        ):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return ref.eval()


def causal_mask(T: int) -> torch.Tensor:
    return torch.triu(torch.full((T, T), float("-inf")), diagonal=1)


def test_block_equals_torch_transformer_encoder_layer():
    model = tiny_model()
    block = model.transformer_blocks[0]
    ref = encoder_layer_from_block(block, 32, 4, 64)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        ours = block(x)
        theirs = ref(x, src_mask=causal_mask(11))
    assert (ours - theirs).abs().max().item() <= 1e-5


def reference_pe(max_len: int, d_model: int) -> torch.Tensor:
    """The spec's formula, element by element with math.sin / math.cos."""
    pe = torch.zeros(max_len, d_model)
    for pos in range(max_len):
        for i in range(0, d_model, 2):
            angle = pos / (10000 ** (i / d_model))
            pe[pos, i] = math.sin(angle)
            if i + 1 < d_model:
                pe[pos, i + 1] = math.cos(angle)
    return pe


def pe_by_pow(max_len: int, d_model: int) -> torch.Tensor:
    """The same formula, vectorised with pow (the model uses exp/log), for big tables."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, i / d_model)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)[:, : d_model // 2]
    return pe.float()


def test_positional_encoding_is_the_spec_formula_and_not_a_parameter():
    model = tiny_model()
    assert torch.allclose(model.pos_encoding.pe, reference_pe(40, 32), atol=1e-6)
    assert "pos_encoding.pe" not in model.state_dict()
    assert all("pos_encoding" not in n for n, _ in model.named_parameters())
    odd = TransformerLM(ModelConfig(**{**TINY, "d_model": 33, "n_heads": 3}))
    assert torch.allclose(odd.pos_encoding.pe, reference_pe(40, 33), atol=1e-6)


def test_whole_model_equals_reference_built_from_torch_layers():
    model = tiny_model()
    layers = [encoder_layer_from_block(b, 32, 4, 64) for b in model.transformer_blocks]
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        x = model.embedding(ids) * math.sqrt(32) + reference_pe(40, 32)[:13]
        for layer in layers:
            x = layer(x, src_mask=causal_mask(13))
        expected = model.head(model.ln_f(x))
        assert (model(ids) - expected).abs().max().item() <= 1e-5


def test_init_is_normal_002_and_biases_zero():
    model = TransformerLM(ModelConfig.preset("tiny", vocab_size=4096))
    w = model.embedding.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert abs(model.head.weight.std().item() - 0.02) < 0.001
    assert model.transformer_blocks[0].attention.w_q.bias.abs().max().item() == 0
    assert model.ln_f.weight.eq(1).all() and model.ln_f.bias.eq(0).all()


def test_kv_cache_token_by_token_equals_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 25))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(batch_size=2)
        steps = [model(ids[:, i : i + 1], cache=cache) for i in range(25)]
        # A prompt prefilled at once, then one token a step, only the last position's logits.
        cache2 = model.allocate_cache(batch_size=2)
        pre = model(ids[:, :10], cache=cache2)
        tail = [model(ids[:, i : i + 1], cache=cache2, last_only=True) for i in range(10, 25)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4
    assert (pre - full[:, :10]).abs().max().item() <= 1e-4
    assert (torch.cat(tail, 1) - full[:, 10:]).abs().max().item() <= 1e-4
    assert cache.length == 25


def test_left_padding_does_not_change_real_tokens_logits():
    model = tiny_model()
    a = torch.randint(0, 97, (1, 9))
    b = torch.randint(0, 97, (1, 5))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0] = a[0]
    batch[1, 4:] = b[0]  # four pad slots on the left, filled with id 0
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        assert (out[0] - model(a)[0]).abs().max().item() <= 1e-5
        assert (out[1, 4:] - model(b)[0]).abs().max().item() <= 1e-5
        batch2 = batch.clone()
        batch2[1, :4] = torch.randint(0, 97, (4,))  # other pad ids change nothing
        assert (model(batch2, attention_mask=mask)[1, 4:] - out[1, 4:]).abs().max() <= 1e-6
        assert torch.isfinite(out).all()


def test_right_padding_and_cached_decoding_with_padding():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right padding: real tokens never see it under causal attention
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        assert (out[1, :5] - model(ids[1:, :5])[0]).abs().max().item() <= 1e-5
        # Left-padded prompt through the cache, then decoding, equals the row alone.
        prompt = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
        pmask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        nxt = torch.tensor([[9], [9]])
        cache = model.allocate_cache(batch_size=2)
        model(prompt, attention_mask=pmask, cache=cache)
        step = model(nxt, cache=cache)
        alone = model(torch.tensor([[5, 6, 7, 9]]))
        assert (step[0, -1] - alone[0, -1]).abs().max().item() <= 1e-4


def test_exact_parameter_counts():
    # Hand-computed from the issue / the spec's layout with biases and norms counted.
    assert parameter_breakdown(ModelConfig.preset("small"))["total"] == 30_520_913
    for name in ("tiny", "small", "medium", "large", "qa"):
        cfg = ModelConfig.preset(name)
        D, F_, V, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
        by_hand = V * D + L * (4 * D * D + 4 * D + 2 * D * F_ + F_ + D + 4 * D) + 2 * D + D * V + V
        with torch.device("meta"):
            built = TransformerLM(cfg)
        assert built.num_parameters() == by_hand == parameter_breakdown(cfg)["total"], name
    assert parameter_breakdown(ModelConfig.preset("large"))["total"] == 162_301_009  # not ~355M


def test_presets_are_the_spec_sizes():
    expected = {
        "small": (256, 8, 6, 1024, 512),
        "medium": (512, 8, 8, 2048, 512),
        "large": (768, 12, 12, 3072, 512),
        "qa": (512, 8, 10, 2048, 1024),
    }
    for name, sizes in expected.items():
        c = ModelConfig.preset(name)
        assert (c.d_model, c.n_heads, c.n_layers, c.d_ff, c.max_seq_length) == sizes
        assert c.vocab_size == 50_257
    assert ModelConfig.preset("small", dropout=0.0, vocab_size=8192).vocab_size == 8192


def test_save_and_load_round_trip(tmp_path):
    from safetensors import safe_open

    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["d_model"] == 32 and config["n_layers"] == 2
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:  # not a pickle
        assert "transformer_blocks.1.feed_forward.linear2.weight" in f.keys()
    loaded = TransformerLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_loading_weights_that_do_not_match_the_config_names_the_tensor(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_ff"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DtlError, match=r"'transformer_blocks\.0\.feed_forward\.linear1\.(weight|bias)'"):
        TransformerLM.from_pretrained(tmp_path)
    config.update(d_ff=64, n_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DtlError, match=r"missing tensor.*transformer_blocks\.2"):
        TransformerLM.from_pretrained(tmp_path)
    with pytest.raises(DtlError, match="no model.safetensors"):
        TransformerLM.from_pretrained(tmp_path / "nowhere")


class LegacyPositionalEncoding(nn.Module):
    """The original scripts' layout: a (max_len, 1, d_model) buffer, added seq-first."""

    def __init__(self, d_model, max_len=5000):
        super().__init__()
        self.register_buffer("pe", pe_by_pow(max_len, d_model).unsqueeze(1))

    def forward(self, x):  # x: (T, B, d)
        return x + self.pe[: x.size(0)]


class LegacyAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.h, self.dk = n_heads, d_model // n_heads
        self.w_q, self.w_k, self.w_v, self.w_o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x):  # explicit softmax attention, no SDPA
        B, T, D = x.shape
        q, k, v = (w(x).view(B, T, self.h, self.dk).transpose(1, 2) for w in (self.w_q, self.w_k, self.w_v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dk)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        out = torch.softmax(scores, -1) @ v
        return self.w_o(out.transpose(1, 2).reshape(B, T, D))


class LegacyFF(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


class LegacyBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff):
        super().__init__()
        self.attention = LegacyAttention(d_model, n_heads)
        self.feed_forward = LegacyFF(d_model, d_ff)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, x):
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.feed_forward(x))


class LegacyLM(nn.Module):
    def __init__(self, vocab, d_model, n_heads, n_layers, d_ff):
        super().__init__()
        self.d_model = d_model
        self.embedding = nn.Embedding(vocab, d_model)
        self.pos_encoding = LegacyPositionalEncoding(d_model)
        self.transformer_blocks = nn.ModuleList(LegacyBlock(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids):
        x = self.embedding(ids) * math.sqrt(self.d_model)
        x = self.pos_encoding(x.transpose(0, 1)).transpose(0, 1)
        for block in self.transformer_blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def test_legacy_checkpoint_gives_the_original_models_logits(tmp_path):
    legacy = LegacyLM(vocab=97, d_model=32, n_heads=8, n_layers=3, d_ff=64).eval()
    path = tmp_path / "best_model.pt"
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": legacy.state_dict(),
            "optimizer_state_dict": {},
            "train_loss": 2.5,
            "eval_loss": 2.7,
        },
        path,
    )
    model = TransformerLM.from_legacy_checkpoint(path).eval()  # n_heads defaults to 8
    assert (model.config.n_layers, model.config.d_ff, model.config.n_heads) == (3, 64, 8)
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        assert (model(ids) - legacy(ids)).abs().max().item() <= 1e-5

    # A bare state dict, saved from a DDP-wrapped model (module. prefix), loads too.
    torch.save({"module." + k: v for k, v in legacy.state_dict().items()}, tmp_path / "bare.pt")
    bare = TransformerLM.from_legacy_checkpoint(tmp_path / "bare.pt").eval()
    with torch.no_grad():
        assert (bare(ids) - legacy(ids)).abs().max().item() <= 1e-5


def test_legacy_n_heads_default_and_bad_files(tmp_path):
    wide = LegacyLM(vocab=11, d_model=768, n_heads=12, n_layers=1, d_ff=8)
    torch.save({"model_state_dict": wide.state_dict()}, tmp_path / "wide.pt")
    assert TransformerLM.from_legacy_checkpoint(tmp_path / "wide.pt").config.n_heads == 12
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(DtlError, match="not a DTL checkpoint"):
        TransformerLM.from_legacy_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DtlError, match="not a loadable"):
        TransformerLM.from_legacy_checkpoint(tmp_path / "junk.pt")


def test_bad_inputs_give_clear_errors():
    with pytest.raises(DtlError, match="divisible by n_heads"):
        ModelConfig(d_model=100, n_heads=8)
    with pytest.raises(DtlError, match="unknown preset"):
        ModelConfig.preset("huge")
    with pytest.raises(DtlError, match="unknown ModelConfig field"):
        ModelConfig.preset("tiny", d_modle=64)
    model = tiny_model()
    with pytest.raises(DtlError, match="longer than the model's max_seq_length"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(DtlError, match=r"token ids must be in \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(DtlError, match="token ids must be in"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(DtlError, match="empty batch"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(DtlError, match="empty batch"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(DtlError, match="unsqueeze"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(DtlError, match="attention_mask shape"):
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    cache = model.allocate_cache(batch_size=1, max_len=4)
    model(torch.ones(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(DtlError, match="KV cache is full"):
        model(torch.ones(1, 1, dtype=torch.long), cache=cache)


def test_fused_head_loss_equals_plain_cross_entropy():
    h = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::7] = -100
    for chunk in (1, 64, 1000):
        fused = linear_cross_entropy(h, w, b, t, chunk_size=chunk)
        (fused * 3).backward()
        grads = [x.grad.clone() for x in (h, w, b)]
        for x in (h, w, b):
            x.grad = None
        plain = F.cross_entropy(h @ w.T + b, t, ignore_index=-100)
        (plain * 3).backward()
        assert abs(fused.item() - plain.item()) < 1e-5
        for g, x in zip(grads, (h, w, b), strict=True):
            assert (g - x.grad).abs().max().item() < 1e-5
            x.grad = None
    ignored = torch.full((4,), -100)
    loss = linear_cross_entropy(h[:4], w, b, ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_head_loss_under_autocast_keeps_small_gradients(dtype):
    """Under fp16 autocast with a GradScaler the plain loss's gradients survive; the fused
    loss computes them in its forward, before any scaling, so it must not round them away."""
    V = 50_257  # a real vocabulary: softmax / n_tokens is ~1e-8, below fp16's normal range
    h = torch.randn(512, 64, requires_grad=True)
    w = (torch.randn(V, 64) * 0.02).requires_grad_()
    b = torch.zeros(V, requires_grad=True)
    t = torch.randint(0, V, (512,))
    F.cross_entropy(h @ w.T + b, t).backward()  # the fp32 reference
    ref = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    with torch.autocast("cpu", dtype=dtype):
        loss = linear_cross_entropy(h, w, b, t)
    (loss * 65536.0).backward()  # what a GradScaler does
    for x, g in zip((h, w, b), ref, strict=True):
        assert ((x.grad / 65536.0 - g).norm() / g.norm()).item() < 1e-2
    assert (w.grad == 0).float().mean().item() < 0.001  # the reference has none


def test_model_loss_equals_cross_entropy_of_its_logits():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 12))
    targets = torch.randint(0, 97, (3, 12))
    targets[:, :4] = -100
    with torch.no_grad():
        plain = F.cross_entropy(model(ids).reshape(-1, 97), targets.reshape(-1), ignore_index=-100)
        assert abs(model.loss(ids, targets).item() - plain.item()) < 1e-5


def test_head_loss_sum_equals_torch_sum_and_its_gradients():
    """reduction="sum" (what evaluation adds up over windows) is torch's summed cross-entropy,
    forward and backward, in chunks and through the model."""
    h = torch.randn(90, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    t = torch.randint(0, 40, (90,))
    t[::5] = -100
    plain = F.cross_entropy(h @ w.T + b, t, ignore_index=-100, reduction="sum")
    ref = torch.autograd.grad(plain, (h, w, b))
    for chunk in (7, 1000):
        fused = linear_cross_entropy(h, w, b, t, chunk_size=chunk, reduction="sum")
        assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
        for g, r in zip(torch.autograd.grad(fused, (h, w, b)), ref, strict=True):
            assert (g - r).abs().max().item() < 1e-5
    model = tiny_model()
    ids, targets = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    targets[0, :3] = -100
    with torch.no_grad():
        summed = F.cross_entropy(model(ids).reshape(-1, 97), targets.reshape(-1), reduction="sum")
        assert model.loss(ids, targets, reduction="sum").item() == pytest.approx(summed.item(),
                                                                                 rel=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, b, t, reduction="none")


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_head_loss_is_fp32_cross_entropy_within_bf16_rounding(autocast):
    """The bf16 path (under autocast, or with bf16 weights as a bf16 model has): its loss and
    gradients against torch's fp32 cross-entropy, in unequal chunks, with ignored targets and
    a chunk with none scored; its loss is fp32 whatever the inputs."""
    h = torch.randn(70, 16, requires_grad=True)
    w = (torch.randn(300, 16) * 0.3).requires_grad_()
    b = (torch.randn(300) * 0.1).requires_grad_()
    t = torch.randint(0, 300, (70,))
    t[::6] = -100
    t[:20] = -100  # the first chunk of 20 scores nothing
    plain = F.cross_entropy(h @ w.T + b, t, ignore_index=-100)
    ref = torch.autograd.grad(plain, (h, w, b))
    for chunk in (20, 33, 1000):
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fused = linear_cross_entropy(h, w, b, t, chunk_size=chunk)
            inputs = (h, w, b)
        else:
            inputs = tuple(x.detach().bfloat16().requires_grad_() for x in (h, w, b))
            fused = linear_cross_entropy(*inputs, t, chunk_size=chunk)
        assert fused.dtype == torch.float32
        assert fused.item() == pytest.approx(plain.item(), abs=5e-3)
        grads = torch.autograd.grad(fused * 2, inputs)
        for g, r, x in zip(grads, ref, inputs, strict=True):
            assert g.dtype == x.dtype
            assert ((g.float() / 2 - r).norm() / r.norm()).item() < 1e-2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        summed = linear_cross_entropy(h, w, b, t, chunk_size=33, reduction="sum")
    want = F.cross_entropy(h @ w.T + b, t, reduction="sum").item()
    assert summed.item() == pytest.approx(want, rel=1e-3)


def test_bf16_head_loss_is_finite_and_exact_when_a_target_is_far_below_the_best_logit():
    """The bf16 path takes the loss from an fp32 softmax; a target whose probability
    underflows fp32 (a logit gap of 120 nats: e^-120 = 7.7e-53) still gets its loss, the gap
    plus the rest, as torch's cross-entropy of the same bf16 logits computes it, not inf;
    its gradient is the softmax's (1 at the winner, -1 at the target)."""
    h = torch.eye(4, 8, dtype=torch.bfloat16, requires_grad=True)  # row i picks column i
    w = torch.zeros(6, 8)
    w[0, 0], w[1, 1], w[2, 2], w[3, 3] = 120.0, 1.0, 2.0, 70.0  # (V=6, D=8)
    w = w.to(torch.bfloat16).requires_grad_()
    t = torch.tensor([5, 1, 4, 0])  # row 0: 120 nats short; row 3: 70 (p ~ 4e-31)
    loss = linear_cross_entropy(h, w, None, t, reduction="sum")
    logits = (h.detach() @ w.detach().T).float()
    want = F.cross_entropy(logits, t, reduction="sum")
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.item() > 190  # 120 + 70 from the two far targets
    loss.backward()
    assert torch.isfinite(h.grad.float()).all()
    assert h.grad[0, 0].item() == pytest.approx(w[0, 0].item() - w[5, 0].item(), rel=1e-2)


def test_bf16_head_loss_gradient_scaled_by_the_fp32_weight_not_a_rounded_one():
    """Gradient accumulation weights a micro-batch's loss by its token share (0.4987...): a
    bf16 model's (training's bf16 weight copies) hidden-state gradient is the unweighted one
    times that fp32 weight, rounded once (not times the weight rounded to bf16 first); the
    head weight's gradient stays in the weight's dtype."""
    from dtl.model.head_loss import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(64, 16, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(40, 16) * 0.3).to(torch.bfloat16).requires_grad_()
    b = torch.zeros(40, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 40, (64,))
    linear_cross_entropy(h, w, b, t).backward()
    g1, gw1 = h.grad.clone(), w.grad.clone()
    assert g1.dtype == gw1.dtype == torch.bfloat16
    h.grad = w.grad = b.grad = None
    weight = 0.4987
    (linear_cross_entropy(h, w, b, t) * weight).backward()
    assert torch.equal(h.grad, (g1.float() * weight).to(torch.bfloat16))
    assert torch.equal(w.grad, (gw1.float() * weight).to(torch.bfloat16))


def _attention_by_hand(attn, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The attention block's output with its causal attention computed in `dtype`: the
    projections in x's dtype, softmax(QK^T / sqrt(d_k)) V written out, the result rounded
    back to x's dtype before the output projection."""
    B, T, D = x.shape
    heads = [
        f(x).view(B, T, attn.n_heads, attn.d_k).transpose(1, 2).to(dtype)
        for f in (attn.w_q, attn.w_k, attn.w_v)
    ]
    q, k, v = heads  # (B, H, T, d_k)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(attn.d_k)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = (weights @ v.float()).to(x.dtype).transpose(1, 2).reshape(B, T, D)
    return attn.w_o(out)


def test_bf16_attention_on_a_cpu_runs_in_fp32_in_training_and_generation():
    """bf16 attention on a CPU is computed in fp32 (torch's bf16 CPU kernel is slower there,
    and fp32 is the more exact), training and generating alike: the output is the fp32
    computation's, rounded, not bf16's; a bf16 model's KV cache is fp32, and its cached
    steps give its full forward's logits; under autocast the bf16 kernel is kept."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(64, 2).to(torch.bfloat16)
    x = torch.randn(2, 48, 64).to(torch.bfloat16)
    train_out = attn(x)
    assert train_out.requires_grad and train_out.dtype == torch.bfloat16
    with torch.no_grad():
        exact = _attention_by_hand(attn, x, torch.float32)
        low = _attention_by_hand(attn, x, torch.bfloat16)
        infer_out = attn(x)
    err_low = float((low.float() - exact.float()).abs().max())
    for out in (train_out.detach(), infer_out):
        assert float((out.float() - exact.float()).abs().max()) <= 0.25 * err_low
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        amp_out = MultiHeadAttention(64, 2)(x.float())
    assert amp_out.dtype == torch.bfloat16
    model = TransformerLM(ModelConfig.preset("tiny", vocab_size=97)).to(torch.bfloat16).eval()
    cache = model.allocate_cache(1, 8)
    assert cache.keys[0].dtype == torch.float32
    ids = torch.tensor([[5, 3, 9, 1, 7]])
    with torch.no_grad():
        full = model(ids)[0, -1]
        model(ids[:, :4], cache=cache)
        step = model(ids[:, 4:], cache=cache)[0, -1]
    torch.testing.assert_close(step.float(), full.float(), atol=0.05, rtol=0.05)


def test_dropout_on_cpu_drops_p_of_the_values_and_scales_the_rest_unbiased():
    """`Dropout` on a CPU: in training about p of the values are zeroed (within 5 standard
    deviations of the binomial), in each of the four 16-bit lanes of its random words alike;
    the rest are x / (1 - p) with p as rounded to 1/65536, so the mean is kept; the gradient
    is the same mask and scale; the same seed gives the same mask; eval is the identity."""
    from dtl.model.transformer import Dropout

    n, p = 1 << 18, 0.1
    drop = Dropout(p).train()
    x = torch.rand(n) + 1.0  # no zeros of its own
    torch.manual_seed(0)
    x.requires_grad_()
    y = drop(x)
    zero = y == 0
    sd = math.sqrt(n * p * (1 - p))
    assert abs(zero.sum().item() - n * p) < 5 * sd
    for lane in range(4):  # element i comes from lane i % 4 of a 64-bit word
        m = n // 4
        assert abs(zero[lane::4].sum().item() - m * p) < 5 * math.sqrt(m * p * (1 - p))
    keep_p = 1 - round(p * 65536) / 65536
    assert torch.allclose(y[~zero], x.detach()[~zero] / keep_p, rtol=3e-7, atol=0)  # 1 ulp
    y.sum().backward()
    assert torch.allclose(x.grad, (~zero).float() / keep_p, rtol=3e-7, atol=0)
    torch.manual_seed(0)
    assert torch.equal(drop(x.detach()) == 0, zero)
    assert not torch.equal(drop(x.detach()) == 0, zero)  # the next draw differs
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    bf = x.detach().bfloat16()
    assert drop.train()(bf).dtype == torch.bfloat16
