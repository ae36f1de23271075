"""The bounded growth transition: the grown state written once, tensor by tensor, split
over writer ranks, equals the in-memory growth bit for bit (weights and Adam moments) for
every operator, tied and untied, however the tensors are split; sharded checkpoints carry
an index and load without one too (earlier versions); a run's step-0 checkpoint after a
growth is that growth exactly, and training from it gives the same losses as training
from the in-memory growth; under engine=deepspeed across a TP and PP change, no rank reads
a tensor or slice it does not own."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from growth_ops import ModelSpec, get_operator
from orchestrator.checkpoint.canonical import (MOMENTS, index_name, load_checkpoint, open_checkpoint, read_meta,
                                               seal_and_publish, shard_name)
from orchestrator.checkpoint.grown import write_grown_shares
from orchestrator.engines.base import ShardRole
from orchestrator.model import build_model

from ..conftest import fork_grow, read_summary

OLD = dict(layers=2, hidden=32, ffn=64, heads=4, kv_heads=2, head_dim=8, vocab=64)
TARGETS = {"msg": dict(layers=4, hidden=48, ffn=96, heads=6, kv_heads=3),
           "zero": dict(layers=3, hidden=48, ffn=80, heads=6, kv_heads=3),
           "clone": dict(layers=3, hidden=64, ffn=128, heads=8, kv_heads=4),
           "stack": dict(layers=4)}


def old_state(spec: ModelSpec):
    state = build_model(spec, seed=3).canonical_state()
    g = torch.Generator().manual_seed(5)
    moments = {k: {n: torch.rand(t.shape, generator=g) for n, t in state.items() if n != "alibi_slopes"}
               for k in MOMENTS}
    return state, moments


def grow_split(tmp: Path, op, plan, state, moments, seed: int, writers: list[list[str]] | None) -> Path:
    """Each writer (in turn: the barriers are no-ops) grows its names into its shard, as the
    ranks of a run do; None: one process writes everything."""
    path = tmp / "ckpt"
    grow = dict(op=op, plan=plan, weights=state, moments=moments, generator=torch.Generator().manual_seed(seed))
    if writers is None:
        staged = write_grown_shares(path, None, None, **grow)
    else:
        for i, names in enumerate(writers):
            role = ShardRole(index=i, count=len(writers), leader=i == 0, barrier=lambda: None)
            staged = write_grown_shares(path, role, names, **grow)
    return seal_and_publish(staged, path, {"spec": plan.new.to_dict()}, point_latest=False)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_split_growth_equals_in_memory_growth(tmp_path, name, tied):
    op = get_operator(name)
    old = ModelSpec(**OLD, tie_embeddings=tied)
    new = old.with_shape(**TARGETS[name])
    state, moments = old_state(old)
    want, _, plan = op.grow(dict(state), old, new, ramp_steps=4 if op.uses_masks else None,
                                generator=torch.Generator().manual_seed(9))
    want_moments = {k: op.grow_moments(moments[k], old, new, plan, kind=k) for k in MOMENTS}
    names = list(want)
    shuffled = random.Random(1).sample(names, len(names))
    for case, writers in (("one", None), ("3-round-robin", [names[i::3] for i in range(3)]),
                          ("4-shuffled", [shuffled[i::4] for i in range(4)])):
        ckpt = grow_split(tmp_path / case, op, plan, state, moments, 9, writers)
        got, got_moments, _ = load_checkpoint(ckpt)
        assert got.keys() == want.keys(), case
        for n in want:
            assert torch.equal(got[n], want[n]), (case, n)
            if n in want_moments["exp_avg"]:
                for k in MOMENTS:
                    assert torch.equal(got_moments[k][n], want_moments[k][n]), (case, k, n)
        if writers is not None:  # the HF index names each tensor's shard
            index = json.loads((ckpt / index_name("model")).read_text())["weight_map"]
            assert index == {n: shard_name("model", i, len(writers)) for i, ns in enumerate(writers) for n in ns}


def test_sharded_checkpoint_of_an_earlier_version_loads(tmp_path):
    """Shards without an index, as versions before indexes wrote them, still verify and load."""
    import hashlib

    from safetensors.torch import save_file

    state, moments = old_state(ModelSpec(**OLD))
    names = sorted(state)
    path = tmp_path / "step_00000001"
    path.mkdir()
    for i in range(2):
        save_file({n: state[n] for n in names[i::2]}, path / shard_name("model", i, 2))
        save_file({f"{k}.{n}": moments[k][n] for k in MOMENTS for n in names[i::2] if n in moments[k]},
                  path / shard_name("optimizer", i, 2))
    (path / "meta.json").write_text(json.dumps({"format": 1, "step": 1}))
    (path / "manifest.json").write_text(json.dumps({
        f.name: {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
        for f in sorted(path.iterdir())}))
    weights, got_moments, meta = open_checkpoint(path)
    assert sorted(weights) == names and all(torch.equal(weights[n], state[n]) for n in names)
    assert all(torch.equal(got_moments[k][n], moments[k][n]) for k in MOMENTS for n in moments[k])
    assert meta["step"] == 1


def _stage_dirs(run_dir: Path, index: int) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob(f"{index}-*/step_*"))


def _growth_of(run_dir: Path, index: int):
    """(operator, plan, masks, generator seed) of the growth into stage `index`, from the run's config."""
    config = json.loads((run_dir / "config.json").read_text())
    growth = config["schedule"]["stages"][index]["growth"] or {}
    growth = {**config["growth"], **{k: v for k, v in growth.items() if v is not None}}
    old = ModelSpec.from_dict(read_meta(_stage_dirs(run_dir, index - 1)[-1])["spec"])
    new = ModelSpec.from_dict(read_meta(_stage_dirs(run_dir, index)[0])["spec"])
    op = get_operator(growth["operator"])
    plan, masks = op.prepare(old, new, ramp_steps=growth["ramp_steps"], layer_insert=growth["layer_insert"],
                             init=growth["init"], moments=growth["moments"])
    return op, plan, masks, config["seed"] * 1_000_003 + index


def assert_step0_is_in_memory_growth(run_dir: Path, index: int) -> dict:
    """The step-0 checkpoint of stage `index` against the in-memory growth of the previous
    stage's final checkpoint, bit for bit (weights, moments, step, masks)."""
    final, step0 = _stage_dirs(run_dir, index - 1)[-1], _stage_dirs(run_dir, index)[0]
    assert step0.name == "step_00000000"
    op, plan, masks, seed = _growth_of(run_dir, index)
    old_w, old_m, old_meta = load_checkpoint(final)
    new_w, new_m, new_meta = load_checkpoint(step0)
    want = op.grow(dict(old_w), plan.old, plan.new, ramp_steps=masks.ramp_steps if masks else None,
                   layer_insert=plan_insert(run_dir, index), init=plan.init, moments=plan.moments_rule,
                   generator=torch.Generator().manual_seed(seed))[0]
    assert new_w.keys() == want.keys()
    assert all(torch.equal(new_w[n], want[n]) for n in want)
    grown_moments = {k: op.grow_moments(dict(old_m[k]), plan.old, plan.new, plan, kind=k) for k in MOMENTS}
    for k in MOMENTS:
        assert new_m[k].keys() == grown_moments[k].keys()
        assert all(torch.equal(new_m[k][n], grown_moments[k][n]) for n in grown_moments[k])
    assert new_meta["optimizer_step"] == old_meta["optimizer_step"] > 0
    assert new_meta["masks"] == (masks.to_dict() if masks else None)
    return {"want": want, "moments": grown_moments, "meta": new_meta, "step0": step0, "plan": plan}


def plan_insert(run_dir: Path, index: int):
    config = json.loads((run_dir / "config.json").read_text())
    return (config["schedule"]["stages"][index]["growth"] or {}).get("layer_insert") or config["growth"]["layer_insert"]


def _losses(run_dir: Path, stage: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["train/loss"] for r in rows if r["stage"] == stage and "train/loss" in r]


def test_run_step0_is_the_in_memory_growth_and_trains_the_same(tmp_path, data_cache):
    """The local engine's transition: the step-0 checkpoints of s2 (width) and s3 (depth)
    equal the in-memory growth of the stage before; a copy of the run whose s2 step-0
    checkpoint is rewritten with the in-memory growth (today's path) trains to the same losses."""
    args = ["tracking.enabled=false"]
    fork_grow(tmp_path, *args, "hydra.run.dir=run", cache=data_cache)
    run_dir = tmp_path / "run"
    grown = assert_step0_is_in_memory_growth(run_dir, 1)
    assert_step0_is_in_memory_growth(run_dir, 2)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for ckpt in _stage_dirs(copy, 1)[1:] + _stage_dirs(copy, 2):
        shutil.rmtree(ckpt)
    step0 = _stage_dirs(copy, 1)[0]
    meta = {k: v for k, v in read_meta(step0).items() if k != "format"}
    shutil.rmtree(step0)
    from orchestrator.checkpoint.canonical import save_checkpoint

    save_checkpoint(step0, grown["want"], grown["moments"], meta)  # also points `latest` at it
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines() if line.strip()]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["stage"] == "s1"))
    (copy / "summary.json").unlink()
    fork_grow(tmp_path, *args, "hydra.run.dir=copy", cache=data_cache)
    assert _losses(copy, "s2") == _losses(run_dir, "s2") and _losses(copy, "s3") == _losses(run_dir, "s3")
    assert [s["val_loss"] for s in read_summary(copy)["stages"]] == \
        [s["val_loss"] for s in read_summary(run_dir)["stages"]]


def _name(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith(("exp_avg.", "exp_avg_sq.")) else key


def _own_slice(name: str, region, shape, spec: ModelSpec, tp: int, pp: int, rank: int) -> bool:
    """Whether a read is this rank's own: its pipeline stage's tensors, its TP slice
    (ranks: tp fastest, then pp; dp=1 here)."""
    from orchestrator.engines.parallel_model import split_dim

    tp_rank, pp_rank = rank % tp, rank // tp
    if name.startswith("layers.") and int(name.split(".")[1]) // (spec.layers // pp) != pp_rank:
        return False
    if name.startswith(("final_norm.", "head.")) and pp_rank != pp - 1:
        return False
    d = split_dim(name)
    if d is None or tp == 1:
        return region is None
    size = -(-shape[d] // tp)
    return region == [d, tp_rank * size, min((tp_rank + 1) * size, shape[d])]


DS_SMALL = ["tracking.enabled=false", "growth.ramp_steps=4",
            *[f"schedule.stages.{i}.{k}" for i in range(3) for k in ("tokens=16384", "lr.warmup_steps=2")]]


@pytest.mark.slow
def test_deepspeed_transition_across_tp_and_pp_reads_only_owned_slices(tmp_path, data_cache):
    """engine=deepspeed, small on tp=2 -> wide on pp=2 -> deep on tp=2: each step-0
    checkpoint equals the in-memory growth (the random fill does not depend on the layout),
    and in each growth no rank reads an old tensor unless it grows a tensor from it or it is
    its own slice (the 'before' evaluation), nor a grown tensor or slice it does not own."""
    log = tmp_path / "reads"
    log.mkdir()
    layouts = ["schedule.stages.0.layout.tp=2", "schedule.stages.1.layout.pp=2", "schedule.stages.2.layout.tp=2"]
    fork_grow(tmp_path, "engine=deepspeed", *DS_SMALL, *layouts, "hydra.run.dir=ds", cache=data_cache,
              schedule="default", timeout=900, env={"GROW_READ_LOG": str(log)})
    run_dir = tmp_path / "ds"
    assert read_summary(run_dir)["status"] == "complete"
    reads = [json.loads(line) for f in log.glob("*.jsonl") for line in f.read_text().splitlines()]
    for index, (tp, pp) in ((1, (1, 2)), (2, (2, 1))):
        grown = assert_step0_is_in_memory_growth(run_dir, index)
        step0, plan = grown["step0"], grown["plan"]
        old_dir = _stage_dirs(run_dir, index - 1)[-1]
        old_files, new_files = open_checkpoint(old_dir)[0], open_checkpoint(step0)[0]
        weight_map = json.loads((step0 / index_name("model")).read_text())["weight_map"]
        writes: dict[int, set] = {}
        for n, f in weight_map.items():  # shard i is rank i's (dp=1)
            writes.setdefault(int(f.split("-")[1]), set()).add(n)
        seen_old = seen_new = 0
        for r in reads:
            name, rank = _name(r["key"]), r["rank"]
            if (r["stage_dir"], r["dir"]) == (step0.parent.name, "." + step0.name + ".tmp-grown"):
                seen_new += 1
                assert _own_slice(name, r["region"], new_files.stored(name)[1], plan.new, tp, pp, rank), r
            elif (r["stage_dir"], r["dir"]) == (old_dir.parent.name, old_dir.name):
                seen_old += 1
                grows_from_it = r["region"] is None and any(plan.source(n) == name for n in writes.get(rank, ()))
                assert grows_from_it or _own_slice(name, r["region"], old_files.stored(name)[1], plan.old, tp, pp,
                                                   rank), r
        assert seen_old and seen_new
        # no rank read the whole old state (with pp=2 each reads its stage's half for the 'before' check)
        for rank in range(2):
            whole = {_name(r["key"]) for r in reads if r["rank"] == rank and r["region"] is None
                     and (r["stage_dir"], r["dir"]) == (old_dir.parent.name, old_dir.name)}
            assert len(whole) < len(old_files), (rank, sorted(set(old_files) - whole))


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))


def test_freed_tensors_leave_resident_memory():
    """With the engines' malloc setting, tensors of a few MiB freed during a transition are
    returned to the OS even when a live tensor sits after them (glibc's default would keep
    them in its heap once it has raised its mmap threshold)."""
    from orchestrator.engines.host_memory import return_freed_tensors_to_the_os

    assert return_freed_tensors_to_the_os()
    torch.ones(5 << 18).sum()  # a 5 MiB block freed: glibc would now raise its threshold to 5 MiB
    base = _rss_anon()
    tensors = [torch.ones(5 << 18) for _ in range(40)]  # 200 MiB
    high = _rss_anon()
    last = tensors[-1]
    del tensors
    assert high - base > 150 << 20
    assert _rss_anon() - base < 30 << 20, (base, high, _rss_anon())
    assert last.sum() == 5 << 18
