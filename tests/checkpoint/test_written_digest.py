"""Checksums taken while writing: the digest a writer keeps is the file's own sha256, the
seal uses it instead of reading the file again, and never one that no longer describes
the file."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.canonical import (CheckpointError, checkpoint_dir, load_checkpoint, save_checkpoint,
                                               verify, write_manifest)
from orchestrator.checkpoint.stream import digest_written, write_safetensors_stream, written_path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(37, 11, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
            "empty": torch.zeros(0, 3)}


def write(path: Path, state: dict, keep: bool = True):
    return write_safetensors_stream(path, [(k, v.dtype, tuple(v.shape)) for k, v in state.items()],
                                    iter(state.items()), keep_digest=keep)


def test_digest_taken_while_writing_is_the_files_sha256(tmp_path):
    f = tmp_path / "model.safetensors"
    written = write(f, tensors())
    assert written.sha256 == sha256(f) and written.bytes == f.stat().st_size
    assert digest_written(f) == sha256(f)
    assert set(written.seconds) >= {"produce", "write", "hash", "sync"}
    assert not written_path(tmp_path / "other.safetensors").exists()
    write(tmp_path / "plain.safetensors", tensors(), keep=False)  # nothing left beside a file not kept
    assert not written_path(tmp_path / "plain.safetensors").exists()


def test_the_seal_takes_kept_digests_and_removes_them(tmp_path, monkeypatch):
    """write_manifest reads no file whose digest was kept; the manifest still verifies, and
    only the checkpoint's own files remain."""
    import orchestrator.checkpoint.canonical as canonical

    path = checkpoint_dir(tmp_path, 0, "s1", 1)
    hashed = []
    real = canonical._sha256
    monkeypatch.setattr(canonical, "_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    save_checkpoint(path, tensors(), {"exp_avg": {"a": torch.ones(37, 11)}, "exp_avg_sq": {"a": torch.ones(37, 11)}},
                    {"step": 1})
    assert hashed == ["meta.json"]  # the tensor files were hashed while written
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "meta.json", "model.safetensors",
                                                      "optimizer.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert manifest[name]["sha256"] == sha256(path / name)
    verify(path)
    model, moments, _ = load_checkpoint(path)
    assert all(torch.equal(model[k], v) for k, v in tensors().items())
    assert torch.equal(moments["exp_avg"]["a"], torch.ones(37, 11))


def test_a_record_that_no_longer_describes_its_file_is_not_trusted(tmp_path):
    """A file rewritten after its digest was kept (same size, other bytes) is hashed again:
    the manifest holds the bytes on disk, never the record's."""
    d = tmp_path / "ckpt"
    d.mkdir()
    f = d / "model.safetensors"
    write(f, tensors())
    kept = json.loads(written_path(f).read_text())
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(kept["mtime_ns"] + 1_000_000, kept["mtime_ns"] + 1_000_000))
    assert digest_written(f) is None
    (d / "meta.json").write_text("{}")
    write_manifest(d)
    assert json.loads((d / "manifest.json").read_text())["model.safetensors"]["sha256"] == sha256(f)
    assert not written_path(f).exists()


def test_damage_after_the_seal_is_still_found(tmp_path):
    """The digest kept while writing goes into the manifest; a byte changed afterwards fails
    verify as before."""
    path = checkpoint_dir(tmp_path, 0, "s1", 1)
    save_checkpoint(path, tensors(), {}, {"step": 1})
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify(path)
