"""The DecoderLM of `orchestrator.model` as pipeline layers with Megatron tensor parallelism.

The blocks are `orchestrator.model.Block` itself, built with a linear factory that returns
Megatron column/row-parallel layers, so the local and the parallel engine run one model
definition (norms with masked statistics, RoPE/ALiBi, GQA, growth masks). Around them:
a vocab-parallel embedding, the final norm, and a vocab-parallel head (the embedding's
weight when tied, as a DeepSpeed `TiedLayerSpec` so the first and last pipeline stage keep
one tied copy each). Every layer reports which canonical tensor each of its parameters is
a slice of (`canonical_slices`), so engines load and export canonical checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from growth_ops.spec import INPUT_SCALE, ModelSpec, layer_parameter_axes

from orchestrator.model import Block, Norm, PositionTables, embed_output, readout_input


def _zeros(weight: torch.Tensor) -> None:  # weights come from the canonical state
    with torch.no_grad():
        weight.zero_()


def megatron_config(spec: ModelSpec, tp: int, pp: int, dtype: torch.dtype):
    """No initialization: an engine loads every weight right after it is built, and Megatron's
    CPU init builds each tensor's full-size master on every TP rank, fills, splits and copies
    it (at 1B, ~4 x a rank's weights of memory traffic, and seconds of a growth transition).
    The tensor-parallel marks that init would set (gradient clipping counts by them) are set
    by `_tensor_parallel` instead."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False, params_dtype=dtype,
                               pipeline_dtype=dtype if pp > 1 else None)


def _tensor_parallel(layer: nn.Module, dim: int) -> nn.Module:
    """`layer`'s weight marked as split along `dim` over the TP ranks (stride 1), as Megatron's
    initialization marks it."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(layer.weight, True, dim, 1)
    return layer


def tp_linear_factory(config):
    """`parallel` -> a Megatron layer whose forward returns only the output tensor."""
    from megatron.core import tensor_parallel

    class Column(tensor_parallel.ColumnParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    class Row(tensor_parallel.RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

        def _forward_impl(self, input, weight, *args, **kwargs):
            # megatron passes tp_group=None here and looks the group up, warning on rank 0:
            # torch.compile cannot trace the warning (a graph break on rank 0 only)
            return super()._forward_impl(input, weight, *args, **{**kwargs, "tp_group": self.tp_group})

    def make(in_features: int, out_features: int, parallel: str) -> nn.Module:
        if parallel == "column":
            return _tensor_parallel(Column(in_features, out_features, config=config, init_method=_zeros, bias=False,
                                           gather_output=False), 0)
        return _tensor_parallel(Row(in_features, out_features, config=config, init_method=_zeros, bias=False,
                                    input_is_parallel=True, skip_bias_add=False), 1)
    return make


# Dimension along which TP splits a canonical tensor (None: replicated on every TP rank).
def split_dim(name: str) -> int | None:
    if name in ("embed.weight", "head.weight", "alibi_slopes"):
        return 0
    if name.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight", "mlp.up.weight", "mlp.gate.weight")):
        return 0
    if name.endswith(("mlp.experts.up.weight", "mlp.experts.gate.weight")):
        return 1  # [E, ffn, hidden]: each expert's intermediate dims
    if name.endswith("mlp.experts.down.weight"):
        return 2
    if name.endswith(("attn.o.weight", "mlp.down.weight")):
        return 1
    return None


def tp_regions():
    """(into, out of) Megatron's TP region for a mixture of experts' expert FFNs: the input
    copied (its gradient summed over TP), each assignment's partial output summed."""
    from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                               reduce_from_tensor_model_parallel_region)

    return copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region


class MaskBox:
    """Shared, mutable holder of the hidden-size mask (one object for all layers)."""

    hidden: torch.Tensor | None = None


class EmbedLayer(nn.Module):
    def __init__(self, spec: ModelSpec, config, box: MaskBox):
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.embed = _tensor_parallel(VocabParallelEmbedding(spec.vocab, spec.hidden, init_method=_zeros,
                                                             config=config), 0)
        self.weight = self.embed.weight  # the tied attribute DeepSpeed syncs
        self.spec, self.box = spec, box
        if spec.has_input_scale:
            self.register_buffer(INPUT_SCALE, torch.ones(()))

    def forward(self, tokens):
        x = embed_output(self.embed(tokens), self.spec, getattr(self, INPUT_SCALE, None))
        if self.box.hidden is not None:
            x = x * self.box.hidden
        return x

    def canonical_slices(self):
        yield "embed.weight", self.weight
        if self.spec.has_input_scale:
            yield INPUT_SCALE, getattr(self, INPUT_SCALE)


def tied_head_forward(module: EmbedLayer, x):
    """Logits of this rank's vocab slice with the embedding weight (tied head)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    # the group given, not looked up: megatron warns on rank 0 when it looks it up, which
    # torch.compile cannot trace (a graph break on rank 0 only)
    return F.linear(copy_to_tensor_model_parallel_region(readout_input(x, module.spec),
                                                         group=ps.get_tensor_model_parallel_group()), module.weight)


class BlockLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int, tp: int, tp_rank: int, config, box: MaskBox):
        super().__init__()
        self.spec, self.index, self.box = spec, index, box
        self.block = Block(spec, tp, tp_linear_factory(config), tp_regions() if tp > 1 else None)
        if spec.position == "alibi":
            self.register_buffer("alibi_slopes", torch.zeros(spec.heads // tp))
        self.positions = PositionTables(spec)

    def forward(self, x):
        rope, bias = self.positions(x.shape[1], x.device, getattr(self, "alibi_slopes", None))
        return self.block(x, self.box.hidden, rope, bias)

    def canonical_slices(self):
        for rel in layer_parameter_axes(self.spec):
            yield f"layers.{self.index}.{rel}", self.block.get_parameter(rel)
        if self.spec.position == "alibi":
            yield "alibi_slopes", self.alibi_slopes


class FinalNormLayer(nn.Module):
    def __init__(self, spec: ModelSpec, box: MaskBox):
        super().__init__()
        self.final_norm, self.box = Norm(spec), box

    def forward(self, x):
        return self.final_norm(x, self.box.hidden)

    def canonical_slices(self):
        yield "final_norm.weight", self.final_norm.weight
        if self.final_norm.bias is not None:
            yield "final_norm.bias", self.final_norm.bias


class HeadLayer(nn.Module):
    def __init__(self, spec: ModelSpec, config):
        super().__init__()
        self.spec = spec
        self.head = tp_linear_factory(config)(spec.hidden, spec.vocab, "column")

    def forward(self, x):
        return self.head(readout_input(x, self.spec))

    def canonical_slices(self):
        yield "head.weight", self.head.weight


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), labels).mean()


def layer_specs(spec: ModelSpec, tp: int, tp_rank: int, config, box: MaskBox) -> list:
    """The flat layer list of a `PipelineModule`: embedding, blocks, final norm, head."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    layers: list = []
    if spec.tie_embeddings:
        layers.append(TiedLayerSpec("embed", EmbedLayer, spec, config, box))
    else:
        layers.append(LayerSpec(EmbedLayer, spec, config, box))
    layers += [LayerSpec(BlockLayer, spec, i, tp, tp_rank, config, box) for i in range(spec.layers)]
    layers.append(LayerSpec(FinalNormLayer, spec, box))
    if spec.tie_embeddings:
        layers.append(TiedLayerSpec("embed", EmbedLayer, spec, config, box, forward_fn=tied_head_forward))
    else:
        layers.append(LayerSpec(HeadLayer, spec, config))
    return layers


class FlatModel(nn.Module):
    """The same layers as `layer_specs` in one module, for ZeRO-2 without a pipeline
    (DeepSpeed's pipeline engine runs ZeRO-1 only): forward(tokens, labels) -> loss."""

    def __init__(self, spec: ModelSpec, tp: int, tp_rank: int, config, box: MaskBox):
        super().__init__()
        self.tied = spec.tie_embeddings
        self.embed = EmbedLayer(spec, config, box)
        self.blocks = nn.ModuleList([BlockLayer(spec, i, tp, tp_rank, config, box) for i in range(spec.layers)])
        self.norm = FinalNormLayer(spec, box)
        self.head = None if self.tied else HeadLayer(spec, config)

    def forward(self, tokens, labels):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        logits = tied_head_forward(self.embed, x) if self.tied else self.head(x)
        return vocab_parallel_loss(logits, labels)


class MegatronMpu:
    """Megatron's parallel state in the `mpu` interface DeepSpeed's engine and ZeRO expect
    (model parallel = tensor parallel here: no pipeline), so gradient clipping counts
    TP-replicated parameters once and sums TP-split ones over the TP group."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()
