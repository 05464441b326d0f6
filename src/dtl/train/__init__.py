"""Training: `dtl train` as functions.

>>> from dtl.train import TrainConfig, train
>>> summary = train(TrainConfig(data="data/wiki", out="runs/tiny", max_steps=200))  # doctest: +SKIP
"""

from dtl.train.loop import (
    MIN_LOSS_SCALE,
    RESUME_LOCKED,
    TrainConfig,
    Trainer,
    absolute_data,
    build_model_config,
    enable_activation_checkpointing,
    seed_everything,
    train,
)

__all__ = [
    "MIN_LOSS_SCALE", "RESUME_LOCKED", "TrainConfig", "Trainer", "absolute_data",
    "build_model_config", "enable_activation_checkpointing", "seed_everything", "train",
]
