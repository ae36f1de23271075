"""A Hugging Face `tokenizer.json`, read with json alone (no `tokenizers` import), so the
schedule can size the model's vocabulary before any data is read
(data.tokenizer.kind=hf; the data layer loads the tokenizer itself)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"


def hf_tokenizer_file(path: str) -> Path:
    """The tokenizer.json `path` names: the file itself, or the one in a directory (a Hugging
    Face model directory). Not checked to exist."""
    p = Path(path).expanduser()
    return p / TOKENIZER_FILE if p.is_dir() else p


def _read(path: str) -> dict:
    doc = json.loads(hf_tokenizer_file(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ValueError("not a tokenizer.json (no 'model')")
    return doc


def hf_vocab_digest(path: str) -> str:
    """A hash of which token has which id (the model's vocabulary and its added tokens):
    two tokenizer.json files with the same number of ids but different ids differ here,
    while formatting, normalizer or decoder settings do not count."""
    doc = _read(path)
    ids = {"vocab": doc["model"].get("vocab"),
           "added": sorted((t.get("id"), t.get("content")) for t in doc.get("added_tokens") or ()
                           if isinstance(t, dict))}
    text = json.dumps(ids, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def hf_vocab_size(path: str) -> int:
    """Ids a tokenizer.json defines: the model's vocabulary and its added tokens, as
    `tokenizers.Tokenizer.get_vocab_size(with_added_tokens=True)` counts them (one past the
    largest id). Raises OSError or ValueError for a file that is missing or not one."""
    doc = _read(path)
    vocab = doc["model"].get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        size = max(map(int, vocab.values()), default=-1) + 1
    elif isinstance(vocab, list):  # Unigram: [token, score] in id order
        size = len(vocab)
    else:
        raise ValueError("not a tokenizer.json (no model.vocab)")
    added = [int(t["id"]) for t in doc.get("added_tokens") or () if isinstance(t, dict) and "id" in t]
    return max([size, *(i + 1 for i in added)])
