"""Device and precision choices: what `auto` means here, and clear errors for the impossible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import cli, tiny_config

from dtl.device import resolve_device
from dtl.errors import DtlError
from dtl.train import train
from dtl.train.precision import (
    autocast,
    cpu_native_bf16,
    fit_precisions,
    grad_scaler,
    resolve_precision,
)

CPU = torch.device("cpu")


def test_auto_on_cpu_is_plain_fp32_without_native_bf16(monkeypatch):
    monkeypatch.delenv("DTL_CPU_BF16")
    monkeypatch.setattr("dtl.train.precision.cpu_native_bf16", lambda: None)
    p = resolve_precision("auto", CPU)
    assert (p.name, p.dtype, p.use_scaler) == ("fp32", None, False)
    assert p.why == "auto: no AVX512-BF16 or AMX on this CPU"
    assert not grad_scaler(p, CPU).is_enabled()
    assert fit_precisions("cpu") == ("fp32",)


def test_auto_on_cpu_is_bf16_with_native_bf16(monkeypatch):
    monkeypatch.delenv("DTL_CPU_BF16")
    monkeypatch.setattr("dtl.train.precision.cpu_native_bf16", lambda: "AMX")
    p = resolve_precision("auto", CPU)
    assert (p.name, p.dtype, p.use_scaler) == ("bf16", torch.bfloat16, False)
    assert p.why.startswith("auto: AMX on this CPU")
    assert fit_precisions("cpu") == ("bf16", "fp32")
    assert resolve_precision("fp32", CPU).name == "fp32"  # named: exact fp32 stays
    assert resolve_precision("auto", torch.device("mps")).name == "fp32"


def test_native_bf16_detection_agrees_with_the_cpus_flags(monkeypatch):
    """Torch's own check and the /proc/cpuinfo fallback both say what the kernel's CPU flags
    say; DTL_CPU_BF16 overrides either way."""
    monkeypatch.delenv("DTL_CPU_BF16")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert (cpu_native_bf16() is not None) == native
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert (cpu_native_bf16() is not None) == native
    monkeypatch.setenv("DTL_CPU_BF16", "1")
    assert cpu_native_bf16() is not None
    monkeypatch.setenv("DTL_CPU_BF16", "0")
    assert cpu_native_bf16() is None


def test_bf16_autocast_on_cpu_really_computes_in_bf16():
    p = resolve_precision("bf16", CPU)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(p, CPU):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
def test_gpu_only_choices_fail_clearly_without_a_gpu():
    with pytest.raises(DtlError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(DtlError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    assert resolve_device("auto").type in ("cpu", "mps")


def test_unknown_names():
    with pytest.raises(DtlError, match="auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU)
    with pytest.raises(DtlError, match="auto, cpu, cuda, mps"):
        resolve_device("tpu")


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def _small_run(data: Path, layers: int, steps: int, extra: list[str]) -> list[str]:
    """`dtl train` argv: a d_model-32 model of `layers` blocks, `steps` steps of batch 4,
    a loss line each step, no dropout, no evaluation, no progress bar; then `extra`."""
    return ["train", "--data", str(data), "--preset", "tiny", "--d-model", "32",
            "--n-heads", "2", "--n-layers", str(layers), "--d-ff", "64",
            "--max-steps", str(steps), "--batch-size", "4", "--log-every", "1",
            "--eval-every", "1000", "--dropout", "0", *extra, "--no-progress"]  # fmt: skip


def test_auto_trains_in_bf16_where_the_cpu_has_it_and_says_so(packed_data, tmp_path, capsys):
    """A run with the default --precision on a CPU with native bf16: its first line says bf16
    and why, config.yaml records it, and its losses follow an fp32 run's."""
    argv = _small_run(packed_data, layers=2, steps=8, extra=["--lr", "3e-3"])
    code, out, err = cli([*argv, "--out", str(tmp_path / "fp32")], capsys)
    assert code == 0, err
    assert "(fp32, auto: DTL_CPU_BF16=0)" in out
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DTL_CPU_BF16", "1")
        code, out, err = cli([*argv, "--out", str(tmp_path / "auto")], capsys)
    assert code == 0, err
    first = next(line for line in out.splitlines() if line.startswith("training "))
    assert (
        "on cpu (bf16, auto: DTL_CPU_BF16=1 on this CPU; --precision fp32 for exact fp32; "
        "bf16 weights and activations, fp32 master weights)" in first
    )
    config = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert (config["precision"], config["precision_resolved"]) == ("auto", "bf16")
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "auto")
    assert len(fp32) == len(bf16) == 8 and fp32 != bf16
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) < 0.05


def test_bf16_resume_is_exact(packed_data, tmp_path):
    """Within bf16, a run stopped and resumed logs the losses of one never stopped, bit for
    bit (the weights and optimizer state saved are the fp32 masters)."""
    kw = {"precision": "bf16", "schedule": "constant", "save_every": 3, "max_steps": 6}
    train(tiny_config(packed_data, tmp_path / "whole", **kw))
    train(tiny_config(packed_data, tmp_path / "split", **{**kw, "max_steps": 3}))
    train(tiny_config(packed_data, tmp_path / "split", **kw), resume=True)
    whole, split = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert len(whole) == 6 and whole == split


@pytest.mark.parametrize("env, want", [("1", ["bf16", "fp32"]), ("0", ["fp32"])])
def test_info_fit_weighs_bf16_on_a_cpu_with_native_bf16(monkeypatch, capsys, env, want):
    monkeypatch.setenv("DTL_CPU_BF16", env)
    code, out, err = cli(["info", "--preset", "tiny", "--device", "cpu", "--fit", "2GB",
                          "--json"], capsys)  # fmt: skip
    assert code == 0, err
    fit = json.loads(out)["fit"]
    assert {o["precision"] for o in fit["options"]} == set(want)
    assert fit["recommended"]["precision"] == want[0]


def _bf16_trainer(data: Path, out: Path, **overrides):
    from dtl.train import Trainer

    return Trainer(tiny_config(data, out, precision="bf16", **overrides))


def test_bf16_on_cpu_trains_bf16_weight_copies_of_fp32_masters(packed_data, tmp_path):
    """bf16 on a CPU runs the forward on bf16 copies of the weights (not autocast): after
    every optimizer step each copy equals its fp32 master rounded to bf16 (torch's own
    rounding), the masters are what the optimizer holds, and the embedding is shared, fp32."""
    trainer = _bf16_trainer(packed_data, tmp_path / "run", dropout=0.1)
    assert trainer.prec.weight_copies and trainer.copies is not None
    master, low = trainer.model, trainer.copies.model
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in master.parameters()}
    assert all(p.dtype == torch.float32 for p in opt_params)
    assert low.embedding.weight is master.embedding.weight
    batches = iter(trainer.train_loader)
    before = {n: p.detach().clone() for n, p in master.named_parameters()}
    for _ in range(3):
        loss, grad_norm, _ = trainer.train_step([next(batches)])
        assert math.isfinite(loss) and grad_norm > 0
        for (name, m), (name_low, c) in zip(
            master.named_parameters(), low.named_parameters(), strict=True
        ):
            assert name == name_low
            if name.startswith("embedding."):
                assert c is m
                continue
            assert c.dtype == torch.bfloat16 and c.grad is None
            assert torch.equal(c, m.detach().to(torch.bfloat16)), name
    # the masters moved by fp32 updates smaller than a bf16 step: they are not rounded
    moved = master.transformer_blocks[0].attention.w_q.weight
    assert not torch.equal(moved, before["transformer_blocks.0.attention.w_q.weight"])
    assert not torch.equal(moved, moved.to(torch.bfloat16).float())
    # the forward really runs in bf16 between the ops: the blocks' output is bf16
    ids = next(batches)["input_ids"]
    assert low.hidden_states(ids).dtype == torch.bfloat16
    assert master.hidden_states(ids).dtype == torch.float32


def test_bf16_checkpoint_holds_fp32_masters_and_resume_rounds_them_again(packed_data, tmp_path):
    """A bf16 run's checkpoint is fp32 (the masters, not the copies); a resumed run's copies
    are the loaded masters rounded, so it goes on exactly as one never stopped (weights too)."""
    from dtl import TransformerLM
    from dtl.train import Trainer

    kw = {"precision": "bf16", "schedule": "constant", "save_every": 2, "max_steps": 4,
          "dropout": 0.1}  # fmt: skip
    train(tiny_config(packed_data, tmp_path / "whole", **kw))
    train(tiny_config(packed_data, tmp_path / "split", **{**kw, "max_steps": 2}))
    saved = TransformerLM.from_pretrained(tmp_path / "split" / "checkpoints" / "step-2")
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    resumed = Trainer(tiny_config(packed_data, tmp_path / "split", **kw), resume=True)
    for (_, m), (name, c) in zip(
        resumed.model.named_parameters(), resumed.copies.model.named_parameters(), strict=True
    ):
        assert torch.equal(m, saved.get_parameter(name))
        assert torch.equal(c, m.detach().to(c.dtype))
    resumed.run()
    whole = TransformerLM.from_pretrained(tmp_path / "whole" / "checkpoints" / "step-4")
    split = TransformerLM.from_pretrained(tmp_path / "split" / "checkpoints" / "step-4")
    for name, p in whole.state_dict().items():
        assert torch.equal(p, split.state_dict()[name]), name
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "split")


def test_fp32_and_fsdp_keep_no_weight_copies():
    """The one rule: bf16 weight copies on a CPU without FSDP; fp32 never, FSDP keeps autocast."""
    from dtl.train.precision import with_weight_copies

    bf16, fp32 = resolve_precision("bf16", CPU), resolve_precision("fp32", CPU)
    assert with_weight_copies(bf16, CPU, fsdp=False).weight_copies
    assert not with_weight_copies(bf16, CPU, fsdp=True).weight_copies
    assert not with_weight_copies(fp32, CPU, fsdp=False).weight_copies
    assert not with_weight_copies(bf16, torch.device("cuda"), fsdp=False).weight_copies
    copies = with_weight_copies(bf16, CPU, fsdp=False)
    with autocast(copies, CPU):  # the model runs in its own dtype: no autocast on top
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_compiled_training_follows_eager_and_warns_of_no_graph_break(
    packed_data, tmp_path, capfd, caplog
):
    """`--compile` trains what eager trains (the same losses to fp32 rounding of the fused
    kernels) and prints no dynamo graph-break warning (the input check and the chunked head,
    which read values on the host, stay out of the graph)."""
    argv = _small_run(packed_data, layers=1, steps=3, extra=["--precision", "fp32"])
    code, _, err = cli([*argv, "--out", str(tmp_path / "eager")], capfd)
    assert code == 0, err
    code, out, err = cli([*argv, "--compile", "--out", str(tmp_path / "compiled")], capfd)
    assert code == 0, err
    said = out + err + "\n".join(r.getMessage() for r in caplog.records)  # dynamo logs them
    assert "graph break" not in said.lower()
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) < 1e-3
