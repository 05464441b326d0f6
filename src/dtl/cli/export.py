"""`dtl export`: a trained model as a transformers folder or an ONNX decoder."""

from __future__ import annotations

import argparse

from dtl.cli import add_common, add_verb
from dtl.errors import DtlError
from dtl.export import FORMATS

EXAMPLES = """examples:
  dtl export runs/tiny --format hf -o tiny-hf
  dtl export runs/tiny/checkpoints/step-1200 --format onnx -o tiny-onnx
  dtl export best_model.pt --format hf -o legacy-hf --tokenizer gpt2
  dtl export runs/tiny --format hf -o tiny-hf --force     # replace an earlier export

then, with transformers (offline, no dtl needed):
  AutoModelForCausalLM.from_pretrained("tiny-hf", trust_remote_code=True)
  PreTrainedTokenizerFast.from_pretrained("tiny-hf")    # the tokenizer runs no code
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_verb(
        subparsers,
        "export",
        help="write a model as a transformers folder or an ONNX decoder",
        description="Export MODEL (a run dir, a checkpoint dir or a legacy .pt, as dtl generate "
        "--model takes) for other tools: --format hf writes a folder that transformers loads "
        "with trust_remote_code=True (modeling code, safetensors weights, tokenizer.json, a "
        "model card ready for push_to_hub); --format onnx writes model.onnx, a decoder with "
        "past key/value inputs and outputs that onnxruntime runs.",
        examples=EXAMPLES,
    )
    p.add_argument("model", metavar="MODEL", help="a run dir, a checkpoint dir or a legacy .pt")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help=f"what to write: {' or '.join(FORMATS)}")  # fmt: skip
    p.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="the folder to write (new or empty)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace DIR if it already holds files")
    p.add_argument("--tokenizer", help="override the model's tokenizer: 'gpt2' or a directory")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dtl.export import export_model

    if args.format not in FORMATS:
        raise DtlError(f"--format {args.format}: unknown; choose one of {', '.join(FORMATS)}")
    out = export_model(args.model, args.format, args.out, force=args.force,
                       tokenizer=args.tokenizer)  # fmt: skip
    print(f"wrote {out} ({args.format})")
    return 0
