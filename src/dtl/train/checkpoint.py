"""Checkpoints of a run: what goes into `RUN_DIR/checkpoints/step-N/` (where it goes, and
which is the latest, is `dtl.run_dir`'s).

A checkpoint is a model dir (`config.json`, `model.safetensors`, the tokenizer's files) plus
`training_state.pt`: optimizer, scheduler, GradScaler, step, the data loader's position and
every RNG state, so `dtl train --resume` continues exactly. Loading never runs code from the
file (`torch.load(weights_only=True)`).

>>> state = load_training_state("runs/tiny/checkpoints/step-200")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtl.errors import DtlError
from dtl.fileio import atomic_write
from dtl.model.config import ModelConfig
from dtl.model.store import read_model_config
from dtl.run_dir import STATE_FILE, ResumeFrom, latest_checkpoint, list_checkpoints, write_step


def _save_state(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    tokenizer=None,
    keep_last: int = 3,
    keep: tuple[int, ...] = (),
) -> Path:
    """Write `checkpoints/step-{step}/` (the model dir and the training state), point
    `latest` at it, and prune old ones (see `dtl.run_dir`)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        # Through a 0600 temporary file, like the model files (the state is as private), and
        # through a Python file object: a full disk then surfaces as the OSError (ENOSPC)
        # behind torch's "unexpected pos", which a path given to torch.save loses.
        atomic_write(tmp / STATE_FILE, lambda path: _save_state(state, path))

    return write_step(run_dir, step, write, keep_last=keep_last, keep=keep)


def load_training_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The training state of a checkpoint dir; tensors and plain data only, no code."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise DtlError(f"{checkpoint}: no {STATE_FILE} here; not a dtl train checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        older = [
            p.name for _, p in list_checkpoints(Path(checkpoint).parent) if p != Path(checkpoint)
        ]
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise DtlError(
            f"{path}: unreadable training state ({reason}); resume from an older checkpoint: "
            f"dtl train --resume {Path(checkpoint).parent}/step-N"
            + (f" (saved: {', '.join(older)})" if older else "")
        ) from None


def load_latest(
    resume: ResumeFrom, model_config: ModelConfig, world_size: int
) -> tuple[Path, dict[str, Any]]:
    """(the checkpoint, its training state) of a run to resume: `resume.checkpoint`, else
    the run's newest. It must hold the model these settings give (its config is read, not
    its weights) and have run on as many processes (the data order)."""
    run_dir = resume.run_dir
    path = resume.checkpoint if resume.checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise DtlError(f"{run_dir}: no checkpoint to resume from (checkpoints/step-N)")
    if not path.is_dir():
        raise DtlError(f"--resume {path}: no such checkpoint; `ls {path.parent}` lists them")
    _, saved = read_model_config(path)
    if saved != model_config:
        raise DtlError(
            f"cannot resume {run_dir}: its model is {saved} but these settings give "
            f"{model_config}; drop the changed model flags"
        )
    state = load_training_state(path)
    if state.get("world_size", 1) != world_size:
        raise DtlError(
            f"cannot resume {run_dir}: it ran on {state.get('world_size', 1)} process(es), "
            f"this launch has {world_size}; the data order would differ"
        )
    return path, state


# ---------------------------------------------------------------------- RNG states
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's RNGs (the weights, dropout, anything random)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, as plain data (lists, ints, tensors) that weights_only loads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
