"""Ranks of the compiled deepspeed engine's check (run under torchrun by tests/engines/test_compile.py).

Usage: compile_worker.py OUT_DIR ZERO_STAGE [TP]: parallel_worker's case (weights, Adam moments
at step 3, growth masks mid-ramp and ending during the run) at tp=TP (1), pp=1, dp=world/tp, with
train.compile=true; writes per-step losses, the validation loss, and the graphs dynamo had
compiled after each step and its graph breaks to OUT_DIR/result-RANK.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))
import parallel_worker  # noqa: E402
from parallel_worker import case_config, case_spec, run_case  # noqa: E402

from orchestrator.run.launch import leave_process_group  # noqa: E402
from orchestrator.schedule import ResolvedStage  # noqa: E402


def ending_ramp_start(spec):
    """parallel_worker's start, its ramp (20 steps) ending after the third of the five steps."""
    state, moments, step, masks = CASE_START(spec)
    masks.steps_done = 17
    return state, moments, step, masks


CASE_START = parallel_worker.case_start


def main() -> None:
    from orchestrator.engines.deepspeed_engine import DeepSpeedEngine

    out, zero = Path(sys.argv[1]), int(sys.argv[2])
    tp = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    spec = case_spec(True)
    cfg, stage = case_config(tp, 1, int(os.environ["WORLD_SIZE"]) // tp, None, engine="deepspeed", zero=zero)
    cfg.train.compile = True
    engine = DeepSpeedEngine(cfg, ResolvedStage.alone(stage, spec))
    graphs = []
    step = engine.train_step

    def counted(batch, lr):
        result = step(batch, lr)
        graphs.append(counters["stats"]["unique_graphs"])
        return result
    engine.train_step = counted
    parallel_worker.case_start = ending_ramp_start
    result = run_case(engine, spec)
    result.update(graphs_after_step=graphs, graph_breaks=sum(counters["graph_break"].values()),
                  compile_s=engine.compile_seconds())
    (out / f"result-{engine.rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    leave_process_group()


if __name__ == "__main__":
    main()
