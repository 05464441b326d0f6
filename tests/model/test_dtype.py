"""`--dtype`: the one rule that picks the inference format (`resolve_inference_dtype`, with the
CPU's native-bf16 detection faked both ways), the one conversion (`to_inference_dtype`), the
decode plan in that format (an int8 model's one-token steps run its int8 weights), fp32
logits, and the quality bound on a trained model's held-out text."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtl import DtlError, ModelConfig, TransformerLM
from dtl.device import cpu_has_native_bf16  # the real one: conftest fakes the module's name
from dtl.generate import generate_tokens
from dtl.generate.decode import Int8Linear, PackedLinear, plan_for
from dtl.generate.evaluate import evaluate_lm
from dtl.model.dtype import (
    inference_dtype_of,
    is_int8_linear,
    resolve_inference_dtype,
    to_inference_dtype,
)
from dtl.model.store import load_model


def tiny(vocab_size: int = 211) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=32)  # fmt: skip
    return TransformerLM(config).eval()


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_int8_on_a_cpu_with_native_bf16_and_fp32_elsewhere(monkeypatch, native):
    monkeypatch.setattr("dtl.device.cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert resolve_inference_dtype("auto", "cpu") == ("int8" if native else "fp32")
    assert resolve_inference_dtype("auto", torch.device("cuda")) == "fp32"  # CPU flags only
    assert resolve_inference_dtype("auto", "mps") == "fp32"
    for name in ("fp32", "bf16", "int8"):  # asked for: as asked, whatever the CPU
        assert resolve_inference_dtype(name, "cpu") == name


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")  # AMX
    assert not cpu_has_native_bf16("flags : fpu sse avx2 avx512f avx512bw\n")  # AVX-512 alone
    assert not cpu_has_native_bf16("model name : avx512_bf16 in a name is no flag\n")
    assert not cpu_has_native_bf16("")


def test_bad_names_and_int8_off_the_cpu_are_one_line_errors():
    with pytest.raises(DtlError, match=r"--dtype fp16: not a format; choose one of auto, fp32"):
        resolve_inference_dtype("fp16", "cpu")
    with pytest.raises(DtlError, match="--dtype int8 runs on the CPU only"):
        resolve_inference_dtype("int8", torch.device("cuda"))


def test_bf16_runs_weights_in_bf16_and_returns_fp32_logits():
    ref = tiny()
    model = to_inference_dtype(tiny(), "bf16")
    assert inference_dtype_of(model) == "bf16" and inference_dtype_of(ref) == "fp32"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # on a CPU the cache is fp32: attention runs there in fp32 (`attention_dtype`)
    assert model.allocate_cache(1, 4).keys[0].dtype == torch.float32
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    logits = model(ids)
    assert logits.dtype == torch.float32  # sampling and log-probs are computed in fp32
    torch.testing.assert_close(logits, ref(ids), atol=0.05, rtol=0.05)
    # the decode plan holds bf16 weights (half the bytes a step streams), packed for oneDNN,
    # and gives what the bf16 model's own layers give, to bf16 rounding
    plan = plan_for(model)
    for product in (plan.blocks[0].qkv, plan.blocks[1].up, plan.blocks[1].linear2,
                    plan.for_rows(1).head):  # fmt: skip
        assert isinstance(product, PackedLinear) and product.weight.dtype == torch.bfloat16
    assert plan.blocks[1].up.relu  # the FFN's ReLU fused into its up-projection
    one, several = plan.for_rows(1), plan.for_rows(8)  # one packed copy for any rows:
    assert several.blocks is one.blocks and several.head is one.head  # no second copy
    a, b = model.allocate_cache(1, 8), model.allocate_cache(1, 8)
    with torch.no_grad():
        model(ids, cache=a), model(ids, cache=b)
        step = model(torch.tensor([[2]]), cache=a, last_only=True, layout=plan)
        plain = model(torch.tensor([[2]]), cache=b, last_only=True)
    assert step.dtype == torch.float32
    torch.testing.assert_close(step, plain, atol=0.03, rtol=0.02)


def test_int8_quantizes_every_linear_layer_and_the_head_per_channel():
    ref = tiny()
    model = to_inference_dtype(tiny(), "int8")
    assert inference_dtype_of(model) == "int8"
    block = model.transformer_blocks[0]
    linears = [block.attention.w_q, block.attention.w_k, block.attention.w_v,
               block.attention.w_o, block.feed_forward.linear1, block.feed_forward.linear2,
               model.head]  # fmt: skip
    assert all(is_int8_linear(m) for m in linears)
    assert model.num_parameters() == ref.num_parameters()  # packed weights still count
    # the oracle: symmetric int8 with one scale per output row, |w| max / 127.5, and every
    # weight within half a step of its int8 value
    w, q = ref.head.weight.detach(), model.head.weight()
    scale = w.abs().amax(1) / 127.5
    torch.testing.assert_close(q.q_per_channel_scales().float(), scale, rtol=1e-5, atol=0)
    assert bool(((q.dequantize() - w).abs() <= scale[:, None] * 0.5001).all())
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    logits = model(ids)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref(ids), atol=0.05, rtol=0.05)
    # the fused, chunked loss falls back to the int8 head; the sum equals F.cross_entropy's
    with torch.no_grad():
        total = model.loss(ids, ids, reduction="sum")
        oracle = F.cross_entropy(model(ids)[0], ids[0], reduction="sum")
    torch.testing.assert_close(total, oracle)


def _packed(layer: torch.nn.Module):
    assert is_int8_linear(layer)
    return layer._packed_params._packed_params


def test_int8_one_token_steps_run_the_int8_weights(monkeypatch):
    """The eager decode plan of an int8 model runs its own fbgemm layers. (Where DTL's step
    kernel runs, steps take its copy of the same int8 weights and scales instead:
    tests/generate/test_step_kernel.py checks it against the dequantized weights. So here the
    kernel is off, for the token loop's part below.)"""
    from dtl.generate import step_kernel

    monkeypatch.setattr(step_kernel, "_BUILD", step_kernel._Build(why_not="off in this test"))
    fp32 = tiny()
    model = to_inference_dtype(tiny(), "int8")
    plan = plan_for(model)
    for bp, block in zip(plan.blocks, model.transformer_blocks, strict=True):
        # the model's own int8 layers' packed weights, called as their fbgemm op, not a copy
        own = [block.attention.w_o, block.feed_forward.linear1, block.feed_forward.linear2]
        for product, layer in zip((bp.w_o, bp.up, bp.linear2), own, strict=True):
            assert isinstance(product, Int8Linear) and product.packed is _packed(layer)
        assert bp.up.relu and not bp.w_o.relu  # the FFN's ReLU fused into its up-projection
        x = torch.randn(3, 32)
        f = block.feed_forward
        assert torch.equal(bp.up(x), f.linear1(x).relu())
        assert torch.equal(bp.linear2(bp.up(x)), f.linear2(f.linear1(x).relu()))
        x = torch.randn(3, 32)
        a = block.attention  # Q, K and V fused: each part is its own int8 layer's output
        torch.testing.assert_close(bp.qkv(x), torch.cat([a.w_q(x), a.w_k(x), a.w_v(x)], 1),
                                   atol=0, rtol=0)  # fmt: skip
    assert plan.for_rows(1).head.packed is _packed(model.head)
    assert plan.for_rows(8).blocks is plan.for_rows(1).blocks  # the same int8 layers
    prompt = torch.tensor([[3, 1, 4], [1, 5, 9]])
    caches = [m.allocate_cache(2, 8) for m in (model, model, fp32)]
    with torch.no_grad():
        for m, c in zip((model, model, fp32), caches, strict=True):
            m(prompt, cache=c)
        nxt = torch.tensor([[2], [6]])
        step = model(nxt, cache=caches[0], last_only=True, layout=plan)
        plain = model(nxt, cache=caches[1], last_only=True)
        exact = fp32(nxt, cache=caches[2], last_only=True, layout=plan_for(fp32))
    torch.testing.assert_close(step, plain, atol=0, rtol=0)  # the int8 layers, to the bit
    assert not torch.equal(step, exact)  # and not fp32 weights
    # the token loop takes the same path
    out = generate_tokens(model, prompt, 5, temperature=0)
    ref = generate_tokens(model, prompt, 5, temperature=0, use_cache=False)
    assert torch.equal(out, ref)


def test_perplexity_of_bf16_and_int8_within_the_bound_of_fp32(trained_run):
    """The quality bound: on held-out text, bf16 within 1% of fp32's perplexity, int8 within
    3%. fp32's is checked against F.cross_entropy of the plain forward first."""
    text = (trained_run.parent / "held_out.txt").read_text()
    ppl = {}
    for dtype in ("fp32", "bf16", "int8"):
        model, tok = load_model(trained_run, dtype=dtype)
        assert inference_dtype_of(model) == dtype
        ppl[dtype] = evaluate_lm(model, tok, [text], 8, None, False)["perplexity"]
        if dtype == "fp32":
            ids = torch.tensor(tok.encode(text)[:65])
            with torch.no_grad():
                nll = F.cross_entropy(model(ids[None, :-1])[0], ids[1:])
            assert float(nll.exp()) < 150  # trained: far below the 512-token vocabulary's
    assert abs(ppl["bf16"] / ppl["fp32"] - 1) < 0.01, ppl
    assert abs(ppl["int8"] / ppl["fp32"] - 1) < 0.03, ppl
