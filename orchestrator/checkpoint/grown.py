"""Grow a canonical state into the tensor files of a new checkpoint, tensor by tensor.

Old tensors are read one at a time (from a checkpoint's memory-mapped files, or a dict)
and each grown tensor is written as soon as it is built, so a writer holds one grown
tensor and the old one it comes from, whatever the model's size. A run's growth
transition splits the work over the new stage's ranks: each writer grows exactly the
tensors it writes when it checkpoints (`Engine.written_names`) into its own shard, so the
grown checkpoint has the stage's own sharding; `grow expand` writes every tensor into one
file. With the same seed the bits equal `growth_ops`' in-memory growth: every tensor has
its own random stream (growth_ops.grown_tensors.tensor_generator), whoever grows it.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Collection

import torch

from growth_ops import GrowthOperator, GrowthPlan, iter_grown, iter_moments
from growth_ops.grown_tensors import all_axes
from growth_ops.spec import axis_size, parameter_axes

from orchestrator.checkpoint.canonical import MOMENTS, WRITE_ERRORS, shard_name, write_failed
from orchestrator.checkpoint.stream import Written, write_safetensors_stream, written_record


def timed_reads(get: Callable[[str], torch.Tensor | None], seconds: dict) -> Callable[[str], torch.Tensor | None]:
    """`get`, adding the time it takes to seconds["read"]."""
    seconds.setdefault("read", 0.0)

    def read(name: str):
        t = time.perf_counter()
        try:
            return get(name)
        finally:
            seconds["read"] += time.perf_counter() - t
    return read


def write_grown(model_file: Path, optimizer_file: Path, op: GrowthOperator, plan: GrowthPlan, weights,
                moments: dict | None, generator: torch.Generator | None, dtype: torch.dtype = torch.float32,
                names: Collection[str] | None = None) -> list[Written]:
    """The grown weights (`names` only, if given; stored as `dtype`) and, when `moments`
    ({kind: old moments}) is given, their grown Adam moments (fp32); else an empty
    optimizer file, as a checkpoint without optimizer state has. Each old tensor is read
    once and each grown one built once, written and hashed in the same pass (the digests
    and the seconds spent reading, growing, writing, hashing and syncing stay beside the
    files for the seal; also returned)."""
    wanted = set(all_axes(plan.new)) if names is None else set(names)
    shapes = {n: tuple(axis_size(plan.new, k) for k in kinds) for n, kinds in all_axes(plan.new).items()}
    layout = [(n, dtype, shapes[n]) for n in all_axes(plan.new) if n in wanted]
    model_s: dict = {}
    written = [write_safetensors_stream(model_file, layout,
                                        iter_grown(plan, op.fill, timed_reads(weights.get, model_s), generator,
                                                   op.finish, wanted), keep_digest=True, seconds=model_s)]
    params = [n for n in parameter_axes(plan.new) if n in wanted]
    moment_layout = [(f"{kind}.{n}", torch.float32, shapes[n]) for kind in MOMENTS for n in params]

    optimizer_s: dict = {}

    def moment_stream():
        for kind in MOMENTS:
            for name, t in iter_moments(plan, timed_reads(moments[kind].get, optimizer_s), kind, wanted):
                yield f"{kind}.{name}", t

    written.append(write_safetensors_stream(optimizer_file, moment_layout if moments else [],
                                            moment_stream() if moments else iter(()), keep_digest=True,
                                            seconds=optimizer_s))
    return written


def staging_dir(path: Path) -> Path:
    """Where the grown files of checkpoint `path` are written before it is sealed: one
    name for all ranks (their pids differ), hidden from `all_checkpoints`."""
    return path.with_name(f".{path.name}.tmp-grown")


def write_grown_shares(path: Path, role, names: Collection[str] | None, **grow) -> Path:
    """Collective over a multi-rank engine's ranks (`role`: their `engines.base.ShardRole`),
    or one process (`role` None): the grown tensor files of checkpoint `path`, unsealed, in
    its staging dir (returned). `grow`: `write_grown`'s arguments after the files."""
    tmp = staging_dir(path)
    if role is None or role.leader:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a transition killed before
        tmp.mkdir()
    if role is None:
        files = [tmp / "model.safetensors", tmp / "optimizer.safetensors"]
    else:
        role.barrier()
        files = [] if role.index is None else [tmp / shard_name(k, role.index, role.count)
                                               for k in ("model", "optimizer")]
    if files:
        try:
            write_grown(*files, names=names, **grow)  # fsynced, digests kept for the seal
        except WRITE_ERRORS as e:  # nothing is published: the job stops here
            raise write_failed(path, tmp, e) from e
    if role is not None:
        role.barrier()
    return tmp


def writer_seconds(staged: Path) -> dict[str, dict]:
    """Per writer (shard index, or "0" for one file) of a staged growth: seconds spent
    reading old tensors, growing, writing, hashing and syncing, summed over its files, from
    the records the writers left (read before the seal removes them)."""
    out: dict[str, dict] = {}
    for f in sorted(Path(staged).glob("*.safetensors")):
        record = written_record(f)
        if record is None or not isinstance(record.get("seconds"), dict):
            continue
        s = record["seconds"]
        parts = f.name.split("-")
        writer = parts[1].lstrip("0") or "0" if len(parts) == 4 else "0"
        mine = out.setdefault(writer, {k: 0.0 for k in ("read", "grow", "write", "hash", "sync")})
        read = s.get("read", 0.0)
        mine["read"] += read
        mine["grow"] += max(0.0, s.get("produce", 0.0) - read)
        for key in ("write", "hash", "sync"):
            mine[key] += s.get(key, 0.0)
    return out
