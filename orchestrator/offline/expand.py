"""Grow a canonical checkpoint on disk, tensor by tensor (`grow expand`, alias `grow grow`).

Old tensors are read one at a time through safetensors' memory map and each grown tensor
is written as soon as it is built, into a safetensors file whose header is computed up
front from the target shape, so memory stays at a few tensors whatever the checkpoint's
size. The source is verified against its manifest first; the result is an ordinary
canonical checkpoint (model, moments, meta, manifest) that a stage can start from. With
the same seed it equals what `growth_ops.<op>.grow` gives in memory.

Before it is published the grown model is checked against the source on a fixed batch of
tokens (offline/check.py): an operator that preserves the function and does not is
refused, with nothing written; for one that does not claim to (stack) the figure is
reported. The record in meta.json (`offline_growth`) says which, with the figure.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from growth_ops import GrowthError, MaskState, ModelSpec, get_operator
from growth_ops.grown_tensors import all_axes
from growth_ops.spec import axis_size
from orchestrator.checkpoint.canonical import LazyTensors, open_checkpoint
from orchestrator.checkpoint.grown import write_grown
from orchestrator.offline.check import FunctionChangedError, describe, logit_change
from orchestrator.offline.outputs import OfflineError, check_output, write_checkpoint_dir



def operator_named(name: str) -> ModuleType:
    try:
        return get_operator(name)
    except GrowthError as e:
        raise OfflineError("growth", str(e).split(": ", 1)[1]) from None


def check_state(model: LazyTensors, spec: ModelSpec, ckpt: Path) -> torch.dtype:
    """Every tensor meta.json's spec implies is there with its shape (a missing one would
    otherwise be grown as new); returns the checkpoint's dtype."""
    for name, kinds in all_axes(spec).items():
        want = tuple(axis_size(spec, k) for k in kinds)
        if name not in model:
            raise OfflineError("ckpt", f"{ckpt} has no tensor {name}, which its meta.json spec implies")
        if model.stored(name)[1] != want:
            raise OfflineError("ckpt", f"{ckpt}: {name} has shape {model.stored(name)[1]}, its meta.json spec "
                                       f"says {want}")
    return model.stored("embed.weight")[0]


def target_spec(old: ModelSpec, shape: dict[str, int]) -> ModelSpec:
    """The grown shape from the keys given; head_dim never changes, so a new hidden size
    alone brings its heads (and kv heads, for multi-head attention) with it."""
    shape = dict(shape)
    if "heads" in shape and "kv_heads" not in shape:
        shape["kv_heads"] = shape["heads"] if old.kv_heads == old.heads else old.kv_heads
    if "hidden" in shape and "heads" not in shape and old.hidden == old.q_dim:
        if shape["hidden"] % old.head_dim:
            raise OfflineError("hidden", f"{shape['hidden']} is not a multiple of head_dim={old.head_dim}, so "
                                         "the heads cannot grow with it; pass heads= too, or a multiple of "
                                         f"{old.head_dim}")
        shape["heads"] = shape["hidden"] // old.head_dim
        shape.setdefault("kv_heads", shape["heads"] if old.kv_heads == old.heads else old.kv_heads)
    return old.with_shape(**shape)


def grow_checkpoint(src: Path, out: Path, operator: str, shape: dict[str, int], *, ramp_steps: int,
                    layer_insert: str, init: str | None, moments: str | None, seed: int, tolerance: float,
                    tolerance_bf16: float, check: bool = True, overwrite: bool = False,
                    drop_ratio: float | None = None) -> dict:
    """Grow the checkpoint at `src` into `out`; returns the growth record (also in meta.json)
    plus `warnings` for the user. Everything is checked before anything is written."""
    src = Path(src)
    if not (src / "manifest.json").is_file():
        raise OfflineError("ckpt", f"{src} is not a canonical checkpoint directory (no manifest.json); make "
                                   "one with `grow import-hf`, or pass a run's checkpoints/<stage>/step_N")
    op = operator_named(operator)
    out = check_output(out, {"ckpt": src}, overwrite)
    model_in, moments_in, meta = open_checkpoint(src)  # verifies every file against the manifest
    old = ModelSpec.from_dict(meta["spec"])
    dtype = check_state(model_in, old, src)
    new = target_spec(old, shape)
    masks_now = MaskState.from_dict(meta.get("masks"))
    if masks_now is not None and not masks_now.done:
        raise OfflineError("ckpt", f"the checkpoint is mid-ramp ({masks_now.steps_done}/{masks_now.ramp_steps} "
                                   "msg steps); train until the masks reach 1 before growing again")
    op.check(old, new, layer_insert, init, moments, drop_ratio)
    if not op.uses_masks and ramp_steps:
        raise OfflineError("ramp_steps", f"{operator} uses no masks; allowed: 0")
    plan = op.plan(old, new, layer_insert, init, moments, drop_ratio)
    masks = None
    if op.uses_masks:
        op.check_ramp_steps(ramp_steps)  # msg: a ramp of 0 steps would not preserve the function
        masks = op.masks(plan, ramp_steps)
    has_moments = len(moments_in["exp_avg"]) > 0
    generator = torch.Generator().manual_seed(seed)

    def write_files(tmp: Path) -> None:
        write_grown(tmp / "model.safetensors", tmp / "optimizer.safetensors", op, plan, model_in,
                    moments_in if has_moments else None, generator, dtype)

    record = {"operator": operator, "from_spec": old.to_dict(), "layer_insert": layer_insert,
              "init": plan.init, "moments": plan.moments_rule, "seed": seed,
              "drop_ratio": getattr(plan, "drop_ratio", None) or None,
              "ramp_steps": ramp_steps if op.uses_masks else None,
              "preserves_function": op.preserves_function, "source": str(src.resolve()), "check": None}
    warnings = []

    def check_function(tmp: Path, new_meta: dict) -> dict:
        if not check:
            warnings.append("check=false: the grown model was not compared with the source")
            return new_meta
        tol = tolerance if dtype == torch.float32 else tolerance_bf16
        result = logit_change(old, model_in, new, LazyTensors([tmp / "model.safetensors"]), masks, tol)
        if op.preserves_function and not result["within_tolerance"]:
            raise FunctionChangedError(f"growth with {operator} changed the function: {describe(result)}; "
                                       f"nothing was written to {out}")
        if not op.preserves_function:
            warnings.append(f"{operator} does not preserve the function (preserves_function: false in "
                            "meta.json); the change was measured, not checked")
        record["check"] = result  # record is new_meta's offline_growth
        return new_meta

    if new.hidden % new.heads:
        warnings.append(f"hidden={new.hidden} is not a multiple of heads={new.heads}: the model allows it "
                        "(head_dim stays), but transformers' LlamaConfig does not, so export-hf will refuse it")
    new_meta = {**{k: v for k, v in meta.items() if k != "format"}, "spec": new.to_dict(),
                "masks": masks.to_dict() if masks is not None else None, "offline_growth": record}
    write_checkpoint_dir(out, write_files, new_meta, before_publish=check_function)
    return {**record, "to_spec": new.to_dict(), "out": str(out), "warnings": warnings}
