"""The `deepspeed` engine: Megatron-core tensor parallelism, a DeepSpeed pipeline and ZeRO-1
data parallelism over one model definition (`parallel_model`): one GPU per rank with NCCL,
or the CPU with gloo; fp32, or bf16 with fp32 master weights and moments in the optimizer
(what the canonical checkpoint holds, so a bf16 stage hands on exact fp32 state). With
`engine.zero_stage=2` (pp=1 only) the same layers run as one module in DeepSpeed's plain
engine with Megatron's parallel state as its `mpu`.

Every rank builds only its pipeline stage with its TP slices, loads exactly those slices
of the canonical state (weights and Adam moments), and at export hands back full tensors
of its share of the model only (gathered across its TP group, tensors spread round-robin
over the TP ranks of DP rank 0), so a checkpoint is written by many ranks in parallel and
never gathered on one. Megatron's parallel state and DeepSpeed's grid use the same rank
order (tp fastest, then dp, then pp); `load` asserts they agree.

What differs between the pipeline and the pipeline-less run lives in `deepspeed_steps`;
what touches DeepSpeed's ZeRO internals, in `zero_state`.

DeepSpeed is imported inside the functions that use it: it picks its accelerator when
first imported (DS_ACCELERATOR), and reads the rank's place (RANK, LOCAL_RANK, ...) from
the environment, which the launcher completes before this module runs
(`orchestrator.run.launch.prepare_rank`); nothing here changes the environment.
"""
from __future__ import annotations

import contextlib
import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from growth_ops.masks import MaskState
from growth_ops.spec import INPUT_SCALE, ModelSpec

from orchestrator.checkpoint.canonical import MOMENTS
from orchestrator.config.schema import RunConfig
from orchestrator.engines import zero_state
from orchestrator.engines.base import Engine, ShardRole, adamw, set_lr
from orchestrator.engines.compiled import CompileClock, TracedPositions, compile_options, fresh_compiler, held_at_one
from orchestrator.engines.deepspeed_steps import pick_steps
from orchestrator.model import PositionTables, install_block_masks, mask_tensors
from orchestrator.model import moe_metrics, moe_stats, set_aux_grad_scale
from orchestrator.schedule import ResolvedStage
from orchestrator.data import rank_slice
from orchestrator.engines.device import backend_for, pick_device
from orchestrator.engines.host_memory import release_free_heap
from orchestrator.engines.parallel_model import BlockLayer, MaskBox, megatron_config, split_dim


def init_distributed(timeout_s: float, device: str = "cpu") -> torch.device:
    """Join the process group the launcher described in the environment (once); returns
    this rank's device (`engine.device`: auto|cpu|cuda; CUDA: GPU LOCAL_RANK and NCCL)."""
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before any NCCL group exists
    if dist.is_initialized():
        return dev
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend_for(dev), timeout=timedelta(seconds=timeout_s),
                               verbose=False)
    return dev


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: RunConfig, stage: ResolvedStage):
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        lay, spec = stage.layout, stage.spec
        self.cfg, self.spec = cfg, spec
        self.tp, self.pp, self.dp = lay.tp, lay.pp, lay.dp
        self.devices = stage.world
        self.bf16 = cfg.engine.dtype == "bf16"
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.check_dtype = cfg.engine.dtype  # evaluate(exact=True) runs in the weights' dtype
        self.device = init_distributed(cfg.engine.timeout_s, cfg.engine.device)
        import deepspeed
        from megatron.core import parallel_state as ps

        deepspeed.utils.logger.setLevel(logging.WARNING)
        world = dist.get_world_size()
        if world != self.devices:
            raise RuntimeError(f"stage {stage.name!r} needs tp*pp*dp = {self.devices} ranks, "
                               f"this job has {world}")
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(self.tp, self.pp)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.rank = dist.get_rank()
        per_rank = stage.config.batch_size // self.dp
        self.micro = lay.micro_batch_size or per_rank
        self.gas = per_rank // self.micro
        self.box = MaskBox()
        config = megatron_config(spec, self.tp, self.pp, torch.float32)
        # the pipeline engine (ZeRO-1, any pp) or one module without a pipeline (ZeRO-2, pp=1)
        self.steps = pick_steps(cfg.engine.zero_stage, self.tp, self.pp, self.dp)
        self.module = self.steps.build(spec, self.tp_rank, config, self.box)
        self.ds_config = {
            "train_batch_size": stage.config.batch_size, "train_micro_batch_size_per_gpu": self.micro,
            "gradient_accumulation_steps": self.gas,
            "gradient_clipping": cfg.train.grad_clip,
            "zero_optimization": {"stage": cfg.engine.zero_stage},
            "bf16": {"enabled": self.bf16},
            "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False, "dump_state": False,
        }
        self.engine = None
        self.masks: MaskState | None = None
        self.compiled = cfg.train.compile  # each layer compiled (DeepSpeed's engine.compile) once loaded
        if self.compiled:
            fresh_compiler()
            self.clock = CompileClock()
            self._set_positions(spec)

    # -- which canonical tensor each local parameter slices -------------------------
    def _slices(self) -> list[tuple[str, torch.Tensor]]:
        """(canonical name, local tensor) of this rank's stage, model order, no repeats."""
        out, seen = [], set()
        for module in self.module.modules():
            if hasattr(module, "canonical_slices"):
                for name, t in module.canonical_slices():
                    if id(t) not in seen:
                        seen.add(id(t))
                        out.append((name, t))
        return out

    def _owns(self, name: str) -> bool:
        """Tensors present on several pipeline stages (tied embedding and its muP input
        scale, ALiBi slopes) are written by stage 0 only."""
        return self.pp_rank == 0 or name not in ("embed.weight", "alibi_slopes", INPUT_SCALE)

    def _local(self, tensors, name: str) -> torch.Tensor:
        """This rank's TP slice of canonical tensor `name` from `tensors` (a dict, or a
        `checkpoint.LazyTensors`, which reads only the slice from disk)."""
        d = split_dim(name)
        if d is None or self.tp == 1:
            return tensors[name]
        if hasattr(tensors, "slice"):
            return tensors.slice(name, d, self.tp_rank, self.tp)
        return tensors[name].chunk(self.tp, dim=d)[self.tp_rank]

    def _gather_tp(self, local: torch.Tensor, name: str) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        d = split_dim(name)
        if d is None or self.tp == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=d)

    # -- canonical state -------------------------------------------------------------
    def load(self, state, moments: dict | None, step: int, masks: MaskState | None) -> None:
        import deepspeed

        if self.engine is not None:
            raise RuntimeError("a DeepSpeedEngine loads its state once")
        slices = self._slices()
        with torch.no_grad():  # one slice in memory at a time
            for name, param in slices:
                param.copy_(self._local(state, name))
        names = {id(t): name for name, t in slices}
        optimizer = adamw(((names[id(p)], p) for p in self.module.parameters()), self.cfg.train, self.spec)
        self.engine, *_ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=self.ds_config,
                                               mpu=self.steps.mpu())
        self.steps.check(self.engine, self.rank, (self.tp_rank, self.dp_rank, self.pp_rank))
        release_free_heap()  # DeepSpeed's transient copies, before the moments are allocated
        if self.compiled:
            self.engine.compile(backend="inductor", compile_kwargs=compile_options(self.cfg.train.compile_mode))
        if self.bf16:  # the optimizer's masters were made from bf16 copies: restore them exactly
            for name, param in slices:  # the same Parameter objects, now bf16 views (read again:
                if zero_state.has_master(param):  # holding every slice meanwhile would double the model)
                    zero_state.set_full_master(param, self._local(state, name).to(self.device, torch.float32))
        if step and moments:  # this rank's ZeRO partition of the Adam moments of its TP slices
            names = {id(t): name for name, t in self._slices()}  # the parameters as initialize left them
            zero_state.write_moments(self.engine, lambda p, key: self._local(moments[key], names[id(p)]), step)
        self.masks = masks
        self._apply_masks()

    def export(self) -> tuple[dict, dict, int]:
        """This rank's share of the canonical state, as full tensors (see module doc)."""
        has_state = zero_state.link_moments(self.engine)
        state: dict = {}
        moments: dict = {k: {} for k in MOMENTS}
        mine = set(self.written_names())
        for name, t in [(n, t) for n, t in self._slices() if self._owns(n)]:
            writer = name in mine
            master = zero_state.full_master(t) if self.bf16 and zero_state.has_master(t) else None
            full = self._gather_tp((t.detach() if master is None else master).float(), name)
            if writer:
                state[name] = full.cpu().clone()
            if has_state and isinstance(t, torch.nn.Parameter):
                for key in MOMENTS:
                    local = zero_state.full_moment(t, key)  # all-reduce over DP
                    full = self._gather_tp(local.reshape(t.shape), name)
                    if writer:
                        moments[key][name] = full.cpu().clone()
        return state, moments, zero_state.optimizer_step(self.engine) if has_state else 0

    def written_names(self) -> list[str]:
        """Of the tensors this pipeline stage owns, one in every `tp` (in model order) on
        each TP rank of DP rank 0; none on the other DP ranks. Each name once (every block
        of an ALiBi model holds the same slopes)."""
        owned = list(dict.fromkeys(n for n, _ in self._slices() if self._owns(n)))
        return [n for j, n in enumerate(owned) if self.dp_rank == 0 and j % self.tp == self.tp_rank]

    def shard_role(self) -> ShardRole:
        """Writers: the TP x PP ranks of DP rank 0, one file each."""
        return ShardRole(index=self.pp_rank * self.tp + self.tp_rank if self.dp_rank == 0 else None,
                         count=self.tp * self.pp, leader=self.rank == 0, barrier=dist.barrier)

    # -- masks -----------------------------------------------------------------------
    def _apply_masks(self) -> None:
        masks = held_at_one(self.masks) if self.compiled else self.masks
        tensors = mask_tensors(masks, self.spec, self.device, self.dtype)  # bf16 x bf16 stays bf16
        self.box.hidden = tensors.hidden if tensors else None
        blocks = [(m.index, m.block) for m in self.module.modules() if isinstance(m, BlockLayer)]
        install_block_masks(blocks, tensors, self.tp, self.tp_rank)

    def moe_metrics(self) -> dict[str, float]:
        """Routing statistics of every rank's layers and batch slices, summed over the world
        (TP ranks see the same tokens: counted once). Every rank calls it (a collective)."""
        if not self.spec.is_moe:
            return {}
        tokens, aux, calls, dropped = moe_stats(self.module)
        t = torch.cat([tokens, torch.tensor([aux, calls, dropped], dtype=torch.float64)])
        dist.all_reduce(t)
        t /= self.tp
        e = self.spec.experts
        return moe_metrics(t[:e], float(t[e]), round(float(t[e + 1])), round(float(t[e + 2])))

    def set_rope_scaling(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._set_positions(spec)

    def _set_positions(self, spec: ModelSpec) -> None:
        for m in self.module.modules():
            if isinstance(m, BlockLayer):
                m.positions = (TracedPositions if self.compiled else PositionTables)(spec)

    # -- compute ---------------------------------------------------------------------
    def _micro_batches(self, batch: torch.Tensor):
        local = rank_slice(batch, self.dp_rank, self.dp)
        chunks = local.split(self.micro)
        return len(chunks), iter([(c[:, :-1].contiguous().to(self.device), c[:, 1:].contiguous().to(self.device))
                                  for c in chunks])

    def compile_seconds(self) -> float | None:
        return self.clock.take() if self.compiled else None

    def train_step(self, batch: torch.Tensor, lr: float) -> tuple[float, float]:
        if self.compiled:
            return self.clock.step(lambda: self._train_step(batch, lr))
        return self._train_step(batch, lr)

    def _train_step(self, batch: torch.Tensor, lr: float) -> tuple[float, float]:
        self._apply_masks()
        self.steps.fit_shape(self.engine, batch.shape[1])
        set_lr(self.engine.optimizer, lr)
        count, it = self._micro_batches(batch)
        set_aux_grad_scale(self.module, 1.0 / count)  # DeepSpeed divides each micro-batch's loss by count
        loss = self.steps.train(self.engine, it)
        norm = self.engine.get_global_grad_norm()
        if self.masks is not None:
            self.masks.advance()
        return float(loss), float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor], exact: bool = False) -> float:
        self._apply_masks()
        losses = []
        self.engine.eval()  # (the pipeline's eval_batch also does so itself)
        # compiled layers evaluate eagerly (no_grad and eval mode would be other graphs: compiled.py)
        with torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext():
            for b in batches:
                self.steps.fit_shape(self.engine, b.shape[1])
                n, it = self._micro_batches(b)
                losses.append(self.steps.evaluate(self.engine, it, n))
        self.engine.train()
        return sum(losses) / len(losses)
