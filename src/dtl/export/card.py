"""The model card (README.md) of an exported folder: what the run trained on and reached.

Read from the run dir around the exported checkpoint (`config.yaml`, `metrics.jsonl`) when
there is one; a bare model dir or a legacy `.pt` gets a card with the sizes only.

>>> facts = run_facts(Path("runs/tiny/checkpoints/step-6"))  # 6 steps of 2 rows of 64 tokens
>>> facts.tokens_seen, facts.val_loss  # doctest: +ELLIPSIS
(768, ...)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtl.run_dir import CONFIG_FILE, METRICS_FILE

_STEP = re.compile(r"^step-(\d+)$")


@dataclass
class RunFacts:
    """What the card reports about the run behind a checkpoint (None: not known)."""

    run_dir: Path | None = None
    step: int | None = None  # the exported checkpoint's step
    data: str | None = None
    init_from: str | None = None
    tokens_seen: int | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    val_step: int | None = None
    settings: dict[str, Any] | None = None


def _run_dir_of(source: Path) -> tuple[Path | None, int | None]:
    """(run dir, checkpoint step) for a model dir or run dir."""
    if source.is_file():
        return None, None
    source = source.resolve()  # follows checkpoints/latest -> step-N
    m = _STEP.match(source.name)
    if m and source.parent.name == "checkpoints":
        return source.parent.parent, int(m.group(1))
    if (source / CONFIG_FILE).is_file():
        return source, None
    return None, None


def run_facts(source: Path) -> RunFacts:
    """The facts of the run around `source` (the resolved model dir or .pt), as far as known."""
    run_dir, step = _run_dir_of(Path(source))
    facts = RunFacts(run_dir=run_dir, step=step)
    if run_dir is None:
        return facts
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        import yaml

        try:
            settings = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            settings = None
        if isinstance(settings, dict):
            facts.settings = settings
            facts.data = None if settings.get("data") is None else str(settings["data"])
            facts.init_from = settings.get("init_from")
    for record in _metrics(run_dir / METRICS_FILE):
        at = record.get("step")
        if step is not None and isinstance(at, int) and at > step:
            continue  # logged after the exported checkpoint
        if isinstance(record.get("tokens"), int):
            facts.tokens_seen = record["tokens"]
        if _finite(record.get("val_loss")):
            facts.val_loss, facts.val_step = float(record["val_loss"]), at
            facts.val_ppl = float(record["val_ppl"]) if _finite(record.get("val_ppl")) else None
    return facts


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a crash
            if isinstance(record, dict):
                records.append(record)
    return records


def model_card(
    name: str, config, n_params: int, tokenizer_name: str, facts: RunFacts, fmt: str = "hf"
) -> str:
    """README.md text with YAML front matter (what the Hub reads when the folder is pushed)."""
    front = [
        "---",
        "library_name: transformers" if fmt == "hf" else "library_name: onnx",
        "pipeline_tag: text-generation",
        "license: other",
        "tags:",
        "- dtl",
        "- text-generation",
        "- custom_code" if fmt == "hf" else "- onnx",
        "---",
        "",
    ]
    lines = [
        f"# {name}",
        "",
        f"A decoder-only transformer language model trained from scratch with DTL and exported "
        f"with `dtl export --format {fmt}`.",
        "",
        "## Model",
        "",
        f"- {n_params:,} parameters: {config.n_layers} post-LN blocks of width {config.d_model}, "
        f"{config.n_heads} heads, feed-forward {config.d_ff} (ReLU), sinusoidal positions, a "
        "final LayerNorm and an untied vocabulary head with bias",
        f"- vocabulary {config.vocab_size:,} ({_tokenizer_words(tokenizer_name)}); end of text "
        "`<|endoftext|>`",
        f"- context: trained at {config.context} tokens (position table {config.max_seq_length})",
        "",
        "## Training",
        "",
    ]
    lines += _training_lines(facts)
    lines += ["", "## Use", ""] + (_hf_use(name) if fmt == "hf" else _onnx_use())
    lines += [
        "",
        "## Licence",
        "",
        "The weights are the product of the data they were trained on: publish them under terms "
        "that data allows, and set `license:` above accordingly.",
    ]
    if tokenizer_name == "gpt2":
        lines.append("GPT-2's tokenizer files (vocabulary and merges) are OpenAI's, under the MIT "
                     "licence.")  # fmt: skip
    lines.append("The modeling code in this folder is DTL's (MIT).")
    return "\n".join(front + lines) + "\n"


def _tokenizer_words(name: str) -> str:
    return "GPT-2's byte-level BPE" if name == "gpt2" else "a byte-level BPE trained with DTL"


def _training_lines(facts: RunFacts) -> list[str]:
    if facts.run_dir is None:
        return ["No run dir came with this model, so its data and figures are not known."]
    lines = []
    if facts.data:
        lines.append(f"- data: `{facts.data}`")
    if facts.init_from:
        lines.append(f"- started from the weights of `{facts.init_from}`")
    if facts.step is not None:
        lines.append(f"- checkpoint: step {facts.step:,}")
    if facts.tokens_seen is not None:
        lines.append(f"- tokens seen: {facts.tokens_seen:,}")
    if facts.val_loss is not None:
        ppl = f", perplexity {facts.val_ppl:.2f}" if facts.val_ppl is not None else ""
        at = f" (step {facts.val_step:,})" if facts.val_step is not None else ""
        lines.append(f"- validation loss {facts.val_loss:.4f}{ppl}{at}")
    else:
        lines.append("- no validation figure was logged")
    settings = facts.settings or {}
    keys = ("preset", "seq_len", "batch_size", "grad_accum", "lr", "max_steps", "max_time", "optimizer",
            "precision_resolved", "device_resolved")  # fmt: skip
    shown = [f"{k}={settings[k]}" for k in keys if settings.get(k) is not None]
    if shown:
        lines.append(f"- settings: {', '.join(shown)}")
    return lines


def _hf_use(name: str) -> list[str]:
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        f'tokenizer = PreTrainedTokenizerFast.from_pretrained("{name}")',
        'ids = tokenizer("The history of", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=40, do_sample=False)",
        "print(tokenizer.decode(out[0]))",
        "```",
        "",
        "`trust_remote_code=True` runs `modeling_dtl.py` and `configuration_dtl.py` from this "
        "folder (they need torch and transformers only). The tokenizer is a plain fast "
        "tokenizer (`tokenizer.json`) and runs no code: `PreTrainedTokenizerFast` loads it "
        "without asking; `AutoTokenizer` gives the same one, but transformers 5 first reads "
        "`config.json` and asks about the model's code.",
    ]


def _onnx_use() -> list[str]:
    return [
        "`model.onnx` is a decoder with past key/values: inputs `input_ids` (batch, sequence), "
        "`attention_mask` (batch, past + sequence), `past_key_values.N.key` / `.value` "
        "(batch, heads, past, head_dim); outputs `logits` and `present.N.key` / `.value`. "
        "`dtl_onnx.json` gives the sizes and the end-of-text id; `tokenizer.json` the tokenizer.",
    ]
