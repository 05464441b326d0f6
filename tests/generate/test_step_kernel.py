"""DTL's decode-step kernel (`dtl.generate.step_kernel`) against the model's own forward.

The oracle is always an fp32 forward over the whole sequence (no cache, torch's kernels): for
an fp32 model the model itself; for bf16 a copy of the fp32 model whose every weight and
buffer is rounded to bf16 (the kernel reads bf16 weights and computes in fp32); for int8 a
copy whose linear layers hold the int8 model's dequantized weights (int8 value x its row's
scale). So each checks that the kernel computes that model, not that it matches itself."""

from __future__ import annotations

import copy
import json
import os
import platform
import stat

import pytest
import torch
from test_decode import odd_model
from testkit import run_cli

from dtl.errors import DtlError
from dtl.generate import generate_tokens, step_kernel
from dtl.generate.decode import plan_for
from dtl.generate.step_kernel import kernel_library, step_for
from dtl.model.dtype import to_inference_dtype
from dtl.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def built():
    """The kernel, built here. Without a C compiler it cannot be: the tests skip with why,
    and fail under CI=true (CI has one: `dtl train --compile`'s inductor needs it too)."""
    build = kernel_library()
    if build.library is None:
        message = f"no step kernel here: {build.why_not}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return build


def oracle_for(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """The fp32 model that `to_inference_dtype(model, dtype)` approximates, exactly."""
    ref = copy.deepcopy(model)
    if dtype == "bf16":
        with torch.no_grad():
            for t in [*ref.parameters(), *ref.buffers()]:
                if t.is_floating_point():
                    t.copy_(t.bfloat16().float())
    elif dtype == "int8":
        quantized = to_inference_dtype(copy.deepcopy(model), "int8")
        layers = dict(quantized.named_modules())
        with torch.no_grad():
            for name, module in ref.named_modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(layers[name].weight().dequantize())
                    module.bias.copy_(layers[name].bias())
    return ref


def sharp_model() -> torch.nn.Module:
    """`odd_model` with its attention made to matter: a freshly initialised model attends
    almost evenly and its scaled embeddings swamp what attention adds, so a wrong attention
    would hardly move its logits. Here queries and keys are 10x (peaked attention), values and
    outputs 8x (a 5% error in the attention scale moves the logits by ~1e-3)."""
    model = odd_model(d_model=24)
    with torch.no_grad():
        for block in model.transformer_blocks:
            a = block.attention
            for w, k in ((a.w_q, 10), (a.w_k, 10), (a.w_v, 8), (a.w_o, 8)):
                w.weight.mul_(k)
    return model


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_each_step_is_the_forward_of_the_model_it_runs(built, dtype):
    """Token by token from an empty cache, every step's logits are the full forward's at that
    position (odd sizes: 3 heads, vocabulary 101, so no product splits evenly into 4 rows)."""
    model = sharp_model()
    ref = oracle_for(model, dtype)
    run = to_inference_dtype(copy.deepcopy(model), dtype)
    kernel = step_for(run)
    assert kernel is not None
    ids = torch.tensor([7, 3, 99, 0, 42, 100, 5, 5, 61, 12])
    with torch.no_grad():
        want = ref(ids[None])[0]  # (T, V)
        cache = run.allocate_cache(1, 16)
        for t, token in enumerate(ids):
            got = kernel(token[None], cache)[0]
            torch.testing.assert_close(got, want[t], rtol=1e-5, atol=2e-5, msg=f"position {t}")
    assert cache.length == len(ids)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v2", "x86-64"])
def test_the_kernel_built_for_narrower_vectors_computes_the_same(built, march, tmp_path,
                                                                 monkeypatch):
    """Built for AVX2 (8-wide vectors), SSE4 and plain x86-64 (4-wide), as on CPUs without
    AVX-512: each format's steps against its oracle, at 1 and 5 rows (5: 4 rows at a time,
    then 1)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("these -march levels are x86's")
    needs = {"x86-64-v3": {"avx2", "fma", "bmi2"}, "x86-64-v2": {"sse4_2", "popcnt"}}
    missing = needs.get(march, set()) - set(step_kernel._cpu_flags().split())
    if missing:  # the build would stop this process with an illegal instruction
        pytest.skip(f"this CPU cannot run a {march} build (no {', '.join(sorted(missing))})")
    flags = [f"-march={march}" if f == "-march=native" else f for f in step_kernel.FLAGS]
    monkeypatch.setattr(step_kernel, "FLAGS", flags)
    monkeypatch.setenv("DTL_CACHE_DIR", str(tmp_path))
    library = step_kernel._compile().library
    assert library is not None
    model = sharp_model()
    ids = torch.tensor([[7, 3, 99, 0, 42, 100], [5, 5, 61, 12, 1, 2], [9, 8, 7, 6, 5, 4],
                        [1, 1, 1, 1, 1, 1], [0, 50, 100, 50, 0, 3]])  # fmt: skip
    for dtype in ("fp32", "bf16", "int8"):
        ref = oracle_for(model, dtype)
        run = to_inference_dtype(copy.deepcopy(model), dtype)
        kernel = step_kernel.StepKernel.of(run, library)
        for rows in (1, 5):
            with torch.no_grad():
                want = ref(ids[:rows])  # (rows, T, V)
                cache = run.allocate_cache(rows, 8)
                for t in range(ids.size(1)):
                    got = kernel(ids[:rows, t], cache)
                    torch.testing.assert_close(got, want[:, t], rtol=1e-5, atol=2e-5,
                                               msg=f"{dtype}, {rows} rows, position {t}")  # fmt: skip


def test_a_cache_from_the_forward_with_padding_and_after_rows_leave(built):
    """The forward fills the cache for a left-padded batch; then the rows step on through the
    kernel, three at once and, after `keep_rows`, one (a new cache, less its padded slots):
    each step's logits and the keys it stored are the forward's."""
    model = sharp_model()
    kernel = step_for(model)
    ids = torch.tensor([[0, 0, 5, 9, 14], [3, 1, 4, 1, 5], [0, 0, 0, 0, 7]])
    mask = (torch.arange(5)[None] >= torch.tensor([[2], [0], [4]])).long()
    new = torch.tensor([[11, 40, 2], [12, 41, 3], [13, 42, 4]])  # (steps, B)
    with torch.no_grad():
        cache, full = model.allocate_cache(3, 12), model.allocate_cache(3, 12)
        for c in (cache, full):
            model(ids, mask, cache=c, last_only=True)
        for step in new[:2]:
            got = kernel(step, cache)
            want = model(step[:, None], cache=full, last_only=True)[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
        for a, b in zip(cache.keys + cache.values, full.keys + full.values, strict=True):
            torch.testing.assert_close(a[:, :, : full.length], b[:, :, : full.length])
        one, one_full = cache.keep_rows([0]), full.keep_rows([0])
        got = kernel(new[2, :1], one)
        want = model(new[2, :1, None], cache=one_full, last_only=True)[:, -1]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_a_padded_prompt_prefills_as_the_forward_and_steps_on(built, dtype, threads,
                                                              monkeypatch):
    """A left-padded batch's prompt in one call (`run`, T = 5) and then two steps: each call's
    logits are the oracle forward's at each row's last token, over the whole text so far (no
    cache), and the real tokens' keys are the forward's. On 3 threads too: the work split
    unevenly, each phase waiting for the one before."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the kernel asks for
    model = sharp_model()
    ref = oracle_for(model, dtype)
    run = to_inference_dtype(copy.deepcopy(model), dtype)
    kernel = step_for(run)
    ids = torch.tensor([[0, 0, 5, 9, 14], [3, 1, 4, 1, 5], [0, 0, 0, 0, 7]])
    mask = (torch.arange(5)[None] >= torch.tensor([[2], [0], [4]])).long()
    new = torch.tensor([[11, 40, 2], [12, 41, 3]])  # (steps, B)
    with torch.no_grad():
        cache = run.allocate_cache(3, 12)
        got = kernel.run(ids, cache, mask)
        torch.testing.assert_close(got, ref(ids, mask)[:, -1], rtol=1e-5, atol=2e-5)
        for step in new:
            ids = torch.cat([ids, step[:, None]], 1)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            got = kernel(step, cache)
            torch.testing.assert_close(got, ref(ids, mask)[:, -1], rtol=1e-5, atol=2e-5)
        if dtype == "fp32":
            full = model.allocate_cache(3, 12)
            model(ids, mask, cache=full)
            real = mask.bool()[:, None, :, None]  # (B, 1, T, 1): padding slots hold anything
            for a, b in zip(cache.keys + cache.values, full.keys + full.values, strict=True):
                torch.testing.assert_close((a[:, :, :7] * real), (b[:, :, :7] * real))


def test_generating_through_the_kernel_lays_out_no_second_copy(built):
    """Prompts and steps of a batch go through the kernel, so the plan's oneDNN-packed and
    one-row layouts (a copy of the weights each) are never made; greedy tokens are those of
    the forward's own loop without a cache."""
    model = odd_model()
    ids = torch.tensor([[0, 4, 5], [1, 2, 3]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = generate_tokens(model, ids, 12, temperature=0, attention_mask=mask)
    plan = plan_for(model)
    assert plan.several is None and plan.built_one_row is None and plan.kernel
    ref = generate_tokens(model, ids, 12, temperature=0, attention_mask=mask, use_cache=False)
    assert torch.equal(out, ref)


def test_large_calls_go_to_torchs_kernels(built, monkeypatch):
    """Steps of more than STEP_ROWS rows and prompts of more than PREFILL_TOKENS tokens in all
    run on torch's ops (its matrix kernels win there, docs/benchmarks.md); the rest on DTL's."""
    model = odd_model()
    plan = plan_for(model)
    seen = []
    real = step_kernel.StepKernel.run
    monkeypatch.setattr(step_kernel.StepKernel, "run",
                        lambda self, ids, c, m=None: seen.append(ids.shape) or real(self, ids, c, m))  # fmt: skip
    monkeypatch.setattr(step_kernel, "STEP_ROWS", 4)  # this model's context is 40 tokens
    monkeypatch.setattr(step_kernel, "PREFILL_TOKENS", 16)
    with torch.no_grad():
        for rows, new in [(4, 1), (5, 1), (1, 16), (2, 8), (1, 17), (3, 6)]:
            cache = model.allocate_cache(rows, 20)
            plan.last_logits(model, torch.ones(rows, new, dtype=torch.long), None, cache)
            assert cache.length == new
    assert seen == [(4, 1), (1, 16), (2, 8)]


def test_a_bad_prompt_gets_the_forwards_message_and_leaves_the_cache(built):
    model = odd_model()
    plan = plan_for(model)
    cache = model.allocate_cache(2, 6)
    cases = [
        (torch.tensor([[1.0, 2.0]] * 2), None, "input_ids must be an integer tensor"),
        (torch.tensor([[1, 2, 3]] * 2), torch.ones(2, 2), "attention_mask shape"),
        (torch.tensor([[1, 2, 3, 4, 5, 6, 7]] * 2), None, "the KV cache is full"),
        (torch.tensor([[1, 2, 300], [0, 1, 2]]), torch.tensor([[0, 1, 1], [1, 1, 1]]),
         "token ids must be in"),
    ]  # fmt: skip
    for ids, mask, message in cases:
        with pytest.raises(DtlError, match=message):
            plan.last_logits(model, ids, mask, cache)
        assert cache.length == 0 and not cache.has_padding


@pytest.mark.parametrize("rows", [1, 3])
def test_the_token_loop_runs_the_kernel(built, rows, monkeypatch):
    """`DecodePlan.step` goes through the kernel (spied on), and greedy decoding gives the
    eager step's tokens."""
    model = odd_model()
    plan = plan_for(model)
    calls = []
    real = step_kernel.StepKernel.__call__
    monkeypatch.setattr(step_kernel.StepKernel, "__call__",
                        lambda self, t, c: calls.append(t.size(0)) or real(self, t, c))  # fmt: skip
    tokens = {}
    with torch.no_grad():
        for way in ("kernel", "eager"):
            cache = model.allocate_cache(rows, 30)
            prompt = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])[:rows]
            logits = model(prompt, cache=cache, last_only=True)[:, -1]
            out = []
            for _ in range(20):
                token = logits.argmax(-1)
                out.append(token.tolist())
                step = plan.step if way == "kernel" else plan.eager_step
                logits = step(model, token, cache)
            tokens[way] = out
    assert calls == [rows] * 20
    assert tokens["kernel"] == tokens["eager"]


def test_a_cache_it_does_not_read_takes_the_eager_step(built):
    """A bf16 model's bf16 KV cache (made by hand: on a CPU `allocate_cache` makes it fp32)
    steps through the eager plan."""
    model = to_inference_dtype(odd_model(), "bf16")
    plan = plan_for(model)
    cache = KVCache.allocate(model.config, 1, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), cache=cache, last_only=True)
        assert not step_for(model).takes(cache)
        assert plan.step(model, torch.tensor([3]), cache).shape == (1, 101)
        with pytest.raises(DtlError, match="reads an fp32 KV cache"):
            step_for(model)(torch.tensor([4]), cache)
    assert cache.length == 3


def test_a_bad_token_id_is_refused_not_read(built):
    model = odd_model()
    kernel = step_for(model)
    cache = model.allocate_cache(2, 8)
    with pytest.raises(DtlError, match=r"token id 101 \(row 1\) is outside the model's vocab"):
        kernel(torch.tensor([3, 101]), cache)
    assert cache.length == 0
    with pytest.raises(DtlError, match="token id -1"):
        kernel(torch.tensor([-1, 0]), cache)


def test_it_is_built_once_and_then_loaded(tmp_path, monkeypatch, capfd):
    """The first process builds into DTL's cache folder, and says so; a later one finds it
    there and runs no compiler (a `cc` wrapper counts the builds)."""
    real = step_kernel.shutil.which("cc") or step_kernel.shutil.which("gcc")
    if real is None:
        message = "no C compiler here"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    log = tmp_path / "builds.log"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *-shared*) echo build >> "{log}";; esac\n'
                       f'exec "{real}" "$@"\n')  # fmt: skip
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("DTL_CACHE_DIR", str(tmp_path / "cache"))
    first = step_kernel._compile()
    second = step_kernel._compile()
    assert first.library is not None and second.library is not None
    assert log.read_text().splitlines() == ["build"]
    said = capfd.readouterr().err
    assert said.count("building DTL's decode-step kernel for this CPU") == 1, said
    assert len(list((tmp_path / "cache" / "kernels").glob("step_kernel-*.so"))) == 1


@pytest.mark.parametrize(("env", "why"), [
    ({"DTL_STEP_KERNEL": "0"}, "off (DTL_STEP_KERNEL=0)"),
    ({"CC": "/nonexistent/cc"}, "/nonexistent/cc does not run"),
])  # fmt: skip
def test_without_the_kernel_the_eager_step_runs_and_info_says_why(env, why, tmp_path,
                                                                 monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DTL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(step_kernel, "_BUILD", None)
    assert step_kernel.kernel_status().startswith(f"torch's ops, eager: {why}")
    model = odd_model()
    assert step_for(model) is None
    plan = plan_for(model)
    with torch.no_grad():
        a, b = model.allocate_cache(1, 8), model.allocate_cache(1, 8)
        for c in (a, b):
            model(torch.tensor([[1, 2]]), cache=c, last_only=True)
        assert torch.equal(plan.step(model, torch.tensor([3]), a),
                           plan.eager_step(model, torch.tensor([3]), b))  # fmt: skip


def test_dtl_info_says_what_decodes_here(built, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(["info", "--preset", "tiny"], capsys)
    assert code == 0 and out.rstrip().endswith("Decode steps on this CPU: DTL's step kernel "
                                               "(C, OpenMP)")  # fmt: skip
    monkeypatch.setenv("DTL_STEP_KERNEL", "0")
    monkeypatch.setattr(step_kernel, "_BUILD", None)
    code, out, _ = run_cli(["info", "--preset", "tiny", "--json"], capsys)
    assert code == 0 and json.loads(out)["decode_step"] == "torch's ops, eager: off (DTL_STEP_KERNEL=0)"


def test_dtl_info_counts_the_kernels_copy_of_the_weights(capsys):
    """On a CPU the inference estimate counts the kernel's panels: every product's weights,
    each padded to a multiple of 32 outputs (computed here by hand), 4 bytes in fp32, 2 in
    16-bit; none on CUDA."""
    code, out, _ = run_cli(["info", "--preset", "tiny", "--vocab-size", "1000", "--json"], capsys)
    assert code == 0
    mem = json.loads(out)["memory"]
    c = json.loads(out)["config"]
    d, f, layers = c["d_model"], c["d_ff"], c["n_layers"]
    padded = layers * (3 * d * d + d * d + f * d + d * f) + 1024 * d  # 1000 outputs -> 1024
    assert mem["train_fp32"]["decode_copy"] == 4 * padded
    assert mem["train_mixed"]["decode_copy"] == 2 * padded
    inference = ("inference_weights", "kv_cache", "decode_copy")
    assert mem["train_fp32"]["inference_total"] == sum(mem["train_fp32"][k] for k in inference) \
        + 8 * 1000 * 4  # fmt: skip  (and one fp32 logits row per sequence of the batch)
    code, out, _ = run_cli(["info", "--preset", "tiny", "--device", "cuda", "--json"], capsys)
    assert json.loads(out)["memory"]["train_fp32"]["decode_copy"] == 0


@pytest.mark.parametrize("refused", [["-fopenmp"], ["-fopenmp", "-march=native"]])
def test_a_compiler_that_refuses_a_flag_builds_without_it(built, refused, tmp_path,
                                                          monkeypatch, capsys):
    """Apple's clang refuses -fopenmp (and some ARM compilers -march=native): the kernel is
    built without them, runs on one thread, computes the same, and `dtl info` says so."""
    real = step_kernel.shutil.which("cc") or step_kernel.shutil.which("gcc")
    wrapper = tmp_path / "cc"
    checks = "".join(f'case "$*" in *{flag}*) echo "unsupported option {flag}" >&2; exit 1;; '
                     "esac\n" for flag in refused)  # fmt: skip
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *--version*) exec "{real}" "$@";; esac\n'
                       f'{checks}exec "{real}" "$@"\n')  # fmt: skip
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("DTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(step_kernel, "_BUILD", None)
    assert step_kernel.kernel_status() == (
        "DTL's step kernel (C, one thread: the compiler has no OpenMP)")
    model = sharp_model()
    kernel = step_for(model)
    ids = torch.tensor([[7, 3, 99, 0, 42, 100], [5, 5, 61, 12, 1, 2]])
    with torch.no_grad():
        cache = model.allocate_cache(2, 8)
        got = kernel.run(ids[:, :4], cache)
        torch.testing.assert_close(got, model(ids[:, :4])[:, -1], rtol=1e-5, atol=2e-5)
        for t in (4, 5):
            got = kernel(ids[:, t], cache)
            torch.testing.assert_close(got, model(ids[:, : t + 1])[:, -1], rtol=1e-5, atol=2e-5)


def test_a_compiler_error_is_reported_not_raised_and_not_retried(tmp_path, monkeypatch, capfd):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\ncase \"$*\" in *--version*) echo fake 1.0; exit 0;; esac\n"
                      "echo 'step_kernel.c:1: error: no' >&2; exit 1\n")  # fmt: skip
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("DTL_CACHE_DIR", str(tmp_path / "cache"))
    build = step_kernel._compile()
    assert build.library is None and "failed: step_kernel.c:1: error: no" in build.why_not
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-built library left
    broken.write_text("#!/bin/sh\ncase \"$*\" in *--version*) echo fake 1.0; exit 0;; esac\n"
                      "echo 'called again' >&2; exit 1\n")  # fmt: skip  (the same key: no rerun)
    again = step_kernel._compile()
    assert again.why_not == build.why_not
    said = capfd.readouterr().err
    assert said.count("could not build it") == 1 and "decoding runs on torch's ops" in said
