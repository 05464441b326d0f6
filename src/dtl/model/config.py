"""Model configuration and the spec's presets.

>>> cfg = ModelConfig.preset("small")
>>> cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, cfg.max_seq_length
(256, 8, 6, 1024, 512)
>>> ModelConfig.preset("tiny", vocab_size=8192).vocab_size
8192
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtl.errors import DtlError

GPT2_VOCAB_SIZE = 50_257
# ModelConfig's fields that record training, not the model's sizes (never training flags).
TRAINED_FIELDS = ("trained_seq_len", "base_seq_len")


@dataclass(frozen=True)
class ModelConfig:
    """The sizes of a TransformerLM. Every field is what the spec's diagrams call it."""

    vocab_size: int = GPT2_VOCAB_SIZE
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 6
    d_ff: int = 1024
    max_seq_length: int = 512
    dropout: float = 0.1
    # What the weights were trained at (tokens per row), recorded by training; not sizes, so
    # they take no part in comparing two models. `trained_seq_len` is the latest run's;
    # `base_seq_len` the source model's when a run started from another's weights
    # (--init-from). None: a model saved before they were recorded (see `context`).
    trained_seq_len: int | None = field(default=None, compare=False)
    base_seq_len: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_seq_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DtlError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in TRAINED_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 < value <= self.max_seq_length):  # fmt: skip
                raise DtlError(
                    f"ModelConfig.{name} must be an integer from 1 to max_seq_length "
                    f"({self.max_seq_length}), got {value!r}"
                )
        if self.d_model % self.n_heads:
            raise DtlError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}): "
                f"each head gets d_model / n_heads dimensions; try n_heads in "
                f"{[h for h in range(1, 33) if self.d_model % h == 0]}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise DtlError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def context(self) -> int:
        """The positions the model was trained on, which eval, generation and serving keep
        to: the latest run's rows, else (a model saved before this was recorded, a legacy
        .pt) max_seq_length, the positional table's length.

        >>> ModelConfig.preset("tiny", trained_seq_len=128).context
        128
        """
        return self.trained_seq_len or self.max_seq_length

    @property
    def d_k(self) -> int:
        """Dimensions per attention head."""
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (`tiny`, `small`, `medium`, `large`, `qa`), with fields overridden."""
        if name not in PRESETS:
            raise DtlError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = dataclasses.asdict(PRESETS[name])
        unknown = set(overrides) - set(fields)
        if unknown:
            raise DtlError(
                f"unknown ModelConfig field(s) {sorted(unknown)}; valid fields: {sorted(fields)}"
            )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"dropout", *TRAINED_FIELDS}
        if missing:
            raise DtlError(f"model config is missing field(s) {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DtlError(f"{path}: no such file; a model directory holds config.json") from None
        except json.JSONDecodeError as err:
            raise DtlError(f"{path}: not valid JSON ({err})") from None
        except UnicodeDecodeError:  # e.g. a .pt or .safetensors file passed as the config
            raise DtlError(
                f"{path}: not a JSON text file; pass a model's config.json or its directory"
            ) from None
        except IsADirectoryError:
            raise DtlError(f"{path}: is a directory; pass the config.json inside it") from None
        if not isinstance(data, dict):
            raise DtlError(f"{path}: expected a JSON object of ModelConfig fields")
        return cls.from_dict(data)


# The spec's presets ("Model Configuration Sizes"), plus `tiny` for CPU work: 4 layers of
# width 128 train at thousands of tokens/s on a laptop CPU, and with an 8k BPE vocabulary
# (`dtl tokenizer train --vocab-size 8192`) the model has 2.9M parameters.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=128, n_heads=4, n_layers=4, d_ff=512, max_seq_length=256),
    "small": ModelConfig(d_model=256, n_heads=8, n_layers=6, d_ff=1024, max_seq_length=512),
    "medium": ModelConfig(d_model=512, n_heads=8, n_layers=8, d_ff=2048, max_seq_length=512),
    "large": ModelConfig(d_model=768, n_heads=12, n_layers=12, d_ff=3072, max_seq_length=512),
    "qa": ModelConfig(d_model=512, n_heads=8, n_layers=10, d_ff=2048, max_seq_length=1024),
}
# The preset `dtl train`, `dtl info` and `dtl prepare` assume when none is named: the one that
# trains on a laptop CPU. Its context is the rows `dtl prepare` cuts text into by default.
DEFAULT_PRESET = "tiny"


def preset_context(name: str | None = None) -> int:
    """The max_seq_length of preset `name` (DEFAULT_PRESET when None): the rows data is
    prepared into when no length is given (`dtl prepare`, a raw `dtl train --data FILE`).

    >>> preset_context(), preset_context("qa")
    (256, 1024)
    """
    return ModelConfig.preset(name or DEFAULT_PRESET).max_seq_length


# What the spec's diagram claims for each preset (vocab 50,257), printed beside the truth.
SPEC_CLAIMED_PARAMS: dict[str, str] = {
    "small": "~27M (its worked example: ~30.5M)",
    "medium": "~85M",
    "large": "~355M",
    "qa": "~110M",
}
