"""What a run started from a checkpoint (`init_from`) must agree with, and how to say it.

The config states the model (model.* and stage 1's shape), so `grow plan`, `grow submit` and
the checks read one resolved schedule without opening checkpoints; a checkpoint that
disagrees is refused before anything runs, with the overrides that state its model
(`model_overrides`), which `grow import-hf` also prints for the model it imported.
"""
from __future__ import annotations

import dataclasses

from growth_ops import ModelSpec

from orchestrator.schedule import Schedule

# ModelSpec field -> the run's key that sets it (the RoPE scaling a run starts from is model.rope_theta)
MODEL_KEYS = {"norm": "model.norm", "mlp": "model.mlp", "position": "model.position",
              "rope_theta": "model.rope_theta", "tie_embeddings": "model.tie_embeddings",
              "norm_eps": "model.norm_eps", "parametrization": "model.parametrization",
              "mup_base_hidden": "model.mup.base_hidden", "mup_output_mult": "model.mup.output_mult",
              "mup_embed_mult": "model.mup.embed_mult", "mup_attn_scale": "model.mup.attn_scale"}
SHAPE_FIELDS = ("layers", "hidden", "ffn", "heads", "kv_heads")
MOE_FIELDS = ("experts", "top_k")  # a mixture's structure (stage 1's `moe`): part of where it starts


def model_at_start(schedule: Schedule) -> ModelSpec:
    """Stage 1's model before any RoPE switch of its own: model.rope_theta, no interpolation
    (stage 1's `position` switches from there, reported like any stage's)."""
    return dataclasses.replace(schedule[0].spec, rope_theta=schedule.cfg.model.rope_theta, rope_interpolation=1.0)


def override(key: str, value) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    return f"{key}={'null' if value is None else value}"


def shape_override(spec: ModelSpec) -> str:
    """schedule.stages.0.shape={...} of `spec`'s shape, quoted for a shell."""
    fields = ", ".join(f"{f}: {getattr(spec, f)}" for f in SHAPE_FIELDS)
    return f"'schedule.stages.0.shape={{{fields}}}'"


def moe_override(spec: ModelSpec) -> str:
    """Stage 1's `moe` of a mixture of experts, quoted for a shell. Merged into the stage
    (schedule.stages.0={moe: ...}): OmegaConf 2.3 cannot merge a dict into a stage's null
    `moe` itself (schedule.stages.0.moe={...} fails with 'NoneType' object has no attribute 'get')."""
    cap = "null" if spec.capacity_factor is None else spec.capacity_factor
    return (f"'schedule.stages.0={{moe: {{experts: {spec.experts}, top_k: {spec.top_k}, "
            f"aux_loss_coef: {spec.aux_loss_coef}, capacity_factor: {cap}}}}}'")


def model_overrides(spec: ModelSpec) -> list[str]:
    """The `grow run` overrides under which stage 1 is exactly `spec`'s model: model.* (muP's
    only when it is one), the vocabulary rows, the shape and a mixture's experts."""
    fields = [f for f in MODEL_KEYS if spec.is_mup or not f.startswith("mup_")]
    return [*(override(MODEL_KEYS[f], getattr(spec, f)) for f in fields),
            override("model.vocab_size", spec.vocab), shape_override(spec),
            *([moe_override(spec)] if spec.is_moe else [])]
