"""Write a canonical checkpoint from many ranks at once, nothing gathered on one rank.

Each writer rank (an engine's `checkpoint_shard["index"]`) writes the full tensors it owns
to `model-<i>-of-<n>.safetensors` / `optimizer-<i>-of-<n>.safetensors` in a shared
temporary directory; the leader then writes meta.json and the manifest, renames the
directory into place and moves `latest`, exactly as `checkpoint.save_checkpoint` does for
one file, so `load_checkpoint` and every reader see the same format either way.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..checkpoint import (FORMAT_VERSION, MOMENTS, _fsync_dir, _fsync_file, _sha256, shard_name,
                          write_json_atomic)


def save_sharded_checkpoint(path: Path, model: dict, moments: dict, meta: dict, shard: dict) -> Path:
    """Collective over all ranks: every rank calls it with its share (maybe empty)."""
    path = Path(path)
    barrier, leader, index, count = shard["barrier"], shard["leader"], shard["index"], shard["count"]
    tmp = path.with_name(f".{path.name}.tmp-sharded")
    if leader:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if index is not None:
        files = [tmp / shard_name("model", index, count), tmp / shard_name("optimizer", index, count)]
        save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, files[0])
        save_file({f"{kind}.{name}": t.detach().contiguous().cpu()
                   for kind in MOMENTS for name, t in moments.get(kind, {}).items()}, files[1])
        for f in files:
            _fsync_file(f)
    barrier()
    if leader:
        with open(tmp / "meta.json", "w") as f:
            json.dump({"format": FORMAT_VERSION, **meta}, f, indent=1)
        _fsync_file(tmp / "meta.json")
        names = sorted(p.name for p in tmp.iterdir())
        manifest = {n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
        _fsync_file(tmp / "manifest.json")
        _fsync_dir(tmp)
        if path.exists():  # the same step saved again after a resume: swap, never leave a gap
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        write_json_atomic(path.parents[1] / "latest", {"path": str(path.relative_to(path.parents[1]))})
    barrier()
    return path
