"""muP across a change of width: the factors that keep the function when the width
multiplier changes."""
from __future__ import annotations

from .spec import INPUT_SCALE, ModelSpec


def mup_reparam(old: ModelSpec, new: ModelSpec) -> dict[str, float]:
    """Factors on copied entries that keep the function when the width multiplier changes
    (muP only): the logits' factor output_mult / m becomes output_mult / m', so the readout
    matrix is multiplied by r = m'/m, and with tied embeddings the recorded input scale is
    divided by r (see growth_ops.spec.INPUT_SCALE). These change the parametrization, not
    the function: Adam's moments follow the gradient's change whatever the moment rule
    (`moments.iter_moments`). New entries keep their init (the readout's base scale)."""
    if not new.is_mup or new.hidden == old.hidden:
        return {}
    r = new.hidden / old.hidden
    if new.tie_embeddings:
        return {"embed.weight": r, INPUT_SCALE: 1.0 / r}
    return {"head.weight": r}
