"""Offline growth of a checkpoint with each operator: time against one plain read + write
of the same bytes on the same disk, and peak memory against the checkpoint size.

    python -m bench.operators                       # ~1.1B params (hidden 2048, 16 layers)
    python -m bench.operators --hidden 512 --layers 8 --ffn 1408 --vocab 32000   # smaller

Each operator runs `grow grow` in its own process (peak RSS from getrusage). The source
checkpoint (weights + two Adam moments, fp32) is written once with random tensors. Width
operators double hidden/ffn/heads; stack doubles depth. Prints a table and writes
bench/results/growth_ops.json. One run each, not a timed assertion.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import REPO, RESULTS
from growth_ops import ModelSpec, count_parameters
from growth_ops.spec import axis_size, parameter_axes
from orchestrator.offline.outputs import write_checkpoint_dir, write_safetensors_stream

CHUNK = 1 << 24
# Runs the CLI in-process and reports the process's own peak RSS.
MEASURED = ("import resource, sys; import orchestrator.offline.expand; from orchestrator.cli import main; "
            "rc = main(sys.argv[1:]); "
            "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def make_checkpoint(path: Path, spec: ModelSpec) -> None:
    layout = [(n, torch.float32, tuple(axis_size(spec, k) for k in kinds)) for n, kinds in parameter_axes(spec).items()]
    g = torch.Generator().manual_seed(0)

    def rand(shape, scale):
        return torch.empty(shape).normal_(0, scale, generator=g)

    def files(tmp: Path) -> None:
        write_safetensors_stream(tmp / "model.safetensors", layout,
                                 ((n, torch.ones(s) if "norm" in n else rand(s, 0.02)) for n, _, s in layout))
        optim = [(f"{k}.{n}", d, s) for k in ("exp_avg", "exp_avg_sq") for n, d, s in layout]
        write_safetensors_stream(tmp / "optimizer.safetensors", optim,
                                 ((n, rand(s, 1e-4).abs() if "sq" in n else rand(s, 1e-3)) for n, _, s in optim))
    write_checkpoint_dir(path, files, {"spec": spec.to_dict(), "masks": None, "optimizer_step": 1000})


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def plain_read_write(src: Path, out_bytes: int, scratch: Path) -> float:
    """Read every byte of `src` and write `out_bytes` bytes (fsynced): the I/O any growth
    must do at least once."""
    t = time.perf_counter()
    buf = bytearray(CHUNK)
    for f in src.iterdir():
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    with open(scratch, "wb") as fh:
        left = out_bytes
        while left > 0:
            n = min(left, CHUNK)
            fh.write(memoryview(buf)[:n])
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - t
    scratch.unlink()
    return elapsed


def drop_page_cache_hint(path: Path) -> None:
    """Ask the kernel to forget the files' pages (best effort) so reads hit the disk alike."""
    for f in path.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--operators", default="msg,zero,clone,stack")
    ap.add_argument("--workdir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "growth_ops.json"))
    a = ap.parse_args()
    spec = ModelSpec(layers=a.layers, hidden=a.hidden, ffn=a.ffn, heads=a.heads, kv_heads=a.kv_heads,
                     head_dim=a.hidden // a.heads, vocab=a.vocab, tie_embeddings=False)
    width = dict(hidden=2 * a.hidden, ffn=2 * a.ffn, heads=2 * a.heads, kv_heads=2 * a.kv_heads)
    targets = {"msg": width, "zero": width, "clone": width, "stack": dict(layers=2 * a.layers)}
    work = Path(a.workdir or tempfile.mkdtemp(prefix="growth-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    t = time.perf_counter()
    make_checkpoint(src, spec)
    print(f"source: {count_parameters(spec) / 1e6:.1f}M params, {dir_bytes(src) / 2**30:.2f} GiB "
          f"(weights + 2 moments, fp32), written in {time.perf_counter() - t:.1f}s")
    base = subprocess.run([sys.executable, "-c", MEASURED.replace("rc = main(sys.argv[1:])", "rc = 0")],
                          cwd=REPO, capture_output=True, text=True)
    base_kib = int(base.stdout.split("MAXRSS_KIB ")[1].split()[0])  # python + torch + our modules
    rows = []
    for name in a.operators.split(","):
        dst = work / f"dst-{name}"
        shape = targets[name]
        new_spec = spec.with_shape(**{**shape, "kv_heads": shape.get("kv_heads", spec.kv_heads)})
        drop_page_cache_hint(src)
        cmd = [sys.executable, "-c", MEASURED, "grow", f"ckpt={src}", f"out={dst}", f"growth={name}",
               *[f"{k}={v}" for k, v in shape.items()], "layer_insert=interleave" if name != "stack" else "layer_insert=append",
               "check=false", "overwrite=true"]  # the streaming growth alone: the check holds whole models
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        grow_s = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
        peak_kib = int(proc.stdout.split("MAXRSS_KIB ")[1].split()[0])
        out_bytes = dir_bytes(dst)
        drop_page_cache_hint(src)
        io_s = plain_read_write(src, out_bytes, work / "scratch.bin")
        rows.append({"operator": name, "params_in": count_parameters(spec), "params_out": count_parameters(new_spec),
                     "bytes_in": dir_bytes(src), "bytes_out": out_bytes, "grow_s": round(grow_s, 2),
                     "plain_read_write_s": round(io_s, 2), "ratio": round(grow_s / io_s, 2),
                     "peak_rss_gib": round(peak_kib / 2**20, 3),
                     "interpreter_rss_gib": round(base_kib / 2**20, 3),
                     "peak_above_interpreter_gib": round((peak_kib - base_kib) / 2**20, 3),
                     "peak_over_checkpoint_in": round(peak_kib * 1024 / dir_bytes(src), 3)})
        print(f"  {name}: {grow_s:.1f}s")
        for f in dst.iterdir():
            f.unlink()
        dst.rmdir()
    header = (f"{'operator':<8} {'params':>15} {'GiB in->out':>13} {'grow s':>8} {'r+w s':>7} {'ratio':>6} "
              f"{'peak GiB':>9} {'peak/in':>8} {'above interp GiB':>17}")
    print(header)
    for r in rows:
        print(f"{r['operator']:<8} {r['params_in'] / 1e6:6.0f}M->{r['params_out'] / 1e6:5.0f}M "
              f"{r['bytes_in'] / 2**30:5.2f}->{r['bytes_out'] / 2**30:5.2f} {r['grow_s']:8.1f} "
              f"{r['plain_read_write_s']:7.1f} {r['ratio']:6.2f} {r['peak_rss_gib']:9.2f} {r['peak_over_checkpoint_in']:8.2f} "
              f"{r['peak_above_interpreter_gib']:17.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"spec": spec.to_dict(), "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    for f in src.iterdir():
        f.unlink()
    src.rmdir()


if __name__ == "__main__":
    main()
