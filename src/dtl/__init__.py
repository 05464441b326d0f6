"""DTL: train decoder-only transformer language models from scratch and put them to work.

>>> import dtl
>>> model = dtl.TransformerLM(dtl.ModelConfig.preset("tiny", vocab_size=8192))
"""

from dtl.errors import DtlError
from dtl.model import KVCache, TransformerLM
from dtl.model.config import PRESETS, ModelConfig

__version__ = "0.1.0"
__all__ = ["PRESETS", "DtlError", "KVCache", "ModelConfig", "TransformerLM", "__version__"]
