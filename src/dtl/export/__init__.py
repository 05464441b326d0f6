"""Taking a trained model out of DTL: a transformers folder or an ONNX decoder.

    dtl export runs/tiny --format hf -o tiny-hf      # AutoModelForCausalLM (trust_remote_code)
    dtl export runs/tiny --format onnx -o tiny-onnx  # onnxruntime, with past key/values

>>> from dtl.export import export_model
>>> export_model("runs/tiny", "hf", "tiny-hf").name
'tiny-hf'

The model is loaded the way `dtl generate --model` loads it (`dtl.model.store.load_model`: a run
dir, a model dir or a legacy `.pt`). The export is written into a temporary folder beside the
target and renamed onto it at the end, so a failure never leaves half an export behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from dtl.errors import DtlError

FORMATS = ("hf", "onnx")


def check_target(out: str | os.PathLike, force: bool = False) -> Path:
    """The output folder, refused when it holds files (unless `force`) or is not a folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DtlError(f"-o {out}: exists and is not a folder; name a new folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DtlError(
            f"-o {out}: the folder is not empty; name a new folder, or pass --force to replace it"
        )
    if not out.parent.is_dir():
        raise DtlError(f"-o {out}: its parent folder {out.parent} does not exist")
    return out


def write_folder(out: Path, fill: Callable[[Path], object]) -> Path:
    """`fill(tmp)` writes a fresh folder beside `out`, which then replaces `out` (an empty or,
    with --force, an old one): never a half-written export under the real name."""
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        if out.exists():
            old = out.parent / f".old-export-{out.name}-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_model(
    spec: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    force: bool = False,
    tokenizer=None,
    opset: int | None = None,
) -> Path:
    """Export the model `spec` names as `fmt` ("hf" or "onnx") into the folder `out`."""
    if fmt not in FORMATS:
        raise DtlError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = check_target(out, force)
    from dtl.model.store import load_model, resolve_model_dir

    source = resolve_model_dir(spec)
    model, tok = load_model(spec, tokenizer=tokenizer)
    if fmt == "hf":
        from dtl.export.hf import write_hf

        return write_folder(out, lambda tmp: write_hf(model, tok, tmp, source, out.name))
    from dtl.export.onnx import write_onnx

    return write_folder(out, lambda tmp: write_onnx(model, tok, tmp, source, out.name, opset=opset))
