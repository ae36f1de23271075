"""The canonical checkpoint: full tensors by self-explaining name, Adam moments beside
them, and a JSON with everything else needed to resume (shape, masks, step, tokens, data
cursor, RNG, ledger, tracking ids).

Layout: `<run_dir>/checkpoints/<index>-<stage>/step_<NNNNNNNN>/` holding `meta.json`,
`manifest.json` (sha256 of each file) and the tensors: `model.safetensors` and
`optimizer.safetensors` from one process, or from many ranks shards split by tensor
(`model-<i>-of-<n>.safetensors`, `optimizer-<i>-of-<n>.safetensors`, each holding full
tensors) with the Hugging Face index beside them (`model.safetensors.index.json`,
`optimizer.safetensors.index.json`: tensor -> file), so a reader opens only the files it
needs. Sharded checkpoints of earlier versions (no index) load as well. A checkpoint is
written under a temporary name, fsynced and renamed; `latest` is replaced last, so it
never points at a partial checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import logging
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from orchestrator.atomic import fsync_dir, fsync_file, replace_dir
from orchestrator.checkpoint.layout import (all_checkpoints, checkpoint_dir,  # noqa: F401 (also imported from here)
                                            checkpoints_root, pointed_at, set_latest)
from orchestrator.checkpoint.stream import WRITTEN_SUFFIX, digest_written, layout_of, write_safetensors_stream
from orchestrator.faults import failpoint

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
KINDS = ("model", "optimizer")
# Called as observer(file, key, region) on every tensor read through LazyTensors (region:
# None for a whole tensor, else (dim, start, stop)): how tests and benchmarks see what a
# rank reads. Empty (always, outside them) it costs one list check.
READ_OBSERVERS: list[Callable[[Path, str, tuple | None], None]] = []


def _log_reads(folder: str) -> Callable[[Path, str, tuple | None], None]:
    """`GROW_READ_LOG=<dir>` (tests of multi-rank runs): each process appends every read to
    <dir>/reads-<pid>.jsonl with its RANK, so a test can check no rank read what it does not own."""
    def observe(file: Path, key: str, region: tuple | None) -> None:
        with open(Path(folder) / f"reads-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "dir": file.parent.name,
                                "stage_dir": file.parent.parent.name, "key": key, "region": region}) + "\n")
    return observe


if os.environ.get("GROW_READ_LOG"):
    READ_OBSERVERS.append(_log_reads(os.environ["GROW_READ_LOG"]))


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: Path, model: dict[str, torch.Tensor],
                    moments: dict[str, dict[str, torch.Tensor]], meta: dict) -> Path:
    """Write a checkpoint atomically at `path` and point `latest` at it. On a write
    error (disk full...) the partial files are removed and CheckpointError says that the
    previous checkpoint is untouched."""
    path = Path(path)
    try:
        return _save(path, model, moments, meta)
    except WRITE_ERRORS as e:
        raise write_failed(path, path.with_name(f".{path.name}.tmp-{os.getpid()}"), e) from e


WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports ENOSPC as its own error


def write_failed(path: Path, tmp: Path, error: Exception) -> CheckpointError:
    """After a failed write of checkpoint `path` (disk full...): its temporary directory
    removed, and the error that says the previous checkpoint is untouched."""
    shutil.rmtree(tmp, ignore_errors=True)
    kept = pointed_at(path.parents[1]) or "none"
    reason = getattr(error, "strerror", None) or str(error)
    return CheckpointError(f"could not write checkpoint {path}: {reason}; the previous checkpoint ({kept}) is intact")


def _save(path: Path, model, moments, meta) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_tensors(tmp / "model.safetensors", model)
    write_tensors(tmp / "optimizer.safetensors", {f"{kind}.{name}": t for kind in MOMENTS
                                                  for name, t in moments.get(kind, {}).items()})
    return seal_and_publish(tmp, path, meta)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint's tensor file, hashed while written (see `stream`), one tensor at a time
    (a GPU tensor is copied to the host alone)."""
    write_safetensors_stream(path, layout_of(tensors), ((k, v.detach().cpu()) for k, v in tensors.items()),
                             keep_digest=True)


def seal_and_publish(tmp: Path, path: Path, meta: dict, point_latest: bool = True) -> Path:
    """Finish a checkpoint whose tensor files are in `tmp`: write meta.json, fsync, write
    the manifest of every file, rename to `path` (swapping out an older copy of the same
    step, never leaving a gap) and, in a run directory, point `latest` at it last."""
    with open(tmp / "meta.json", "w") as f:
        json.dump({"format": FORMAT_VERSION, **meta}, f, indent=1)
    write_indexes(tmp)
    write_manifest(tmp)
    failpoint("checkpoint.tmp_written")
    replace_dir(tmp, path)
    failpoint("checkpoint.renamed")
    if point_latest:
        set_latest(path)
        failpoint("checkpoint.done")
    return path


def write_manifest(path: Path) -> None:
    """The manifest of every other file in directory `path` (sha256 and size), all durable.
    A file whose digest was taken while it was written (`stream.write_safetensors_stream`
    with keep_digest) is not read again; those records are removed, so only the files and
    the manifest remain."""
    path = Path(path)
    records = [p for p in path.iterdir() if p.name.startswith(".") and
               (p.name.endswith(WRITTEN_SUFFIX) or p.name.endswith(".written.tmp"))]
    names = sorted(p.name for p in path.iterdir() if p.name != "manifest.json" and p not in records)
    known = {n: digest_written(path / n) for n in names}
    for p in records:
        p.unlink()
    for name in names:
        fsync_file(path / name)
    todo = [n for n in names if known[n] is None]
    digests = dict(known)
    if todo:
        with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:  # hashlib frees the GIL
            digests.update(zip(todo, pool.map(lambda n: _sha256(path / n), todo)))
    manifest = {n: {"sha256": digests[n], "bytes": (path / n).stat().st_size} for n in names}
    with open(path / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
    fsync_file(path / "manifest.json")
    fsync_dir(path)


def verify(path: Path) -> None:
    """Checkpoint `path` is whole (every file matches the manifest) and readable (see
    `check_readable`); else CheckpointError naming the file and what is wrong."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"{manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = [(name, e["sha256"], e["bytes"]) for name, e in manifest.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{manifest_path} is not a valid manifest") from None
    if not _complete_file_set({n for n, _, _ in entries}):
        raise CheckpointError(f"{manifest_path} does not list the checkpoint's files")
    for name, sha, size in entries:
        f = Path(path) / name
        if not f.exists():
            raise CheckpointError(f"{f} is missing")
        if f.stat().st_size != size or _sha256(f) != sha:
            raise CheckpointError(f"{f} does not match its checksum")
    check_readable(Path(path))


def check_readable(path: Path) -> None:
    """What a loader reads agrees with itself: meta.json is a JSON object, every tensor file's
    header parses, and each index maps every tensor to the shard that holds it. A manifest
    sealed over a bad index (or a damaged meta.json) passes the checksums, and would otherwise
    fail every resume with a rank's traceback; headers are a few KB, so this costs little."""
    try:
        meta = read_meta(path)
    except ValueError as e:
        raise CheckpointError(f"{path / 'meta.json'} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / 'meta.json'} does not hold a JSON object")
    for kind in KINDS:
        held = _held_tensors(path, kind)
        if (path / index_name(kind)).exists():
            _check_index(path / index_name(kind), held)


def _held_tensors(path: Path, kind: str) -> dict[str, str]:
    """tensor -> name of the file of `kind` that holds it, from the files' headers."""
    held: dict[str, str] = {}
    for f in _data_files(path, kind):
        try:
            with safe_open(f, framework="pt") as h:
                keys = list(h.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None
        for key in keys:
            if key in held:
                raise CheckpointError(f"{key!r} is in both {held[key]} and {f.name} of {path}")
            held[key] = f.name
    return held


def _check_index(index: Path, held: dict[str, str]) -> None:
    """`index` maps exactly the tensors in `held` to the files that hold them."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        pairs = [(str(k), str(v)) for k, v in weight_map.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid index ({type(e).__name__}: {e})") from None
    files = set(held.values())
    for key, file in pairs:
        if file not in files:
            raise CheckpointError(f"{index} maps {key!r} to {file}, which is not a tensor file of the checkpoint")
        if held.get(key) != file:
            where = f"it is in {held[key]}" if key in held else "no file holds it"
            raise CheckpointError(f"{index} maps {key!r} to {file}, but {where}")
    if len(pairs) != len(held):
        missing = sorted(held.keys() - weight_map.keys())
        raise CheckpointError(f"{index} leaves out {len(missing)} tensors its files hold (first: {missing[0]!r})")


def index_name(kind: str) -> str:
    return f"{kind}.safetensors.index.json"


def write_indexes(path: Path) -> None:
    """For a sharded checkpoint: the index of each kind (HF convention: {"metadata":
    {"total_size"}, "weight_map": {tensor: file}}), from the shards' headers alone."""
    for kind in KINDS:
        shards = sorted(path.glob(f"{kind}-*-of-*.safetensors"))
        if not shards:
            continue
        weight_map, total = {}, 0
        for f in shards:
            with safe_open(f, framework="pt") as h:
                for key in h.keys():
                    weight_map[key] = f.name
            total += f.stat().st_size
        with open(path / index_name(kind), "w") as out:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, out, indent=1)


def shard_name(kind: str, index: int, count: int) -> str:
    """File of one writer of a checkpoint written by several ranks (`kind`: model or
    optimizer). Shards split the set of tensors, never a tensor: each holds full tensors."""
    return f"{kind}-{index:05d}-of-{count:05d}.safetensors"


def _complete_file_set(names: set[str]) -> bool:
    """meta.json plus either model/optimizer.safetensors or every shard of both (with
    their indexes, or without: checkpoints of earlier versions have none)."""
    if names == {"model.safetensors", "optimizer.safetensors", "meta.json"}:
        return True
    indexes = {index_name(k) for k in KINDS}
    if names & indexes and not indexes <= names:
        return False
    shards = sorted(names - {"meta.json"} - indexes)
    if "meta.json" not in names or not shards:
        return False
    count = shards[0].rsplit("-of-", 1)[-1].split(".")[0]
    if not count.isdigit():
        return False
    want = {shard_name(k, i, int(count)) for k in KINDS for i in range(int(count))}
    return set(shards) == want


def _data_files(path: Path, kind: str) -> list[Path]:
    single = path / f"{kind}.safetensors"
    return [single] if single.exists() else sorted(path.glob(f"{kind}-*-of-*.safetensors"))


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict]:
    path = Path(path)
    verify(path)
    model, optim = {}, {}
    for f in _data_files(path, "model"):
        model.update(load_file(f))
    for f in _data_files(path, "optimizer"):
        optim.update(load_file(f))
    moments: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in MOMENTS}
    for key, t in optim.items():
        kind, name = key.split(".", 1)
        moments[kind][name] = t
    return model, moments, read_meta(path)


class LazyTensors(Mapping):
    """Tensors of a checkpoint's safetensors files, read on access: `t[name]` reads one
    full tensor, `t.slice(name, dim, index, parts)` only chunk `index` of `parts` along
    `dim` (as `tensor.chunk`), so a rank reads just the slice it owns. With an `index`
    (HF weight map) no file is opened until one of its tensors is read."""

    def __init__(self, files: list[Path], prefix: str = "", index: dict[str, Path] | None = None):
        self._where: dict[str, tuple[Path, str]] = {}
        if index is not None:  # key -> file: no header read
            self._where = {key[len(prefix):]: (f, key) for key, f in index.items() if key.startswith(prefix)}
            return
        for f in files:
            with safe_open(f, framework="pt") as h:
                for key in h.keys():
                    if key.startswith(prefix):
                        self._where[key[len(prefix):]] = (f, key)

    def __getitem__(self, name: str) -> torch.Tensor:
        f, key = self._where[name]
        for observe in READ_OBSERVERS:
            observe(f, key, None)
        with safe_open(f, framework="pt") as h:
            return h.get_tensor(key)

    def slice(self, name: str, dim: int, index: int, parts: int) -> torch.Tensor:
        f, key = self._where[name]
        with safe_open(f, framework="pt") as h:
            sl = h.get_slice(key)
            shape = sl.get_shape()
            size = -(-shape[dim] // parts)  # tensor.chunk's sizes
            lo, hi = min(index * size, shape[dim]), min((index + 1) * size, shape[dim])
            idx = tuple(slice(lo, hi) if d == dim else slice(None) for d in range(len(shape)))
            for observe in READ_OBSERVERS:
                observe(f, key, (dim, lo, hi))
            return sl[idx]

    def stored(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of one tensor, from the file header (no data read)."""
        f, key = self._where[name]
        with safe_open(f, framework="pt") as h:
            sl = h.get_slice(key)
            return STORED_DTYPES[sl.get_dtype()], tuple(sl.get_shape())

    def __contains__(self, name) -> bool:  # without reading the tensor (Mapping's would)
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def open_tensors(path: Path) -> tuple[LazyTensors, dict[str, LazyTensors]]:
    """The weights and moments in the tensor files of `path`, opened lazily (see LazyTensors)."""
    path = Path(path)

    def opened(kind: str, prefix: str = "") -> LazyTensors:
        index = path / index_name(kind)
        if not index.exists():  # one file, or shards of an earlier version
            return LazyTensors(_data_files(path, kind), prefix)
        weight_map = json.loads(index.read_text())["weight_map"]
        return LazyTensors([], prefix, {key: path / file for key, file in weight_map.items()})

    return opened("model"), {kind: opened("optimizer", f"{kind}.") for kind in MOMENTS}


def open_checkpoint(path: Path, check: bool = True) -> tuple[LazyTensors, dict[str, LazyTensors], dict]:
    """As `load_checkpoint`, but nothing is read until asked for (see LazyTensors).
    `check=False` skips hashing every file against the manifest, for a checkpoint this very
    job has just sealed (at scale, hashing on every rank costs more than the reads)."""
    path = Path(path)
    if check:
        verify(path)
    model, moments = open_tensors(path)
    return model, moments, read_meta(path)


def latest_checkpoint(run_dir: Path, damaged: list[str] | None = None,
                      check_meta: Callable[[dict], object] | None = None) -> Path | None:
    """The checkpoint to resume from: `latest` if it verifies, else the newest one that
    does, with a warning naming what was skipped (also appended to `damaged`). A checkpoint
    verifies when its files are whole and readable (`verify`), its meta.json names the step
    and stage of its directory, and `check_meta(meta)` (the run's reading of it) raises no
    KeyError, TypeError or ValueError: whatever would fail the resume falls back here instead."""
    root = checkpoints_root(run_dir)
    candidates = list(reversed(all_checkpoints(run_dir)))
    try:
        pointed = pointed_at(root)
        if pointed is not None:
            target = root / pointed
            candidates = [target] + [c for c in candidates if c != target]
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring damaged pointer %s", root / "latest")
    for ckpt in candidates:
        try:
            if not ckpt.is_dir():
                raise CheckpointError(f"{root / 'latest'} names {ckpt}, which does not exist")
            verify(ckpt)
            _check_meta(ckpt, check_meta)
            return ckpt
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            if damaged is not None:
                damaged.append(str(e))
    return None


def _check_meta(ckpt: Path, check_meta: Callable[[dict], object] | None) -> None:
    """meta.json of run checkpoint `ckpt` agrees with its place (`<index>-<stage>/step_<N>`)
    and, with `check_meta`, reads as the run's state."""
    meta, where = read_meta(ckpt), ckpt / "meta.json"
    index, _, stage = ckpt.parent.name.partition("-")
    step = ckpt.name[len("step_"):]
    if not (ckpt.name.startswith("step_") and step.isdigit() and index.isdigit() and stage):
        raise CheckpointError(f"{ckpt} is not where a run keeps checkpoints (<index>-<stage>/step_<N>)")
    placed = {"step": int(step), "stage_index": int(index), "stage_name": stage}
    for key, want in placed.items():
        if key in meta and meta[key] != want:
            raise CheckpointError(f"{where} says {key} {meta[key]!r}, but the checkpoint is {key} {want!r}")
    if check_meta is None:
        return
    try:
        check_meta(meta)
    except KeyError as e:
        raise CheckpointError(f"{where} has no {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where} holds a value the run cannot read ({type(e).__name__}: {e})") from None


def prune(stage_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints of a stage (stage-final ones stay)."""
    ckpts = sorted(p for p in Path(stage_dir).glob("step_*") if p.is_dir())
    def complete(p: Path) -> bool:
        try:
            return bool(read_meta(p).get("stage_complete"))
        except (OSError, ValueError):
            return False

    mid = [p for p in ckpts if not complete(p)]
    for p in mid[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
