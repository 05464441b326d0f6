"""`dtl info`: parameter breakdown and memory estimate for a preset or a model config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dtl.errors import DtlError
from dtl.model.config import PRESETS, SPEC_CLAIMED_PARAMS, ModelConfig

EXAMPLES = """examples:
  dtl info --preset small
  dtl info --preset tiny --vocab-size 8192 --batch-size 32 --seq-len 256
  dtl info --preset qa --fit 8GB              # settings that train it on an 8 GB GPU
  dtl info --config runs/tiny/checkpoints/latest/config.json --json
"""


def register(subparsers) -> None:
    from dtl.cli import add_common

    p = subparsers.add_parser(
        "info",
        help="parameter breakdown and memory estimate",
        description="Print a model's exact parameter counts (in the spec's layout) and the "
        "memory training and inference need.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=list(PRESETS), help="a named preset (default: small)")
    src.add_argument("--config", type=Path, help="a model config.json, or a model directory")
    p.add_argument("--vocab-size", type=int, help="override the vocabulary size")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: max_seq_length)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device the estimate is for "
                   "(dropout masks are 4 bytes on CPU, 1 on CUDA; default cpu, cuda with --fit)")
    p.add_argument("--fit", metavar="SIZE", help="memory budget such as 8GB: print settings "
                   "(micro-batch, accumulation, precision, checkpointing) that fit it")
    p.add_argument("--target-batch", type=int, default=32,
                   help="with --fit: the batch (sequences per optimizer step) to reach (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def load_config(args) -> tuple[str, ModelConfig]:
    if args.config is not None:
        path = args.config / "config.json" if args.config.is_dir() else args.config
        config = ModelConfig.from_json(path)
        if args.vocab_size:
            config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": args.vocab_size})
        return str(path), config
    name = args.preset or "small"
    return name, ModelConfig.preset(name, vocab_size=args.vocab_size)


def run(args) -> int:
    from dtl.train import memory

    name, config = load_config(args)
    seq_len = args.seq_len or config.max_seq_length
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
    fit = None
    if args.fit:
        try:
            budget = memory.parse_size(args.fit)
        except ValueError as err:
            raise DtlError(f"--fit: {err}") from None
        precisions = ("bf16", "fp16", "fp32") if device == "cuda" else ("fp32",)  # CPU: fp32
        options = memory.fit_options(
            config, budget, seq_len, args.target_batch, precisions=precisions, device=device
        )
        best = memory.recommend(options)
        fit = {
            "budget_bytes": budget,
            "target_batch": args.target_batch,
            "options": [o.__dict__ for o in options],
            "recommended": None if best is None else best.__dict__,
        }
        result["fit"] = fit
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(name, config, params, result["memory"], fit))
    if args.fit and fit["recommended"] is None:
        tried = "16-bit precision and " if device == "cuda" else ""
        raise DtlError(
            f"{name} does not fit in {args.fit} even with batch 1, {tried}activation "
            f"checkpointing at seq_len {seq_len}; try a shorter --seq-len or a smaller preset"
        )
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def format_report(name, config: ModelConfig, p: dict, mem: dict, fit: dict | None) -> str:
    D, F, V, L = config.d_model, config.d_ff, config.vocab_size, config.n_layers
    rows = [
        f"Model {name}: d_model {D}, n_heads {config.n_heads}, n_layers {L}, d_ff {F}, "
        f"max_seq_length {config.max_seq_length}, vocab {V:,}",
        "",
        "Parameters",
        f"  Embedding: {V:,} x {D}".ljust(52) + f"{p['embedding']:>14,}",
        f"  Positional encoding: {config.max_seq_length} x {D} (fixed)".ljust(52) + f"{0:>14,}",
        "  Per transformer block:",
        f"    Multi-head attention: 4 x ({D}x{D} + {D})".ljust(52) + f"{p['attention_per_block']:>14,}",
        f"    Feed-forward: {D}x{F} + {F} + {F}x{D} + {D}".ljust(52)
        + f"{p['feed_forward_per_block']:>14,}",
        f"    LayerNorms: 2 x 2 x {D}".ljust(52) + f"{p['norms_per_block']:>14,}",
        "    Total per block".ljust(52) + f"{p['per_block']:>14,}",
        f"  {L} blocks".ljust(52) + f"{p['blocks']:>14,}",
        f"  Final LayerNorm: 2 x {D}".ljust(52) + f"{p['final_norm']:>14,}",
        f"  Output head: {D} x {V:,} + {V:,}".ljust(52) + f"{p['head']:>14,}",
        "  Total".ljust(52) + f"{p['total']:>14,}",
    ]
    if name in SPEC_CLAIMED_PARAMS:
        rows.append(f"  (the spec says {SPEC_CLAIMED_PARAMS[name]}; the total above is exact)")
    fp, mx = mem["train_fp32"], mem["train_mixed"]
    rows += [
        "",
        f"Memory, training (batch {mem['batch_size']} x {mem['seq_len']} tokens, AdamW, "
        f"{mem['device']})".ljust(52) + f"{'fp32':>14}{'mixed 16-bit':>16}",
    ]
    for key, label in (
        ("weights", "weights (fp32 master copy)"),
        ("gradients", "gradients"),
        ("optimizer", "AdamW moments"),
        ("weight_casts", "16-bit weight copies (autocast)"),
        ("activations", "activations"),
        ("head_workspace", "head + loss workspace (chunked)"),
        ("train_total", "peak (gradients mostly come as activations go)"),
    ):
        rows.append(f"  {label}".ljust(52) + f"{_mb(fp[key]):>14}{_mb(mx[key]):>16}")
    rows += [
        "",
        f"Memory, inference ({mem['seq_len']} tokens, batch {mem['batch_size']})".ljust(52)
        + f"{'fp32':>14}{'16-bit':>16}",
        "  weights".ljust(52) + f"{_mb(fp['inference_weights']):>14}{_mb(mx['inference_weights']):>16}",
        "  KV cache".ljust(52) + f"{_mb(fp['kv_cache']):>14}{_mb(mx['kv_cache']):>16}",
        "  total".ljust(52) + f"{_mb(fp['inference_total']):>14}{_mb(mx['inference_total']):>16}",
    ]
    if fit is not None:
        extra = "CUDA context and " if mem["device"] == "cuda" else ""
        rows += ["", f"Fitting {_mb(fit['budget_bytes'])} (target batch {fit['target_batch']}, "
                 f"seq_len {mem['seq_len']}; includes {extra}allocator slack):"]
        for o in fit["options"]:
            rows.append(
                f"  {o['precision']:>4}  checkpointing {'on ' if o['activation_checkpointing'] else 'off'}"
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
            rows.append(f"Recommended: dtl train ... {flags}  (bf16 where the GPU supports it, "
                        "else fp16)")
    return "\n".join(rows)
