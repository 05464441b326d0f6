"""Decode speed of `dtl.generate` against Hugging Face's GPT-2 `generate`, and the server's
time to first token and tokens/s.

The `small` preset with random weights (d_model 256, 6 layers, d_ff 1024, GPT-2 vocabulary),
fp32 on the CPU: a 16-token prompt, 128 new tokens, top-k 50. Ours with the KV cache, without
it, and `GPT2LMHeadModel.generate` of the same dimensions (KV cache on), at batch 1 and 8,
in one run. Decoding one token reads every weight of the blocks and the vocabulary head
(the embedding table only gives one row), so memory bandwidth bounds it: the run measures
the machine's bandwidth too and prints the fraction of it each decoder reaches.

    python benchmarks/bench_generate.py                 # everything (a few minutes on 2 cores)
    python benchmarks/bench_generate.py --no-server     # just the decode loop
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# ruff: noqa: E402  (torch must load after the wait policy is set)
from dtl.threads import set_wait_policy

set_wait_policy(verb="generate")  # torch's OpenMP waits as under `dtl generate` (dtl.threads)

import torch
from peers import gpt2_peer

from dtl import ModelConfig, TransformerLM
from dtl.cli.serve import serve_threads
from dtl.generate import generate_tokens

PROMPT, NEW, TOP_K = 16, 128, 50
SHARED_GPT2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2"


def bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Best of `repeats` reads of an `mb` MB fp32 tensor (a sum reads each byte once)."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: torch.nn.Module, embedding_names: tuple[str, ...]) -> int:
    """Bytes of the weights one decode step reads: all but the tables it only takes a row of
    (GPT-2's token table is also its head, so for HF only the position table is left out)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith(embedding_names))  # fmt: skip


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up (the box is shared and noisy)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def hf_peer(config: ModelConfig):
    return gpt2_peer(config).eval()


def bench_decode(batch: int, repeats: int, ours, hf, bw: float) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (batch, PROMPT), generator=g)

    def run_ours(use_cache):
        return lambda: generate_tokens(ours, ids, NEW, top_k=TOP_K, seed=0, use_cache=use_cache)

    def run_hf():
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=TOP_K,
                        max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)  # fmt: skip

    rows = []
    for name, fn, model, emb in (
        ("dtl, KV cache", run_ours(True), ours, ("embedding.",)),
        ("dtl, no cache", run_ours(False), ours, ("embedding.",)),
        ("HF GPT2LMHeadModel.generate", run_hf, hf, ("transformer.wpe.",)),
    ):
        if name == "dtl, no cache" and repeats > 1:
            seconds = timed(fn, 1)  # slow: one timed run is enough
        else:
            seconds = timed(fn, repeats)
        steps_per_s = NEW / seconds
        bytes_per_s = steps_per_s * weight_bytes_per_token(model, emb)
        rows.append({"batch": batch, "decoder": name, "tokens_per_s": steps_per_s * batch,
                     "ms_per_step": 1e3 / steps_per_s,
                     "bandwidth_fraction": bytes_per_s / (bw * 1e9)})  # fmt: skip
    return rows


# ---------------------------------------------------------------------- the server
SERVER = """
import sys, torch, uvicorn
torch.set_num_threads(int(sys.argv[3]))
from dtl.model.store import load_model
from dtl.serve.api import create_app
model, tok = load_model(sys.argv[1])
uvicorn.run(create_app(model, tok, "small"), host="127.0.0.1", port=int(sys.argv[2]),
            log_level="warning")
"""


def bench_server(
    model: TransformerLM, streams: list[int], max_tokens: int, threads: int
) -> list[dict]:

    from dtl.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        load_tokenizer("gpt2").save(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-c", SERVER, tmp, str(port), str(threads)])
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_up(url, proc)
            body = {"prompt": "The history of the Normans begins", "max_tokens": max_tokens,
                    "temperature": 1.0, "top_k": TOP_K, "stream": True}  # fmt: skip
            _one_stream(url, body)  # warm-up
            return [_concurrent(url, body, n) for n in streams]
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _wait_up(url: str, proc) -> None:
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def _one_stream(url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first text chunk, text chunks) for one streamed completion."""
    import httpx

    start, first, chunks = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                if json.loads(line[6:])["choices"][0]["text"]:
                    first = first or time.perf_counter() - start
                    chunks += 1
    return first or float("nan"), chunks


def _concurrent(url: str, body: dict, n: int) -> dict:
    results: list[tuple[float, int]] = [(0.0, 0)] * n

    def client(i: int) -> None:
        results[i] = _one_stream(url, {**body, "seed": i})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    return {"streams": n, "ttft_ms_median": 1e3 * statistics.median(ttft),
            "ttft_ms_max": 1e3 * max(ttft), "tokens_per_s": sum(r[1] for r in results) / wall,
            "max_tokens": body["max_tokens"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-server", action="store_true", help="skip the server figures")
    parser.add_argument("--no-decode", action="store_true", help="only the server figures")
    parser.add_argument("--server-streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--server-threads",
        type=int,
        help="the server's threads (default: dtl serve's, all cores but one)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if SHARED_GPT2.is_dir():  # the server's model dir needs GPT-2's files, offline
        os.environ.setdefault("DTL_GPT2_DIR", str(SHARED_GPT2))
    torch.manual_seed(0)
    ours = TransformerLM(ModelConfig.preset("small")).eval()
    hf = hf_peer(ours.config)
    bw = bandwidth_gbs()
    print(f"torch {torch.__version__}, {args.threads} threads, fp32; read bandwidth {bw:.1f} GB/s")
    ours_mb = weight_bytes_per_token(ours, ("embedding.",)) / 1e6
    hf_mb = weight_bytes_per_token(hf, ("transformer.wpe.",)) / 1e6
    print(f"weights read per decode step: dtl {ours_mb:.1f} MB, HF {hf_mb:.1f} MB")
    figures: dict = {"bandwidth_gbs": bw, "threads": args.threads, "decode": [], "server": []}
    for batch in [] if args.no_decode else args.batches:
        rows = bench_decode(batch, args.repeats, ours, hf, bw)
        hf_rate = rows[-1]["tokens_per_s"]
        for row in rows:
            row["vs_hf"] = row["tokens_per_s"] / hf_rate
            print(f"batch {batch}: {row['decoder']:<28} {row['tokens_per_s']:8.1f} tok/s "
                  f"{row['ms_per_step']:7.2f} ms/step  {100 * row['bandwidth_fraction']:5.1f}% "
                  f"of bandwidth  {row['vs_hf']:.2f}x HF")  # fmt: skip
        figures["decode"] += rows
    if not args.no_server:
        server_threads = serve_threads(args.server_threads, os.cpu_count() or 1)
        print(f"server: {server_threads} thread(s), as `dtl serve --threads {server_threads}`")
        for row in bench_server(ours, args.server_streams, NEW, server_threads):
            print(f"server, {row['streams']} concurrent stream(s) of {row['max_tokens']} tokens: "
                  f"time to first token median {row['ttft_ms_median']:.0f} ms "
                  f"(max {row['ttft_ms_max']:.0f} ms), {row['tokens_per_s']:.1f} tok/s in all")  # fmt: skip
            figures["server"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
