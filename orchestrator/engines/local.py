"""The local engine: plain PyTorch in one process, on the CPU or one GPU."""
from __future__ import annotations

import contextlib

import torch

from growth_ops.masks import MaskState
from growth_ops.spec import ModelSpec

from orchestrator.config.schema import RunConfig
from orchestrator.engines.base import Engine, adamw, set_lr
from orchestrator.engines.compiled import CompileClock, TracedPositions, compile_options, fresh_compiler, held_at_one
from orchestrator.engines.device import pick_device
from orchestrator.model import DecoderLM, PositionTables, moe_metrics, moe_stats, set_aux_grad_scale
from orchestrator.schedule import ResolvedStage


class LocalEngine(Engine):
    devices = 1
    check_dtype = "fp32"  # evaluate(exact=True) runs without autocast

    def __init__(self, cfg: RunConfig, stage: ResolvedStage):
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        self.cfg, self.spec = cfg, stage.spec
        self.device = pick_device(cfg.engine.device)
        self.bf16 = cfg.engine.dtype == "bf16"
        self.micro = stage.layout.micro_batch_size or stage.config.batch_size
        with torch.device("meta"):  # no default init: load() sets every weight
            self.model = DecoderLM(self.spec)
        self.model.to_empty(device=self.device)
        self.optimizer = adamw(self.model.named_parameters(), cfg.train, self.spec)
        self.masks: MaskState | None = None
        self.compiled = cfg.train.compile
        self.loss_fn = self.model.loss  # train.compile: the compiled forward and loss (evaluation stays eager)
        if self.compiled:
            fresh_compiler()
            self.model.positions = TracedPositions(self.spec)
            self.loss_fn = torch.compile(self.model.loss, **compile_options(cfg.train.compile_mode))
            self.clock = CompileClock()

    # -- canonical state -------------------------------------------------------------
    def load(self, state, moments: dict | None, step: int, masks: MaskState | None) -> None:
        """`state` may be lazily opened files: tensors are read and copied one at a time,
        so loading never holds a second copy of the model."""
        own = self.model.canonical_state()
        if set(own) != set(state):
            raise KeyError(f"canonical state mismatch: missing {sorted(set(own) - set(state))}, "
                           f"unexpected {sorted(set(state) - set(own))}")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(state[name])
        self.masks = masks
        self.model.set_masks(masks)
        if step == 0 or not moments:
            return
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step), device=p.device),  # the fused kernel's: on the device
                "exp_avg": moments["exp_avg"][name].to(self.device, torch.float32).clone(),
                "exp_avg_sq": moments["exp_avg_sq"][name].to(self.device, torch.float32).clone()}

    def export(self) -> tuple[dict, dict, int]:
        state = {k: v.detach().cpu().clone() for k, v in self.model.canonical_state().items()}
        moments: dict = {"exp_avg": {}, "exp_avg_sq": {}}
        step = 0
        for name, p in self.model.named_parameters():
            s = self.optimizer.state.get(p)
            if s:
                moments["exp_avg"][name] = s["exp_avg"].detach().cpu().clone()
                moments["exp_avg_sq"][name] = s["exp_avg_sq"].detach().cpu().clone()
                step = int(s["step"])
        return state, moments, step

    def moe_metrics(self) -> dict[str, float]:
        stats = moe_stats(self.model)
        return {} if stats is None else moe_metrics(*stats)

    def set_rope_scaling(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model.positions = (TracedPositions if self.compiled else PositionTables)(spec)

    # -- compute ---------------------------------------------------------------------
    def _autocast(self, exact: bool = False):
        if self.bf16 and not exact:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_masks(self) -> None:
        self.model.set_masks(held_at_one(self.masks) if self.compiled else self.masks)

    def compile_seconds(self) -> float | None:
        return self.clock.take() if self.compiled else None

    def train_step(self, batch: torch.Tensor, lr: float) -> tuple[float, float]:
        if self.compiled:
            return self.clock.step(lambda: self._train_step(batch, lr))
        return self._train_step(batch, lr)

    def _train_step(self, batch: torch.Tensor, lr: float) -> tuple[float, float]:
        self._set_masks()
        set_lr(self.optimizer, lr)
        batch = batch.to(self.device, non_blocking=True)
        chunks = batch.split(self.micro)
        set_aux_grad_scale(self.model, 1.0 / len(chunks))  # each chunk's loss is divided by len(chunks)
        total = torch.zeros((), device=self.device)
        for chunk in chunks:
            with self._autocast():
                loss = self.loss_fn(chunk) / len(chunks)
            loss.backward()
            total += loss.detach()
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masks is not None:
            self.masks.advance()
        return total.item(), norm.item()

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor], exact: bool = False) -> float:
        self.model.eval()
        self._set_masks()
        losses = []
        for b in batches:
            with self._autocast(exact):
                losses.append(self.model.loss(b.to(self.device)).item())
        self.model.train()
        return sum(losses) / len(losses)
