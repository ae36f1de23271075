"""Ranks of parallel-vs-local comparisons (run under torchrun by tests/engines/test_deepspeed.py).

Usage: parallel_worker.py CASE [CASE ...], CASE = OUT_DIR,TP,PP,DP,TIED,MICRO,ZERO_STAGE,DTYPE
(MICRO `-`: the whole per-rank batch). Every case needs TP*PP*DP = the world size; one launch
runs its cases one after another (each builds its own engine; the engine sets up the
model-parallel groups again), so the start of torchrun and its imports is paid once.

Each case trains `CASE_STEPS` steps from `case_start()` (weights, Adam moments at step 3,
growth masks mid-ramp) with clipping active, and writes per-step losses, grad norms, the
validation loss and this rank's exported share of the canonical state to OUT_DIR (in bf16
also the share exported right after loading, before any step).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from growth_ops import MaskState, ModelSpec
from orchestrator.run.launch import leave_process_group
from orchestrator.schedule import ResolvedStage
from orchestrator.config.schema import LayoutConfig, RunConfig, StageConfig
from orchestrator.model import build_model

CASE_STEPS = 5


def case_spec(tied: bool) -> ModelSpec:
    return ModelSpec(layers=2, hidden=32, ffn=64, heads=4, kv_heads=2, head_dim=8, vocab=128,
                     tie_embeddings=tied)


def case_config(tp=1, pp=1, dp=1, micro=None, engine="local", zero=1, dtype="fp32") -> tuple[RunConfig, StageConfig]:
    cfg = RunConfig(run_dir="/unused")
    cfg.engine.name, cfg.engine.threads, cfg.engine.timeout_s = engine, 1, 60.0
    cfg.engine.zero_stage, cfg.engine.dtype = zero, dtype
    cfg.train.grad_clip = 0.5  # the gradient norms here are ~1-3: clipping is active
    stage = StageConfig(name="s", batch_size=8, seq_len=16,
                        layout=LayoutConfig(tp=tp, pp=pp, dp=dp, micro_batch_size=micro))
    return cfg, stage


def case_start(spec: ModelSpec):
    """Weights, moments and masks as after a growth: an in-flight ramp, Adam at step 3."""
    state = build_model(spec, seed=7).canonical_state()
    g = torch.Generator().manual_seed(11)
    moments = {"exp_avg": {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()},
               "exp_avg_sq": {k: 1e-5 * torch.rand(v.shape, generator=g) for k, v in state.items()}}
    masks = MaskState(ramp_steps=20, steps_done=4, hidden_new=[28, 29, 30, 31], ffn_new=[5, 40, 41, 63],
                      heads_new=[1, 3], layers_new=[1])
    return state, moments, 3, masks


def case_batches(spec: ModelSpec, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, spec.vocab, (8, 17), generator=g) for _ in range(n)]


def run_case(engine, spec: ModelSpec, start=None, after_load=None) -> dict:
    state, moments, step, masks = case_start(spec)
    if start is not None:  # the same values, read lazily from a checkpoint's files
        state, moments = start
    engine.load(state, moments, step, masks)
    if after_load is not None:
        after_load()
    losses, norms = [], []
    for i, batch in enumerate(case_batches(spec, CASE_STEPS, 1)):
        loss, norm = engine.train_step(batch, lr=1e-2 * (1 + i))
        losses.append(loss)
        norms.append(norm)
    val = engine.evaluate(case_batches(spec, 2, 2), exact=True)
    return {"losses": losses, "grad_norms": norms, "val_loss": val}


def case_arg(out: Path, tp: int, pp: int, dp: int, tied: int, micro: int | None = None, zero: int = 1,
             dtype: str = "fp32") -> str:
    """One CASE argument of this script."""
    return ",".join(map(str, (out, tp, pp, dp, tied, "-" if micro is None else micro, zero, dtype)))


def run_one(out: Path, tp: int, pp: int, dp: int, tied: int, micro: int | None, zero: int, dtype: str) -> None:
    from orchestrator.engines.deepspeed_engine import DeepSpeedEngine

    spec = case_spec(bool(tied))
    cfg, stage = case_config(tp, pp, dp, micro, engine="deepspeed", zero=zero, dtype=dtype)
    engine = DeepSpeedEngine(cfg, ResolvedStage.alone(stage, spec))
    # load through checkpoint.LazyTensors, recording which tensors are read whole
    from safetensors.torch import save_file

    from orchestrator.checkpoint.canonical import MOMENTS, LazyTensors

    full_reads: list[str] = []

    class Spy(LazyTensors):
        def __getitem__(self, name):
            full_reads.append(name)
            return super().__getitem__(name)

    state, moments, _, _ = case_start(spec)
    files = [out / f"start-{engine.rank}-model.safetensors", out / f"start-{engine.rank}-optimizer.safetensors"]
    save_file(state, files[0])
    save_file({f"{k}.{n}": t for k in MOMENTS for n, t in moments[k].items()}, files[1])
    start = (Spy([files[0]]), {k: Spy([files[1]], f"{k}.") for k in MOMENTS})
    rank = engine.rank

    def save(prefix: str) -> int:
        state, moments, step = engine.export()
        save_file(state, out / f"{prefix}state-{rank}.safetensors")
        save_file({f"{k}.{n}": t for k, d in moments.items() for n, t in d.items()},
                  out / f"{prefix}moments-{rank}.safetensors")
        return step
    result = run_case(engine, spec, start, after_load=(lambda: save("loaded-")) if dtype == "bf16" else None)
    result["full_reads"] = sorted(set(full_reads))
    step = save("")
    (out / f"result-{rank}.json").write_text(json.dumps({**result, "step": step}))


def main() -> None:
    for arg in sys.argv[1:]:
        out, tp, pp, dp, tied, micro, zero, dtype = arg.split(",")
        run_one(Path(out), int(tp), int(pp), int(dp), int(tied), None if micro == "-" else int(micro), int(zero),
                dtype)
        torch.distributed.barrier()  # the next case, or leaving, together (as `grow run`'s ranks leave)
    leave_process_group()


if __name__ == "__main__":
    main()
