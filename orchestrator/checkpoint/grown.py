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
from pathlib import Path
from typing import Collection

import torch

from growth_ops import GrowthOperator, GrowthPlan, iter_grown, iter_moments
from growth_ops.grown_tensors import all_axes
from growth_ops.spec import axis_size, parameter_axes

from orchestrator.atomic import fsync_file
from orchestrator.checkpoint.canonical import MOMENTS, WRITE_ERRORS, shard_name, write_failed
from orchestrator.checkpoint.stream import write_safetensors_stream


def write_grown(model_file: Path, optimizer_file: Path, op: GrowthOperator, plan: GrowthPlan, weights,
                moments: dict | None, generator: torch.Generator | None, dtype: torch.dtype = torch.float32,
                names: Collection[str] | None = None) -> None:
    """The grown weights (`names` only, if given; stored as `dtype`) and, when `moments`
    ({kind: old moments}) is given, their grown Adam moments (fp32); else an empty
    optimizer file, as a checkpoint without optimizer state has."""
    wanted = set(all_axes(plan.new)) if names is None else set(names)
    shapes = {n: tuple(axis_size(plan.new, k) for k in kinds) for n, kinds in all_axes(plan.new).items()}
    layout = [(n, dtype, shapes[n]) for n in all_axes(plan.new) if n in wanted]
    write_safetensors_stream(model_file, layout, iter_grown(plan, op.fill, weights.get, generator, op.finish,
                                                            wanted))
    params = [n for n in parameter_axes(plan.new) if n in wanted]
    moment_layout = [(f"{kind}.{n}", torch.float32, shapes[n]) for kind in MOMENTS for n in params]

    def moment_stream():
        for kind in MOMENTS:
            for name, t in iter_moments(plan, moments[kind].get, kind, wanted):
                yield f"{kind}.{name}", t

    write_safetensors_stream(optimizer_file, moment_layout if moments else [],
                             moment_stream() if moments else iter(()))


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
            write_grown(*files, names=names, **grow)
            for f in files:
                fsync_file(f)
        except WRITE_ERRORS as e:  # nothing is published: the job stops here
            raise write_failed(path, tmp, e) from e
    if role is not None:
        role.barrier()
    return tmp
