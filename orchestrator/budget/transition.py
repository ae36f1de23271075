"""What a growth transition costs, before anything runs (`grow plan`).

The transition into a grown stage (orchestrator/run/transition.py `start_stage`): the old
model's check loss was taken at the end of its stage and kept in its final checkpoint (no
old model is rebuilt), the writer ranks grow the state tensor by tensor from the old files
into the new stage's step-0 checkpoint (each old tensor read once, each grown tensor
written and hashed once, in the same pass), and every rank loads its slices of it; the
seal reads nothing back. Bytes are fp32 weights plus two fp32 Adam moments, as the
canonical checkpoint stores them. Per GPU: the new stage's model states (what the engine
holds once loaded; the old model's slice, weights only, is smaller and freed before).
Per host: what the growth itself holds, one grown tensor, its old source and the random
fill of its new entries, on each rank of the node. Time: all bytes at
`cluster.storage_gbps`, the checkpoint storage's bandwidth.
"""
from __future__ import annotations

from growth_ops.grown_tensors import all_axes
from growth_ops.spec import ModelSpec, count_parameters, tensor_size

from orchestrator.budget.memory import GIB, state_bytes_per_param
from orchestrator.config.schema import RunConfig
from orchestrator.schedule import ResolvedStage

FP32 = 4
STATE_BYTES = 3 * FP32  # weights + exp_avg + exp_avg_sq
GROWTH_WORKING_SET = 3  # a grown tensor, its old source and the random fill of its new entries


def largest_tensor_bytes(spec: ModelSpec) -> int:
    return max(tensor_size(spec, kinds) for kinds in all_axes(spec).values()) * FP32


def transition_cost(cfg: RunConfig, old: ResolvedStage, new: ResolvedStage) -> dict:
    """Bytes read and written, peak memory per GPU and per host, and seconds of the growth
    from `old`'s final checkpoint into `new`."""
    p_old, p_new = count_parameters(old.spec), count_parameters(new.spec)
    lay = new.layout
    written = STATE_BYTES * p_new
    read = STATE_BYTES * p_old + written  # grow from the old state; load the grown one
    per_gpu = p_new / (lay.tp * lay.pp) * state_bytes_per_param(cfg.engine.dtype, lay.dp)
    ranks_per_host = min(new.world, cfg.cluster.gpus_per_node or new.world)
    per_host = ranks_per_host * GROWTH_WORKING_SET * largest_tensor_bytes(new.spec)
    return {"from": old.name, "bytes_read": read, "bytes_written": written,
            "peak_gib_per_gpu": per_gpu / GIB, "peak_gib_per_host": per_host / GIB,
            "seconds": (read + written) / (cfg.cluster.storage_gbps * 1e9)}
