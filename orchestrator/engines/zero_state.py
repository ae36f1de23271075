"""The canonical state inside DeepSpeed's ZeRO optimizers: the only module that touches
DeepSpeed's internal attributes, so a DeepSpeed upgrade that renames them breaks here only.

Why internals at all: the canonical checkpoint holds full fp32 weights and Adam moments per
tensor, while ZeRO 1/2 keep them as flat fp32 partitions, one per parameter group and rank.
DeepSpeed's public helpers (`deepspeed.utils.safe_*`, used below) read and write one
parameter's master or moment, but a moment only once the optimizer's state exists and is
linked to the parameters, which DeepSpeed does at the first step; a stage that resumes or
grows must hold its moments before that step. So they are written into this rank's
partitions here, and linked.

Two optimizer classes hold the partitions, under different names:
`DeepSpeedZeroOptimizer` (ZeRO 1/2) and `BF16_Optimizer` (bf16 with ZeRO 1).
"""
from __future__ import annotations

from typing import Callable

import torch

from orchestrator.checkpoint.canonical import MOMENTS

# (flat fp32 partitions, their low-precision parameter groups) by optimizer class:
# DeepSpeedZeroOptimizer, then BF16_Optimizer
_PARTITIONS = (("single_partition_of_fp32_groups", "bit16_groups"),
               ("fp32_groups_flat_partition", "bf16_groups"))


def _partitions(ds_engine):
    """DeepSpeed's partitioned optimizer, its flat fp32 partitions (this rank's, one per
    parameter group) and the parameters each partition is the master of."""
    zopt = ds_engine.optimizer
    for flat, groups in _PARTITIONS:
        if hasattr(zopt, flat):
            return zopt, getattr(zopt, flat), getattr(zopt, groups)
    raise RuntimeError("canonical moments need ZeRO stage 1 or 2 (engine.zero_stage)")


def _relink(zopt) -> None:
    """Point every parameter's fragment mapping at the moments now in the optimizer's state:
    DeepSpeed links them once, lazily, and may have done so before the state existed (then
    the mappings hold no moments). Its flag and linking method are private, no public call
    does this."""
    zopt._hp_optimizer_states_linked = False
    zopt._lazy_init_hp_params_optimizer_state()


def _fragment(param):
    """Where this rank's share of `param` lies in its flat partition (`hp_fragment_address`)
    and in the flattened parameter (`lp_fragment_address`); None when none of it is on this
    rank. DeepSpeed attaches it to each parameter as the private `_hp_mapping`."""
    return getattr(param, "_hp_mapping", None)


def write_moments(ds_engine, local_moment: Callable[[torch.nn.Parameter, str], torch.Tensor], step: int) -> None:
    """Set the Adam state of this rank's ZeRO partitions: step `step`, and for each parameter
    its fragment of `local_moment(param, key)` (the parameter's full local moment, `key` in
    MOMENTS); whatever no parameter covers (padding) stays zero."""
    zopt, flat_groups, param_groups = _partitions(ds_engine)
    for i, hp in enumerate(flat_groups):
        st = {"step": torch.tensor(float(step), device=hp.device),  # the fused kernel's: on the device
              "exp_avg": torch.zeros_like(hp), "exp_avg_sq": torch.zeros_like(hp)}
        for lp in param_groups[i]:
            m = _fragment(lp)
            if m is None:
                continue
            for key in MOMENTS:
                flat = local_moment(lp, key).reshape(-1).to(hp.device, hp.dtype)
                st[key].narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel).copy_(
                    flat.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel))
        # the client torch optimizer ZeRO wraps (`.optimizer`) keys its state by partition
        zopt.optimizer.state[hp] = st
    _relink(zopt)


def link_moments(ds_engine) -> bool:
    """Whether the optimizer holds moments yet (it has stepped, or they were loaded); if so,
    (re)link them so `full_moment` reads them. Raises unless ZeRO 1/2 runs."""
    zopt = _partitions(ds_engine)[0]
    has_state = bool(zopt.optimizer.state)
    if has_state:
        _relink(zopt)
    return has_state


def optimizer_step(ds_engine) -> int:
    """Adam's step count (the same in every partition); call only when `link_moments` is True."""
    return int(next(iter(_partitions(ds_engine)[0].optimizer.state.values()))["step"])


def has_master(param) -> bool:
    """Whether ZeRO keeps an fp32 master of `param` (every parameter it optimizes; buffers
    have none). The master may lie on another rank: the helpers below gather it."""
    return hasattr(param, "_hp_mapping")


def set_full_master(param, value: torch.Tensor) -> None:
    """Overwrite the fp32 master of `param` (its fragment on this rank) with `value`."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value)


def full_master(param) -> torch.Tensor:
    """The full fp32 master of `param` (a collective over the DP group)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def full_moment(param, key: str) -> torch.Tensor:
    """The full moment `key` of `param`, shaped as `param` (a collective over the DP group)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return safe_get_full_optimizer_state(param, key)
