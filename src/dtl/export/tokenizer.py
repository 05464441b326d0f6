"""A DTL tokenizer as Hugging Face files: `tokenizer.json` (a fast tokenizer) and
`tokenizer_config.json`, which `PreTrainedTokenizerFast.from_pretrained(folder)` loads offline
without running any code (so does `AutoTokenizer`, which in transformers 5 first reads the
folder's `config.json` and so asks about the model's custom code: nothing here can stop that).

GPT-2's BPE and a BPE trained by `dtl tokenizer train` are the same kind of tokenizer (byte-level
BPE, GPT-2's pre-tokenizer split, no space added in front), so both become one `tokenizers` BPE
built from the vocabulary and merges DTL reads; it encodes as DTL does.

>>> Path("tok-export").mkdir()
>>> write_hf_tokenizer(tokenizer, Path("tok-export"), context=256)
>>> sorted(p.name for p in Path("tok-export").iterdir())
['tokenizer.json', 'tokenizer_config.json']
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from dtl.errors import DtlError
from dtl.fileio import atomic_write_text
from dtl.tokenizer import EOT_TEXT


def hf_tokenizer(tokenizer) -> HFTokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes as the DTL `tokenizer` does."""
    vocab, merges = tokenizer.files.get("vocab.json"), tokenizer.files.get("merges.txt")
    if vocab is None or merges is None:
        raise DtlError(
            f"the {tokenizer.name} tokenizer was loaded without its vocabulary files (from "
            "tiktoken's cache), so it cannot be written out; pass --tokenizer DIR naming a "
            "folder with GPT-2's encoder.json + vocab.bpe, or set DTL_GPT2_DIR"
        )
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    except Exception as err:
        raise DtlError(f"{merges}: not a readable BPE merges file ({err})") from None
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    # end-of-text is already in the vocabulary (its id stays); marking it special lets
    # decode(skip_special_tokens=True) drop it, as transformers users expect
    hf.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    if hf.token_to_id(EOT_TEXT) != tokenizer.eos_id:
        raise DtlError(
            f"{vocab}: {EOT_TEXT} has id {hf.token_to_id(EOT_TEXT)}, not {tokenizer.eos_id}"
        )
    return hf


def write_hf_tokenizer(tokenizer, directory: Path, context: int) -> None:
    """Write tokenizer.json and tokenizer_config.json into `directory`."""
    hf = hf_tokenizer(tokenizer)
    atomic_write_text(directory / "tokenizer.json", hf.to_str(pretty=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode gives back the exact text
        "model_max_length": context,
    }
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
