"""data.tokenizer.kind=hf: a Hugging Face tokenizer.json (trained here with `tokenizers`,
saved as a model directory would hold it) drives a real `grow run`; its eos/bos come from
tokenizer_config.json, the model's vocabulary from its size, and bits-per-byte from the
real UTF-8 bytes of each id. Refusals are one line naming the key."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from orchestrator.config.schema import DataConfig, SourceConfig, TokenizerConfig
from orchestrator.config.tokenizer_file import hf_vocab_size
from orchestrator.data import HfTokenizer, prepare_data, validation_batches
from orchestrator.data.errors import DataError

from ..conftest import grow_in_process, read_summary

EOS, BOS = "<|doc_end|>", "<|doc_start|>"  # not among the well-known names: only the config names them
WORDS = ["growth", "schedule", "naïve", "café", "日本語", "données", "🐍", "tokens", "model", "wider",
         "deeper", "Straße", "über", "ctx", "loss", "bits"]


def _documents(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(40, 120))))
            for _ in range(n)]


def _train(texts, specials, vocab_size=400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte -> printable symbol table, inverted (written out here, not taken from
    the library, so the bytes per id below are computed independently)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    corpus = root / "corpus"
    corpus.mkdir()
    docs = _documents(60)
    for i, d in enumerate(docs):
        (corpus / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    model_dir = root / "model"
    model_dir.mkdir()
    tok = _train(docs, ["<pad>", BOS, EOS])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "bos_token": {"content": BOS, "special": True}, "model_max_length": 128}))
    return root, corpus, model_dir, tok, docs


def _args(root: Path, corpus: Path, tok_path, run: str, *extra: str) -> list[str]:
    return ["run", "schedule=tiny", "tracking=off", "engine.threads=1", "data=files",
            f"data.sources.mine.paths=[{corpus}]", f"data.cache_dir={root / 'cache'}",
            "data.tokenizer.kind=hf", f"data.tokenizer.path={tok_path}", f"hydra.run.dir={root / run}",
            "train.eval_batches=2", "checkpoint.every_steps=8",
            "schedule.stages.0.tokens=4096", "schedule.stages.1.tokens=4096", "schedule.stages.2.tokens=8192",
            "schedule.stages.1.growth.ramp_steps=4", "schedule.stages.2.growth.ramp_steps=4",
            "schedule.stages.2.lr.warmup_steps=2", *extra]


@pytest.fixture(scope="module")
def hf_run(hf_setup):
    root, corpus, model_dir, _, _ = hf_setup
    code = grow_in_process(*_args(root, corpus, model_dir, "run"))
    assert code == 0
    return root / "run"


def test_eos_and_bos_come_from_the_directorys_config(hf_setup):
    _, _, model_dir, tok, _ = hf_setup
    ours = HfTokenizer(model_dir)
    assert ours.eos_id == tok.token_to_id(EOS) and ours.bos_id == tok.token_to_id(BOS)
    assert ours.vocab_size == tok.get_vocab_size(with_added_tokens=True) == hf_vocab_size(str(model_dir))
    assert HfTokenizer(model_dir / "tokenizer.json").fingerprint == ours.fingerprint  # the file, or its directory


def test_well_known_eos_name_without_a_config_and_refusal_without_one(tmp_path):
    docs = _documents(5)
    (tmp_path / "a").mkdir()
    _train(docs, ["</s>"], 300).save(str(tmp_path / "a" / "tokenizer.json"))
    tok = HfTokenizer(tmp_path / "a")
    assert tok.eos_id == 0 and tok.bos_id is None
    (tmp_path / "b").mkdir()
    _train(docs, ["<pad>"], 300).save(str(tmp_path / "b" / "tokenizer.json"))
    with pytest.raises(DataError, match="no end-of-text token"):
        HfTokenizer(tmp_path / "b")


def test_token_bytes_are_the_utf8_bytes_of_each_id(hf_setup):
    _, _, model_dir, tok, docs = hf_setup
    ours = HfTokenizer(model_dir)
    table = ours.token_bytes()
    symbols = _gpt2_byte_decoder()
    specials = {tok.token_to_id(t) for t in ("<pad>", BOS, EOS)}
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i not in specials:
            assert table[i] == len(token) and all(c in symbols for c in token), token
    assert table[ours.eos_id] == 1 and table[ours.bos_id] == 0
    for text in docs[:5] + ["naïve café – 日本語 🐍\n\tdef f(x): return x ** 2"]:
        assert int(table[ours.encode(text)].sum()) == len(text.encode("utf-8"))


def test_grow_run_with_an_hf_tokenizer_reports_true_bits_per_byte(hf_setup, hf_run):
    root, corpus, model_dir, tok, docs = hf_setup
    summary = read_summary(hf_run)
    size = tok.get_vocab_size(with_added_tokens=True)
    stage = summary["stages"][-1]
    got = stage["val_by_source"]["mine"]
    # the token files: bos, the document, eos; each document's tokens decode to its bytes
    pinned = json.loads((hf_run / "config.json").read_text())
    assert pinned["data"]["tokenizer"]["path"] == str(model_dir)
    d = pinned["data"]
    cfg = DataConfig(**{**d, "tokenizer": TokenizerConfig(**d["tokenizer"]),
                        "sources": {n: SourceConfig(**s) for n, s in d["sources"].items()}})
    data = prepare_data(cfg)
    assert not data.built["mine"]  # the run's own token files, reused
    val = data.val["mine"].window(0, len(data.val["mine"]))
    eos, bos = tok.token_to_id(EOS), tok.token_to_id(BOS)
    assert val[0] == bos and val[-1] == eos
    symbols = _gpt2_byte_decoder()
    vocab = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    nbytes = np.array([1 if i == eos else 0 if i == bos else
                       len(vocab[i].encode("utf-8")) if i == tok.token_to_id("<pad>") else
                       len(bytes(symbols[c] for c in vocab[i])) for i in range(size)])
    for seg in np.split(val, np.flatnonzero(val == eos) + 1)[:-1]:
        assert seg[0] == bos and seg[-1] == eos
        text = bytes(b for i in seg[1:-1] for b in bytes(symbols[c] for c in vocab[int(i)])).decode("utf-8")
        assert text in docs
    batches = validation_batches(data.val, 8, 128, 2)  # stage s3's shape, train.eval_batches=2
    targets = np.concatenate([b[:, 1:].numpy().ravel() for b in batches])
    expected = got["loss"] * targets.size / (int(nbytes[targets].sum()) * math.log(2))
    assert got["bpb"] == pytest.approx(expected, rel=1e-9)
    assert summary["stages"][-1].get("val_bpb", got["bpb"]) == pytest.approx(got["bpb"], rel=1e-9)
    # the model's vocabulary is the tokenizer's size padded to model.vocab_multiple (64)
    meta = json.loads((hf_run / "checkpoints" / "2-s3" / "step_00000008" / "meta.json").read_text())
    assert meta["spec"]["vocab"] == -(-size // 64) * 64


# -- refusals: one line, the key named, before anything runs --------------------------------

def _refused(capsys, args, key: str, words: str) -> None:
    code = grow_in_process(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.splitlines() == [err] and key in err and words in err, err


def test_hf_settings_refused_by_name(hf_setup, tmp_path, capsys):
    root, corpus, model_dir, tok, _ = hf_setup
    size = tok.get_vocab_size(with_added_tokens=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-eos").mkdir()
    _train(_documents(5), ["<pad>"], 300).save(str(tmp_path / "no-eos" / "tokenizer.json"))
    cases = [
        (["data.tokenizer.path=null"], "data.tokenizer.path", "kind=hf needs a path"),
        ([f"data.tokenizer.path={tmp_path / 'missing'}"], "data.tokenizer.path", "does not exist"),
        ([f"data.tokenizer.path={tmp_path / 'empty'}"], "data.tokenizer.path", "holds no tokenizer.json"),
        ([f"data.tokenizer.path={tmp_path / 'no-eos'}"], "data.tokenizer.path", "no end-of-text token"),
        ([f"model.vocab_size={size - 1}"], "model.vocab_size", f"below the tokenizer's {size} ids"),
        (["data.tokenizer.kind=byte"], "data.tokenizer.path", "is for data.tokenizer.kind=hf only"),
    ]
    for extra, key, words in cases:
        args = _args(root, corpus, model_dir, f"r{len(extra[0])}", *extra)
        _refused(capsys, args, key, words)
        assert not (root / f"r{len(extra[0])}").exists()


def test_init_from_with_another_vocabulary_refused_by_name(hf_setup, hf_run, capsys):
    root, corpus, model_dir, tok, _ = hf_setup
    ckpt = hf_run / "checkpoints" / "0-s1" / "step_00000008"  # stage 1's shape: nothing to grow
    rows = json.loads((ckpt / "meta.json").read_text())["spec"]["vocab"]
    tail = [f"init_from={ckpt}"]
    # hf: the rows must be the padded size exactly
    _refused(capsys, _args(root, corpus, model_dir, "i1", "model.vocab_multiple=256", *tail), "init_from",
             f"has {rows} vocabulary rows, this run 512")
    # a larger tokenizer than the checkpoint's rows
    args = [a for a in _args(root, corpus, model_dir, "i2", *tail) if not a.startswith("data.tokenizer.")]
    _refused(capsys, args + ["data.tokenizer.kind=bpe", "data.tokenizer.vocab_size=4096"], "init_from",
             f"has {rows} vocabulary rows, fewer than the tokenizer's 4096 ids")
    # the same tokenizer and padding: the run starts from it
    assert grow_in_process(*_args(root, corpus, model_dir, "i3", *tail)) == 0
    assert read_summary(root / "i3")["status"] == "complete"
