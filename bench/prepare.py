"""`grow prepare`: its throughput against the raw `tokenizers` rate, and its peak memory as
the corpus grows 10x.

Corpus: English prose (the standard library's docstrings and pydoc topics, the
`stdlib_prose` source) repeated into a JSONL file of --mb MB; tokenizer: a byte-level BPE
of 8192 learnt from its first 4 MB, used as a Hugging Face tokenizer.json (kind=hf).

- Throughput: blocks alternate in one process (bench/common.interleaved): the raw rate is
  `tokenizers`' own encode_batch over the same texts already in memory (its Rust threads
  use every core); ours is prepare_files (what `grow prepare` runs) with --workers worker
  processes, reading the JSONL, writing parts and merging them. The figure is raw seconds /
  our seconds (aim >= 0.8).
- Memory: `grow prepare` as a subprocess on the corpus and on one 10x larger; peak RSS
  summed over it and its workers, sampled every 20 ms (aim: flat).

Nothing is written (exit 1) when the machine was busy: a 1-minute load average above 2.5,
this bench's own workers counted (the machine has 2 shared cores), after any pair of blocks.
(Peak RSS does not depend on the load; the memory runs' own load is recorded, not refused.)

    python -m bench.prepare                    # 20 MB and 200 MB, 2 workers: minutes
    python -m bench.prepare --mb 4 --min-pairs 2 --out /tmp/x   # a smoke run

Writes bench/results/prepare.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import check_quiet, interleaved, machine, publish_timing, table
from orchestrator.config.schema import SourceConfig
from orchestrator.data.corpus import iter_documents
from orchestrator.data.prepare import prepare_files
from orchestrator.data.tokenizer import BpeTokenizer, HfTokenizer, first_chars

MAX_LOAD = 2.5
GROW = Path(sys.executable).parent / "grow"


def write_corpus(path: Path, mb: float) -> int:
    """stdlib_prose documents, cycled, as JSONL of at least `mb` MB; returns its bytes."""
    docs = [text for _, text in iter_documents(SourceConfig(kind="stdlib_prose"))]
    target, size, i = mb * 1e6, 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            line = json.dumps({"text": docs[i % len(docs)]}) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            i += 1
    return size


def texts_of(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB of `cmd` and all its children together, seconds it ran)."""
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"bench: grow prepare failed: {err.strip().splitlines()[-1:]}")
    return peak / 1e6, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size for the throughput and the base memory run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--min-pairs", type=int, default=4)
    ap.add_argument("--max-pairs", type=int, default=8)
    ap.add_argument("--target-spread", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    check_quiet(MAX_LOAD)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(tmp)
        corpus, big = work / "corpus.jsonl", work / "big.jsonl"
        nbytes = write_corpus(corpus, args.mb)
        texts = texts_of(corpus)
        tok_file = work / "tokenizer.json"
        BpeTokenizer.train(first_chars(texts, 4_000_000), vocab_size=8192).save(tok_file)
        tok = HfTokenizer(tok_file)
        source = SourceConfig(kind="files", paths=[str(corpus)])
        out = work / "out_text_document"

        def raw() -> float:
            t0 = time.perf_counter()
            for i in range(0, len(texts), 1000):  # batches like prepare's chunks: the same work per call
                tok.encode_batch(texts[i:i + 1000])
            return time.perf_counter() - t0

        def ours() -> float:
            t0 = time.perf_counter()
            prepare_files(source, out, tok, workers=args.workers, overwrite=True)
            return time.perf_counter() - t0

        timing = interleaved({"raw_encode_batch": raw, "grow_prepare": ours}, args.target_spread,
                             min_pairs=args.min_pairs, max_pairs=args.max_pairs, max_load=MAX_LOAD - args.workers)
        meta = json.loads(Path(f"{out}.json").read_text())
        del texts
        write_corpus(big, 10 * args.mb)
        memory = {}
        for name, path in (("1x", corpus), ("10x", big)):
            cmd = [str(GROW), "prepare", f"input={path}", f"output={work / name}_text_document",
                   f"workers={args.workers}", "data.tokenizer.kind=hf", f"data.tokenizer.path={tok_file}"]
            peak, seconds = peak_rss_of(cmd)
            memory[name] = {"mb": round(path.stat().st_size / 1e6, 1), "peak_rss_mb": round(peak, 1),
                            "seconds": round(seconds, 1)}
    raw_s, ours_s = (min(timing["blocks_s"][k]) for k in ("raw_encode_batch", "grow_prepare"))
    result = {"machine": machine(), "corpus_mb": round(nbytes / 1e6, 2), "workers": args.workers,
              "documents": meta["documents"], "tokens": meta["tokens"],
              "raw_mb_per_s": nbytes / 1e6 / raw_s, "prepare_mb_per_s": nbytes / 1e6 / ours_s,
              "prepare_over_raw": 1.0 / timing["ratio"], "timing": timing, "memory": memory,
              "peak_rss_10x_over_1x": memory["10x"]["peak_rss_mb"] / memory["1x"]["peak_rss_mb"]}
    table(f"grow prepare, {result['corpus_mb']} MB JSONL, hf BPE 8192, {args.workers} workers",
          ["what", "value"],
          [["raw encode_batch MB/s (best block)", result["raw_mb_per_s"]],
           ["grow prepare MB/s (best block)", result["prepare_mb_per_s"]],
           ["prepare / raw (mean of pairs)", result["prepare_over_raw"]],
           ["peak RSS 1x (MB)", memory["1x"]["peak_rss_mb"]], ["peak RSS 10x (MB)", memory["10x"]["peak_rss_mb"]],
           ["load average per pair", " ".join(map(str, timing["loadavg_1_per_pair"]))]])
    busiest = max(timing["loadavg_1_per_pair"])  # the memory runs' own load does not change their RSS
    if busiest > MAX_LOAD:  # stricter than publish_timing's mean: no timing taken above it
        print(f"bench: refused to write prepare.json: load average reached {busiest:.2f} > {MAX_LOAD}",
              file=sys.stderr)
        return 1
    return publish_timing("prepare.json", result, [timing], resolution=0.05, own_threads=args.workers,
                          out_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
