"""The two ways the deepspeed engine runs its layers: what differs between them, and only that.

`PipelineSteps`: the layers as a DeepSpeed `PipelineModule` in DeepSpeed's pipeline engine
(`train_batch`/`eval_batch`), any number of pipeline stages; that engine runs ZeRO 0/1 only.
`TensorDataSteps`: the same layers as one module (`FlatModel`) in DeepSpeed's plain engine,
tensor and data parallel without a pipeline, with Megatron's parallel state as its `mpu`;
it runs ZeRO-2, which the pipeline engine refuses.

Both are built from the same layer classes (`parallel_model`), report the same canonical
slices and run in the same process groups; the engine (`deepspeed_engine`) holds the rest.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from growth_ops.spec import ModelSpec

from orchestrator.engines.parallel_model import FlatModel, MaskBox, MegatronMpu, layer_specs, vocab_parallel_loss

MicroBatches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (inputs, labels) on the rank's device


class Steps(ABC):
    """One way of running the model's layers in DeepSpeed."""

    @abstractmethod
    def build(self, spec: ModelSpec, tp_rank: int, config, box: MaskBox) -> nn.Module:
        """This rank's layers (its pipeline stage, its TP slices), weights still unset."""

    def mpu(self):
        """What `deepspeed.initialize` gets as `mpu` (None: the module brings its topology)."""
        return None

    def check(self, ds_engine, rank: int, ranks: tuple[int, int, int]) -> None:
        """After `deepspeed.initialize`: raise if DeepSpeed placed this rank elsewhere than
        Megatron's (tp, dp, pp) `ranks` say."""

    def fit_shape(self, ds_engine, context: int) -> None:
        """Before a batch of `context` tokens per sequence runs."""

    @abstractmethod
    def train(self, ds_engine, micro_batches: MicroBatches) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; the loss, averaged over the
        global batch."""

    @abstractmethod
    def evaluate(self, ds_engine, micro_batches: MicroBatches, count: int) -> float:
        """The loss of one batch (`count` micro-batches on this rank), averaged over it."""


class PipelineSteps(Steps):
    """DeepSpeed's pipeline engine over `pp` stages (also pp=1): it splits the layers over
    the stages, schedules the micro-batches and averages the loss over DP itself."""

    def __init__(self, tp: int, pp: int, dp: int):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        self.tp = tp
        self.topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        self.context: int | None = None  # the sequence length the pipeline's buffers have

    def build(self, spec: ModelSpec, tp_rank: int, config, box: MaskBox) -> nn.Module:
        from deepspeed.pipe import PipelineModule

        return PipelineModule(layers=layer_specs(spec, self.tp, tp_rank, config, box),
                              topology=self.topology, loss_fn=vocab_parallel_loss,
                              partition_method="type:BlockLayer")

    def check(self, ds_engine, rank: int, ranks: tuple[int, int, int]) -> None:
        # the grid DeepSpeed built from the topology: its rank order must be Megatron's
        grid = ds_engine.grid
        got = (grid.get_slice_parallel_rank(), grid.get_data_parallel_rank(), grid.get_pipe_parallel_rank())
        if got != ranks:
            raise RuntimeError(f"rank {rank}: DeepSpeed grid (tp, dp, pp) = {got} disagrees with "
                               f"Megatron's {ranks}")

    def fit_shape(self, ds_engine, context: int) -> None:
        """DeepSpeed's pipeline keeps its activation buffers for one shape: a stage that mixes
        contexts (or evaluates at another) resets them when the context changes."""
        if context != self.context:
            if self.context is not None:
                ds_engine.reset_activation_shape()
            self.context = context

    def train(self, ds_engine, micro_batches: MicroBatches) -> torch.Tensor:
        return ds_engine.train_batch(data_iter=micro_batches)

    def evaluate(self, ds_engine, micro_batches: MicroBatches, count: int) -> float:
        return float(ds_engine.eval_batch(micro_batches, num_micro_batches=count))


class TensorDataSteps(Steps):
    """DeepSpeed's plain engine over one module (no pipeline): each micro-batch is a
    forward, a backward and a `step` that DeepSpeed applies at the accumulation boundary;
    the loss is averaged over DP here."""

    def __init__(self, tp: int, dp: int):
        self.tp, self.dp = tp, dp

    def build(self, spec: ModelSpec, tp_rank: int, config, box: MaskBox) -> nn.Module:
        return FlatModel(spec, self.tp, tp_rank, config, box)

    def mpu(self):
        # so gradient clipping and ZeRO see the TP and DP groups (see MegatronMpu)
        return MegatronMpu()

    def _dp_mean(self, loss: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        loss = loss.detach().clone()
        if self.dp > 1:
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            loss /= self.dp
        return loss

    def train(self, ds_engine, micro_batches: MicroBatches) -> torch.Tensor:
        losses = []
        for x, y in micro_batches:  # DeepSpeed scales each by 1/gas and steps at the boundary
            micro_loss = ds_engine(x, y)
            ds_engine.backward(micro_loss)
            ds_engine.step()
            losses.append(micro_loss.detach())
        return self._dp_mean(torch.stack(losses).mean())

    def evaluate(self, ds_engine, micro_batches: MicroBatches, count: int) -> float:
        return float(self._dp_mean(torch.stack([ds_engine(x, y) for x, y in micro_batches]).mean()))


def pick_steps(zero_stage: int, tp: int, pp: int, dp: int) -> Steps:
    """The pipeline engine wherever it can run (ZeRO 0/1, any pp: also pp=1, so those runs
    keep the one code path they have always had); ZeRO-2, which it refuses, without a
    pipeline (pp=1, as validation requires)."""
    if zero_stage < 2:
        return PipelineSteps(tp, pp, dp)
    if pp == 1:
        return TensorDataSteps(tp, dp)
    raise ValueError(f"engine.zero_stage={zero_stage} needs layout.pp=1 (got {pp})")
