"""DTL: train decoder-only transformer language models from scratch and put them to work.

>>> import dtl
>>> model = dtl.TransformerLM(dtl.ModelConfig.preset("tiny", vocab_size=8192))
"""

from dtl.threads import set_wait_policy

set_wait_policy()  # before anything imports torch, which loads OpenMP: see dtl/threads.py

from dtl.errors import DtlError  # noqa: E402
from dtl.model import KVCache, TransformerLM  # noqa: E402
from dtl.model.config import PRESETS, ModelConfig  # noqa: E402

__version__ = "0.1.0"
__all__ = ["PRESETS", "DtlError", "KVCache", "ModelConfig", "TransformerLM", "__version__"]
