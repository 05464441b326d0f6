"""`dtl export --format hf`: transformers loads the folder and computes what DTL computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from export_helpers import SAMPLES, tiny_model

from dtl.export import export_model
from dtl.generate import generate_tokens
from dtl.model.store import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(bpe_model_dir, tmp_path_factory) -> Path:
    return export_model(bpe_model_dir, "hf", tmp_path_factory.mktemp("x") / "tiny-hf")


def _hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, local_files_only=True
    ).eval()


def _hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_logits_equal_dtl(exported, bpe_model_dir):
    model, tok = load_model(bpe_model_dir)
    hf = _hf_model(exported)
    assert type(hf).__name__ == "DtlForCausalLM"
    a, b = tok.encode(SAMPLES[1]), tok.encode(SAMPLES[2])
    n = min(len(a), len(b))
    ids = torch.tensor([a[:n], b[:n]])  # two rows, no padding
    with torch.no_grad():
        expected = model(ids)
        got = hf(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_padded_batch_logits_equal_dtl(exported, bpe_model_dir):
    """Left padding: each row's real tokens get the logits DTL gives them (positions count
    real tokens), and DTL's padded batch equals the rows alone."""
    model, tok = load_model(bpe_model_dir)
    hf = _hf_model(exported)
    rows = [tok.encode(SAMPLES[1]), tok.encode(SAMPLES[0])]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        got = hf(ids, attention_mask=mask).logits
        short = model(torch.tensor([rows[1]]))[0]
        expected = model(ids, mask)
    n = len(rows[1])
    torch.testing.assert_close(got[1, -n:], short, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


def test_generate_with_kv_cache_is_dtl_greedy(exported, bpe_model_dir):
    model, tok = load_model(bpe_model_dir)
    hf = _hf_model(exported)
    for text in SAMPLES[:3]:
        ids = torch.tensor([tok.encode(text)])
        expected = generate_tokens(model, ids, max_new_tokens=12, temperature=0)
        got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                          do_sample=False, use_cache=True, eos_token_id=None)  # fmt: skip
        assert got.tolist() == expected.tolist()


def test_generate_left_padded_batch_is_dtl_greedy(exported, bpe_model_dir):
    model, tok = load_model(bpe_model_dir)
    hf = _hf_model(exported)
    rows = [tok.encode(SAMPLES[1]), tok.encode(SAMPLES[0])]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                      use_cache=True, eos_token_id=None, pad_token_id=0)  # fmt: skip
    for i, row in enumerate(rows):  # each row as DTL continues it alone
        alone = generate_tokens(model, torch.tensor([row]), max_new_tokens=12, temperature=0)
        assert got[i, T:].tolist() == alone[0, len(row) :].tolist()


def test_tokenizer_encodes_and_decodes_as_dtl(exported, bpe_model_dir):
    _, tok = load_model(bpe_model_dir)
    hf_tok = _hf_tokenizer(exported)
    assert hf_tok.is_fast
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.eos_id
    for text in SAMPLES[:-1]:
        ids = hf_tok(text).input_ids
        assert ids == tok.encode(text), text
        assert hf_tok.decode(ids) == tok.decode(ids) == text


def test_gpt2_tokenizer_exports_as_gpt2(gpt2, tmp_path):
    """A model on GPT-2's vocabulary: its tokenizer.json encodes as GPT-2 (tiktoken) does."""
    model = tiny_model(gpt2.vocab_size)
    model.save_pretrained(tmp_path / "m")
    gpt2.save(tmp_path / "m")
    out = export_model(tmp_path / "m", "hf", tmp_path / "gpt2-hf")
    hf_tok = _hf_tokenizer(out)
    assert hf_tok.eos_token_id == 50256
    for text in SAMPLES[:-1]:
        assert hf_tok(text).input_ids == gpt2.encode(text), text
    assert hf_tok.decode([15496, 995]) == "Hello world"


def test_folder_loads_offline_without_dtl(exported, bpe_model_dir):
    """A user with transformers and no dtl, offline: the folder loads and generates. Run in a
    fresh interpreter where `import dtl` fails and HF_HUB_OFFLINE=1."""
    script = f"""
import importlib.abc, json, sys
class NoDtl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "dtl" or name.startswith("dtl."):
            raise ImportError("dtl is not installed here")
sys.meta_path.insert(0, NoDtl())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(exported)!r})
ids = tok({SAMPLES[1]!r}, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
assert not any(m == "dtl" or m.startswith("dtl.") for m in sys.modules)
open(sys.argv[1], "w").write(json.dumps(out[0].tolist()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(exported.parent / "hf-home")}  # fmt: skip
    env.pop("PYTHONPATH", None)
    answer = exported.parent / "answer.json"
    result = subprocess.run([sys.executable, "-c", script, str(answer)], capture_output=True, text=True,
                            env=env, stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    model, tok = load_model(bpe_model_dir)
    ids = torch.tensor([tok.encode(SAMPLES[1])])
    expected = generate_tokens(model, ids, max_new_tokens=8, temperature=0)
    assert json.loads(answer.read_text()) == expected[0].tolist()


def test_the_tokenizer_loads_without_remote_code_as_the_card_says(exported, bpe_model_dir):
    """The card's own example, run as written beside the folder in a fresh interpreter whose
    stdin is a pipe holding "n" (not a terminal): the model loads with trust_remote_code=True,
    the tokenizer with none, and no question about remote code is asked. The tokenizer
    encodes as DTL's; `AutoTokenizer.from_pretrained(folder)` with no trust_remote_code gives
    the same ids (transformers 5 first asks about config.json's code; "n" goes on). No
    documented line passes trust_remote_code to a tokenizer: it runs no code."""
    import re

    card = (exported / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "PreTrainedTokenizerFast.from_pretrained" in example
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for text in (example, readme):
        for line in text.splitlines():
            assert not ("Tokenizer" in line and "trust_remote_code" in line), line
    sample = SAMPLES[1]
    script = example + f"""
import json, sys
from transformers import AutoTokenizer
print("-- the card's example ran", flush=True)
auto = AutoTokenizer.from_pretrained({exported.name!r})
json.dump([tokenizer({sample!r}).input_ids, auto({sample!r}).input_ids], open(sys.argv[1], "w"))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(exported.parent / "hf-home")}
    answer = exported.parent / "tokenized.json"
    result = subprocess.run([sys.executable, "-c", script, str(answer)], input="n\n", text=True,
                            capture_output=True, cwd=exported.parent, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    before = result.stdout.split("-- the card's example ran")[0]
    assert "custom code" not in before and "trust_remote_code" not in before + result.stderr
    _, tok = load_model(bpe_model_dir)
    assert json.loads(answer.read_text()) == [tok.encode(sample)] * 2


def test_folder_files_config_and_card(run_dir, tmp_path):
    out = export_model(run_dir, "hf", tmp_path / "tiny-hf")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "README.md", "config.json", "configuration_dtl.py", "generation_config.json",
        "model.safetensors", "modeling_dtl.py", "tokenizer.json", "tokenizer_config.json",
    ])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dtl"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dtl.DtlForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_dtl.DtlConfig"
    assert (config["d_model"], config["n_layers"], config["trained_seq_len"]) == (32, 2, 48)
    assert (
        json.loads((out / "generation_config.json").read_text())["eos_token_id"]
        == (config["eos_token_id"])
    )
    for code in ("configuration_dtl.py", "modeling_dtl.py"):  # no dtl needed to load it
        text = (out / code).read_text()
        assert "import dtl" not in text and "from dtl" not in text
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])  # the Hub's metadata
    assert front["library_name"] == "transformers" and "custom_code" in front["tags"]
    assert "# tiny-hf" in card and "`notes.txt`" in card
    # the checkpoint is step 20: its figures, not the ones logged later at step 30
    assert "step 20" in card and "tokens seen: 3,840" in card
    assert "validation loss 3.7500, perplexity 42.52 (step 20)" in card
    assert "5,760" not in card and "3.2500" not in card


def test_transformers_round_trip_keeps_weights(exported, tmp_path):
    """save_pretrained of the loaded model (what push_to_hub uploads) loads back equal."""
    hf = _hf_model(exported)
    hf.save_pretrained(tmp_path / "again")
    again = _hf_model(tmp_path / "again")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_labels_loss_is_dtl_loss_and_no_cache_generate_agrees(exported, bpe_model_dir):
    """What fine-tuning with transformers relies on: `labels=input_ids` gives DTL's
    next-token loss; and generate() without the cache draws what it draws with it."""
    model, tok = load_model(bpe_model_dir)
    hf = _hf_model(exported)
    ids = torch.tensor([tok.encode(SAMPLES[1])])
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, labels=ids).loss, model.loss(ids, targets),
                                   atol=1e-5, rtol=0)  # fmt: skip
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert hf.generate(ids, use_cache=False, **kw).tolist() == hf.generate(ids, **kw).tolist()


def test_legacy_pt_exports_with_gpt2_tokenizer(gpt2, tmp_path):
    """A .pt from the original DTL scripts (read with GPT-2's tokenizer, as dtl generate
    reads it) exports too, and its card says no run came with it."""
    legacy = tiny_model(gpt2.vocab_size, seed=3)
    torch.save({"model_state_dict": legacy.state_dict(), "epoch": 4}, tmp_path / "best.pt")
    out = export_model(tmp_path / "best.pt", "hf", tmp_path / "legacy-hf")
    hf = _hf_model(out)
    ids = torch.tensor([gpt2.encode(SAMPLES[1])])
    model, _ = load_model(tmp_path / "best.pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)
    assert _hf_tokenizer(out)(SAMPLES[1]).input_ids == ids[0].tolist()
    card = (out / "README.md").read_text()
    assert "No run dir came with this model" in card and "MIT" in card


def test_card_metadata_reads_as_the_hub_reads_it(exported):
    """huggingface_hub's own parser (what push_to_hub and the Hub use) reads the front matter."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "other"
    assert "custom_code" in card.data.tags
