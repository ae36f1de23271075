"""Training tokens/s when batches come from a Megatron indexed dataset (the one reader of
every source since the token cache became `.bin/.idx`) against a flat token file read by
`np.memmap` (the cache's previous format), on the same tokens.

Both sides run the real training step (the decoder LM and AdamW, `--shape`), fed by the real
`next_global_batch` over the same documents: one side through `orchestrator.data.indexed
.TokenStream` (megatron-core's `IndexedDataset`, a window found by binary search over the
documents), the other through a plain memmap of the same tokens laid end to end (below,
`FlatStream`: what the previous `TokenStream` did). Blocks of --steps steps alternate
(bench/common.interleaved) until the spread of the paired ratios is small; the figure is
indexed tokens/s over flat tokens/s (aim >= 0.98). The data path alone (windows per second,
no step) is reported beside it.

    python -m bench.indexed_read                   # minutes on 2 cores
    python -m bench.indexed_read --min-pairs 2 --max-pairs 2 --out /tmp/x   # a smoke run

Writes bench/results/indexed_read.json (not when the machine was busy).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import check_quiet, interleaved, machine, publish_timing, table
from growth_ops import ModelSpec
from orchestrator.data.batches import new_cursor, next_global_batch
from orchestrator.data.cache import IndexedWriter
from orchestrator.data.indexed import TokenStream
from orchestrator.model import build_model

VOCAB = 4096


class FlatStream:
    """Tokens laid end to end in one file, memory-mapped: the previous cache's reader."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.tokens = np.memmap(path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def window(self, offset: int, length: int) -> np.ndarray:
        n, start = len(self), offset % len(self)
        if start + length <= n:
            return np.array(self.tokens[start:start + length], dtype=np.int64)
        return self.tokens[(start + np.arange(length, dtype=np.int64)) % n].astype(np.int64)


def write_corpus(work: Path, tokens: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Documents of random length (lognormal, median ~400 tokens), written once as an indexed
    dataset and once end to end; returns (prefix, flat file, documents)."""
    rng = np.random.default_rng(seed)
    prefix, flat = work / "corpus_text_document", work / "corpus.tokens"
    written = docs = 0
    with IndexedWriter(prefix, np.uint16) as w, flat.open("wb") as f:
        while written < tokens:
            doc = rng.integers(0, VOCAB, size=max(2, int(rng.lognormal(6.0, 1.0))), dtype=np.uint16)
            w.add(doc)
            f.write(doc.tobytes())
            written += len(doc)
            docs += 1
        w.commit()
    return prefix, flat, docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=20_000_000, help="corpus size in tokens")
    ap.add_argument("--shape", default="2x128", help="layers x hidden of the trained model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-pairs", type=int, default=6)
    ap.add_argument("--max-pairs", type=int, default=30)
    ap.add_argument("--target-spread", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    check_quiet()
    torch.set_num_threads(args.threads)
    layers, hidden = map(int, args.shape.split("x"))
    spec = ModelSpec(layers=layers, hidden=hidden, ffn=4 * hidden, heads=hidden // 64, kv_heads=hidden // 64,
                     head_dim=64, vocab=VOCAB)
    with tempfile.TemporaryDirectory(prefix="bench-indexed-") as tmp:
        prefix, flat_path, documents = write_corpus(Path(tmp), args.tokens)
        streams = {"indexed": {"corpus": TokenStream.whole(prefix, "corpus")},
                   "flat": {"corpus": FlatStream(flat_path, np.uint16)}}
        model = build_model(spec, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cursors = {k: new_cursor(["corpus"]) for k in streams}

        def training(side: str):
            def block() -> float:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    batch, cursors[side] = next_global_batch(streams[side], cursors[side], None, args.batch, args.seq)
                    opt.zero_grad(set_to_none=True)
                    model.loss(batch).backward()
                    opt.step()
                return time.perf_counter() - t0
            return block

        def reading(side: str):
            def block() -> float:
                cursor, t0 = new_cursor(["corpus"]), time.perf_counter()
                for _ in range(50 * args.steps):
                    _, cursor = next_global_batch(streams[side], cursor, None, args.batch, args.seq)
                return time.perf_counter() - t0
            return block

        training("flat")()  # warm-up: first-step allocations, page cache
        train = interleaved({"flat": training("flat"), "indexed": training("indexed")}, args.target_spread,
                            min_pairs=args.min_pairs, max_pairs=args.max_pairs)
        read = interleaved({"flat": reading("flat"), "indexed": reading("indexed")}, 0.02,
                           min_pairs=args.min_pairs, max_pairs=args.max_pairs)
    tokens_per_block = args.steps * args.batch * args.seq
    result = {"machine": machine(), "corpus_tokens": args.tokens, "documents": documents,
              "shape": args.shape, "batch": args.batch, "seq": args.seq, "threads": args.threads,
              "train_tokens_per_s": {k: tokens_per_block / min(v) for k, v in train["blocks_s"].items()},
              # blocks are seconds: indexed/flat seconds is flat/indexed speed
              "indexed_over_flat_train": 1.0 / train["ratio"], "indexed_over_flat_read": 1.0 / read["ratio"],
              "training": train, "reading": read}
    table(f"training tokens/s by reader ({args.shape}, batch {args.batch} x {args.seq}, "
          f"{args.tokens / 1e6:.0f}M tokens in {documents:,} documents)", ["what", "value"],
          [["flat memmap: train tokens/s (best block)", result["train_tokens_per_s"]["flat"]],
           ["indexed: train tokens/s (best block)", result["train_tokens_per_s"]["indexed"]],
           ["indexed / flat, training (mean of pairs)", result["indexed_over_flat_train"]],
           ["spread (2 s.e.)", train["spread"]],
           ["indexed / flat, batches alone", result["indexed_over_flat_read"]],
           ["load average per pair", " ".join(map(str, train["loadavg_1_per_pair"]))]])
    return publish_timing("indexed_read.json", result, [train], resolution=0.02, own_threads=args.threads,
                          out_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
