"""Initial values of canonical tensors: the rule shared by fresh models and new weights
added by growth, so grown structures start at the model's own init scale."""
from __future__ import annotations

import math

import torch

from .spec import INPUT_SCALE, ModelSpec, is_norm, is_output_projection

VECTOR_LIKE = ("embed.weight", "head.weight")  # muP: one width-sized axis; init and lr stay at the base's


def is_hidden_matrix(name: str, ndim: int) -> bool:
    """muP's matrix-like parameters: both axes grow with width (all block matrices)."""
    return ndim >= 2 and name not in VECTOR_LIKE


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes (Press et al.), with their rule for non-power-of-2 counts."""
    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        return torch.tensor(power_of_2(heads))
    below = 2 ** math.floor(math.log2(heads))
    extra = power_of_2(2 * below)[0::2][: heads - below]
    return torch.tensor(power_of_2(below) + extra)


def init_tensor(name: str, shape: tuple[int, ...], spec: ModelSpec,
                generator: torch.Generator | None) -> torch.Tensor:
    if name == "alibi_slopes":
        return alibi_slopes(shape[0])
    if name == INPUT_SCALE:
        return torch.ones(shape)
    if is_norm(name):
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    std = spec.init_std
    if spec.is_mup and is_hidden_matrix(name, len(shape)):
        std = std / math.sqrt(spec.width_mult)  # muP: fan-in scaled relative to the base shape
    if is_output_projection(name):
        std = std / math.sqrt(2 * spec.layers)  # GPT-2: keep the residual's variance flat in depth
    return torch.empty(shape).normal_(0.0, std, generator=generator)
