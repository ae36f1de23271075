"""What the runner needs of a training engine, and what every engine shares.

An engine holds one stage's model on its devices: it loads and exports the canonical state
(weights, Adam moments, optimizer step, growth masks), takes one optimizer step per global
batch and evaluates fixed batches. Which engines exist and what they can do is declared in
`orchestrator.engines.registry`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from growth_ops.init import is_hidden_matrix
from growth_ops.masks import MaskState
from growth_ops.spec import ModelSpec

from orchestrator.config.schema import TrainConfig


@dataclass(frozen=True)
class ShardRole:
    """How one rank of a multi-rank engine takes part in a checkpoint write
    (`orchestrator.checkpoint.sharded`): its file index (None: writes nothing) of `count`
    files, whether it seals and publishes, and the barrier all ranks meet at."""

    index: int | None
    count: int
    leader: bool
    barrier: Callable[[], None]


class Engine(ABC):
    devices: int  # devices billed per step
    check_dtype: str  # the dtype evaluate(exact=True) computes in (the growth check's)
    masks: MaskState | None = None

    @abstractmethod
    def load(self, state, moments: dict | None, step: int, masks: MaskState | None) -> None:
        """Canonical weights (a dict, or a checkpoint's lazily opened tensors, read one
        tensor or slice at a time), Adam moments ({exp_avg, exp_avg_sq}: name -> tensor)
        when `step` > 0, growth masks."""

    @abstractmethod
    def export(self) -> tuple[dict, dict, int]:
        """(weights, moments, optimizer step) as full fp32 CPU tensors: all of them, or for
        a multi-rank engine this rank's share (see `shard_role`)."""

    @abstractmethod
    def train_step(self, batch: torch.Tensor, lr: float) -> tuple[float, float]:
        """One optimizer step on a global batch [B, T+1]; returns (loss, grad norm)."""

    @abstractmethod
    def evaluate(self, batches: list[torch.Tensor], exact: bool = False) -> float:
        """Mean loss over fixed batches; `exact` computes in `check_dtype` (growth checks)."""

    @abstractmethod
    def set_rope_scaling(self, spec: ModelSpec) -> None:
        """Compute positions with `spec`'s RoPE scaling (theta, interpolation) from now on;
        `spec` differs from the engine's only there (a context-length stage's switch)."""

    def compile_seconds(self) -> float | None:
        """Under train.compile: the seconds the stage's first step spent compiling, once,
        when known (after the second step); else None."""
        return None

    def moe_metrics(self) -> dict[str, float]:
        """A mixture of experts' routing since the last call (orchestrator.model.moe_metrics:
        moe/aux_loss, moe/max_load, moe/dropped_tokens, moe/tokens/expert_<e>); {} when dense."""
        return {}

    def shard_role(self) -> ShardRole | None:
        """None: this process writes whole checkpoints alone."""
        return None

    def written_names(self) -> list[str] | None:
        """The canonical tensors this rank writes into its shard (see `shard_role`), or None
        when this process writes them all. A growth transition grows exactly these here."""
        return None


def adamw(named_params, train: TrainConfig, spec: ModelSpec) -> torch.optim.AdamW:
    """AdamW over (canonical name, parameter) pairs, with weight decay on matrices only (not
    on norms, biases or slopes). Under muP (microsoft/mup's MuAdam rule) the hidden matrices
    form their own group at learning rate lr / m; embeddings, the readout and vectors stay at
    lr. Each group's `lr_mult` is applied by `set_lr`, so an engine built for a grown stage
    trains at the new width's rates from its first step."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    matrices = [(n, p) for n, p in named if p.ndim >= 2]
    if spec.is_mup:
        groups = [([p for n, p in matrices if is_hidden_matrix(n, p.ndim)], train.weight_decay, 1.0 / spec.width_mult),
                  ([p for n, p in matrices if not is_hidden_matrix(n, p.ndim)], train.weight_decay, 1.0)]
    else:
        groups = [([p for _, p in matrices], train.weight_decay, 1.0)]
    groups.append(([p for _, p in named if p.ndim < 2], 0.0, 1.0))
    # torch's fused kernel, on every device that has one: on the CPU torch's default is a
    # per-tensor loop, 1.4-9x slower (13.8M parameters, 2 cores). Numerics differ from it
    # in the last bits, so every engine and every resume uses the same kernel.
    fused = all(p.device.type in FUSED_ADAMW_DEVICES for _, p in named)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": decay, "lr_mult": mult} for params, decay, mult in groups if params],
        lr=0.0, betas=(train.beta1, train.beta2), eps=train.eps, fused=True if fused else None)


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate, times each group's muP multiplier (1 under the standard parametrization)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
