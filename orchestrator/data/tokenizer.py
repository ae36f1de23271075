"""Tokenizers: raw UTF-8 bytes, a byte-level BPE learned from the training text, or a
Hugging Face tokenizer.json given by path.

byte and bpe map any string to ids and back without loss (hf: as far as its normalizer
keeps the text), and none appends anything itself: the dataset writes `eos_id` after every
document (and an hf tokenizer's `bos_id`, when it has one, before it), so the model learns where documents end
and never attends across a boundary without seeing it. `fingerprint` identifies the exact
id mapping; token caches are keyed by it, because ids from another mapping are garbage.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from orchestrator.config.schema import BYTE_VOCAB, TokenizerConfig
from orchestrator.config.tokenizer_file import hf_tokenizer_file
from orchestrator.atomic import write_bytes_atomic
from orchestrator.data.cache import stable_hash
from orchestrator.data.errors import DataError

EOT = "<|endoftext|>"
log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for, indexed by id: what bits-per-byte divides by,
        so losses compare across tokenizers and languages. eos counts one byte, the
        separator it stands for, which makes a byte tokenizer's bpb exactly its loss in bits."""


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes of the text and 256 is end-of-text.

    Needs no training and no files; the numpy path (`encode_array`) views the encoded
    bytes in place, which is what makes tokenizing tens of MB take well under a second."""

    vocab_size = BYTE_VOCAB
    eos_id = 256
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (see `Tokenizer.token_bytes`): one each."""
        return np.ones(self.vocab_size, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; end-of-text is dropped, and bytes that do not form UTF-8 (a
        sequence cut mid-character) become U+FFFD rather than failing."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i != self.eos_id:
                raise ValueError(f"token id {i} is outside the byte vocabulary (0..256)")
        return out.decode("utf-8", errors="replace")


class _TokenizersLibrary:
    """Encoding and decoding through a `tokenizers.Tokenizer` (`self._tok`): shared by the
    BPE this project trains and a Hugging Face tokenizer.json."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes in parallel (Rust threads); offsets are not computed."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: >= 0.21
        encs = encode(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._tok.decode(ids, skip_special_tokens=True)


class BpeTokenizer(_TokenizersLibrary):
    """A byte-level BPE (GPT-2 style) from the `tokenizers` library, with one special
    token, `<|endoftext|>`, as eos. Byte-level means every string is encodable: there
    is no unknown token, the 256 byte symbols are always in the vocabulary."""

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as HfTokenizer
        self._json = json_text
        self._tok = HfTokenizer.from_str(json_text)
        eos = self._tok.token_to_id(EOT)
        if eos is None:
            raise DataError(f"tokenizer has no {EOT} token")
        self.eos_id = eos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = "bpe-" + hashlib.blake2b(json_text.encode(), digest_size=16).hexdigest()

    # -- training / persistence --------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BpeTokenizer":
        from tokenizers import Tokenizer as HfTokenizer, decoders, models, pre_tokenizers, trainers
        tok = HfTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        seen = [0]

        def counted():
            for t in texts:
                seen[0] += len(t)
                yield t

        tok.train_from_iterator(counted(), trainer=trainer)
        if not seen[0]:
            raise DataError("no text to train the BPE tokenizer on")
        return cls(tok.to_str())

    def save(self, path: Path) -> None:
        write_bytes_atomic(Path(path), self._json.encode())

    @classmethod
    def load(cls, path: Path) -> "BpeTokenizer":
        return cls(Path(path).read_text(encoding="utf-8"))

    # -- use ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


    def token_bytes(self) -> np.ndarray:
        """Byte-level tokens are spelled in a 256-symbol alphabet, one symbol per byte, so
        a token's byte count is its length; special tokens (eos) count one."""
        out = np.ones(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if token not in special:
                out[i] = len(token)
        return out



EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class HfTokenizer(_TokenizersLibrary):
    """A Hugging Face tokenizer (`tokenizer.json`, as a model directory ships it), loaded
    offline with `tokenizers`. eos and bos are the tokens the directory's
    tokenizer_config.json or special_tokens_map.json name, else the first of EOS_NAMES /
    BOS_NAMES the vocabulary has; there is no bos when none is named or found, and a
    tokenizer without an eos is refused. Documents are encoded without the tokenizer's own
    post-processing (the dataset writes bos, when there is one, before each document and eos
    after it). The fingerprint hashes the file's content and the eos/bos chosen."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Hf
        file = hf_tokenizer_file(str(path))
        try:
            raw = file.read_bytes()
            self._tok = _Hf.from_str(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{file}: {getattr(e, 'strerror', None) or e}", "data.tokenizer.path") from None
        except Exception as e:  # the library's own parse error
            raise DataError(f"{file}: not a tokenizer.json the tokenizers library reads ({e})",
                            "data.tokenizer.path") from None
        self.path = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        named = _named_special_tokens(file.parent)
        self.eos_id = self._special_id(named.get("eos_token"), EOS_NAMES)
        if self.eos_id is None:
            what = f"{named['eos_token']!r} (named as eos_token) is not in it" if named.get("eos_token") else \
                f"no eos_token in {' or '.join(SPECIAL_FILES)} beside it and none of {', '.join(EOS_NAMES)}"
            raise DataError(f"{file}: no end-of-text token: {what}; documents need one to end with",
                            "data.tokenizer.path")
        self.bos_id = self._special_id(named.get("bos_token"), BOS_NAMES)
        if self.bos_id == self.eos_id:
            self.bos_id = None  # one token for both (GPT-2): eos already separates the documents
        digest = hashlib.blake2b(raw, digest_size=16)
        digest.update(f"eos={self.eos_id} bos={self.bos_id}".encode())
        self.fingerprint = "hf-" + digest.hexdigest()

    def _special_id(self, name: str | None, fallbacks: tuple[str, ...]) -> int | None:
        if name:
            return self._tok.token_to_id(name)
        return next((i for i in map(self._tok.token_to_id, fallbacks) if i is not None), None)

    # -- use ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids



    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of the text each id decodes to (see `Tokenizer.token_bytes`). A
        byte-level vocabulary (GPT-2, Llama 3, Qwen) spells each byte with one symbol of a
        256-symbol alphabet, so such a token's bytes are its symbols, as for BpeTokenizer
        (a token may hold part of a character, which decoding it alone would not show). Other
        vocabularies (SentencePiece-style) are decoded token by token after an anchor token,
        so a word-start marker counts its space; byte-fallback tokens (<0xE3>) count one.
        eos counts one (the separator it stands for), bos none, other special tokens one.
        Ids the vocabulary skips count one."""
        out = np.ones(self.vocab_size, dtype=np.int64)
        added = self._tok.get_added_tokens_decoder()
        special = {i for i, t in added.items() if t.special}
        alphabet = set(_byte_level_alphabet()) if _uses_byte_level(self._tok) else None
        decoder = self._tok.decoder
        anchor = "a" if decoder is not None else None
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in special:
                continue
            if i in added:  # a plain added token: its text as written
                out[i] = len(token.encode("utf-8"))
            elif alphabet is not None:
                out[i] = sum(1 if c in alphabet else len(c.encode("utf-8")) for c in token)
            elif BYTE_FALLBACK.fullmatch(token):
                out[i] = 1
            elif decoder is None:
                out[i] = len(token.encode("utf-8"))
            else:
                out[i] = len(decoder.decode([anchor, token]).encode("utf-8")) - len(decoder.decode([anchor]).encode("utf-8"))
        if self.bos_id is not None:
            out[self.bos_id] = 0
        return out


def _named_special_tokens(directory: Path) -> dict:
    """eos_token and bos_token as tokenizer_config.json, else special_tokens_map.json, in
    `directory` name them (a string, or a dict with "content"); {} without either file."""
    named: dict = {}
    for name in reversed(SPECIAL_FILES):  # tokenizer_config.json wins
        try:
            doc = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in ("eos_token", "bos_token"):
            value = doc.get(key) if isinstance(doc, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                named[key] = value
    return named


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers
    return pre_tokenizers.ByteLevel.alphabet()


def _uses_byte_level(tok) -> bool:
    """Whether the tokenizer's decoder maps a byte-level alphabet back to bytes."""
    doc = json.loads(tok.to_str()).get("decoder") or {}
    stack = [doc]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            if d.get("type") == "ByteLevel":
                return True
            stack.extend(d.get("decoders") or ())
    return False


def first_chars(texts: Iterable[str], limit: int) -> Iterator[str]:
    """The texts, cut so their total length is `limit` characters."""
    left = limit
    if left <= 0:
        return
    for t in texts:
        yield t[:left]
        left -= len(t)
        if left <= 0:
            return  # before pulling another text: it may be expensive to produce


def tokenizer_path(cfg: TokenizerConfig, cache_dir: Path, content_key: str) -> Path:
    key = {"kind": cfg.kind, "vocab_size": cfg.vocab_size, "train_chars": cfg.train_chars,
           "content": content_key, "format": 1}
    if cfg.train_mix:  # only when set, so the tokenizers trained before it existed stay valid
        key["train_mix"] = dict(sorted(cfg.train_mix.items()))
    key = stable_hash(key)
    return Path(cache_dir) / f"bpe-{key}.json"


def build_tokenizer(cfg: TokenizerConfig, train_texts: Callable[[], Iterable[str]], cache_dir: Path,
                    content_key: str = "") -> ByteTokenizer | BpeTokenizer | HfTokenizer:
    """The tokenizer `cfg` describes.

    byte needs nothing; hf loads `cfg.path` (read every time: it is the cache's key). bpe learns from the first `cfg.train_chars` characters of
    `train_texts()` (which honours `cfg.train_mix`, see dataset._tokenizer) and caches the result in `cache_dir` under a key of the config and
    `content_key`, which the caller derives from what the texts are (their sources'
    content fingerprints); a later call with the same key loads it and never calls
    `train_texts`, so training (minutes on a real corpus) happens once."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "hf":
        if not cfg.path:
            raise DataError("data.tokenizer.kind=hf needs a path (a tokenizer.json or a directory "
                            "holding one)", "data.tokenizer.path")
        return HfTokenizer(cfg.path)
    if cfg.kind != "bpe":
        raise DataError(f"unknown tokenizer kind {cfg.kind!r}; allowed: byte, bpe, hf")
    if cfg.vocab_size < 257 + 1:
        raise DataError(f"a BPE vocab_size must exceed the 256 bytes + eos, got {cfg.vocab_size}")
    if cfg.train_chars <= 0:
        raise DataError(f"tokenizer.train_chars must be positive, got {cfg.train_chars}")
    path = tokenizer_path(cfg, cache_dir, content_key)
    if path.exists():
        try:
            return BpeTokenizer.load(path)
        except Exception as e:  # edited or damaged by hand: retrain rather than fail
            log.warning("ignoring unreadable cached tokenizer %s (%s); retraining", path, e)
    tok = BpeTokenizer.train(first_chars(train_texts(), cfg.train_chars), cfg.vocab_size)
    tok.save(path)
    return tok
