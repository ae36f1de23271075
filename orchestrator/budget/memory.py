"""Memory one training step of a stage needs on one device, for refusing stages that cannot
fit (`grow plan` against `cluster.gpu_memory_gb`, `grow run` against this machine).

The estimate is a lower bound on purpose: a stage is refused only when it certainly does
not fit, never because of a guess. Model states are exact per parameter; activations count
only what autograd must keep for the backward pass of every layer (the block's input and
norm outputs, q/k/v after RoPE, the attention output, the MLP's hidden activations), and
the fp32 logits with their log-softmax; attention scores are not counted (fused attention does not store them).
"""
from __future__ import annotations

from dataclasses import dataclass

from growth_ops.spec import ModelSpec, count_parameters

from orchestrator.config.schema import LayoutConfig

GIB = 2.0**30


def state_bytes_per_param(dtype: str, dp: int) -> float:
    """Model states per parameter on one GPU with the optimizer sharded over data parallelism
    (ZeRO-1 / Megatron's distributed optimizer): bf16 keeps bf16 weights (2), fp32 gradients
    (4) and fp32 master weights + Adam moments (12 / dp); fp32 keeps weights and gradients
    (8) and the moments (8 / dp)."""
    return 2 + 4 + 12 / dp if dtype == "bf16" else 8 + 8 / dp


def activation_bytes_per_token(spec: ModelSpec, dtype: str) -> float:
    """Lower bound of what one token of a micro-batch keeps for the backward pass, whole model."""
    kv = spec.kv_heads * spec.head_dim
    mlp = 3 * spec.ffn if spec.mlp == "swiglu" else 2 * spec.ffn  # gate, up, product | fc1, gelu
    per_layer = 5 * spec.hidden + 2 * kv + mlp  # elements, see the module docstring
    elem = 2 if dtype == "bf16" else 4
    # + the embedding output and final norm; the fp32 logits and their log-softmax, both
    # alive when the loss is taken
    return (spec.layers * per_layer + 2 * spec.hidden) * elem + 2 * spec.vocab * 4


@dataclass(frozen=True)
class StepMemory:
    states: float  # bytes per device
    activations: float  # bytes per device, one micro-batch

    @property
    def total(self) -> float:
        return self.states + self.activations


def step_memory(spec: ModelSpec, layout: LayoutConfig, batch_size: int, seq_len: int, dtype: str,
                states_dtype: str | None = None) -> StepMemory:
    """Per device: tp x pp split the model and its activations, dp shards the optimizer;
    a micro-batch is layout.micro_batch_size sequences, else the whole per-rank batch.
    `states_dtype`: the weights' dtype when it differs from the activations' (autocast)."""
    shards = layout.tp * layout.pp
    micro = layout.micro_batch_size or batch_size // layout.dp
    states = count_parameters(spec) / shards * state_bytes_per_param(states_dtype or dtype, layout.dp)
    activations = micro * seq_len * activation_bytes_per_token(spec, dtype) / shards
    return StepMemory(states, activations)


def memory_problem(key: str, need: StepMemory, limit_bytes: float, where: str, dtype: str,
                   device: str = "GPU") -> tuple[str, str] | None:
    """(key, message) when a stage `key` (schedule.stages.N) cannot fit in `limit_bytes`
    of `where`; None when it may. States alone too big: the layout must split the model
    more; with activations too big: the micro-batch or context must shrink."""
    if need.total <= limit_bytes:
        return None
    what = (f"one step needs at least {need.total / GIB:.1f} GiB per {device} (model states {need.states / GIB:.1f} GiB "
            f"in {dtype} + activations {need.activations / GIB:.1f} GiB), more than {where} "
            f"({limit_bytes / GIB:.1f} GiB)")
    if need.states > limit_bytes:
        return f"{key}.layout", f"{what}; raise tp, pp or dp, or train a smaller shape"
    return f"{key}.seq_len", f"{what}; lower seq_len or the micro-batch (layout.micro_batch_size)"
