"""Training throughput: our LocalEngine against transformers' LlamaForCausalLM.

Both train the identical model (same shape, RMSNorm + SwiGLU + RoPE, tied embeddings, same
initial weights copied tensor by tensor), on the same batches from the embedded corpus, with
the same AdamW (decay on matrices only, same betas/eps/weight decay), the same gradient
clipping and the same fp32 cross-entropy on [B, T+1] token batches; both read the loss and
the grad norm back each step as the engine does. Short blocks alternate in one process
(ours, HF, HF, ours, ...: bench/common.interleaved) so both see the same machine load, pair
after pair until the spread is small; the figure per size is the mean over pairs of HF's
block time / ours (= ours / HF in tokens/s; >= 1.0 means we are not slower). Nothing is
written (exit status 1) if any size's spread (2 standard errors) is wider than both
|ratio - 1| and --resolution, or the machine was busy (load average beyond this bench's
threads > 0.75 per core).

    python -m bench.throughput                              # 3 CPU sizes, ~5-10 min on 2 busy cores
    python -m bench.throughput --sizes 2x128,4x256 --steps 4 --target-spread 0.01
    python -m bench.throughput --device cuda --bf16 --sizes 16x2048 --batch 8 --seq 2048   # ~1B on a GPU (+ MFU
                                                    # over the measured matmul peak)

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

DEFAULT_SIZES = "2x128,4x256,6x384"


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

    def __init__(self, spec, engine, seq: int, attn: str):
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
            lr=0.0, betas=(t.beta1, t.beta2), eps=t.eps)
        self.clip = t.grad_clip
        self.model.train()

    def train_step(self, batch: torch.Tensor, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else torch.autocast(
            self.device.type, enabled=False)
        with ctx:
            logits = self.model(input_ids=batch[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip if self.clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), norm.item()


def measured_peak_tflops(device: str, bf16: bool, n: int = 8192, iters: int = 50) -> float:
    """The device's matmul peak as this bench sees it: TFLOP/s of n x n x n matmuls."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, y = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        x @ y
    sync(torch.device(device))
    t = time.perf_counter()
    for _ in range(iters):
        x @ y
    sync(torch.device(device))
    return 2 * n ** 3 * iters / (time.perf_counter() - t) / 1e12


def measure(size: str, a) -> dict:
    from orchestrator.data import new_cursor, next_global_batch
    from orchestrator.engines.local import LocalEngine
    from orchestrator.schedule import ResolvedStage
    from orchestrator.model import build_model, flops_per_token

    shape = parse_size(size)
    extra = [f"engine.device={a.device}", f"engine.dtype={'bf16' if a.bf16 else 'fp32'}"]
    cfg, spec, data = one_stage_config(shape, a.batch, a.seq, extra=extra)
    stage = cfg.schedule.stages[0]
    ours = LocalEngine(cfg, ResolvedStage.alone(stage, spec))
    ours.load(build_model(spec, seed=0).canonical_state(), None, 0, None)
    hf = HFRunner(spec, ours, a.seq, a.attn)
    streams = {n: data.train[n] for n in sorted(data.train)}
    cursor = new_cursor(sorted(data.train))
    lr = 1e-3

    def batch():
        nonlocal cursor
        b, cursor = next_global_batch(streams, cursor, None, a.batch, a.seq)
        return b

    # the same first steps on both: a check that the two are the same model and optimizer
    check = []
    for _ in range(a.warmup):
        b = batch()
        check.append((ours.train_step(b, lr)[0], hf.train_step(b, lr)[0]))

    def block(runner) -> float:
        """--steps steps on fresh batches; seconds per step."""
        chunk = [batch() for _ in range(a.steps)]
        sync(ours.device)
        t = time.perf_counter()
        for b in chunk:
            runner.train_step(b, lr)
        sync(ours.device)
        return (time.perf_counter() - t) / len(chunk)

    timing = interleaved({"ours": lambda: block(ours), "hf": lambda: block(hf)}, a.target_spread,
                         a.min_pairs, a.max_pairs, a.max_load)
    times = timing["blocks_s"]
    tokens = a.batch * a.seq
    tps = {k: tokens / median(v) for k, v in times.items()}  # for the table; the ratio is paired
    fpt = flops_per_token(spec, a.seq)
    out = {"shape": dict(zip(("layers", "hidden", "ffn", "heads"), shape)), "params": sum(
        p.numel() for p in ours.model.parameters()), "batch": a.batch, "seq": a.seq,
           "ours_tokens_per_s": tps["ours"], "hf_tokens_per_s": tps["hf"],
           "ratio": timing["ratio"], "spread": timing["spread"], "timing": timing,
           "first_losses_ours_hf": check, "max_first_loss_diff": max(abs(x - y) for x, y in check) if check else None,
           "achieved_tflops_ours": fpt * tps["ours"] / 1e12, "achieved_tflops_hf": fpt * tps["hf"] / 1e12}
    if a.peak_tflops:
        out["peak_tflops"] = a.peak_tflops
        out["mfu_ours"] = out["achieved_tflops_ours"] / a.peak_tflops
        out["mfu_hf"] = out["achieved_tflops_hf"] / a.peak_tflops
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
                   help="per-device peak for MFU; 0: measured with large matmuls on a GPU, none on the CPU")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    start_load = check_quiet(a.max_load)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if not a.peak_tflops and a.device.startswith("cuda"):
        a.peak_tflops = measured_peak_tflops(a.device, a.bf16)
        console.print(f"measured matmul peak: {a.peak_tflops:.0f} TFLOP/s")
    results = {}
    for size in a.sizes.split(","):
        console.print(f"size {size}: measuring ...")
        results[size] = measure(size, a)
        r = results[size]
        console.print(f"  ours {r['ours_tokens_per_s']:,.0f} tok/s  hf {r['hf_tokens_per_s']:,.0f} tok/s  "
                      f"ratio {r['ratio']:.3f} +- {r['spread']:.3f} over {r['timing']['pairs']} pairs  "
                      f"(first-step loss diff {r['max_first_loss_diff']:.2e})")
    rows = [[s, r["params"], r["ours_tokens_per_s"], r["hf_tokens_per_s"], r["ratio"], r["spread"],
             r["max_first_loss_diff"], r.get("mfu_ours"), r.get("mfu_hf")] for s, r in results.items()]
    table(f"training tokens/s, ours vs transformers LlamaForCausalLM (batch {a.batch} x seq {a.seq}, "
          f"{a.device}{' bf16' if a.bf16 else ' fp32'})",
          ["size", "params", "ours tok/s", "HF tok/s", "ratio ours/HF", "+-", "first-loss diff", "MFU ours",
           "MFU HF"],
          rows)
    return publish_timing("throughput.json", {"args": vars(a), "machine": machine(), "loadavg_1_start": start_load,
                                            "sizes": results},
                          [r["timing"] for r in results.values()], a.resolution, torch.get_num_threads(), a.out)


if __name__ == "__main__":
    raise SystemExit(main())
