"""DTL: train decoder-only transformer language models from scratch and put them to work.

>>> import dtl
>>> model = dtl.TransformerLM(dtl.ModelConfig.preset("tiny", vocab_size=8192))
"""

from dtl.config import PRESETS, ModelConfig
from dtl.errors import DtlError
from dtl.model import KVCache, TransformerLM

__version__ = "0.1.0"
__all__ = ["PRESETS", "DtlError", "KVCache", "ModelConfig", "TransformerLM", "__version__"]
