"""Data pipeline: corpus -> tokenizer -> cached token files -> cursor-addressed batches.

Modules, in the order data flows through them:
  corpus     documents of a source (files, the stdlib's code or prose, People's Daily)
             in a fixed order; the hash-based val split
  tokenizer  byte and byte-level BPE tokenizers, BPE training cached by content
  cache      atomic, race-safe writes of cache files
  indexed    Megatron indexed datasets (.bin/.idx) as TokenStreams, the split by document,
             their checks; every source, cached or the user's own, is read through it
  dataset    prepare_data: tokenize text sources once into indexed datasets
  mixture    which source each sequence comes from (pure function of its number)
  batches    next_global_batch / validation_batches over a JSON cursor
"""
import importlib

# name -> module, imported on first use: a process that needs one piece (a `grow prepare`
# worker, which only tokenizes) does not load torch through `batches`
_EXPORTS = {
    "new_cursor": "batches", "next_global_batch": "batches", "rank_slice": "batches",
    "tokens_read": "batches", "validation_batches": "batches",
    "is_validation": "corpus", "iter_documents": "corpus",
    "PreparedData": "dataset", "prepare_data": "dataset",
    "DataError": "errors",
    "TokenStream": "indexed", "read_prefix_meta": "indexed",
    "BpeTokenizer": "tokenizer", "ByteTokenizer": "tokenizer", "HfTokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
