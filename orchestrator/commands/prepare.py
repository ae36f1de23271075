"""`grow prepare`: text or JSONL -> a Megatron indexed dataset for `kind: indexed` sources.

    grow prepare input=PATH[,PATH...] output=PREFIX [workers=1] [format=auto] [jsonl_key=text]
                 [glob=*] [chunk_mb=4] [overwrite=false] [data.tokenizer.kind=byte] [data.tokenizer.path=]
                 [data.tokenizer.vocab_size=] [data.tokenizer.train_chars=] [data.cache_dir=]

Writes PREFIX.bin and PREFIX.idx (megatron-core's IndexedDatasetBuilder: one sequence per
document, bos when the tokenizer has one, eos after each, like Megatron's
preprocess_data.py --append-eod) and PREFIX.json (the tokenizer, documents, tokens, inputs).
A directory input is read recursively (files matching glob, sorted); a .jsonl/.json file
holds one document per line (its jsonl_key), any other file is one document. The
data.* keys are the ones `grow run` takes, so the same overrides name the same tokenizer
(bpe learns from the input's first train_chars characters). A killed run resumes from the
parts in PREFIX.work/ (a part is chunk_mb of text, the unit of work and of resume); the output appears whole (its .idx last) or not at all.
"""
from __future__ import annotations

import os
from pathlib import Path

from orchestrator.commands.options import (UsageError, bool_option, float_option, int_option, parse_options,
                                           run_reporting_errors)

TOKENIZER_KEYS = {"data.tokenizer.kind": "kind", "data.tokenizer.path": "path",
                  "data.tokenizer.vocab_size": "vocab_size", "data.tokenizer.train_chars": "train_chars"}
KEYS = ("input", "output", "workers", "format", "jsonl_key", "glob", "chunk_mb", "overwrite", *TOKENIZER_KEYS,
        "data.cache_dir")
FORMATS = ("auto", "text", "jsonl")


def tokenizer_config(opts: dict[str, str]):
    from orchestrator.config.schema import TokenizerConfig
    cfg = TokenizerConfig()
    for key, field in TOKENIZER_KEYS.items():
        if key in opts:
            value = int_option(opts, key, minimum=1) if field in ("vocab_size", "train_chars") else opts[key]
            setattr(cfg, field, value)
    if cfg.kind not in ("byte", "bpe", "hf"):
        raise UsageError(f"data.tokenizer.kind: {cfg.kind!r} is not allowed; allowed: byte, bpe, hf")
    return cfg


def prepare(args: list[str]) -> int:
    from orchestrator.config.schema import DataConfig, SourceConfig
    from orchestrator.data.corpus import content_fingerprint, iter_documents
    from orchestrator.data.errors import DataError
    from orchestrator.data.prepare import prepare_files
    from orchestrator.data.tokenizer import build_tokenizer

    opts = parse_options(args, ("input", "output"), KEYS)
    workers = int_option(opts, "workers", 1, minimum=1)
    chunk_bytes = max(1, round(float_option(opts, "chunk_mb", 4.0) * 1e6))
    fmt = opts.get("format", "auto")
    if fmt not in FORMATS:
        raise UsageError(f"format: {fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    source = SourceConfig(kind="files", paths=[p for p in opts["input"].split(",") if p], format=fmt,
                          jsonl_key=opts.get("jsonl_key", "text"), glob=opts.get("glob", "*"))
    cache_dir = Path(os.path.expanduser(opts.get("data.cache_dir", DataConfig.cache_dir)))
    try:
        tok = build_tokenizer(tokenizer_config(opts), lambda: (t for _, t in iter_documents(source)),
                              cache_dir / "tokenizers", content_key=content_fingerprint(source))
        meta = prepare_files(source, Path(opts["output"]), tok, workers=workers,
                             overwrite=bool_option(opts, "overwrite", False), chunk_bytes=chunk_bytes)
    except DataError as e:
        raise UsageError(f"{e.key + ': ' if e.key else ''}{e}") from None
    print(f"prepared {meta['documents']:,} documents, {meta['tokens']:,} tokens "
          f"({meta['tokenizer']['kind']} tokenizer) -> {opts['output']}.bin/.idx")
    return 0


def prepare_command(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    return run_reporting_errors("prepare", lambda: prepare(args))
