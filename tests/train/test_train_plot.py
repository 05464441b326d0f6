"""`dtl plot` writes a real PNG of the run's curves; TensorBoard logs when asked."""

from __future__ import annotations

import matplotlib.image as mpimg
import pytest
from train_helpers import cli, tiny_config

from dtl.train import train


def test_plot_writes_loss_png(packed_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(packed_data, run, max_steps=4, eval_every=2))
    code, out, err = cli(["plot", str(run)], capsys)
    assert code == 0, err
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert str(png) in out


def test_plot_of_a_dir_without_metrics_is_a_clear_error(tmp_path, capsys):
    code, _, err = cli(["plot", str(tmp_path)], capsys)
    assert code == 2 and "no metrics.jsonl" in err


def test_tensorboard_event_file(packed_data, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(tiny_config(packed_data, run, max_steps=2, tensorboard=True))
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
