"""Two real processes through torchrun (gloo on CPU): 2 ranks x batch B train exactly like
1 process x batch 2B, with DDP and with --fsdp (FSDP2, sharded weights and optimizer state);
only rank 0 logs and saves, the checkpoint loads, and --resume continues exactly."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import DTL, run_dtl, torchrun, train_argv

from dtl import TransformerLM
from dtl.run_dir import latest_checkpoint
from dtl.train.checkpoint import load_training_state


def _args(data, out, batch, steps=4):
    # A constant lr after warmup: the schedule does not depend on --max-steps, so a run of 4
    # steps resumed to 6 can be compared with a run of 6. No dropout: each rank draws masks for
    # its own rows from the same RNG, so masks differ from one process's for all 4 rows.
    return train_argv(
        data,
        out,
        max_steps=steps,
        batch_size=batch,
        log_every=1,
        eval_every=2,
        eval_batches=2,
        save_every=4,
        lr=3e-3,
        warmup_steps=2,
        schedule="constant",
        dropout=0,
    )


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_records(one, two):
    for a, b in zip(one, two, strict=False):
        key = "val_loss" if "val_loss" in a else "loss"
        assert b[key] == pytest.approx(a[key], abs=1e-5), (a, b)


@pytest.fixture(scope="module")
def single_run(padded_data, tmp_path_factory):
    """One process, batch 4, 6 steps (checkpoints at steps 4 and 6): what 2 ranks x 2 rows
    must reproduce."""
    out = tmp_path_factory.mktemp("dist") / "one"
    done = run_dtl(*_args(padded_data, out, 4, steps=6))
    assert done.returncode == 0, done.stderr
    return out


def _train_and_resume(padded_data, single_run, run_dir, *extra):
    """2 ranks x batch 2 to step 4 (`extra` flags), then --resume to 6, checked against the
    one-process run at each step; returns the step-4 checkpoint's path."""
    torchrun(*DTL[1:], *_args(padded_data, run_dir, 2), *extra)
    one, two = _records(single_run), _records(run_dir)
    assert [r["step"] for r in two] == [r["step"] for r in one if r["step"] <= 4]  # rank 0 only
    _same_records(one, two)
    assert two[0]["tokens"] == one[0]["tokens"]  # 2 ranks x 2 rows == 1 x 4 rows

    step4 = latest_checkpoint(run_dir)
    assert step4.name == "step-4"
    model = TransformerLM.from_pretrained(step4)
    assert model.config.d_model == 32 and model.config.vocab_size == 512
    assert load_training_state(step4)["world_size"] == 2
    saved = {p.name: p.stat().st_size > 0 for p in step4.iterdir()}
    assert {"config.json", "model.safetensors", "training_state.pt"} <= set(saved)

    # Resume the 2-process run to step 6: it continues as the 1-process run did (optimizer,
    # data position, step; the RNG round trip is the SIGKILL test's, with dropout on).
    torchrun(*DTL[1:], "train", "--resume", str(run_dir), "--max-steps", "6", "--no-progress")
    resumed = _records(run_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in one]
    _same_records(one, resumed)
    return step4


def test_two_ranks_equal_one_process_with_twice_the_batch_and_resume(
    padded_data, single_run, tmp_path
):
    _train_and_resume(padded_data, single_run, tmp_path / "two")


def test_fsdp_on_cpu_trains_saves_and_resumes_like_one_process(padded_data, single_run, tmp_path):
    run_dir = tmp_path / "fsdp"
    _train_and_resume(padded_data, single_run, run_dir, "--fsdp")
    assert load_training_state(latest_checkpoint(run_dir))["world_size"] == 2

    # Rank 0 wrote the full, unsharded weights and optimizer state, in the layout (and to
    # float tolerance the values) of the one-process run's own step-4 checkpoint.
    fsdp_dir, ref_dir = run_dir / "checkpoints" / "step-4", single_run / "checkpoints" / "step-4"
    fsdp, ref = TransformerLM.from_pretrained(fsdp_dir), TransformerLM.from_pretrained(ref_dir)
    assert json.loads((fsdp_dir / "config.json").read_text()) == json.loads(
        (ref_dir / "config.json").read_text()
    )
    ref_weights = ref.state_dict()
    for name, tensor in fsdp.state_dict().items():
        torch.testing.assert_close(tensor, ref_weights[name], atol=1e-5, rtol=1e-4)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = fsdp(ids)
    assert logits.shape == (2, 16, 512) and torch.isfinite(logits).all()

    got = load_training_state(fsdp_dir)["optimizer"]
    want = load_training_state(ref_dir)["optimizer"]
    # The same weight-decay groups (decayed matrices, then the rest), in the same order.
    assert [(g["weight_decay"], g["params"]) for g in got["param_groups"]] == [
        (g["weight_decay"], g["params"]) for g in want["param_groups"]
    ]
    assert sorted(got["state"]) == sorted(want["state"])
    for i, state in want["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(
                got["state"][i][key].cpu(), value.cpu(), atol=1e-5, rtol=1e-4
            )


@pytest.fixture(scope="module")
def single_muon_run(padded_data, tmp_path_factory):
    """single_run with --optimizer muon."""
    out = tmp_path_factory.mktemp("dist") / "one-muon"
    done = run_dtl(*_args(padded_data, out, 4, steps=6), "--optimizer", "muon")
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_muon_on_two_ranks_equals_one_process_and_resumes(
    padded_data, single_muon_run, tmp_path, mode
):
    """Muon under DDP (gradients averaged, every rank orthogonalises the same matrix) and
    FSDP (each rank's shard of the momentum, the update gathered whole, orthogonalised, cut
    back to the shard): 2 ranks x 2 rows follow 1 process x 4 rows, and --resume continues."""
    extra = ("--fsdp",) if mode == "fsdp" else ()
    step4 = _train_and_resume(
        padded_data, single_muon_run, tmp_path / mode, "--optimizer", "muon", *extra
    )
    got = load_training_state(step4)["optimizer"]
    want = load_training_state(single_muon_run / "checkpoints" / "step-4")["optimizer"]
    # muon, then AdamW for the head, the embedding, the scalars (`muon.build_muon`)
    assert [g["use_muon"] for g in got["param_groups"]] == [True, False, False, False]
    for i, state in want["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(
                got["state"][i][key].cpu(), value.cpu(), atol=1e-5, rtol=1e-4
            )


def test_init_from_gives_every_rank_the_source_weights(padded_data, single_run, tmp_path):
    """--init-from under FSDP: 2 ranks x 2 rows log what 1 process x 4 rows logs from the
    same source weights. FSDP shards each rank's own weights without a broadcast (DDP would
    copy rank 0's over), so a rank that did not load the source would change the losses."""
    source = str(single_run)
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_dtl(*_args(padded_data, one, 4, steps=2), "--init-from", source)
    assert done.returncode == 0, done.stderr
    torchrun(*DTL[1:], *_args(padded_data, two, 2, steps=2), "--init-from", source, "--fsdp")
    first = _records(two)[0]
    assert first["step"] == 1 and "loss" in first
    _same_records(_records(one), _records(two))
    assert len(_records(two)) == len(_records(one)) >= 2


def test_bf16_weight_copies_on_two_ranks_follow_one_process_and_resume(padded_data, tmp_path):
    """bf16 on a CPU under DDP: the ranks train bf16 weight copies (their gradients all-reduced
    in bf16) of fp32 masters; the losses follow one bf16 process with twice the batch within
    bf16's rounding, the checkpoint is fp32 and --resume continues."""
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_dtl(*_args(padded_data, one, 4, steps=6), "--precision", "bf16")
    assert done.returncode == 0, done.stderr
    first = torchrun(*DTL[1:], *_args(padded_data, two, 2), "--precision", "bf16")
    assert "(bf16, bf16 weights and activations, fp32 master weights)" in first.stdout
    ran = torchrun(*DTL[1:], "train", "--resume", str(two), "--max-steps", "6", "--no-progress")
    assert "resuming" in ran.stdout
    a, b = _records(one), _records(two)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b, strict=True):
        key = "val_loss" if "val_loss" in x else "loss"
        assert y[key] == pytest.approx(x[key], abs=2e-2), (x, y)
    model = TransformerLM.from_pretrained(latest_checkpoint(two))
    assert all(p.dtype == torch.float32 for p in model.parameters())
