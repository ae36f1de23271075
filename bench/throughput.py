"""Training throughput: our LocalEngine against transformers' LlamaForCausalLM, eager and
compiled, and both sides' model FLOP utilisation against this machine's measured peak.

Both train the identical model (same shape, RMSNorm + SwiGLU + RoPE, tied embeddings, same
initial weights copied tensor by tensor), on the same batches from the embedded corpus, with
the same AdamW (torch's fused kernel, decay on matrices only, same betas/eps/weight decay), the same gradient
clipping and the same fp32 cross-entropy on [B, T+1] token batches; both read the loss and
the grad norm back each step as the engine does. Short blocks alternate in one process
(ours, HF, HF, ours, ...: bench/common.interleaved) so both see the same machine load, pair
after pair until the spread is small; the figure per size is the mean over pairs of HF's
block time / ours (= ours / HF in tokens/s; >= 1.0 means we are not slower). Nothing is
written (exit status 1) if any size's spread (2 standard errors) is wider than both
|ratio - 1| and --resolution, or the machine was busy (load average beyond this bench's
threads > 0.75 per core).

Compiled (unless --no-compile): our engine with train.compile=true (torch.compile of the
forward and loss, `orchestrator.engines.compiled`) against LlamaForCausalLM under
torch.compile (the same options: static shapes, default mode), timed as a second
interleaved pair: `compiled_ratio` = HF compiled block time / ours compiled (compiled vs
compiled); `compile_s` per side is the first step's time less the second's.

The machine's peak: the FLOP/s of a plain matmul (fp32 on the CPU, the run's dtype on a
GPU) on the same threads, at a large square shape (`cpu_peak_flops`: 2048^3 on the CPU)
and at the model's largest GEMMs for this batch (tokens x hidden x ffn, x vocab, ...:
`gemm_flops`, best of them `gemm_peak_flops`). `mfu` per side (ours, hf, ours_compiled,
hf_compiled) is model FLOPs per second (6N + attention per token, as the ledger counts)
over the square peak, `mfu_vs_gemm` over the best GEMM.

    python -m bench.throughput                              # 3 CPU sizes, ~5-10 min on 2 busy cores
    python -m bench.throughput --sizes 2x128,4x256 --steps 4 --target-spread 0.01
    python -m bench.throughput --device cuda --bf16 --sizes 16x2048 --batch 8 --seq 2048   # ~1B on a GPU
    python -m bench.throughput --sizes 2x128 --steps 1 --min-pairs 2 --max-pairs 2 --out /tmp/t   # a smoke run

A size is LAYERSxHIDDEN (ffn = 8/3 hidden rounded up to 16, head_dim 32 below hidden 512,
else 64), or LAYERSxHIDDENxFFNxHEADS. Writes bench/results/throughput.json.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import (check_quiet, console, interleaved, machine, median, one_stage_config, publish_timing,
                          sync, table)
from orchestrator.budget.machine_peak import gemm_shapes, matmul_flops
from orchestrator.engines.compiled import CompileClock, compile_options

DEFAULT_SIZES = "2x128,4x256,6x384"
SQUARE_CPU = 2048  # the square matmul of the CPU's peak: 17 GFLOP, large enough for the BLAS's best blocking


def parse_size(s: str):
    parts = [int(x) for x in s.lower().split("x")]
    if len(parts) == 4:
        return tuple(parts)
    layers, hidden = parts
    ffn = -(-int(hidden * 8 / 3) // 16) * 16
    head_dim = 32 if hidden < 512 else 64
    return layers, hidden, ffn, hidden // head_dim


class HFRunner:
    """LlamaForCausalLM trained exactly as LocalEngine trains DecoderLM."""

    def __init__(self, spec, engine, seq: int, attn: str, compiled: bool = False):
        from transformers import LlamaForCausalLM

        from orchestrator.offline.hf import hf_config, hf_name
        cfg = hf_config(spec, max_positions=max(seq, 128))
        cfg._attn_implementation = attn
        self.device, self.bf16 = engine.device, engine.bf16
        self.model = LlamaForCausalLM(cfg).to(self.device)
        ours = engine.model.canonical_state()
        hf_state = {hf_name(k): v.detach().clone() for k, v in ours.items()}
        if spec.tie_embeddings:
            hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
        missing, unexpected = self.model.load_state_dict(hf_state, strict=False)
        missing = [m for m in missing if m != "lm_head.weight" and "rotary" not in m]
        assert not missing and not unexpected, (missing, unexpected)
        t = engine.cfg.train
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.0, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)  # as ours, and transformers' Trainer's default
        self.clip = t.grad_clip
        self.model.train()
        self.forward = self.model
        if compiled:  # the options our engine compiles with (orchestrator.engines.compiled)
            self.forward = torch.compile(self.model, **compile_options("default"))
        self.clock = CompileClock()

    def train_step(self, batch: torch.Tensor, lr: float):
        return self.clock.step(lambda: self._train_step(batch, lr))

    def compile_seconds(self) -> float | None:
        return self.clock.take()

    def _train_step(self, batch: torch.Tensor, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else torch.autocast(
            self.device.type, enabled=False)
        with ctx:
            logits = self.forward(input_ids=batch[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip if self.clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), norm.item()


def machine_peaks(spec, tokens: int, device: str, bf16: bool) -> dict:
    """The matmul FLOP/s this machine reaches on the bench's threads: at a large square shape
    and at the model's largest GEMMs for `tokens` tokens (orchestrator.budget.machine_peak)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    n = SQUARE_CPU if device == "cpu" else 8192
    gemms = gemm_shapes(spec.hidden, spec.ffn, spec.vocab, spec.q_dim, tokens)
    gemm = {k: matmul_flops(*shape, seconds=0.5, dtype=dtype, device=device) for k, shape in gemms.items()}
    return {"square": n, "cpu_peak_flops" if device == "cpu" else "device_peak_flops":
            matmul_flops(n, n, n, seconds=1.0, dtype=dtype, device=device),
            "gemm_shapes": gemms, "gemm_flops": gemm, "gemm_peak_flops": max(gemm.values())}


def measure(size: str, a) -> dict:
    from orchestrator.data import new_cursor, next_global_batch
    from orchestrator.engines.local import LocalEngine
    from orchestrator.schedule import ResolvedStage
    from orchestrator.model import build_model, flops_per_token

    shape = parse_size(size)
    extra = [f"engine.device={a.device}", f"engine.dtype={'bf16' if a.bf16 else 'fp32'}"]
    cfg, spec, data = one_stage_config(shape, a.batch, a.seq, extra=extra)
    stage = cfg.schedule.stages[0]
    resolved = ResolvedStage.alone(stage, spec)
    start = build_model(spec, seed=0).canonical_state()
    ours = LocalEngine(cfg, resolved)
    ours.load(start, None, 0, None)
    hf = HFRunner(spec, ours, a.seq, a.attn)
    compiled = {}
    if a.compile:  # ours first: a compiled engine starts from a fresh dynamo cache
        cfg.train.compile = True
        compiled["ours"] = LocalEngine(cfg, resolved)
        compiled["ours"].load(start, None, 0, None)
        compiled["hf"] = HFRunner(spec, ours, a.seq, a.attn, compiled=True)
    streams = {n: data.train[n] for n in sorted(data.train)}
    cursor = new_cursor(sorted(data.train))
    lr = 1e-3

    def batch():
        nonlocal cursor
        b, cursor = next_global_batch(streams, cursor, None, a.batch, a.seq)
        return b

    # the same first steps on both: a check that the two are the same model and optimizer
    check, check_compiled = [], []
    for _ in range(max(a.warmup, 2 if a.compile else 0)):  # compiled: 2 steps give the compile time
        b = batch()
        check.append((ours.train_step(b, lr)[0], hf.train_step(b, lr)[0]))
        if a.compile:
            check_compiled.append((compiled["ours"].train_step(b, lr)[0], compiled["hf"].train_step(b, lr)[0]))

    def block(runner) -> float:
        """--steps steps on fresh batches; seconds per step."""
        chunk = [batch() for _ in range(a.steps)]
        sync(ours.device)
        t = time.perf_counter()
        for b in chunk:
            runner.train_step(b, lr)
        sync(ours.device)
        return (time.perf_counter() - t) / len(chunk)

    tokens = a.batch * a.seq
    peaks = machine_peaks(spec, tokens, a.device, a.bf16)  # before timing, on the same threads
    timing = interleaved({"ours": lambda: block(ours), "hf": lambda: block(hf)}, a.target_spread,
                         a.min_pairs, a.max_pairs, a.max_load)
    times = dict(timing["blocks_s"])
    out = {"shape": dict(zip(("layers", "hidden", "ffn", "heads"), shape)), "params": sum(
        p.numel() for p in ours.model.parameters()), "batch": a.batch, "seq": a.seq,
           "ratio": timing["ratio"], "spread": timing["spread"], "timing": timing,
           "first_losses_ours_hf": check, "max_first_loss_diff": max(abs(x - y) for x, y in check) if check else None}
    if a.compile:
        ctiming = interleaved({"ours": lambda: block(compiled["ours"]), "hf": lambda: block(compiled["hf"])},
                              a.target_spread, a.min_pairs, a.max_pairs, a.max_load)
        times.update({f"{k}_compiled": v for k, v in ctiming["blocks_s"].items()})
        out.update({"compiled_ratio": ctiming["ratio"], "compiled_ratio_is": "ours compiled vs transformers compiled",
                    "compiled_spread": ctiming["spread"], "compiled_timing": ctiming,
                    "compile_s": {k: r.compile_seconds() for k, r in compiled.items()},
                    "first_losses_compiled_ours_hf": check_compiled,
                    "max_first_loss_diff_compiled_vs_eager": max(
                        abs(c - e) for cs, es in zip(check_compiled, check) for c, e in zip(cs, es))})
    fpt = flops_per_token(spec, a.seq)
    tps = {k: tokens / median(v) for k, v in times.items()}  # for the table; the ratios are paired
    flops = {k: fpt * v for k, v in tps.items()}
    peak = a.peak_tflops * 1e12 if a.peak_tflops else peaks.get("cpu_peak_flops", peaks.get("device_peak_flops"))
    out.update({"tokens_per_s": tps, "achieved_flops": flops, **peaks, "peak_flops_used": peak,
                "mfu": {k: v / peak for k, v in flops.items()},
                "mfu_vs_gemm": {k: v / peaks["gemm_peak_flops"] for k, v in flops.items()},
                "ours_tokens_per_s": tps["ours"], "hf_tokens_per_s": tps["hf"]})  # (the earlier files' keys)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated LAYERSxHIDDEN[xFFNxHEADS]")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed steps per block")
    p.add_argument("--min-pairs", type=int, default=6, help="pairs of (ours, HF) blocks at least")
    p.add_argument("--max-pairs", type=int, default=30, help="... and at most, until the spread is --target-spread")
    p.add_argument("--target-spread", type=float, default=0.02, help="stop once 2 standard errors are this small")
    p.add_argument("--resolution", type=float, default=0.03,
                   help="smallest ratio difference resolved; a wider spread than this and |ratio - 1|: refused")
    p.add_argument("--max-load", type=float, help="busy above this 1-minute load average (default 0.75 x cores)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (also a loss check)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation (ours uses SDPA)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak for `mfu`; 0: the measured square matmul (CPU and GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the compiled pair (ours and transformers under torch.compile)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    start_load = check_quiet(a.max_load)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    results = {}
    for size in a.sizes.split(","):
        console.print(f"size {size}: measuring ...")
        results[size] = measure(size, a)
        r = results[size]
        console.print(f"  ours {r['ours_tokens_per_s']:,.0f} tok/s  hf {r['hf_tokens_per_s']:,.0f} tok/s  "
                      f"ratio {r['ratio']:.3f} +- {r['spread']:.3f} over {r['timing']['pairs']} pairs  "
                      f"(first-step loss diff {r['max_first_loss_diff']:.2e})")
        if a.compile:
            console.print(f"  compiled: ratio {r['compiled_ratio']:.3f} +- {r['compiled_spread']:.3f} over "
                          f"{r['compiled_timing']['pairs']} pairs; compile s ours {r['compile_s']['ours']:.1f} "
                          f"hf {r['compile_s']['hf']:.1f}")
    sides = ["ours", "hf"] + (["ours_compiled", "hf_compiled"] if a.compile else [])
    rows = [[s, r["params"], r["ours_tokens_per_s"], r["hf_tokens_per_s"], r["ratio"], r["spread"],
             r.get("compiled_ratio"), r.get("compiled_spread"), r["peak_flops_used"] / 1e9,
             r["gemm_peak_flops"] / 1e9, *(r["mfu"][k] for k in sides)] for s, r in results.items()]
    table(f"training tokens/s, ours vs transformers LlamaForCausalLM (batch {a.batch} x seq {a.seq}, "
          f"{a.device}{' bf16' if a.bf16 else ' fp32'}; compiled ratio: compiled vs compiled; "
          "MFU over the square peak)",
          ["size", "params", "ours tok/s", "HF tok/s", "ratio ours/HF", "+-", "compiled ratio", "+-",
           "peak GFLOP/s", "GEMM peak", *(f"MFU {k}" for k in sides)],
          rows)
    checks = [r[k] for r in results.values() for k in ("timing", "compiled_timing") if k in r]
    return publish_timing("throughput.json", {"args": vars(a), "machine": machine(), "loadavg_1_start": start_load,
                                            "sizes": results},
                          checks, a.resolution, torch.get_num_threads(), a.out)


if __name__ == "__main__":
    raise SystemExit(main())
