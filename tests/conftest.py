"""Shared helpers: run the real `grow` CLI in a subprocess, the way users do."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main as grow_main

from .forked_grow import ForkedGrow, run_grow_forked, start_grow

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenized-corpus cache for the whole session (tokenizing is done once)."""
    return tmp_path_factory.mktemp("data-cache")


def grow_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def grow_in_process(*args: str) -> int:
    """`grow ARGS` through orchestrator.cli.main in this process, for refusals that come before
    Hydra starts a job (a subprocess costs an interpreter and imports; one test per kind of
    refusal still goes through the real `grow` script). What the command sets for a whole
    process (signal handlers, umask) is put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        return grow_main(list(args))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        os.umask(umask)


def _grow_run_args(overrides, cache: Path, schedule: str) -> list[str]:
    return ["run", f"schedule={schedule}", f"data.cache_dir={cache}", "engine.threads=1", *overrides]


def _grow_env(env: dict | None = None) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}


def _checked(proc, check: bool):
    if check and proc.returncode != 0:
        raise AssertionError(f"grow failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_grow(cwd: Path, *overrides: str, cache: Path, timeout: int = 600, check: bool = True,
             schedule: str = "tiny") -> subprocess.CompletedProcess:
    """`grow run` on the given schedule through the real `grow` script, in a subprocess."""
    cmd = grow_cmd(*_grow_run_args(overrides, cache, schedule))
    proc = subprocess.run(cmd, cwd=cwd, env=_grow_env(), capture_output=True, text=True, timeout=timeout)
    return _checked(proc, check)


def fork_grow(cwd: Path, *overrides: str, cache: Path, timeout: int = 600, check: bool = True,
              schedule: str = "tiny", env: dict | None = None) -> ForkedGrow:
    """run_grow, in a child forked from a process that has imported torch already
    (tests/forked_grow.py), for tests where the start of an interpreter is not the point;
    `.returncode`, `.stdout`, `.stderr` as from subprocess.run."""
    proc = run_grow_forked(_grow_run_args(overrides, cache, schedule), cwd, _grow_env(env), cwd / "grow-logs",
                           timeout=timeout)
    return _checked(proc, check)


def fork_grow_start(cwd: Path, *overrides: str, cache: Path, schedule: str = "tiny",
                    env: dict | None = None) -> ForkedGrow:
    """fork_grow, not waited for: `.wait()`, `.poll()`, `.send_signal()` as with Popen."""
    return start_grow(_grow_run_args(overrides, cache, schedule), cwd, _grow_env(env), cwd / "grow-logs")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_cache):
    """(cwd, run dir, finished process) of one uninterrupted `grow run schedule=tiny` through
    the real `grow` script, MLflow in cwd/mlflow.db: shared by the tests that only read it."""
    cwd = tmp_path_factory.mktemp("tiny")
    run_dir = cwd / "run"
    proc = run_grow(cwd, f"hydra.run.dir={run_dir}", cache=data_cache)
    return cwd, run_dir, proc


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def one_torch_thread():
    """Exactness tests on one thread: reductions then do not depend on the machine's cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- transformers, the independent reference (fp32, eager attention, no downloads) ---------------

def random_llama(*, vocab: int, hidden: int, heads: int, kv_heads: int, ffn: int, layers: int = 2,
                 head_dim: int | None = None, tied: bool = True, theta: float = 10000.0, max_positions: int = 64,
                 seed: int = 0, eps: float = 1e-5):
    """A seeded LlamaForCausalLM built from a LlamaConfig, its norm gains random in [0.5, 1.5)
    (transformers sets them to 1, where a misplaced gain would not show)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   head_dim=head_dim, rms_norm_eps=eps, tie_word_embeddings=tied,
                                   rope_parameters={"rope_type": "default", "rope_theta": theta},
                                   max_position_embeddings=max_positions)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model_or_dir, tokens):
    """transformers' logits for `tokens`: of a LlamaForCausalLM, or of the one saved in a directory
    (loaded with eager attention). The reference every interop and growth test compares against."""
    import torch
    import transformers

    model = model_or_dir
    if not isinstance(model, torch.nn.Module):
        model = transformers.LlamaForCausalLM.from_pretrained(model_or_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def save_ours(path: Path, spec, state) -> None:
    """Our canonical checkpoint of `state` (no optimizer moments, no masks) at `path`."""
    from orchestrator.offline.outputs import write_checkpoint_dir, write_safetensors_stream

    def files(tmp):
        write_safetensors_stream(tmp / "model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in state.items()],
                                 state.items())
        write_safetensors_stream(tmp / "optimizer.safetensors", [], iter(()))
    write_checkpoint_dir(path, files, {"spec": spec.to_dict(), "masks": None})
