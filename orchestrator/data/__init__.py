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
from orchestrator.data.batches import new_cursor, next_global_batch, rank_slice, tokens_read, validation_batches
from orchestrator.data.corpus import is_validation, iter_documents
from orchestrator.data.dataset import PreparedData, prepare_data
from orchestrator.data.errors import DataError
from orchestrator.data.indexed import TokenStream, read_prefix_meta
from orchestrator.data.tokenizer import BpeTokenizer, ByteTokenizer, HfTokenizer, build_tokenizer

__all__ = ["DataError", "prepare_data", "PreparedData", "TokenStream", "new_cursor",
           "next_global_batch", "validation_batches", "tokens_read", "rank_slice", "ByteTokenizer",
           "BpeTokenizer", "HfTokenizer", "build_tokenizer", "iter_documents", "is_validation",
           "read_prefix_meta"]
