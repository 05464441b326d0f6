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
from dataclasses import dataclass
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
    """Where a run writes its checkpoints: RUN_DIR/checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def find_checkpoints(path: str | os.PathLike) -> Path:
    """The checkpoints folder a reader means: `path` itself when it is one (named
    `checkpoints`, or holding the `latest` pointers), else RUN_DIR/checkpoints. Every reader
    (resuming, loading a model, listing) finds it here.

    >>> find_checkpoints("runs/tiny"), find_checkpoints("runs/tiny/checkpoints")
    (PosixPath('runs/tiny/checkpoints'), PosixPath('runs/tiny/checkpoints'))
    """
    path = Path(path)
    if path.name == CHECKPOINTS and not (path / CONFIG_FILE).is_file():
        return path
    if (path / "latest.txt").is_file() or (path / "latest").is_symlink():
        return path
    return checkpoint_dir(path)


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
    # The link first, latest.txt second: a crash between the two leaves the link (which
    # `latest_step` reads first) the newer pointer, never the staler one.
    link_tmp = root / f".latest.{os.getpid()}"
    try:
        link_tmp.unlink(missing_ok=True)
        link_tmp.symlink_to(name, target_is_directory=True)
        os.replace(link_tmp, root / "latest")
    except OSError:  # no symlinks here: latest.txt alone names it
        link_tmp.unlink(missing_ok=True)
    txt_tmp = root / f".latest.txt.{os.getpid()}"
    txt_tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(txt_tmp, root / "latest.txt")


def _step_dirs(root: Path, holding: str, links: bool = False) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` under root that holds the file `holding`, oldest first;
    symlinked step dirs count only with `links` (readers; pruning never follows a link)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / holding).is_file() and (links or not child.is_symlink()):
            found.append((int(m.group(1)), child))
    return sorted(found)


def list_checkpoints(run_dir_or_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those holding a training state), oldest first."""
    return _step_dirs(find_checkpoints(run_dir_or_root), STATE_FILE)


def prune(root: Path, keep_last: int, keep: tuple[int, ...] = ()) -> None:
    ckpts = list_checkpoints(root)
    newest = {step for step, _ in ckpts[-keep_last:]} if keep_last > 0 else set()
    for step, path in ckpts:
        if step not in newest and step not in keep:
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class ResumeFrom:
    """A run to continue: its dir, and the checkpoint to go on from (None: its newest)."""

    run_dir: Path
    checkpoint: Path | None = None


def resume_target(spec: str | os.PathLike) -> ResumeFrom:
    """The run and checkpoint a `--resume` argument names: a run dir resumes from its newest
    checkpoint; `RUN_DIR/checkpoints/step-N` from that one.

    >>> resume_target("runs/tiny/checkpoints/step-30")
    ResumeFrom(run_dir=PosixPath('runs/tiny'), checkpoint=PosixPath('runs/tiny/checkpoints/step-30'))
    """
    path = Path(spec)
    if path.name == CHECKPOINTS and not (path / CONFIG_FILE).is_file():
        return ResumeFrom(path.parent)
    if path.name == "latest" and path.parent.name == CHECKPOINTS:
        return ResumeFrom(path.parent.parent)
    if _STEP_DIR.match(path.name) and path.parent.name == CHECKPOINTS:
        return ResumeFrom(path.parent.parent, path)
    return ResumeFrom(path)


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


def latest_step(run_dir_or_root: str | os.PathLike, holding: str = WEIGHTS_FILE) -> Path | None:
    """The newest `step-N` of a run that holds the file `holding`, or None: the one rule for
    "latest". The step the `latest` symlink names, else the one `latest.txt` names (written
    where symlinks are not), else the highest step number; a pointer to a step without
    `holding` (pruned, half-copied) is passed over.

    Loading a model needs model.safetensors (`latest_model_dir`); resuming needs the
    training state too (`latest_checkpoint`).

    >>> latest_step("runs/tiny")  # doctest: +SKIP
    PosixPath('runs/tiny/checkpoints/step-1200')
    """
    root = find_checkpoints(run_dir_or_root)
    if not root.is_dir():
        return None
    for pointed in _pointed(root):
        if (pointed / holding).is_file():
            return pointed
    steps = _step_dirs(root, holding, links=True)
    return steps[-1][1] if steps else None


def _pointed(root: Path) -> list[Path]:
    """The step dirs `latest` and `latest.txt` name, in that order (which may not exist).

    `_point_latest` writes the link first and latest.txt second, so the link is never the
    staler of the two."""
    found = []
    link = root / "latest"
    if link.is_symlink():
        target = link.resolve()
        # a link to a sibling reads as root/step-N, like latest.txt's name
        found.append(root / target.name if target.parent == root.resolve() else target)
    txt = root / "latest.txt"
    if txt.is_file():
        name = txt.read_text(encoding="utf-8").strip()
        if name:
            found.append(root / name)
    return found


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (to resume from: it holds the training
    state), or None when it has none."""
    return latest_step(run_dir, STATE_FILE)


def latest_model_dir(run_dir_or_root: str | os.PathLike) -> Path | None:
    """The newest loadable model dir of a run (for generating: model.safetensors is enough),
    or None; takes a run dir or its `checkpoints/` dir."""
    return latest_step(run_dir_or_root, WEIGHTS_FILE)
