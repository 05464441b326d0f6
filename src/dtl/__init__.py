"""DTL: train decoder-only transformer language models from scratch and put them to work.

>>> import dtl
>>> model = dtl.TransformerLM(dtl.ModelConfig.preset("tiny", vocab_size=8192))

The model's names load torch when first used (`dtl.lazy`): `import dtl` alone, and the
verbs that never run a model (`dtl extract`, its worker processes), do not import it.
"""

from dtl.threads import set_wait_policy

set_wait_policy()  # before anything imports torch, which loads OpenMP: see dtl/threads.py

from dtl.errors import DtlError  # noqa: E402
from dtl.lazy import lazy_exports  # noqa: E402

__version__ = "0.1.0"
__all__ = ["PRESETS", "DtlError", "KVCache", "ModelConfig", "TransformerLM", "__version__"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "KVCache": "dtl.model",
        "TransformerLM": "dtl.model",
        "PRESETS": "dtl.model.config",
        "ModelConfig": "dtl.model.config",
    },
)
