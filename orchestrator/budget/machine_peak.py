"""The FLOP/s this machine's CPU reaches on a plain fp32 matmul, on the threads a run uses.

A GPU's peak is a datasheet number (`cluster.peak_tflops_per_gpu`); a CPU's depends on
its cores, vector units, the BLAS torch calls and the threads given to it, so a run on
the CPU measures it: `perf/mfu` is then the model's FLOP/s over what the same matmul
library reaches on the same threads, the physical limit this machine sets. The probe
takes under a second and is cached per process and thread count. It keeps the best of a
few repetitions: on a busy machine every repetition is slowed, and the best one is the
least disturbed (a busy machine still reads low: the MFU against it reads high).
"""
from __future__ import annotations

import functools
import time

import torch

SQUARE = 1024  # n x n x n: ~2 GFLOP, a few tens of milliseconds on two cores


def matmul_flops(m: int, k: int, n: int, seconds: float = 0.25, dtype=torch.float32, device="cpu") -> float:
    """Best FLOP/s of [m, k] @ [k, n] over repetitions for about `seconds` (after one warm-up)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    torch.matmul(a, b, out=out)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() >= deadline:
            break
    return 2.0 * m * k * n / best


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _cpu_peak(threads: int) -> float:
    return matmul_flops(SQUARE, SQUARE, SQUARE)


def cpu_peak_flops() -> float:
    """This process's measured fp32 matmul peak on the CPU, at its current thread count
    (measured on first use, then cached)."""
    return _cpu_peak(torch.get_num_threads())


def gemm_shapes(hidden: int, ffn: int, vocab: int, q_dim: int, tokens: int) -> dict[str, tuple[int, int, int]]:
    """A decoder step's largest matmuls as (m, k, n): the tokens of a batch through the FFN's
    up projection, its down projection, the query projection and the vocabulary head."""
    return {"ffn_up": (tokens, hidden, ffn), "ffn_down": (tokens, ffn, hidden),
            "q": (tokens, hidden, q_dim), "head": (tokens, hidden, vocab)}


def mfu_peak(configured_tflops: float, device_type: str) -> tuple[float, str]:
    """(peak FLOP/s per device, where it comes from) for `perf/mfu`: on a GPU the configured
    `cluster.peak_tflops_per_gpu`, on the CPU this machine's measured matmul peak."""
    if device_type == "cpu":
        return cpu_peak_flops(), "measured_cpu_matmul"
    return configured_tflops * 1e12, "cluster.peak_tflops_per_gpu"
