"""`dtl export --format onnx`: onnxruntime runs the decoder and computes what DTL computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import SAMPLES

from dtl.export import export_model
from dtl.export.onnx import greedy
from dtl.generate import generate_tokens
from dtl.model.store import load_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

N_LAYERS = 2  # tiny_model's
TOL = dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def exported(bpe_model_dir, tmp_path_factory) -> Path:
    return export_model(bpe_model_dir, "onnx", tmp_path_factory.mktemp("x") / "tiny-onnx")


@pytest.fixture(scope="module")
def session(exported):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(exported / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])  # fmt: skip


def _past(batch: int) -> dict[str, np.ndarray]:
    """Empty past keys and values, written out here (not with the module's helper)."""
    return {f"past_key_values.{i}.{kind}": np.zeros((batch, 4, 0, 8), dtype=np.float32)
            for i in range(N_LAYERS) for kind in ("key", "value")}  # fmt: skip


def _run(session, ids, mask, past) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    feeds = {"input_ids": np.asarray(ids, dtype=np.int64),
             "attention_mask": np.asarray(mask, dtype=np.int64), **past}  # fmt: skip
    return dict(zip(names, session.run(None, feeds), strict=True))


def _presents_as_past(out) -> dict[str, np.ndarray]:
    return {k.replace("present.", "past_key_values."): v for k, v in out.items() if k != "logits"}


def test_graph_inputs_and_outputs(exported, session):
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    pasts = [f"past_key_values.{i}.{k}" for i in range(N_LAYERS) for k in ("key", "value")]
    assert inputs == ["input_ids", "attention_mask", *pasts]
    assert outputs == ["logits", *[p.replace("past_key_values", "present") for p in pasts]]
    info = json.loads((exported / "dtl_onnx.json").read_text())
    assert info["inputs"] == inputs and info["outputs"] == outputs
    assert (exported / "tokenizer.json").is_file() and (exported / "README.md").is_file()


def test_logits_equal_dtl_prefill_and_steps(session, bpe_model_dir):
    """The prompt in one call, then one token at a time through the past: every call's logits
    equal DTL's forward over the whole sequence so far."""
    model, tok = load_model(bpe_model_dir)
    ids = tok.encode(SAMPLES[1])
    prompt, rest = ids[:10], ids[10:16]
    out = _run(session, [prompt], [[1] * len(prompt)], _past(1))
    with torch.no_grad():
        full = model(torch.tensor([ids[:16]]))[0].numpy()  # (16, V)
    np.testing.assert_allclose(out["logits"][0], full[:10], **TOL)
    assert out["present.0.key"].shape == (1, 4, 10, 8)
    seen = list(prompt)
    for token in rest:
        seen.append(token)
        out = _run(session, [[token]], [[1] * len(seen)], _presents_as_past(out))
        np.testing.assert_allclose(out["logits"][0, -1], full[len(seen) - 1], **TOL)


def test_left_padded_batch_equals_rows_alone(session, bpe_model_dir):
    model, tok = load_model(bpe_model_dir)
    rows = [tok.encode(SAMPLES[1])[:20], tok.encode(SAMPLES[0])]
    T = max(map(len, rows))
    ids = [[0] * (T - len(r)) + r for r in rows]
    mask = [[0] * (T - len(r)) + [1] * len(r) for r in rows]
    out = _run(session, ids, mask, _past(2))
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = model(torch.tensor([row]))[0].numpy()
        np.testing.assert_allclose(out["logits"][i, T - len(row) :], alone, **TOL)


def test_greedy_with_past_is_dtl_greedy(session, bpe_model_dir):
    """A greedy continuation driven through the past keys/values, token for token DTL's."""
    model, tok = load_model(bpe_model_dir)
    for text in SAMPLES[:3]:
        prompt = tok.encode(text)
        expected = generate_tokens(model, torch.tensor([prompt]), max_new_tokens=12,
                                   temperature=0)[0].tolist()  # fmt: skip
        tokens = list(prompt)
        out = _run(session, [prompt], [[1] * len(prompt)], _past(1))
        for _ in range(12):
            tokens.append(int(out["logits"][0, -1].argmax()))
            out = _run(session, [[tokens[-1]]], [[1] * len(tokens)], _presents_as_past(out))
        assert tokens == expected, text
        assert greedy(session, prompt, 12) == expected  # the helper users are shown


def test_export_leaves_the_model_in_eval_mode(tmp_path):
    """torch.onnx.export restores the mode of what it traced: the model must come back in
    eval mode (dropout off), or whatever runs it next gets noisy logits."""
    from export_helpers import tiny_model

    from dtl.export.onnx import export_onnx

    model = tiny_model(50)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids)
    export_onnx(model, tmp_path / "m.onnx")
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
