"""dtl.generate.decode: a one-token step on the CPU plan must be the model's own maths, whatever
the layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtl import ModelConfig, TransformerLM
from dtl.errors import DtlError
from dtl.generate.decode import (
    PackedLinear,
    SplitLinear,
    plan_for,
    split_for,
    uses_fast_path,
)


def decode_step(model: TransformerLM, tokens: torch.Tensor, cache) -> torch.Tensor:
    """One token per row through the cache, on the model's own forward with the CPU plan."""
    return model(tokens, cache=cache, last_only=True, layout=plan_for(model))[:, -1]


def odd_model(seed: int = 0, d_model: int = 24) -> TransformerLM:
    """Sizes that the splits do not divide evenly: vocab 101, d_ff 72, 3 heads (d_model 15:
    no row split either, so every product is cut in zero-padded column blocks)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=101, d_model=d_model, n_heads=3, n_layers=3, d_ff=72,
                         max_seq_length=40)  # fmt: skip
    return TransformerLM(config).eval()


@pytest.mark.parametrize("by_rows", [False, True])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("outs", [(13, 7), (300, 270)])  # the second: blocks span slabs of rows
def test_split_linear_equals_f_linear(by_rows, parts, batch, outs):
    torch.manual_seed(parts)
    weights = [torch.randn(n, 24) for n in outs]  # two fused along out, in 24
    biases = [torch.randn(n) for n in outs]
    x = torch.randn(batch, 24)
    want = F.linear(x, torch.cat(weights), torch.cat(biases))  # the oracle: PyTorch's own
    got = SplitLinear.of(weights, biases, parts, by_rows=by_rows)(x)
    assert got.shape == (batch, sum(outs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("batch", [2, 5])
def test_packed_linear_equals_f_linear(relu, batch):
    torch.manual_seed(batch)
    weights = [torch.randn(n, 24) for n in (13, 300)]  # two fused along out, in 24
    biases = [torch.randn(n) for n in (13, 300)]
    x = torch.randn(batch, 24)
    want = F.linear(x, torch.cat(weights), torch.cat(biases))  # the oracle: PyTorch's own
    packed = PackedLinear.of(weights, biases, relu=relu)
    assert packed is not None  # this torch has oneDNN (torch's CPU wheels do)
    torch.testing.assert_close(packed(x), want.relu() if relu else want, rtol=1e-5, atol=1e-5)


def test_several_rows_take_their_own_layout_and_one_row_keeps_its_own():
    """A batch steps on the oneDNN-packed products, made on first use; one row on the split
    layouts, bit for bit what it was."""
    model = odd_model()
    plan = plan_for(model)
    assert plan.several is None  # nothing made for batches until one comes
    one, several = plan.for_rows(1), plan.for_rows(3)
    assert one is plan.one_row and plan.for_rows(8) is several
    assert isinstance(one.head, SplitLinear) and isinstance(several.head, PackedLinear)
    assert all(isinstance(b.qkv, PackedLinear) and b.up.relu for b in several.blocks)
    ids = torch.tensor([[4, 8, 15], [16, 23, 42]])
    with torch.no_grad():
        h = model.hidden_states(ids)[:, -1]  # (2, d)
        want = model.head(h)
        torch.testing.assert_close(plan.head(h), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(plan.head(h[:1]), one.head(h[:1]))


def test_without_onednn_a_batch_keeps_the_split_blocks(monkeypatch):
    """A torch without oneDNN (or one that cannot pack the dtype): batches step on the one-row
    blocks with a head of column blocks, and still equal the model's own head."""
    monkeypatch.setattr(PackedLinear, "of", classmethod(lambda cls, *a, **k: None))
    model = odd_model()
    plan = plan_for(model)
    several = plan.for_rows(4)
    assert several.blocks is plan.one_row.blocks and isinstance(several.head, SplitLinear)
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]))[:, -1]
        torch.testing.assert_close(several.head(h), model.head(h), rtol=1e-5, atol=1e-5)


def test_split_for_cuts_rows_only_where_they_divide():
    widening = split_for([torch.randn(30, 8)], [torch.zeros(30)], threads=2)
    narrowing = split_for([torch.randn(8, 30)], [torch.zeros(8)], threads=2)
    odd_input = split_for([torch.randn(30, 7)], [torch.zeros(30)], threads=2)
    assert widening.by_rows and not narrowing.by_rows and not odd_input.by_rows


@pytest.mark.parametrize("d_model", [24, 15])
def test_decode_steps_equal_the_full_forward_with_padding(d_model):
    """Left-padded rows of different lengths, several steps: each step's logits equal the
    model run on the whole context without a cache (an independent path through model.py)."""
    model = odd_model(d_model=d_model)
    ids = torch.tensor([[0, 0, 5, 9, 14], [3, 1, 4, 1, 5], [0, 0, 0, 0, 7]])
    mask = (torch.arange(5)[None] >= torch.tensor([[2], [0], [4]])).long()
    steps = torch.tensor([[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        cache = model.allocate_cache(3, 16)
        model(ids, mask, cache=cache, last_only=True)
        context, context_mask = ids, mask
        for t in range(steps.size(1)):
            token = steps[:, t : t + 1]
            got = decode_step(model, token, cache)
            context = torch.cat([context, token], 1)
            context_mask = torch.cat([context_mask, torch.ones_like(token)], 1)
            want = model(context, context_mask)[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert cache.length == 5 + steps.size(1)


def test_the_plan_follows_weight_changes():
    model, other = odd_model(0), odd_model(1)
    ids = torch.tensor([[1, 2, 3]])

    def step():
        cache = model.allocate_cache(1, 8)
        model(ids[:, :2], cache=cache)
        return decode_step(model, ids[:, 2:], cache)

    with torch.no_grad():
        first = plan_for(model)
        assert plan_for(model) is first  # unchanged weights: the same plan, no rebuild
        model.load_state_dict(other.state_dict())  # copies in place: a new _version
        torch.testing.assert_close(step(), other(ids)[:, -1], rtol=1e-5, atol=1e-5)
        model.transformer_blocks[1].feed_forward.linear2.weight = torch.nn.Parameter(
            torch.zeros(24, 72)
        )  # a replaced parameter, too
        torch.testing.assert_close(step(), model(ids)[:, -1], rtol=1e-5, atol=1e-5)
        for p, q in zip(model.parameters(), odd_model(2).parameters(), strict=True):
            p.data.copy_(q)  # `.data` writes bump no version counter: the samples see them
        torch.testing.assert_close(step(), model(ids)[:, -1], rtol=1e-5, atol=1e-5)


def test_the_plan_follows_training_with_dtls_fused_adamw():
    """The CPU fused AdamW step updates parameters without bumping their version counters."""
    from dtl.train.optim import build_optimizer

    model = odd_model()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    with torch.no_grad():
        plan_for(model)  # a plan of the untrained weights
    for _ in range(3):
        model.train()
        model.loss(ids, ids.roll(-1, 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        cache = model.allocate_cache(1, 8)
        model(ids[:, :5], cache=cache)
        got = decode_step(model, ids[:, 5:], cache)
        torch.testing.assert_close(got, model(ids)[:, -1], rtol=1e-5, atol=1e-5)


def test_a_full_cache_is_a_clear_error():
    model = odd_model()
    with torch.no_grad():
        cache = model.allocate_cache(1, 3)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(DtlError, match="KV cache is full"):
            decode_step(model, torch.tensor([[4]]), cache)


def test_training_mode_with_dropout_keeps_the_models_path():
    model = TransformerLM(ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1,
                                      d_ff=32, max_seq_length=8, dropout=0.1))  # fmt: skip
    assert not uses_fast_path(model.train())
    assert uses_fast_path(model.eval())


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_lean_step_is_the_forward_bit_for_bit(dtype, rows):
    """`DecodePlan.eager_step` (what the token loop calls where DTL's step kernel does not
    run) against the model's own forward with the
    plan as its layout: the same logits and the same cache, bit for bit, step after step,
    with left padding in the batch (its mask and positions) and without (one row)."""
    from dtl.model.dtype import to_inference_dtype

    model = to_inference_dtype(odd_model(d_model=24), dtype)
    plan = plan_for(model)
    ids = torch.tensor([[0, 0, 5, 9, 14], [3, 1, 4, 1, 5], [0, 0, 0, 0, 7]])[:rows]
    mask = (torch.arange(5)[None] >= torch.tensor([[2], [0], [4]])[:rows]).long()
    mask = None if rows == 1 else mask
    with torch.no_grad():
        lean, full = model.allocate_cache(rows, 12), model.allocate_cache(rows, 12)
        for cache in (lean, full):
            model(ids, mask, cache=cache, last_only=True, layout=plan)
        for t in range(7):
            token = torch.tensor([11, 40, 2])[:rows] + t
            got = plan.eager_step(model, token, lean)
            want = model(token[:, None], cache=full, last_only=True, layout=plan)[:, -1]
            assert got.dtype == torch.float32 and torch.equal(got, want), f"step {t}"
        assert lean.length == full.length == 12 and lean.has_padding == (rows > 1)
        assert torch.equal(lean.key_mask, full.key_mask)
        for a, b in zip(lean.keys + lean.values, full.keys + full.values, strict=True):
            assert torch.equal(a, b)
        with pytest.raises(DtlError, match="KV cache is full"):
            plan.eager_step(model, token, lean)


def test_the_lean_step_syncs_nothing_and_copies_no_cache():
    """A step reads no value back to the host (the forward's input check did, twice) and
    writes the KV cache in place (no cat, no new cache tensors): the loop's one host sync
    per step is its own end-of-text check."""
    from torch.profiler import profile

    model = odd_model()
    plan = plan_for(model)
    with torch.no_grad():
        cache = model.allocate_cache(2, 12)
        model(torch.tensor([[0, 5, 9], [3, 1, 4]]), torch.tensor([[0, 1, 1], [1, 1, 1]]),
              cache=cache, layout=plan)  # fmt: skip
        plan.step(model, torch.tensor([7, 8]), cache)  # the frame is made on the first step
        with profile() as lean:
            plan.step(model, torch.tensor([7, 8]), cache)
        with profile() as full:
            model(torch.tensor([[7], [8]]), cache=cache, last_only=True, layout=plan)
    names = [e.name for e in lean.events()]
    assert "aten::_local_scalar_dense" not in names and "aten::cat" not in names
    assert "aten::_local_scalar_dense" in [e.name for e in full.events()]  # the check's syncs
    top = [e for e in lean.events() if e.cpu_parent is None]
    assert len(top) < 0.75 * sum(e.cpu_parent is None for e in full.events())


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_one_row_step_runs_its_blocks_on_one_thread_and_the_head_on_all(dtype, monkeypatch):
    """Where idle threads sleep, one row's block products are too short to share between
    threads (each wake-up costs more than it saves); the head, the large product, keeps every
    thread. The caller's thread count is restored after the step, also when a product fails.
    Where idle threads spin (the decode verbs), the blocks keep every thread."""
    from dtl.model.dtype import to_inference_dtype

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    spinning = to_inference_dtype(odd_model(), dtype)
    model = to_inference_dtype(odd_model(), dtype)
    plan = plan_for(model)
    seen: list[tuple[str, int]] = []

    def spy(name, product):
        def call(x):
            seen.append((name, torch.get_num_threads()))
            return product(x)

        return call

    layout = plan.one_row
    block = layout.blocks[1]
    block.qkv, block.linear2 = spy("qkv", block.qkv), spy("linear2", block.linear2)
    layout.head = spy("head", layout.head)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            cache = model.allocate_cache(1, 12)
            model(torch.tensor([[3, 1, 4]]), cache=cache, last_only=True, layout=plan)
            seen.clear()
            plan.eager_step(model, torch.tensor([5]), cache)
            assert seen == [("qkv", 1), ("linear2", 1), ("head", 2)]
            assert torch.get_num_threads() == 2
            block.qkv = lambda x: 1 / 0
            with pytest.raises(ZeroDivisionError):
                plan.eager_step(model, torch.tensor([5]), cache)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "2000")
    assert plan_for(spinning).one_row.block_threads is None
