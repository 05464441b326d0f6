"""Threads (`dtl.threads`): idle OpenMP threads sleep, set before torch loads; `--threads N`
on every verb that runs a model; the default one per usable core (a share under torchrun);
bad values one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from testkit import PROJECT_ROOT

from dtl import DtlError, ModelConfig, TransformerLM
from dtl.cli import build_parser
from dtl.threads import choose_threads, set_wait_policy

SPY = """
import os, sys
class Spy:  # reports the environment at the moment torch is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("torch loads with OMP_WAIT_POLICY =", os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Spy())
import dtl.cli
dtl.TransformerLM  # torch loads with the model's names (dtl.lazy), after `import dtl`
"""


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    clean["PYTHONPATH"] = str(PROJECT_ROOT / "src")
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_torch_loads_with_idle_threads_sleeping():
    """libgomp reads the policy once, when torch loads it: dtl must set it before that."""
    assert _python(SPY) == "torch loads with OMP_WAIT_POLICY = PASSIVE\n"


def test_a_users_own_wait_policy_is_kept():
    assert "= ACTIVE" in _python(SPY, OMP_WAIT_POLICY="ACTIVE")
    assert "= None" in _python(SPY, GOMP_SPINCOUNT="10000")  # their spin count, their call
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    set_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


VERB_SPY = """
import os, sys
class Spy:  # reports the wait settings at the moment torch is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("torch loads with", {k: v for k, v in os.environ.items()
                                       if k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")})
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Spy())
import dtl.cli
try:
    dtl.cli.main([sys.argv[1], "--help"])
except SystemExit:
    pass
import torch  # a verb whose --help loads no torch (serve): what its run would load it with
"""


def _verb_policy(verb: str, **env: str) -> str:
    out = _python(VERB_SPY.replace("sys.argv[1]", repr(verb)), **env)
    return next(line for line in out.splitlines() if line.startswith("torch loads"))


@pytest.mark.parametrize("verb", ["generate", "ask", "chat", "serve"])
def test_decode_verbs_load_torch_with_a_short_spin(verb):
    """A one-token step is ~30 short parallel kernels: its verbs spin briefly between them
    (libgomp's GOMP_SPINCOUNT) instead of waking a sleeping thread for each."""
    assert _verb_policy(verb) == "torch loads with {'GOMP_SPINCOUNT': '2000'}"


@pytest.mark.parametrize("verb", ["train", "eval", "prepare"])
def test_other_verbs_keep_idle_threads_sleeping(verb):
    assert _verb_policy(verb) == "torch loads with {'OMP_WAIT_POLICY': 'PASSIVE'}"


def test_a_users_policy_is_kept_by_decode_verbs_too():
    assert _verb_policy("generate", OMP_WAIT_POLICY="PASSIVE") == (
        "torch loads with {'OMP_WAIT_POLICY': 'PASSIVE'}"
    )
    assert _verb_policy("chat", GOMP_SPINCOUNT="0") == "torch loads with {'GOMP_SPINCOUNT': '0'}"


def test_the_thread_line_says_how_idle_threads_wait():
    spin = choose_threads(None, cores=2, environ={"GOMP_SPINCOUNT": "2000"}).line()
    assert spin == (
        "threads: 2 (one per core of 2; idle threads spin 2000 turns, then sleep; "
        "--threads N to override)"
    )


def test_the_default_is_one_thread_per_usable_core():
    choice = choose_threads(None, cores=4, environ={"OMP_WAIT_POLICY": "PASSIVE"})
    assert choice.threads == 4
    assert choice.line() == (
        "threads: 4 (one per core of 4; idle threads sleep; --threads N to override)"
    )
    assert choose_threads(None, environ={}).threads == len(os.sched_getaffinity(0))


def test_torchrun_ranks_share_the_cores_and_omp_num_threads_is_kept():
    assert choose_threads(None, cores=16, environ={"LOCAL_WORLD_SIZE": "4"}).threads == 4
    assert choose_threads(None, cores=2, environ={"LOCAL_WORLD_SIZE": "4"}).threads == 1
    assert choose_threads(None, cores=8, environ={"OMP_NUM_THREADS": "3"}).threads == 3


def test_asked_threads_win_and_bad_ones_say_what_to_give():
    assert choose_threads(3, cores=8, environ={"LOCAL_WORLD_SIZE": "4"}).threads == 3
    more = choose_threads(6, cores=2, environ={})
    assert more.threads == 6 and "more than the 2 cores" in more.why  # allowed, and said
    for bad in (0, -2):
        with pytest.raises(DtlError, match=f"--threads {bad}: give at least 1"):
            choose_threads(bad, cores=2, environ={})


@pytest.mark.parametrize("verb", ["train", "generate", "ask", "chat", "eval", "quickstart"])
def test_every_verb_that_runs_a_model_takes_threads(verb):
    sub = build_parser()._subparsers._group_actions[0].choices[verb]
    assert "--threads" in sub.format_help()


@pytest.fixture
def model_dir(tmp_path, gpt2):
    config = ModelConfig(vocab_size=gpt2.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                         max_seq_length=32)  # fmt: skip
    TransformerLM(config).save_pretrained(tmp_path / "model")
    gpt2.save(tmp_path / "model")
    return tmp_path / "model"


def test_dtl_generate_threads_applies_and_says_it_first(dtl, model_dir):
    code, out, err = dtl("generate", "--model", model_dir, "--prompt", "Hi",
                         "--max-new-tokens", 2, "--threads", 2)  # fmt: skip
    assert code == 0, err
    assert torch.get_num_threads() == 2  # conftest restores its one thread afterwards
    assert err.splitlines()[0].startswith("threads: 2 (as asked")
    code, out, err = dtl("ask", "--model", model_dir, "Who?", "--threads", 0)
    assert code == 2 and out == ""
    assert (
        err.strip() == "dtl ask: error: --threads 0: give at least 1 "
        f"(default: one per core, {len(os.sched_getaffinity(0))})"
    )
