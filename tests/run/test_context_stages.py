"""Context-length stages: RoPE's per-stage scaling (base frequency, linear interpolation) and
the switch the runner reports, the within-stage mixture of two contexts with the ledger and
plan counting the batches actually trained, the long_context example with ALiBi and RoPE,
clear errors for impossible contexts, and the export to transformers."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console

from growth_ops import ModelSpec
from orchestrator.budget.planner import make_plan
from orchestrator.checkpoint.canonical import load_checkpoint
from orchestrator.commands.compose import CommandLine, load
from orchestrator.commands.hf import export_command
from orchestrator.config.errors import ConfigError
from orchestrator.data import prepare_data, validation_batches
from orchestrator.engines.local import LocalEngine
from orchestrator.exits import exit_status
from orchestrator.model import PositionTables, build_model, flops_per_token, rope_tables
from orchestrator.run.runner import run_schedule
from orchestrator.run.transition import CHECK_BATCHES
from orchestrator.schedule import resolve

from ..conftest import hf_logits, read_summary, save_ours
from ..forked_grow import run_grow_forked

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the long_context example, a few steps per stage (a test runs it in seconds)
SHORT = ["schedule=long_context", "tracking=off", "engine.threads=1", "train.eval_batches=2",
         "schedule.stages.0.tokens=16384", "schedule.stages.0.batch_size=8",  # 32 steps of 8 x 64
         "schedule.stages.1.tokens=8192", "schedule.stages.1.batch_size=4",  # 8 steps of 4 x 256
         "schedule.stages.1.lr.warmup_steps=2"]  # a warmup below the stage's steps


def run_in_process(tmp_path: Path, cache: Path, *overrides: str, name: str = "run") -> tuple[Path, dict]:
    run_dir = tmp_path / name
    cfg = load(CommandLine([*SHORT, f"data.cache_dir={cache}", *overrides]), run_dir=str(run_dir), runs_here=True)
    return run_dir, run_schedule(cfg, Console(record=True, width=200))


# -- the positions RoPE computes ---------------------------------------------------------

@pytest.mark.parametrize("theta,interpolation", [(10000.0, 1.0), (500000.0, 1.0), (10000.0, 4.0), (40000.0, 2.5)])
def test_rope_angles_are_position_over_interpolation_times_theta_frequencies(theta, interpolation):
    seq_len, head_dim = 300, 16
    cos, sin = rope_tables(seq_len, head_dim, theta, "cpu", interpolation)
    p = torch.arange(seq_len, dtype=torch.float64)[:, None] / interpolation
    i = torch.arange(head_dim // 2, dtype=torch.float64)[None, :]
    angles = p * theta ** (-2 * i / head_dim)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=2e-4)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=2e-4)
    # the model's tables are these, from its spec
    spec = ModelSpec(layers=1, hidden=32, ffn=8, heads=2, kv_heads=2, head_dim=head_dim, vocab=8,
                     rope_theta=theta, rope_interpolation=interpolation)
    (mcos, msin), bias = PositionTables(spec)(seq_len, torch.device("cpu"))
    assert bias is None and torch.equal(mcos, cos) and torch.equal(msin, sin)


def test_interpolation_maps_a_longer_context_onto_the_trained_angles():
    """With factor 4, position 4p gets exactly the angles position p had without it; a larger
    theta turns every frequency but the first more slowly."""
    cos1, sin1 = rope_tables(64, 32, 10000.0, "cpu")
    cos4, sin4 = rope_tables(256, 32, 10000.0, "cpu", 4.0)
    assert torch.equal(cos4[::4], cos1) and torch.equal(sin4[::4], sin1)
    assert not torch.equal(cos4[1:64], cos1[1:])
    _, slow = rope_tables(64, 32, 500000.0, "cpu")
    # position 1, every frequency but the first: its angle (below pi/2, so sin grows with it) is smaller
    assert (slow[1, 1:16] < sin1[1, 1:16]).all() and torch.equal(slow[:, 0], sin1[:, 0])


# -- config: bad input, one line, exit 2 --------------------------------------------------


def test_a_context_longer_than_a_split_is_refused_before_anything_is_written(tmp_path):
    """Sequences are packed across documents, so only a whole split bounds the context: a
    window longer than the split would hold it twice."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i}.txt").write_text(f"document {i} says a little. " * 3)  # ~2.6 KB of text in all
    cfg = load(CommandLine(["schedule=tiny", "tracking=off", "data=files", f"data.sources.mine.paths=[{corpus}]",
                            f"data.cache_dir={tmp_path / 'cache'}", "schedule.stages.2.seq_len=4096",
                            "schedule.stages.2.tokens=327680"]), run_dir=str(tmp_path / "run"), runs_here=True)
    with pytest.raises(ConfigError) as e:
        run_schedule(cfg, Console(record=True))
    assert e.value.key == "schedule.stages.2.seq_len" and "longer than source 'mine'" in str(e.value), str(e.value)
    assert exit_status(e.value) == 2
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "checkpoints").exists()


# -- FLOPs and tokens: ledger, plan, the batches trained ----------------------------------

def test_a_mixture_of_contexts_trains_the_steps_the_ledger_and_plan_count(tmp_path, data_cache, monkeypatch):
    """Stage 0 mixes 25% of its steps at 4x the context: the batches the engine gets, the
    ledger's tokens and FLOPs (attention grows with the context) and the plan agree."""
    seen: list[tuple[int, int]] = []
    train_step = LocalEngine.train_step

    def recording(self, batch, lr):
        seen.append((batch.shape[0], batch.shape[1] - 1))
        return train_step(self, batch, lr)

    monkeypatch.setattr(LocalEngine, "train_step", recording)
    mix = ["schedule.stages.0.long_seq_len=256", "schedule.stages.0.long_fraction=0.25",
           "schedule.stages.0.tokens=14336", "schedule.stages.0.lr.warmup_steps=4"]  # 16 steps: 12 x (8 x 64) + 4 x (8 x 256)
    run_dir, summary = run_in_process(tmp_path, data_cache, *mix, "model=gpt_tiny")
    first = [t for _, t in seen[:16]]
    assert first == [64, 64, 64, 256] * 4  # every 4th step, by its number
    assert [t for _, t in seen[16:]] == [256] * 8
    cfg = load(CommandLine([*SHORT, *mix, "model=gpt_tiny"]), planning=True)
    schedule = resolve(cfg)
    for stage, entry, steps in zip(schedule, summary["stages"], (seen[:16], seen[16:])):
        assert entry["tokens"] == sum(b * t for b, t in steps)
        flops = sum(flops_per_token(stage.spec, t) * b * t for b, t in steps)
        assert entry["flops"] == pytest.approx(flops, rel=1e-12)
        assert entry["flops"] != pytest.approx(flops_per_token(stage.spec, 64) * entry["tokens"], rel=1e-6)
    plan = make_plan(cfg)
    assert [s.long_steps for s in plan.stages] == [4, 0]
    assert [(s.tokens, s.steps) for s in plan.stages] == [(e["tokens"], e["steps"]) for e in summary["stages"]]
    for planned, entry in zip(plan.stages, summary["stages"]):
        assert planned.flops == pytest.approx(entry["flops"], rel=1e-12)
    logged = [p["train/seq_len"] for p in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "train/seq_len" in p]
    assert logged == [t for _, t in seen]


def test_budget_stops_before_a_long_step_would_cross_the_flops_cap():
    """The cap is checked against the next step's own FLOPs: a long step costs more."""
    from orchestrator.budget.control import RunBudget
    cfg = load(CommandLine([*SHORT, "schedule.stages.0.long_seq_len=256", "schedule.stages.0.long_fraction=0.25",
                            "schedule.stages.0.tokens=14336", "schedule.stages.0.lr.warmup_steps=4"]), planning=True)
    budget = RunBudget(resolve(cfg), Console(record=True))
    stage = budget.schedule[0]
    short, long = stage.flops_at(0), stage.flops_at(3)
    assert long > 4 * short  # 4x the tokens, and more attention per token
    budget.budget.max_flops = 3 * short + long - 1.0
    for step in range(3):
        assert budget.blocks(stage, step, 0.0) is None
        budget.count_step(stage, step + 1, 0.01)
    assert budget.ledger.total.flops == 3 * short
    assert budget.blocks(stage, 3, 0.01).startswith("budget.max_flops")


# -- the long_context example: ALiBi, RoPE with a switch ---------------------------------

def test_long_context_with_alibi_needs_no_switch(tmp_path, data_cache):
    _, summary = run_in_process(tmp_path, data_cache, "model=gpt_tiny")
    long = summary["stages"][1]
    assert long["growth"] is None and math.isfinite(long["val_loss"])
    cfg = load(CommandLine([*SHORT, "model=gpt_tiny"]), planning=True)
    for stage, entry, context in zip(resolve(cfg), summary["stages"], (64, 256)):
        assert entry["flops"] == flops_per_token(stage.spec, context) * entry["tokens"]


def test_long_context_with_rope_reports_the_switch_it_made(tmp_path, data_cache):
    """theta 10000 -> 40000 and interpolation 4 at the switch: the checkpoints record each
    stage's values, and the losses reported before and after the switch are those of the
    short stage's final weights on the long stage's validation batches at the old and new
    scaling."""
    run_dir, summary = run_in_process(tmp_path, data_cache, "schedule.stages.1.position.rope_theta=40000",
                                      "schedule.stages.1.position.interpolation=4")
    short, long = summary["stages"]
    switch = long["growth"]["positions"]
    assert long["growth"]["operator"] is None and long["growth"]["preserves_function"] is False
    assert switch["from"] == {"rope_theta": 10000.0, "rope_interpolation": 1.0}
    assert switch["to"] == {"rope_theta": 40000.0, "rope_interpolation": 4.0}
    weights, _, meta = load_checkpoint(Path(short["checkpoint"]))
    old = ModelSpec.from_dict(meta["spec"])
    assert old.rope_scaling() == switch["from"]
    long_meta = json.loads((Path(long["checkpoint"]) / "meta.json").read_text())
    assert ModelSpec.from_dict(long_meta["spec"]).rope_scaling() == switch["to"]
    cfg = load(CommandLine([*SHORT, f"data.cache_dir={data_cache}"]), planning=True)
    data = prepare_data(cfg.data)
    batches = validation_batches(data.val, 4, 256, 2)[:CHECK_BATCHES]  # what the transition checks on
    losses = []
    for scaling in (switch["from"], switch["to"]):
        model = build_model(dataclass_replace(old, **scaling))
        model.load_canonical(weights)
        with torch.no_grad():
            losses.append(sum(model.loss(b).item() for b in batches) / len(batches))
    assert switch["val_loss_before"] == pytest.approx(losses[0], rel=1e-6)
    assert switch["val_loss_after"] == pytest.approx(losses[1], rel=1e-6)
    assert abs(losses[1] - losses[0]) > 1e-3  # not function-preserving: a change worth reporting
    points = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(p.get("positions/val_loss_after") == switch["val_loss_after"] for p in points)


def dataclass_replace(spec: ModelSpec, **fields) -> ModelSpec:
    return dataclasses.replace(spec, **fields)


def test_growth_context_and_rope_change_in_one_transition(tmp_path, data_cache):
    """tiny's s3 deepens (msg) and doubles the context; with a new theta too, growth is
    checked at the old scaling (function preserved) and the switch after it is reported."""
    run_dir = tmp_path / "run"
    cfg = load(CommandLine(["schedule=tiny", "tracking=off", "engine.threads=1", f"data.cache_dir={data_cache}",
                            "schedule.stages.2.position.rope_theta=20000"]), run_dir=str(run_dir), runs_here=True)
    summary = run_schedule(cfg, Console(record=True, width=200))
    g = summary["stages"][2]["growth"]
    assert g["operator"] == "msg" and g["preserves_function"]
    assert abs(g["val_loss_after_growth"] - g["val_loss_before"]) <= 1e-5
    assert g["positions"]["val_loss_before"] == g["val_loss_after_growth"]
    assert g["val_loss_after"] == g["positions"]["val_loss_after"] != g["val_loss_after_growth"]
    assert g["positions"]["to"]["rope_theta"] == 20000.0


# -- resume bitwise after kills around the switch ----------------------------------------

def _losses(run_dir: Path) -> dict:
    """The last logged training loss of every global step (a resumed run logs again the steps
    it redoes)."""
    out = {}
    for p in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "train/loss" in p:
            out[p["step"]] = p["train/loss"]
    return out


@pytest.mark.slow
def test_resume_after_kills_around_a_context_switch_is_bitwise(tmp_path, data_cache):
    """Stage 0 mixes contexts; stage 1 quadruples the context and switches RoPE's scaling.
    Killed after a long step of stage 0, right after the switch (before its step-0
    checkpoint), and after the first steps at the new context; each time resumed. The
    final weights, every step's loss and the ledger equal an uninterrupted run's."""
    args = ["run", *SHORT, f"data.cache_dir={data_cache}", "checkpoint.every_steps=2", "train.eval_every_steps=5",
            "schedule.stages.0.long_seq_len=256", "schedule.stages.0.long_fraction=0.25",
            "schedule.stages.0.tokens=14336", "schedule.stages.0.lr.warmup_steps=4", "schedule.stages.1.position.interpolation=4",
            "schedule.stages.1.position.rope_theta=40000"]
    def grow(run_dir: Path, failpoints: str = ""):
        env = {k: v for k, v in os.environ.items() if k != "GROW_FAILPOINTS"}
        env.update({"OMP_NUM_THREADS": "1", **({"GROW_FAILPOINTS": failpoints} if failpoints else {})})
        return run_grow_forked([*args, f"hydra.run.dir={run_dir}"], tmp_path, env, tmp_path / f"{run_dir.name}-logs")

    ref = tmp_path / "ref"
    assert grow(ref).returncode == 0
    run = tmp_path / "killed"
    # step 8 is long (every 4th); the last checkpoint before it is step 6
    for point in ("step.done@8", "positions.switched@1", "step.done@3"):
        proc = grow(run, point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
    assert grow(run).returncode == 0
    a, b = read_summary(ref), read_summary(run)
    assert [(s["tokens"], s["steps"], s["flops"]) for s in a["stages"]] == \
        [(s["tokens"], s["steps"], s["flops"]) for s in b["stages"]]
    assert [s["growth"] for s in a["stages"]] == [s["growth"] for s in b["stages"]]
    assert _losses(ref) == _losses(run) and len(_losses(ref)) == 24
    wa, _, _ = load_checkpoint(Path(a["stages"][-1]["checkpoint"]))
    wb, _, _ = load_checkpoint(Path(b["stages"][-1]["checkpoint"]))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- export to transformers ----------------------------------------------------------------

def test_export_carries_theta_and_interpolation_to_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")

    spec = ModelSpec(layers=2, hidden=32, ffn=36, heads=4, kv_heads=2, head_dim=8, vocab=53,
                     rope_theta=40000.0, rope_interpolation=4.0)
    ours = build_model(spec, seed=3)
    save_ours(tmp_path / "ckpt", spec, ours.canonical_state())
    assert export_command([f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.rope_parameters == {"rope_type": "linear", "rope_theta": 40000.0, "factor": 4.0}
    tokens = torch.randint(0, 53, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mine = ours(tokens)
    ref = hf_logits(hf, tokens)
    torch.testing.assert_close(ref, mine, rtol=1e-5, atol=1e-5 * mine.abs().max().item())
    # the same weights without the scaling compute something else: the export carried it
    plain = dataclass_replace(spec, rope_theta=10000.0, rope_interpolation=1.0)
    other = build_model(plain)
    other.load_canonical(ours.canonical_state())
    with torch.no_grad():
        assert not torch.allclose(other(tokens), ref, atol=1e-3)


def test_export_refuses_an_interpolation_below_one(tmp_path, capsys):

    spec = ModelSpec(layers=1, hidden=16, ffn=32, heads=2, kv_heads=2, head_dim=8, vocab=20, rope_interpolation=0.5)
    save_ours(tmp_path / "ckpt", spec, build_model(spec, seed=0).canonical_state())
    assert export_command([f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"]) == 2
    assert "rope_interpolation: 0.5 has no transformers equivalent" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# -- the DeepSpeed engine: the same mixture and switch -------------------------------------

@pytest.mark.slow
def test_deepspeed_pipeline_trains_the_mixture_and_the_switch_as_the_local_engine(tmp_path, data_cache):
    """pp=2 on gloo: the pipeline resets its buffers when the context changes (every 4th step
    and for evaluation), and switches RoPE's scaling in place; losses, the reported switch
    and the ledger match the local engine's."""
    from ..conftest import fork_grow

    mix = ["schedule.stages.0.long_seq_len=256", "schedule.stages.0.long_fraction=0.25",
           "schedule.stages.0.tokens=14336", "schedule.stages.0.lr.warmup_steps=4", "schedule.stages.1.position.interpolation=4",
           "schedule.stages.1.position.rope_theta=40000"]
    _, want = run_in_process(tmp_path, data_cache, *mix, name="local")
    fork_grow(tmp_path, *SHORT[1:], *mix, "engine=deepspeed", "schedule.stages.0.layout.pp=2",
              "schedule.stages.1.layout.pp=2", "hydra.run.dir=ds", cache=data_cache, schedule="long_context",
              timeout=900)
    got = read_summary(tmp_path / "ds")
    for w, g in zip(want["stages"], got["stages"], strict=True):
        assert (g["tokens"], g["steps"], g["flops"]) == (w["tokens"], w["steps"], w["flops"])
        assert g["val_loss"] == pytest.approx(w["val_loss"], rel=1e-5)
    w, g = want["stages"][1]["growth"]["positions"], got["stages"][1]["growth"]["positions"]
    assert (g["from"], g["to"]) == (w["from"], w["to"])
    for k in ("val_loss_before", "val_loss_after"):
        assert g[k] == pytest.approx(w[k], rel=1e-5)
