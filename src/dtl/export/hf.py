"""`dtl export --format hf`: a folder transformers loads with `trust_remote_code=True`.

    config.json              DtlConfig's fields, model_type "dtl", auto_map -> the two files below
    configuration_dtl.py     the config class       (torch + transformers only: no dtl needed)
    modeling_dtl.py          DtlForCausalLM, the spec's model with a KV cache for generate()
    model.safetensors        the weights under the names modeling_dtl.py gives them
    generation_config.json   end-of-text as eos (and pad)
    tokenizer.json           a fast tokenizer that encodes as DTL's does
    tokenizer_config.json
    README.md                the model card, with YAML front matter for the Hub

>>> Path("tiny-hf").mkdir()
>>> write_hf(model, tokenizer, Path("tiny-hf"), Path("runs/tiny/checkpoints/step-6"))
>>> sorted(p.name for p in Path("tiny-hf").iterdir())  # doctest: +NORMALIZE_WHITESPACE
['README.md', 'config.json', 'configuration_dtl.py', 'generation_config.json',
 'model.safetensors', 'modeling_dtl.py', 'tokenizer.json', 'tokenizer_config.json']
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import Tensor

from dtl.export.card import model_card, run_facts
from dtl.export.tokenizer import write_hf_tokenizer
from dtl.fileio import atomic_write, atomic_write_text

REMOTE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_dtl.py", "modeling_dtl.py")
AUTO_MAP = {
    "AutoConfig": "configuration_dtl.DtlConfig",
    "AutoModel": "modeling_dtl.DtlModel",
    "AutoModelForCausalLM": "modeling_dtl.DtlForCausalLM",
}


def hf_name(name: str) -> str:
    """DTL's parameter name -> the name in modeling_dtl.py (DtlForCausalLM)."""
    if name.startswith("head."):
        return "lm_head." + name.removeprefix("head.")
    if name.startswith("transformer_blocks."):
        return "model.layers." + name.removeprefix("transformer_blocks.")
    return "model." + name  # embedding.*, ln_f.*


def hf_state_dict(model) -> dict[str, Tensor]:
    """The model's weights under modeling_dtl.py's names, contiguous, on the CPU."""
    return {hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def hf_config(model, tokenizer) -> dict:
    """config.json: what `DtlConfig` reads, plus what transformers needs to find the code."""
    c = model.config
    eos = tokenizer.eos_id
    return {
        "architectures": ["DtlForCausalLM"],
        "auto_map": AUTO_MAP,
        "model_type": "dtl",
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "n_heads": c.n_heads,
        "n_layers": c.n_layers,
        "d_ff": c.d_ff,
        "max_seq_length": c.max_seq_length,
        "dropout": c.dropout,
        "layer_norm_eps": 1e-5,  # nn.LayerNorm's default, which DTL uses
        "trained_seq_len": c.context,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def write_hf(model, tokenizer, directory: Path, source: Path, name: str = "my-model") -> None:
    """Fill `directory` (empty) with the transformers folder of `model` and `tokenizer`;
    `source` is the model dir or .pt it came from, `name` what the card's snippet loads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = hf_state_dict(model)
    atomic_write(
        directory / "model.safetensors",
        lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
    )
    config = hf_config(model, tokenizer)
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.eos_id,  # no padding token of its own, as GPT-2
    }
    atomic_write_text(directory / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    for file in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / file, directory / file)
    write_hf_tokenizer(tokenizer, directory, model.config.context)
    card = model_card(
        name,
        model.config,
        model.num_parameters(),
        tokenizer.name,
        run_facts(source),
        fmt="hf",
    )
    atomic_write_text(directory / "README.md", card)
