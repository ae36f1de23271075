"""Does a grown checkpoint compute what its source computed? The logits of both models on
one fixed batch of tokens, in fp32, as the offline counterpart of the validation-loss check
`grow run` makes at every growth.

The figure is max |logit after - logit before| over the batch; it is compared with
`tolerance x max(1, max |logit before|)`, so the bound is absolute for models with small
logits and relative for trained ones (whose logits reach tens).
"""
from __future__ import annotations

from typing import Mapping

import torch

from growth_ops import MaskState, ModelSpec
from orchestrator.model import build_model

CHECK_BATCH = (2, 64)  # sequences x tokens: every position, both attention paths, a few seconds
CHECK_SEED = 0


class FunctionChangedError(RuntimeError):
    """A growth that must preserve the function did not."""


def check_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, CHECK_BATCH, generator=torch.Generator().manual_seed(CHECK_SEED))


def logits(spec: ModelSpec, state: Mapping[str, torch.Tensor], masks: MaskState | None,
           tokens: torch.Tensor) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):  # the throwaway default init must not move the caller's RNG
        model = build_model(spec)
    model.load_canonical({k: state[k].float() for k in model.canonical_state()})
    model.set_masks(masks)
    with torch.no_grad():
        return model.float().eval()(tokens)


def logit_change(old_spec: ModelSpec, old_state: Mapping[str, torch.Tensor], new_spec: ModelSpec,
                 new_state: Mapping[str, torch.Tensor], new_masks: MaskState | None,
                 tolerance: float) -> dict:
    """The check's record: the figure, the scale it is judged against, and the verdict.
    One model is in memory at a time."""
    tokens = check_tokens(old_spec.vocab)
    before = logits(old_spec, old_state, None, tokens)
    after = logits(new_spec, new_state, new_masks, tokens)
    diff = (after - before).abs().max().item()
    scale = max(1.0, before.abs().max().item())
    return {"tokens": list(CHECK_BATCH), "seed": CHECK_SEED, "dtype": "fp32", "max_abs_logit_diff": diff,
            "max_abs_logit": before.abs().max().item(), "tolerance": tolerance, "bound": tolerance * scale,
            "within_tolerance": diff <= tolerance * scale}


def describe(check: dict) -> str:
    return (f"max |logit diff| {check['max_abs_logit_diff']:.3g} (max |logit| {check['max_abs_logit']:.3g}, bound "
            f"{check['bound']:.3g}) on {check['tokens'][0]}x{check['tokens'][1]} fixed tokens in fp32")
