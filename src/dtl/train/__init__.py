"""Training: `dtl train` as functions. The loop, and the pieces it is built from:

config.py       TrainConfig; settings: defaults < saved run < --config file < flags;
                ResolvedRun, the run as decided once (context, model, lr schedule)
setup.py        the run's setup, in one order: processes, precision, run dir, data (a raw
                file is prepared into RUN_DIR/data) -> context -> model config -> lr
parallelize.py  the loss as the forward, activation checkpointing, DDP/FSDP, torch.compile
step.py         one step's arithmetic: token-weighted accumulation, clipping, evaluation
loop.py         Trainer (the loop) and train()
optim.py        AdamW's parameter groups and the lr schedule
precision.py    fp32 / bf16 / fp16 autocast, bf16 weight copies (CPU), the GradScaler
checkpoint.py   what a checkpoint holds and how a run resumes from one; RNG states
metrics.py      metrics.jsonl, TensorBoard, printed lines
interrupt.py    Ctrl-C: stop after this step and save
distributed.py  torchrun's processes: DDP, FSDP2, collectives
memory.py       parameter counts, memory estimates, out-of-memory advice
plot.py         loss.png of a run

>>> from dtl.train import TrainConfig, train
>>> summary = train(TrainConfig(data="data/wiki", out="runs/tiny", max_steps=200))  # doctest: +SKIP
"""

from dtl.run_dir import ResumeFrom
from dtl.train.checkpoint import seed_everything
from dtl.train.config import (
    RESUME_LOCKED,
    LrSchedule,
    ResolvedRun,
    TrainConfig,
    absolute_data,
    build_config,
    resolve_lr_schedule,
    resolve_seq_len,
)
from dtl.train.loop import MIN_LOSS_SCALE, Trainer, train
from dtl.train.parallelize import enable_activation_checkpointing
from dtl.train.setup import RunSetup, build_model_config, setup_run

__all__ = [
    "MIN_LOSS_SCALE",
    "RESUME_LOCKED",
    "LrSchedule",
    "ResolvedRun",
    "ResumeFrom",
    "RunSetup",
    "TrainConfig",
    "Trainer",
    "absolute_data",
    "build_config",
    "build_model_config",
    "enable_activation_checkpointing",
    "resolve_lr_schedule",
    "resolve_seq_len",
    "seed_everything",
    "setup_run",
    "train",
]
