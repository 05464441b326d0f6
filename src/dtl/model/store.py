"""Find and load a trained model (and its tokenizer) from whatever a user names.

A model spec is one of:
- a run dir (written by `dtl train`), or its `checkpoints/` folder: its newest checkpoint
  (`dtl.run_dir.latest_model_dir`: `checkpoints/latest`, else `checkpoints/latest.txt`, else
  the highest `checkpoints/step-N`);
- a checkpoint or model dir: `config.json` + `model.safetensors` + the tokenizer's files;
- a `.pt` file from the original DTL scripts, read with the GPT-2 tokenizer.

Every verb that loads a model (generate, ask, eval, serve, export, `dtl train --init-from`)
goes through `load_model`, so each gets the same checks (the tokenizer fits the model, no
NaN/Inf weights); `read_model_config` reads a model's config without its weights.

>>> model, tokenizer = load_model("runs/tiny")  # doctest: +SKIP
>>> path, config = read_model_config("runs/tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dtl.errors import DtlError
from dtl.model.config import ModelConfig
from dtl.model.dtype import resolve_inference_dtype, to_inference_dtype
from dtl.model.legacy import read_legacy_config
from dtl.model.transformer import TransformerLM
from dtl.run_dir import CHECKPOINTS, WEIGHTS_FILE, find_checkpoints, latest_model_dir


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """The model dir or `.pt` file a spec names (see the module docs), or a DtlError."""
    path = Path(spec)
    if path.is_file():
        if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
            raise DtlError(
                f"{path}: a model file must be a legacy DTL .pt checkpoint; otherwise name a "
                "run dir or a checkpoint dir (config.json + model.safetensors)"
            )
        return path
    if not path.is_dir():
        raise DtlError(
            f"{path}: no such model; give a run dir (dtl train --out DIR), a checkpoint dir "
            "(DIR/checkpoints/step-N) or a legacy .pt file"
        )
    if (path / WEIGHTS_FILE).is_file():
        return path
    checkpoints = find_checkpoints(path)
    if checkpoints.is_dir():
        found = latest_model_dir(checkpoints)
        if found is None:
            raise DtlError(f"{checkpoints}: no saved checkpoint (step-N/{WEIGHTS_FILE}) yet")
        return found
    raise DtlError(
        f"{path}: neither a model dir (no {WEIGHTS_FILE}) nor a run dir (no {CHECKPOINTS}/); "
        "has training saved a checkpoint yet?"
    )


def read_model_config(spec: str | os.PathLike) -> tuple[Path, ModelConfig]:
    """(the model dir or `.pt` file a spec names, its config), without loading the weights:
    a model dir's config.json, or the shapes a legacy `.pt` file records.

    >>> path, config = read_model_config("runs/tiny")  # doctest: +SKIP
    >>> config.d_model  # doctest: +SKIP
    128
    """
    path = resolve_model_dir(spec)
    if path.is_file():
        return path, read_legacy_config(path)
    return path, ModelConfig.from_json(path / "config.json")


def load_model(
    spec: str | os.PathLike,
    device: str | torch.device = "cpu",
    tokenizer=None,
    gpt2_dir: str | os.PathLike | None = None,
    dtype: str = "fp32",
) -> tuple[TransformerLM, object]:
    """(model in eval mode, tokenizer) for a run dir, checkpoint dir or legacy `.pt` file.

    `tokenizer` overrides the one saved with the model: a Tokenizer, or a spec for
    `load_tokenizer` ("gpt2" or a directory). `dtype` is the format it runs inference in
    (`dtl.model.dtype`: fp32, bf16, int8 or auto; the CLI's `--dtype`).

    >>> model, tokenizer = load_model("runs/tiny", dtype="int8")  # doctest: +SKIP
    """
    dtype = resolve_inference_dtype(dtype, device)  # a bad name fails before the load
    from dtl.tokenizer import load_tokenizer

    path = resolve_model_dir(spec)
    if path.is_file():
        model = TransformerLM.from_legacy_checkpoint(path, device=device)
        default_tokenizer: str | Path = "gpt2"  # the original scripts all used GPT-2's BPE
    else:
        model = TransformerLM.from_pretrained(path, device=device)
        default_tokenizer = path
    check_finite(model, path)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        spec_tok = default_tokenizer if tokenizer is None else tokenizer
        try:
            tokenizer = load_tokenizer(spec_tok, gpt2_dir=gpt2_dir)
        except DtlError as err:
            raise DtlError(
                f"{path}: cannot load its tokenizer ({err}); pass --tokenizer gpt2 or a "
                "tokenizer dir"
            ) from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise DtlError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model "
            f"{path} only {model.config.vocab_size}; they were not trained together"
        )
    return to_inference_dtype(model.eval(), dtype), tokenizer


def check_finite(model: torch.nn.Module, source: str | os.PathLike) -> None:
    """Refuse weights holding NaN or Inf (a damaged file, or a run that diverged): they
    would give NaN perplexities and garbage text, never an error of their own.

    >>> check_finite(model, "runs/tiny/checkpoints/step-400")  # doctest: +SKIP
    """
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise DtlError(
                f"{source}: weight {name} holds {bad} non-finite value(s) (NaN/Inf); the model "
                "file is damaged or its training diverged: load another checkpoint "
                "(RUN_DIR/checkpoints/step-N) or retrain"
            )


def model_name(spec: str | os.PathLike) -> str:
    """A short display name for a model spec: its directory or file name."""
    path = Path(spec).resolve()
    return path.stem if path.is_file() else path.name
