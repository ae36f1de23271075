"""Where the old blocks go in the grown stack (`layer_insert`), and block-relative names."""
from __future__ import annotations

from collections.abc import Sequence

from .errors import GrowthError

LAYER_INSERTS = ("append", "interleave")
# growth.layer_insert: one of LAYER_INSERTS, or the new blocks' positions ("1,3" or a list)
LayerInsert = str | Sequence[int]


def new_layer_positions(layer_insert: LayerInsert, old_layers: int, new_layers: int) -> list[int]:
    """New position of each old block. `append` puts new blocks last; `interleave` spreads
    them evenly, each after an old block; explicit positions ("1,3" or a list) name the
    positions of the new blocks in the grown stack."""
    added = new_layers - old_layers
    if isinstance(layer_insert, str) and layer_insert in LAYER_INSERTS:
        if layer_insert == "append" or added == 0:
            return list(range(old_layers))
        return [i + (i * added) // old_layers for i in range(old_layers)]
    try:
        items = layer_insert.replace(";", ",").split(",") if isinstance(layer_insert, str) else layer_insert
        spots = [int(p) for p in items if str(p).strip() != ""]
    except (TypeError, ValueError, AttributeError):
        raise GrowthError("layer_insert", f"{layer_insert!r} is not allowed; allowed: "
                                          f"{', '.join(LAYER_INSERTS)}, or the positions of the new "
                                          "blocks as 'i,j,...'") from None
    if len(spots) != added or len(set(spots)) != added or any(not 0 <= p < new_layers for p in spots):
        raise GrowthError("layer_insert", f"positions {spots} must be {added} distinct new-block "
                                          f"positions in 0..{new_layers - 1}")
    return [p for p in range(new_layers) if p not in set(spots)]


def layer_sources(old_layers: int, new_layers: int, layer_insert: LayerInsert) -> list[int]:
    """New block -> the old block it copies, -1 where new."""
    src = [-1] * new_layers
    for i, j in enumerate(new_layer_positions(layer_insert, old_layers, new_layers)):
        src[j] = i
    return src


def layer_name(name: str) -> tuple[int | None, str]:
    """'layers.3.attn.q.weight' -> (3, 'attn.q.weight'); other names -> (None, name)."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return int(i), rest
    return None, name
