"""Checkpoints of a run: `RUN_DIR/checkpoints/step-N/`, written atomically.

A checkpoint is a model dir (`config.json`, `model.safetensors`, the tokenizer's files) plus
`training_state.pt`: optimizer, scheduler, GradScaler, step, the data loader's position and
every RNG state, so `dtl train --resume` continues exactly. It is written under a temporary
name and renamed, so a crash mid-save never leaves a broken `step-N`; `checkpoints/latest`
(a symlink) and `checkpoints/latest.txt` (its name, for filesystems without symlinks) name the
newest. Loading never runs code from the file (`torch.load(weights_only=True)`).

>>> path = latest_checkpoint("runs/tiny")  # doctest: +SKIP
>>> state = load_training_state(path)      # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtl.errors import DtlError

STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    tokenizer=None,
    keep_last: int = 3,
    keep: tuple[int, ...] = (),
) -> Path:
    """Write `checkpoints/step-{step}/`, point `latest` at it, and prune old ones.

    Keeps the `keep_last` newest plus the steps in `keep` (the best by val loss).
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        torch.save(state, tmp / STATE_FILE)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(root, final.name)
    prune(root, keep_last, keep=(step, *keep))
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` (a re-save of the same step) goes after."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _point_latest(root: Path, name: str) -> None:
    txt_tmp = root / f".latest.txt.{os.getpid()}"
    txt_tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(txt_tmp, root / "latest.txt")
    link_tmp = root / f".latest.{os.getpid()}"
    try:
        link_tmp.unlink(missing_ok=True)
        link_tmp.symlink_to(name, target_is_directory=True)
        os.replace(link_tmp, root / "latest")
    except OSError:  # no symlinks here: latest.txt alone names it
        link_tmp.unlink(missing_ok=True)


def list_checkpoints(run_dir_or_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those holding a training state), oldest first."""
    root = Path(run_dir_or_root)
    if root.name != "checkpoints":
        root = checkpoint_dir(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file() and not child.is_symlink():
            found.append((int(m.group(1)), child))
    return sorted(found)


def prune(root: Path, keep_last: int, keep: tuple[int, ...] = ()) -> None:
    ckpts = list_checkpoints(root)
    newest = {step for step, _ in ckpts[-keep_last:]} if keep_last > 0 else set()
    for step, path in ckpts:
        if step not in newest and step not in keep:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    root = checkpoint_dir(run_dir)
    txt = root / "latest.txt"
    if txt.is_file():
        candidate = root / txt.read_text(encoding="utf-8").strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def latest_model_dir(run_dir_or_root: str | os.PathLike) -> Path | None:
    """The newest loadable model dir of a run (for generating, not resuming), or None.

    Takes a run dir or its `checkpoints/` dir and tries, in order: the `latest` symlink,
    `latest.txt`, then the highest `step-N`; each must hold `model.safetensors` (a training
    state is not needed to load the model, unlike `latest_checkpoint`).
    """
    root = Path(run_dir_or_root)
    if root.name != "checkpoints" and not (root / "latest.txt").is_file():
        root = checkpoint_dir(root)
    if not root.is_dir():
        return None
    link = root / "latest"
    if link.is_dir() and (link / "model.safetensors").is_file():
        return link.resolve()
    txt = root / "latest.txt"
    if txt.is_file():
        name = txt.read_text(encoding="utf-8").strip()
        if name and (root / name / "model.safetensors").is_file():
            return root / name
    steps = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / "model.safetensors").is_file():
            steps.append((int(m.group(1)), child))
    return max(steps)[1] if steps else None


def load_training_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The training state of a checkpoint dir; tensors and plain data only, no code."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise DtlError(f"{checkpoint}: no {STATE_FILE} here; not a dtl train checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise DtlError(f"{path}: unreadable training state ({err}); resume from another checkpoint") from None


# ---------------------------------------------------------------------- RNG states
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
