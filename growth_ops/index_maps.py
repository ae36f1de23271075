"""Index maps of a growth: for each axis kind, the old index each new index comes from
(-1: a new index). Placement keeps old indices where they were; tiling copies them."""
from __future__ import annotations

import torch

from .spec import FFN, HEADS, HIDDEN, KV, Q, VOCAB, ModelSpec, axis_size


def placement_axes(old: ModelSpec, new: ModelSpec) -> dict[str, torch.Tensor]:
    """Old indices keep their place and new ones follow, except query heads: old head h of
    kv group h // g moves to (h // g) * g' + h % g, so it stays in its group as g grows."""
    g_old, g_new = old.group_size, new.group_size
    heads = torch.full((new.heads,), -1, dtype=torch.long)
    for h in range(old.heads):
        heads[(h // g_old) * g_new + h % g_old] = h
    axes = {}
    for kind in (HIDDEN, FFN, KV, VOCAB):
        n_old, n_new = axis_size(old, kind), axis_size(new, kind)
        axes[kind] = torch.cat([torch.arange(n_old), torch.full((n_new - n_old,), -1, dtype=torch.long)])
    axes[HEADS] = heads
    axes[Q] = expand_heads(heads, old.head_dim)
    return axes


def tiling_axes(old: ModelSpec, new: ModelSpec) -> dict[str, torch.Tensor]:
    """Every new index copies an old one: widths cycle through the old indices; kv head k'
    copies k' mod KV; query head h' (in group k', at rank r) copies old head
    (k' mod KV) * g + r mod g, so it reads the copy of its own old kv head."""
    g_old, g_new = old.group_size, new.group_size
    hn = torch.arange(new.heads)
    heads = ((hn // g_new) % old.kv_heads) * g_old + (hn % g_new) % g_old
    kv_heads = torch.arange(new.kv_heads) % old.kv_heads
    axes = {HIDDEN: torch.arange(new.hidden) % old.hidden, FFN: torch.arange(new.ffn) % old.ffn,
            VOCAB: torch.arange(new.vocab), HEADS: heads}
    axes[Q] = expand_heads(heads, old.head_dim)
    axes[KV] = expand_heads(kv_heads, old.head_dim)
    return axes


def expand_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-head source indices -> per-coordinate source indices (-1 stays -1)."""
    coords = heads[:, None] * head_dim + torch.arange(head_dim)[None, :]
    return torch.where(heads[:, None] >= 0, coords, -1).flatten()
