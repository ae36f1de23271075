"""What bench/mup_coord_check.py and bench/mup_transfer.py share: the model family across
widths (standard or muP, head_dim fixed, heads and FFN grow with the hidden size), the
embedded text as fixed batches, and plain training with the project's optimizer
(`orchestrator.engines.base.adamw`: muP's per-group rates) on the project's model."""
from __future__ import annotations

import torch

from bench.common import run_vocab
from growth_ops import ModelSpec
from orchestrator.config.schema import DataConfig, SourceConfig, TrainConfig
from orchestrator.data import prepare_data, validation_batches
from orchestrator.engines.base import adamw, set_lr
from orchestrator.model import build_model

HEAD_DIM = 32
VOCAB = run_vocab()  # the runner's own for the embedded text's byte tokenizer (257 ids, padded: 320)


def spec_for(hidden: int, parametrization: str, base_hidden: int, layers: int = 2,
             output_mult: float = 1.0, head_dim: int = HEAD_DIM, init_std: float = 0.02) -> ModelSpec:
    mup = {}
    if parametrization == "mup":
        mup = dict(parametrization="mup", mup_base_hidden=base_hidden, mup_output_mult=output_mult,
                   mup_embed_mult=1.0, mup_attn_scale="inv")
    return ModelSpec(layers=layers, hidden=hidden, ffn=2 * hidden, heads=hidden // head_dim,
                     kv_heads=hidden // head_dim, head_dim=head_dim, vocab=VOCAB, init_std=init_std, **mup)


def text_batches(batch: int, seq: int, n_train: int, n_val: int, cache_dir: str | None = None):
    """(train, val) lists of [batch, seq + 1] token batches from the embedded text."""
    cfg = DataConfig(sources={"stdlib": SourceConfig(kind="embedded")})
    if cache_dir:
        cfg.cache_dir = cache_dir
    data = prepare_data(cfg)
    return (validation_batches(data.train, batch, seq, n_train), validation_batches(data.val, batch, seq, n_val))


def trainer(spec: ModelSpec, seed: int = 0, weight_decay: float = 0.0):
    """(model, optimizer) at the parametrization's init and per-group learning rates."""
    model = build_model(spec, seed=seed)
    return model, adamw(model.named_parameters(), TrainConfig(weight_decay=weight_decay), spec)


def step(model, optimizer, batch: torch.Tensor, lr: float, clip: float = 1.0) -> float:
    set_lr(optimizer, lr)
    loss = model.loss(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def evaluate(model, batches) -> float:
    return sum(model.loss(b).item() for b in batches) / len(batches)
