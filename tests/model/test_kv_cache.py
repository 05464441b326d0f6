"""The KV cache changes only through its own methods, and what they make is what the rows alone
give: the oracle is always the plain forward of each row's real tokens, with no cache."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import dtl
from dtl import KVCache, ModelConfig, TransformerLM
from dtl.model.transformer import attention_mask_and_positions

TINY = dict(vocab_size=97, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_length=40)


def tiny_model() -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**TINY))
    with torch.no_grad():  # non-zero biases and norms, so the tests see them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def alone(model: TransformerLM, tokens: list[int]) -> torch.Tensor:
    """The oracle: the next-token logits (V,) of `tokens` through the plain forward."""
    return model(torch.tensor([tokens]))[0, -1]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = torch.tensor(r), 1
    return ids, mask


def test_mask_and_positions_hand_computed():
    """Two new tokens after two cached ones; row 0's first slot is padding."""
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    mask, pos = attention_mask_and_positions(2, 2, valid)
    assert mask.shape == (2, 1, 2, 4)
    # slot 2 sees slots 1, 2 (not the padding, not the future); slot 3 sees 1, 2, 3
    assert mask[0, 0].int().tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert pos.tolist() == [[1, 2], [2, 3]]  # real tokens before each
    # a padding query still sees itself (an all-masked row would be NaN)
    mask, pos = attention_mask_and_positions(0, 2, torch.tensor([[False, True]]))
    assert mask[0, 0].int().tolist() == [[1, 0], [0, 1]] and pos.tolist() == [[0, 0]]
    causal, none = attention_mask_and_positions(1, 2)  # no padding: causal only, no positions
    assert causal.shape == (1, 1, 2, 3) and none is None
    assert causal[0, 0].int().tolist() == [[1, 1, 0], [1, 1, 1]]


def test_a_forward_changes_the_cache_through_its_methods():
    """write_mask, append, advance by hand: what a forward does to the cache, step by step."""
    cache = KVCache.allocate(ModelConfig(**TINY), batch_size=2, max_len=5)
    assert cache.write_mask(None, 2) is None  # no padding yet: the fast paths
    k, v = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8)
    for layer in range(2):
        keys, values = cache.append(layer, k, v)
        assert torch.equal(keys, k) and torch.equal(values, v)
    assert cache.length == 0  # not until every layer has appended
    cache.advance(2)
    valid = cache.write_mask(torch.tensor([[True], [False]]), 1)
    assert valid.tolist() == [[True, True, True], [True, True, False]] and cache.has_padding
    k2 = torch.randn(2, 4, 1, 8)
    keys, _ = cache.append(0, k2, k2)
    assert keys.shape == (2, 4, 3, 8) and torch.equal(keys[:, :, :2], k)
    assert torch.equal(keys[:, :, 2:], k2)
    cache.advance(1)
    assert cache.length == 3


@torch.no_grad()
def test_keep_rows_gives_what_the_kept_rows_give_alone():
    model = tiny_model()
    rows = [[5, 6, 7], [1, 2, 3, 4, 5, 6], [9, 8, 7, 6]]
    ids, mask = left_padded(rows)
    cache = model.allocate_cache(3, 12)
    model(ids, attention_mask=mask, cache=cache)
    kept = cache.keep_rows([0, 2])  # the longest row leaves: its 2 leading slots go with it
    assert kept.batch_size == 2 and kept.length == 4 and kept.has_padding
    out = model(torch.tensor([[11], [12]]), cache=kept)[:, -1]  # (2, V)
    assert kept.length == 5 and cache.length == 6  # the source cache is not changed
    assert torch.allclose(out[0], alone(model, rows[0] + [11]), atol=1e-5)
    assert torch.allclose(out[1], alone(model, rows[2] + [12]), atol=1e-5)
    solo = cache.keep_rows(torch.tensor([1]))  # the longest alone: no padding left
    assert solo.length == 6 and not solo.has_padding


@torch.no_grad()
def test_merge_gives_what_each_row_gives_alone_and_keeps_room():
    model = tiny_model()
    a, b = [3, 1, 4, 1, 5], [2, 7, 1]
    first = model.allocate_cache(1, 5)
    model(torch.tensor([a]), cache=first)
    second = model.allocate_cache(1, 3)
    model(torch.tensor([b]), cache=second)
    merged = KVCache.merge([first, second], room=3)
    assert merged.batch_size == 2 and merged.length == 5 and merged.max_len == 8
    assert merged.has_padding and merged.key_mask[1].tolist() == [False, False] + [True] * 6
    seq_a, seq_b = list(a), list(b)
    for token_a, token_b in ((9, 8), (10, 11), (12, 13)):  # every slot of the room
        out = model(torch.tensor([[token_a], [token_b]]), cache=merged)[:, -1]
        seq_a.append(token_a)
        seq_b.append(token_b)
        assert torch.allclose(out[0], alone(model, seq_a), atol=1e-5)
        assert torch.allclose(out[1], alone(model, seq_b), atol=1e-5)
    assert merged.length == 8


CACHE_FIELDS = {"length", "has_padding", "key_mask", "keys", "values"}


def _cache_field(node: ast.AST) -> str | None:
    """The KVCache field an assignment target writes (`x.length`, `x.key_mask[...]`,
    `x.keys[i][...]`, on an object whose name says cache), else None."""
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute) and node.attr in CACHE_FIELDS:
        owner = node.value
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if "cache" in name.lower():
            return node.attr
    return None


def test_only_the_cache_assigns_its_fields():
    """One owner of the cache's state: no other module of dtl writes a KVCache field."""
    package = Path(dtl.__file__).parent
    writes = []
    for path in package.rglob("*.py"):
        if path.name == "kv_cache.py" or "hf_remote" in path.parts:  # hf_remote runs without dtl
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            writes += [f"{path.relative_to(package)}:{node.lineno} .{field}"
                       for t in targets if (field := _cache_field(t))]  # fmt: skip
    assert writes == []
