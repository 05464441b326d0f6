"""`dtl train --init-from MODEL`: a new run that starts from a trained model's weights.

The source is any model spec `dtl generate --model` takes (a run dir means its newest
checkpoint, a checkpoint/model dir, a legacy `.pt`). The new run gets the source's weights and
nothing else of its training: a fresh optimizer, schedule and step 0. The model's sizes and
its context (max_seq_length) are the source's; the new run may train at a shorter --seq-len.
The data must be tokenized with the source's tokenizer (a raw --data file is prepared with
it), and that tokenizer is saved with the new run's checkpoints.

The source is loaded by `dtl.model.store.load_model`, as `dtl generate` loads it, with the
same checks (weights holding NaN or Inf are refused with the same line), once, before the
run writes anything.

>>> source = read_init_source("runs/pretrain")    # doctest: +SKIP
>>> source.config.d_model, source.tokenizer.name   # doctest: +SKIP
(128, 'bpe')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dtl.errors import DtlError
from dtl.model.config import ModelConfig
from dtl.model.store import load_model, read_model_config, resolve_model_dir
from dtl.model.transformer import TransformerLM
from dtl.tokenizer import Tokenizer, load_tokenizer

# The sizes that fix the weights' shapes: a flag may not change them on --init-from.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff")


@dataclass
class InitSource:
    """The model a run starts from: where it is, its config, its tokenizer and its weights
    (held until the new run's model takes them: `take_weights`)."""

    spec: str  # as the user gave it
    path: Path  # the resolved model dir or legacy .pt file
    config: ModelConfig
    tokenizer: Tokenizer
    tokenizer_spec: str  # what load_tokenizer / prepare take: the model dir, or "gpt2"
    weights: dict[str, Tensor] | None = field(default=None, repr=False)

    @property
    def is_legacy(self) -> bool:
        return self.path.is_file()

    def take_weights(self) -> dict[str, Tensor]:
        """The source's state dict, handed over once (the run does not keep a second copy)."""
        if self.weights is None:
            raise DtlError(f"--init-from {self.spec}: its weights were already handed over")
        weights, self.weights = self.weights, None
        return weights


def read_init_source(spec: str) -> InitSource:
    """Resolve `spec` and load the model with `load_model` (config, tokenizer, weights)."""
    try:
        found = resolve_model_dir(spec)
    except DtlError as err:
        raise DtlError(f"--init-from {spec}: {err}") from None
    # the original scripts' .pt files all used GPT-2's BPE; a model dir holds its own
    tokenizer_spec = "gpt2" if found.is_file() else str(found.resolve())
    try:
        tokenizer = load_tokenizer(tokenizer_spec)
    except DtlError as err:
        raise DtlError(f"--init-from {spec}: cannot load its tokenizer ({err})") from None
    # `found` as load_model names it for `dtl generate --model SPEC`: the same refusals, word
    # for word (a NaN weight names the file as generate does)
    model, _ = load_model(found, tokenizer=tokenizer)
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    return InitSource(str(spec), found.resolve(), model.config, tokenizer, tokenizer_spec, weights)


def read_init_config(spec: str) -> ModelConfig:
    """The source's config alone (its weights are not read): what a resumed fine-tune whose
    checkpoint lacks config.json falls back to."""
    try:
        return read_model_config(spec)[1]
    except DtlError as err:
        raise DtlError(f"--init-from {spec}: {err}") from None


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids: same kind, size, end-of-text and
    (for a trained BPE) byte-identical vocab and merges files."""
    if (a.name, a.vocab_size, a.eos_id) != (b.name, b.vocab_size, b.eos_id):
        return False
    if a.name == "gpt2":
        return True
    if set(a.files) != set(b.files):
        return False
    return all(a.files[k].read_bytes() == b.files[k].read_bytes() for k in a.files)


def init_model_config(
    source: InitSource, overrides: dict[str, object], data_tokenizer: Tokenizer, seq_len: int
) -> ModelConfig:
    """The new run's model: the source's config (dropout may be changed), checked against the
    flags' sizes (`overrides`, unset ones None), the data's tokenizer and the rows' length."""
    where = f"--init-from {source.spec}"
    for name in SHAPE_FIELDS:
        given = overrides.get(name)
        if given is not None and given != getattr(source.config, name):
            flag = "--" + name.replace("_", "-")
            raise DtlError(
                f"{where}: {flag} {given} differs from the model's {name} "
                f"{getattr(source.config, name)}; the sizes come from the model: drop {flag}"
            )
    if not same_tokenizer(data_tokenizer, source.tokenizer):
        raise DtlError(
            f"{where}: the data's tokenizer ({_describe(data_tokenizer)}) is not the model's "
            f"({_describe(source.tokenizer)}); prepare the data with `dtl prepare ... "
            f"--tokenizer {source.tokenizer_spec}`, or pass a raw --data file (it is prepared "
            "with the model's tokenizer)"
        )
    if seq_len > source.config.max_seq_length:
        raise DtlError(
            f"{where}: rows of {seq_len} tokens are longer than the model's context "
            f"(max_seq_length {source.config.max_seq_length}); pass --seq-len "
            f"{source.config.max_seq_length} or less"
        )
    # the source's context travels as base_seq_len: "trained at 128, fine-tuned at 96"
    config = dataclasses.replace(source.config, base_seq_len=source.config.context)
    dropout = overrides.get("dropout")
    if dropout is None:
        return config
    return dataclasses.replace(config, dropout=float(dropout))


def _describe(tok: Tokenizer) -> str:
    files = next(iter(tok.files.values()), None)
    where = f" from {files.parent}" if files is not None and tok.name != "gpt2" else ""
    return f"{tok.name}, {tok.vocab_size} tokens{where}"


def load_init_weights(model: TransformerLM, source: InitSource) -> None:
    """Copy the source's weights into `model` (built with `init_model_config`). Every rank
    read the same file, so every rank starts from identical weights."""
    with torch.no_grad():
        model.load_weights(source.take_weights(), source=str(source.path))
