"""bench/throughput.py's measurement on the smallest settings (its contents, not its timing):
both sides train the same model, the machine's matmul peak and the model's GEMM shapes are
measured, and each side's MFU is its FLOP/s over that peak. The compiled pair's path is
the engines' (tests/engines/test_compile.py); compiling here would cost a minute."""
from __future__ import annotations

import json

from bench.throughput import main


def test_throughput_reports_mfu_against_the_measured_peak(tmp_path):
    code = main(["--sizes", "1x32x64x2", "--batch", "2", "--seq", "16", "--steps", "1", "--min-pairs", "2",
                 "--max-pairs", "2", "--max-load", "1000", "--resolution", "1000", "--no-compile",
                 "--out", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "throughput.json").read_text())["sizes"]["1x32x64x2"]
    assert r["max_first_loss_diff"] <= 1e-5  # the same model and optimizer on both sides
    assert r["gemm_shapes"]["ffn_up"] == [32, 32, 64]  # batch x seq tokens through the FFN
    assert r["cpu_peak_flops"] > 0 and r["peak_flops_used"] == r["cpu_peak_flops"]
    assert r["gemm_peak_flops"] == max(r["gemm_flops"].values())
    for side in ("ours", "hf"):
        assert r["mfu"][side] == r["achieved_flops"][side] / r["cpu_peak_flops"] > 0
        assert r["mfu_vs_gemm"][side] == r["achieved_flops"][side] / r["gemm_peak_flops"]
    assert "compiled_ratio" not in r
