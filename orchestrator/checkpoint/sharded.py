"""Write a canonical checkpoint from many ranks at once, nothing gathered on one rank.

Each writer rank (an engine's `shard_role().index`) writes the full tensors it owns to
`model-<i>-of-<n>.safetensors` / `optimizer-<i>-of-<n>.safetensors` in a shared temporary
directory, hashing the bytes as it writes them; the leader then writes meta.json, the index
of each kind and the manifest (from those digests: no file is read again), renames the
directory into place and moves `latest`, exactly as
`checkpoint.save_checkpoint` does for one file, so `load_checkpoint` and every reader see
the same format either way.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from orchestrator.checkpoint.canonical import MOMENTS, seal_and_publish, shard_name, write_tensors


def save_sharded_checkpoint(path: Path, model: dict, moments: dict, meta: dict, role) -> Path:
    """Collective over all ranks: every rank calls it with its share (maybe empty) and its
    `engines.base.ShardRole`."""
    path = Path(path)
    barrier, leader, index, count = role.barrier, role.leader, role.index, role.count
    tmp = path.with_name(f".{path.name}.tmp-sharded")
    if leader:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if index is not None:
        write_tensors(tmp / shard_name("model", index, count), model)  # hashed while written:
        write_tensors(tmp / shard_name("optimizer", index, count),  # the seal reads no file again
                      {f"{kind}.{name}": t for kind in MOMENTS for name, t in moments.get(kind, {}).items()})
    barrier()
    if leader:
        seal_and_publish(tmp, path, meta)
    barrier()
    return path
