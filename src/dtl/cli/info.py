"""`dtl info`: parameter breakdown and memory estimate for a preset or a model config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dtl.cli import add_common, add_verb
from dtl.errors import DtlError
from dtl.model.config import DEFAULT_PRESET, PRESETS, SPEC_CLAIMED_PARAMS, ModelConfig
from dtl.train import memory
from dtl.train.precision import fit_precisions

EXAMPLES = """examples:
  dtl info                                    # the preset dtl train uses by default
  dtl info --preset small
  dtl info --preset tiny --vocab-size 8192 --batch-size 32 --seq-len 256
  dtl info --preset qa --fit 8GB              # settings that train it on an 8 GB GPU
  dtl info --config runs/tiny/checkpoints/latest/config.json --json
"""
DEVICE_HELP = (
    "device the estimate is for (dropout masks are 4 bytes on CPU, 1 on CUDA; default cpu, "
    "cuda with --fit)"
)
FIT_HELP = (
    "memory budget such as 8GB: print settings (micro-batch, accumulation, precision, "
    "checkpointing) that fit it"
)
LABEL_WIDTH = 52  # the report's first column


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_verb(
        subparsers,
        "info",
        help="parameter breakdown and memory estimate",
        description="Print a model's exact parameter counts (in the spec's layout) and the "
        "memory training and inference need.",
        examples=EXAMPLES,
    )
    add_common(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset",
        choices=list(PRESETS),
        help=f"a named preset (default: {DEFAULT_PRESET}, as dtl train)",
    )
    src.add_argument("--config", type=Path, help="a model config.json, or a model directory")
    p.add_argument("--vocab-size", type=int, help="override the vocabulary size")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument(
        "--seq-len",
        type=int,
        help="tokens per sequence (default: the context the model trained at, else max_seq_length)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help=DEVICE_HELP)
    p.add_argument("--fit", metavar="SIZE", help=FIT_HELP)
    p.add_argument(
        "--target-batch",
        type=int,
        default=32,
        help="with --fit: the batch (sequences per optimizer step) to reach (default 32)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def load_config(args: argparse.Namespace) -> tuple[str, ModelConfig]:
    """(name to show, config) of `--config` (a file or model dir) or `--preset`."""
    if args.config is not None:
        path = args.config / "config.json" if args.config.is_dir() else args.config
        config = ModelConfig.from_json(path)
        if args.vocab_size:
            config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": args.vocab_size})
        return str(path), config
    name = args.preset or DEFAULT_PRESET
    return name, ModelConfig.preset(name, vocab_size=args.vocab_size)


def run(args: argparse.Namespace) -> int:
    name, config = load_config(args)
    seq_len = args.seq_len or config.context
    if args.batch_size < 1 or seq_len < 1:
        raise DtlError("--batch-size and --seq-len must be positive")
    if seq_len > config.max_seq_length:
        raise DtlError(f"--seq-len {seq_len} is longer than max_seq_length {config.max_seq_length}")
    device = args.device or ("cuda" if args.fit else "cpu")
    params = memory.parameter_breakdown(config)
    train = {
        p: memory.estimate_memory(config, args.batch_size, seq_len, p, False, device)
        for p in ("fp32", "bf16")
    }
    result = {
        "model": name,
        "config": config.to_dict(),
        "context": config.context,
        "parameters": params,
        "spec_claimed": SPEC_CLAIMED_PARAMS.get(name),
        "memory": {
            "batch_size": args.batch_size,
            "seq_len": seq_len,
            "device": device,
            "train_fp32": train["fp32"],
            "train_mixed": train["bf16"],
        },
    }
    if device == "cpu":  # what decodes here: DTL's step kernel, or why the eager step does
        from dtl.generate.step_kernel import kernel_status

        result["decode_step"] = kernel_status()
    fit = _fit(args, config, seq_len, device) if args.fit else None
    if fit is not None:
        result["fit"] = fit
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(name, config, params, result["memory"], fit))
        if "decode_step" in result:
            print(f"\nDecode steps on this CPU: {result['decode_step']}")
    if fit is not None and fit["recommended"] is None:
        tried = "16-bit precision and " if len(fit_precisions(device)) > 1 else ""
        raise DtlError(
            f"{name} does not fit in {args.fit} even with batch 1, {tried}activation "
            f"checkpointing at seq_len {seq_len}; try a shorter --seq-len or a smaller preset"
        )
    return 0


def _fit(args: argparse.Namespace, config: ModelConfig, seq_len: int, device: str) -> dict:
    """The settings that train `config` within `--fit`, and the one to use (None: none fit)."""
    try:
        budget = memory.parse_size(args.fit)
    except ValueError as err:
        raise DtlError(f"--fit: {err}") from None
    precisions = fit_precisions(device)  # CPU: bf16 only where it has native bf16 units
    options = memory.fit_options(
        config, budget, seq_len, args.target_batch, precisions=precisions, device=device
    )
    best = memory.recommend(options)
    return {
        "budget_bytes": budget,
        "target_batch": args.target_batch,
        "options": [o.__dict__ for o in options],
        "recommended": None if best is None else best.__dict__,
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _row(label: str, *columns: str) -> str:
    """A label, then right-aligned columns: the first 14 wide, the rest 16."""
    widths = [14] + [16] * (len(columns) - 1)
    return label.ljust(LABEL_WIDTH) + "".join(
        f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)
    )


def format_report(name: str, config: ModelConfig, p: dict, mem: dict, fit: dict | None) -> str:
    """The text `dtl info` prints: parameters, then training and inference memory, then --fit."""
    rows = [
        f"Model {name}: d_model {config.d_model}, n_heads {config.n_heads}, n_layers "
        f"{config.n_layers}, d_ff {config.d_ff}, max_seq_length {config.max_seq_length}, "
        f"vocab {config.vocab_size:,}",
        *_context_rows(config),
        "",
        *_parameter_rows(name, config, p),
        "",
        *_memory_rows(mem),
    ]
    if fit is not None:
        rows += ["", *_fit_rows(fit, mem)]
    return "\n".join(rows)


def trained_context(config: ModelConfig) -> str:
    """How the context eval, generation and serving use came about, in words.

    >>> trained_context(ModelConfig.preset("tiny", trained_seq_len=128, base_seq_len=256))
    'context 128 tokens: trained at 128 (fine-tuned from a model trained at 256)'
    """
    if config.trained_seq_len is None:
        return f"context {config.context} tokens: max_seq_length (training did not record its rows)"
    base = config.base_seq_len
    source = f" (fine-tuned from a model trained at {base})" if base is not None else ""
    return f"context {config.context} tokens: trained at {config.trained_seq_len}{source}"


def _context_rows(config: ModelConfig) -> list[str]:
    """The trained-context line, for a model that has one (a preset has none)."""
    if config.trained_seq_len is None and config.base_seq_len is None:
        return []
    return [f"  {trained_context(config)}"]


def _parameter_rows(name: str, config: ModelConfig, p: dict) -> list[str]:
    D, F, V, L = config.d_model, config.d_ff, config.vocab_size, config.n_layers
    counts = [
        (f"  Embedding: {V:,} x {D}", p["embedding"]),
        (f"  Positional encoding: {config.max_seq_length} x {D} (fixed)", 0),
        ("  Per transformer block:", None),
        (f"    Multi-head attention: 4 x ({D}x{D} + {D})", p["attention_per_block"]),
        (f"    Feed-forward: {D}x{F} + {F} + {F}x{D} + {D}", p["feed_forward_per_block"]),
        (f"    LayerNorms: 2 x 2 x {D}", p["norms_per_block"]),
        ("    Total per block", p["per_block"]),
        (f"  {L} blocks", p["blocks"]),
        (f"  Final LayerNorm: 2 x {D}", p["final_norm"]),
        (f"  Output head: {D} x {V:,} + {V:,}", p["head"]),
        ("  Total", p["total"]),
    ]
    rows = ["Parameters"]
    rows += [label if n is None else _row(label, f"{n:,}") for label, n in counts]
    if name in SPEC_CLAIMED_PARAMS:
        rows.append(f"  (the spec says {SPEC_CLAIMED_PARAMS[name]}; the total above is exact)")
    return rows


# The training memory report's rows: (key in estimate_memory's result, label).
TRAIN_MEMORY_ROWS = (
    ("weights", "weights (fp32 master copy)"),
    ("gradients", "gradients"),
    ("optimizer", "AdamW moments"),
    ("weight_casts", "16-bit weight copies"),
    ("activations", "activations"),
    ("head_workspace", "head + loss workspace (chunked)"),
    ("train_total", "peak (gradients mostly come as activations go)"),
)


def _memory_rows(mem: dict) -> list[str]:
    fp, mx = mem["train_fp32"], mem["train_mixed"]
    batch, seq_len = mem["batch_size"], mem["seq_len"]
    title = f"Memory, training (batch {batch} x {seq_len} tokens, AdamW, {mem['device']})"
    rows = [_row(title, "fp32", "mixed 16-bit")]
    rows += [_row(f"  {label}", _mb(fp[key]), _mb(mx[key])) for key, label in TRAIN_MEMORY_ROWS]
    rows += [
        "",
        _row(f"Memory, inference ({seq_len} tokens, batch {batch})", "fp32", "16-bit"),
        _row("  weights", _mb(fp["inference_weights"]), _mb(mx["inference_weights"])),
        _row("  KV cache" + (" (fp32 on a CPU)" if mem["device"] == "cpu" else ""),
             _mb(fp["kv_cache"]), _mb(mx["kv_cache"])),  # fmt: skip
    ]
    if mem["device"] == "cpu":
        rows.append(_row("  the decode step's copy of the weights", _mb(fp["decode_copy"]),
                         _mb(mx["decode_copy"])))  # fmt: skip
    rows += [
        _row("  total", _mb(fp["inference_total"]), _mb(mx["inference_total"])),
    ]
    return rows


def _fit_rows(fit: dict, mem: dict) -> list[str]:
    extra = "CUDA context and " if mem["device"] == "cuda" else ""
    rows = [
        f"Fitting {_mb(fit['budget_bytes'])} (target batch {fit['target_batch']}, "
        f"seq_len {mem['seq_len']}; includes {extra}allocator slack):"
    ]
    for o in fit["options"]:
        checkpointing = "on " if o["activation_checkpointing"] else "off"
        rows.append(
            f"  {o['precision']:>4}  checkpointing {checkpointing}"
            f"  --batch-size {o['micro_batch']:<4} --grad-accum {o['grad_accum']:<4}"
            f"  ~{_mb(o['bytes'])}"
        )
    best = fit["recommended"]
    if best is not None:
        flags = (
            f"--precision {best['precision']} --batch-size {best['micro_batch']} "
            f"--grad-accum {best['grad_accum']}"
            + (" --activation-checkpointing" if best["activation_checkpointing"] else "")
        )
        rows.append(
            f"Recommended: dtl train ... {flags}  (bf16 where the GPU supports it, else fp16)"
        )
    return rows
