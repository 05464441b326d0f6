"""The layout of a run dir, in one place: training writes it, model loading reads it.

    RUN_DIR/
      config.yaml              every setting of the run, resolved (`dtl train` writes it)
      metrics.jsonl            one JSON object per logged step and per evaluation
      data/                    the prepared data, when --data was a raw file or a dataset name
      checkpoints/
        step-N/                a model dir (config.json, model.safetensors, the tokenizer's
                               files) plus training_state.pt (what --resume needs)
        latest -> step-N       the newest (a symlink), and latest.txt naming it (for
        latest.txt             filesystems without symlinks)
        superseded-from-step-N-TIME/   the checkpoints after step N (and their metrics),
                               set aside by `dtl train --resume RUN_DIR/checkpoints/step-N`

A checkpoint is written under a temporary name and renamed (`write_step`), so a crash never
leaves a half-written `step-N`. The newest N are kept (`keep_last`), and any steps named in
`keep` (the best by validation loss).

>>> latest_model_dir("runs/tiny")  # doctest: +SKIP
PosixPath('runs/tiny/checkpoints/step-1200')
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from dtl.fileio import atomic_write_text, disk_full_as_error, remove_stale

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DATA_DIR = "data"
DATA_SOURCE_FILE = ".data-source"  # the dataset name RUN_DIR/data was prepared from
CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"  # in a step dir: what makes it resumable
WEIGHTS_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# What a killed writer leaves behind, each name ending in its process id (`remove_stale`):
# in checkpoints/ a half-written step, a replaced one, the latest pointers' temporaries;
# in the run dir the write probe and RUN_DIR/data being prepared or replaced.
_STALE_IN_CHECKPOINTS = r"^\.(?:tmp-step-\d+-|old-step-\d+-|latest\.txt\.|latest\.)(?P<pid>\d+)$"
_STALE_IN_RUN_DIR = (
    r"^\.(?:write-test-|data\.partial-|data\.old-)(?P<pid>\d+)$"
    r"|^\.(?:config\.yaml|metrics\.jsonl)\.(?P<pid2>\d+)\.\w+\.tmp$"  # atomic_write's
)


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _root(run_dir_or_root: str | os.PathLike) -> Path:
    """RUN_DIR/checkpoints, given the run dir or that folder itself."""
    root = Path(run_dir_or_root)
    if root.name != CHECKPOINTS and not (root / "latest.txt").is_file():
        root = checkpoint_dir(root)
    return root


def write_step(
    run_dir: str | os.PathLike,
    step: int,
    write: Callable[[Path], object],
    keep_last: int = 3,
    keep: tuple[int, ...] = (),
) -> Path:
    """`write(tmp)` fills a fresh folder, which becomes `checkpoints/step-{step}/`; then
    `latest` names it and older steps are pruned (the newest `keep_last`, and `keep`, stay)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_full_as_error(final):  # one line naming the checkpoint; the older ones stay
        try:
            tmp.mkdir()
            write(tmp)
            _replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _point_latest(root, final.name)
    prune(root, keep_last, keep=(step, *keep))
    return final


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what killed runs left in a run dir (a `.tmp-step-N-PID` is checkpoint-sized);
    a live process's temporaries stay. Returns what was removed."""
    run_dir = Path(run_dir)
    return remove_stale(checkpoint_dir(run_dir), _STALE_IN_CHECKPOINTS) + remove_stale(
        run_dir, _STALE_IN_RUN_DIR
    )


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


def _step_dirs(root: Path, holding: str) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` under root that holds the file `holding`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / holding).is_file() and not child.is_symlink():
            found.append((int(m.group(1)), child))
    return sorted(found)


def list_checkpoints(run_dir_or_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those holding a training state), oldest first."""
    root = Path(run_dir_or_root)
    return _step_dirs(root if root.name == CHECKPOINTS else checkpoint_dir(root), STATE_FILE)


def prune(root: Path, keep_last: int, keep: tuple[int, ...] = ()) -> None:
    ckpts = list_checkpoints(root)
    newest = {step for step, _ in ckpts[-keep_last:]} if keep_last > 0 else set()
    for step, path in ckpts:
        if step not in newest and step not in keep:
            shutil.rmtree(path, ignore_errors=True)


def resume_target(spec: str | os.PathLike) -> tuple[Path, Path | None]:
    """(run dir, checkpoint) of a `--resume` argument: a run dir resumes from its newest
    checkpoint (None here); `RUN_DIR/checkpoints/step-N` from that one.

    >>> resume_target("runs/tiny/checkpoints/step-30")
    (PosixPath('runs/tiny'), PosixPath('runs/tiny/checkpoints/step-30'))
    """
    path = Path(spec)
    if path.name == CHECKPOINTS and not (path / CONFIG_FILE).is_file():
        return path.parent, None
    if path.name == "latest" and path.parent.name == CHECKPOINTS:
        return path.parent.parent, None
    if _STEP_DIR.match(path.name) and path.parent.name == CHECKPOINTS:
        return path.parent.parent, path
    return path, None


def set_aside_newer(run_dir: str | os.PathLike, step: int) -> Path | None:
    """Before a run continues from an older `step-{step}`: move its newer checkpoints, and
    the metrics records after that step, into `checkpoints/superseded-from-step-{step}-TIME/`
    (kept, never deleted, and out of `latest` and pruning); `latest` names `step-{step}`.
    Returns that folder, or None when no newer checkpoint was there."""
    root = checkpoint_dir(run_dir)
    newer = [path for n, path in _step_dirs(root, WEIGHTS_FILE) if n > step]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = root / f"superseded-from-step-{step}-{stamp}"
    for n in range(2, 1000):  # two resumes from one step within a second
        if not aside.exists():
            break
        aside = root / f"superseded-from-step-{step}-{stamp}-{n}"
    aside.mkdir()
    metrics = Path(run_dir) / METRICS_FILE
    if metrics.is_file():  # the records of the set-aside steps go with them
        lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
        later = [line for line in lines if (_record_step(line) or 0) > step]
        atomic_write_text(aside / METRICS_FILE, "".join(later))
    for path in newer:
        os.replace(path, aside / path.name)
    _point_latest(root, f"step-{step}")
    return aside


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (to resume from), or None when it has none."""
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
    `latest.txt`, then the highest `step-N`; each must hold model.safetensors (a training
    state is not needed to load the model, unlike `latest_checkpoint`).
    """
    root = _root(run_dir_or_root)
    if not root.is_dir():
        return None
    link = root / "latest"
    if link.is_dir() and (link / WEIGHTS_FILE).is_file():
        return link.resolve()
    txt = root / "latest.txt"
    if txt.is_file():
        name = txt.read_text(encoding="utf-8").strip()
        if name and (root / name / WEIGHTS_FILE).is_file():
            return root / name
    steps = []
    for child in root.iterdir():  # symlinked step dirs count here
        m = _STEP_DIR.match(child.name)
        if m and (child / WEIGHTS_FILE).is_file():
            steps.append((int(m.group(1)), child))
    return max(steps)[1] if steps else None
