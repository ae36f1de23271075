"""Damage that a checkpoint's manifest agrees with, for the tests of what happens when a
checkpoint does not load (tests/checkpoint/test_readable.py, tests/faults/test_bad_index.py):
plain file edits, then the manifest sealed over them again (`write_manifest`), as a damaged
writer or a hand edit would leave it. `shard` first rewrites a one-file checkpoint as the
sharded, indexed one a multi-rank engine writes (same tensors, split over files by name), so
the index has something to get wrong."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from orchestrator.checkpoint.canonical import KINDS, index_name, shard_name, write_indexes, write_manifest


def shard(ckpt: Path, count: int = 2) -> None:
    """Rewrite `ckpt`'s tensor files as `count` shards of each kind with their indexes."""
    for kind in KINDS:
        tensors = load_file(ckpt / f"{kind}.safetensors")
        names = sorted(tensors)
        for i in range(count):
            save_file({n: tensors[n] for n in names[i::count]}, ckpt / shard_name(kind, i, count))
        (ckpt / f"{kind}.safetensors").unlink()
    write_indexes(ckpt)
    write_manifest(ckpt)


def damage(ckpt: Path, kind: str) -> None:
    """Apply DAMAGE[kind] to sharded checkpoint `ckpt` and seal the manifest over it."""
    DAMAGE[kind](ckpt)
    write_manifest(ckpt)


def _edit_json(f: Path, edit) -> None:
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))


def _remap(kind: str, tensor: str):
    """The index of `kind` sends `tensor` to another shard."""
    def edit(ckpt: Path) -> None:
        def swap(index):
            m = index["weight_map"]
            m[tensor] = next(f for f in sorted(set(m.values())) if f != m[tensor])
        _edit_json(ckpt / index_name(kind), swap)
    return edit


def _name_missing_shard(ckpt: Path) -> None:
    missing = shard_name("model", 2, 3)
    _edit_json(ckpt / index_name("model"), lambda i: i["weight_map"].update({"embed.weight": missing}))


def _truncate(name: str, keep: int):
    return lambda ckpt: (ckpt / name).write_bytes((ckpt / name).read_bytes()[:keep])


def _meta(edit):
    return lambda ckpt: _edit_json(ckpt / "meta.json", edit)


DAMAGE = {  # name -> edit of a sharded checkpoint
    "model-index-wrong-mapping": _remap("model", "embed.weight"),
    "optimizer-index-wrong-mapping": _remap("optimizer", "exp_avg.embed.weight"),
    "index-names-missing-shard": _name_missing_shard,
    "model-index-truncated": _truncate(index_name("model"), 40),
    "optimizer-index-truncated": _truncate(index_name("optimizer"), 40),
    "shard-header-truncated": _truncate(shard_name("model", 1, 2), 20),
    "meta-wrong-step": _meta(lambda m: m.update(step=m["step"] - 1)),
    "meta-missing-key": _meta(lambda m: m.pop("spec")),
    "meta-ledger-garbled": _meta(lambda m: m.update(ledger={"s1": "spent"})),
    "meta-cursor-garbled": _meta(lambda m: m["data_cursor"].update(sequences=-8)),
}
