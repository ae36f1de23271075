"""The canonical model description: shape, architecture options and tensor names.

Every engine builds its model from a `ModelSpec` and names its parameters exactly as
`parameter_axes` does, so a canonical checkpoint is just `{name: tensor}` and growth
operators can work on it without knowing any engine.

A mixture-of-experts block (`experts` >= 2; 0: dense) replaces a block's `mlp.up/gate/down`
by a router and the experts' FFNs stacked on a leading expert axis:

    layers.N.mlp.router.weight        [experts, hidden]         (EXPERTS, HIDDEN)
    layers.N.mlp.experts.up.weight    [experts, ffn, hidden]    (EXPERTS, FFN, HIDDEN)
    layers.N.mlp.experts.gate.weight  [experts, ffn, hidden]    (swiglu only)
    layers.N.mlp.experts.down.weight  [experts, hidden, ffn]    (EXPERTS, HIDDEN, FFN)

Expert e's slice is exactly a dense block's `mlp.up/gate/down.weight` (transformers'
Mixtral: router = `block_sparse_moe.gate`, experts.gate[e] = w1, up[e] = w3, down[e] = w2).
`ffn` is each expert's intermediate size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


# RoPE's position scaling: the base frequency and the linear interpolation factor (positions
# are divided by it). Growth keeps them; a stage may change them (a context-length stage,
# `schedule.stages.N.position`), which is a separate step that does not preserve the function.
ROPE_SCALING = ("rope_theta", "rope_interpolation")

# What the function depends on besides the shape and vocabulary: growth keeps these, and a
# run's config (`model.*`, orchestrator.config.schema.ModelConfig; ROPE_SCALING per stage) sets them.
ARCHITECTURE = ("norm", "mlp", "position", *ROPE_SCALING, "tie_embeddings", "norm_eps")
# The parametrization (muP's base shape and multipliers, `model.parametrization` and
# `model.mup.*`): growth keeps these too; the width multiplier follows the hidden size.
PARAMETRIZATION = ("parametrization", "mup_base_hidden", "mup_output_mult", "mup_embed_mult", "mup_attn_scale")


@dataclass(frozen=True)
class ModelSpec:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu | gelu
    position: str = "rope"  # rope | alibi
    rope_theta: float = 10000.0
    rope_interpolation: float = 1.0  # linear position interpolation: RoPE sees position / this
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02  # of new weights (fresh models, random growth fill); muP: the base shape's
    # muP (Yang et al., Tensor Programs V) relative to a base shape of hidden size mup_base_hidden,
    # width multiplier m = hidden / mup_base_hidden: hidden matrices init at init_std / sqrt(m)
    # and trained at lr / m (orchestrator.engines.base.adamw), embeddings times mup_embed_mult,
    # logits times mup_output_mult / m, attention scores times 1/head_dim ("inv") or
    # 1/sqrt(head_dim) ("sqrt"). Under "standard" the mup_* fields are unused (None).
    parametrization: str = "standard"  # standard | mup
    mup_base_hidden: int | None = None
    mup_output_mult: float | None = None
    mup_embed_mult: float | None = None
    mup_attn_scale: str | None = None  # sqrt | inv
    # Mixture of experts (orchestrator.model.MoE): a softmax top-k router with the top-k
    # weights renormalised to sum 1; 0 experts: a dense FFN. capacity_factor None: dropless;
    # else each expert takes at most ceil(factor x tokens x top_k / experts) tokens per batch.
    # aux_loss_coef weighs the load-balancing loss added to the training objective (not to the
    # validation loss).
    experts: int = 0
    top_k: int = 0
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 for multi-head attention)."""
        return self.heads // self.kv_heads

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def dense(self) -> "ModelSpec":
        """The same model with a dense FFN (the shape an upcycle starts from)."""
        return replace(self, experts=0, top_k=0, capacity_factor=None, aux_loss_coef=0.0)

    @property
    def is_mup(self) -> bool:
        return self.parametrization == "mup"

    @property
    def width_mult(self) -> float:
        """muP's width multiplier m (1 under the standard parametrization)."""
        return self.hidden / self.mup_base_hidden if self.is_mup else 1.0

    @property
    def readout_mult(self) -> float | None:
        """The factor on the logits (None: none, the standard parametrization)."""
        return self.mup_output_mult / self.width_mult if self.is_mup else None

    @property
    def embed_mult(self) -> float | None:
        return self.mup_embed_mult if self.is_mup else None

    @property
    def attention_scale(self) -> float | None:
        """Factor on q.k (None: scaled_dot_product_attention's default 1/sqrt(head_dim))."""
        return 1.0 / self.head_dim if self.is_mup and self.mup_attn_scale == "inv" else None

    @property
    def has_input_scale(self) -> bool:
        """muP with tied embeddings keeps a recorded input scale (see `INPUT_SCALE`)."""
        return self.is_mup and self.tie_embeddings

    def with_shape(self, **shape) -> "ModelSpec":
        return replace(self, **shape)

    def rope_scaling(self) -> dict:
        return {f: getattr(self, f) for f in ROPE_SCALING}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**d)


# Axis kinds of a tensor dimension; growth maps each kind with its own index map.
HIDDEN, FFN, Q, KV, HEADS, VOCAB = "hidden", "ffn", "q", "kv", "heads", "vocab"
EXPERTS = "experts"
# The mixture-of-experts block's training settings: they change the objective or which tokens
# an expert drops, never the weights, so a stage may change them without a growth.
MOE_SETTINGS = ("capacity_factor", "aux_loss_coef")
FFN_TENSORS = ("up", "gate", "down")  # mlp.<t>.weight (dense) <-> mlp.experts.<t>.weight (MoE)


def moe_settings_only(old: ModelSpec, new: ModelSpec) -> bool:
    """Two mixtures of experts with the same weights, differing at most in MOE_SETTINGS (a
    stage may change them without a growth)."""
    return old.is_moe and new.is_moe and replace(old, **{f: getattr(new, f) for f in MOE_SETTINGS}) == new


def dense_name(name: str) -> str:
    """'...mlp.experts.up.weight' -> '...mlp.up.weight' (an expert's tensor as a dense block
    names it); other names unchanged."""
    return name.replace("mlp.experts.", "mlp.", 1)


def is_expert_tensor(name: str) -> bool:
    return "mlp.experts." in name


def is_router(name: str) -> bool:
    return name.endswith("mlp.router.weight")


def layer_parameter_axes(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    """Names (relative to `layers.<i>.`) and axis kinds of one block's tensors."""
    axes = {
        "attn_norm.weight": (HIDDEN,),
        "attn.q.weight": (Q, HIDDEN),
        "attn.k.weight": (KV, HIDDEN),
        "attn.v.weight": (KV, HIDDEN),
        "attn.o.weight": (HIDDEN, Q),
        "mlp_norm.weight": (HIDDEN,),
    }
    if spec.is_moe:
        axes["mlp.router.weight"] = (EXPERTS, HIDDEN)
        axes["mlp.experts.up.weight"] = (EXPERTS, FFN, HIDDEN)
        axes["mlp.experts.down.weight"] = (EXPERTS, HIDDEN, FFN)
        if spec.mlp == "swiglu":
            axes["mlp.experts.gate.weight"] = (EXPERTS, FFN, HIDDEN)
    else:
        axes["mlp.up.weight"] = (FFN, HIDDEN)
        axes["mlp.down.weight"] = (HIDDEN, FFN)
        if spec.mlp == "swiglu":
            axes["mlp.gate.weight"] = (FFN, HIDDEN)
    if spec.norm == "layernorm":
        axes["attn_norm.bias"] = (HIDDEN,)
        axes["mlp_norm.bias"] = (HIDDEN,)
    return axes


def parameter_axes(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    """Every trainable tensor of the canonical state, in model order, with axis kinds."""
    axes: dict[str, tuple[str, ...]] = {"embed.weight": (VOCAB, HIDDEN)}
    for i in range(spec.layers):
        for name, kinds in layer_parameter_axes(spec).items():
            axes[f"layers.{i}.{name}"] = kinds
    axes["final_norm.weight"] = (HIDDEN,)
    if spec.norm == "layernorm":
        axes["final_norm.bias"] = (HIDDEN,)
    if not spec.tie_embeddings:
        axes["head.weight"] = (VOCAB, HIDDEN)
    return axes


# muP with tied embeddings: a widening growth from m to m' must change the readout factor
# output_mult / m to output_mult / m' without changing the function. The one matrix feeds the
# input and the readout, so growth multiplies it by m'/m (the readout then computes the old
# logits at its muP-correct factor for the new width) and divides this recorded scalar, which
# multiplies the embedding output only, by m'/m (the input stays as it was). 1 in a fresh model.
INPUT_SCALE = "embed_input_scale"


def buffer_axes(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    """Non-trainable tensors that are part of the function (kept in checkpoints)."""
    axes: dict[str, tuple[str, ...]] = {"alibi_slopes": (HEADS,)} if spec.position == "alibi" else {}
    if spec.has_input_scale:
        axes[INPUT_SCALE] = ()  # a scalar
    return axes


def axis_size(spec: ModelSpec, kind: str) -> int:
    return {HIDDEN: spec.hidden, FFN: spec.ffn, Q: spec.q_dim, KV: spec.kv_dim,
            HEADS: spec.heads, VOCAB: spec.vocab, EXPERTS: spec.experts}[kind]


def tensor_size(spec: ModelSpec, kinds: tuple[str, ...]) -> int:
    """Entries of a tensor whose axes are `kinds`."""
    return math.prod(axis_size(spec, k) for k in kinds)


def count_parameters(spec: ModelSpec) -> int:
    """All parameters (every expert: what memory holds)."""
    return sum(tensor_size(spec, kinds) for kinds in parameter_axes(spec).values())


def active_parameters(spec: ModelSpec) -> int:
    """Parameters one token computes with: top_k of the experts' FFNs (the router's every
    row); equal to `count_parameters` for a dense model."""
    total = 0
    for name, kinds in parameter_axes(spec).items():
        size = tensor_size(spec, kinds)
        total += size * spec.top_k // spec.experts if is_expert_tensor(name) else size
    return total


def is_output_projection(name: str) -> bool:
    """Projections writing into the residual stream get the depth-scaled init."""
    return name.endswith(("attn.o.weight", "mlp.down.weight", "mlp.experts.down.weight"))


def is_norm(name: str) -> bool:
    return "norm." in name


def attention_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Training FLOPs of QK^T and AV per token (PaLM's 12 * L * H * d_head * T)."""
    return 12.0 * spec.layers * spec.q_dim * seq_len


def flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """6 x the parameters that do matrix work per token (all but the embedding lookup;
    the output head counts, tied or not; of a mixture of experts the router and top_k
    experts: `active_parameters`) plus the attention term."""
    matmul_params = active_parameters(spec) - (0 if spec.tie_embeddings else spec.vocab * spec.hidden)
    return 6.0 * matmul_params + attention_flops_per_token(spec, seq_len)
