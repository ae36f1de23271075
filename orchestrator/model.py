"""One decoder-only LM for every engine, with MSG growth masks built in.

Parameter names equal the canonical checkpoint's (`growth_ops.spec.parameter_axes`), and
the network is a flat sequence (embedding, blocks, final norm, head) so a pipeline can cut
it between blocks. Masks are None outside a growth ramp, and then cost nothing.

A block's FFN is dense (`MLP`) or a mixture of experts (`MoE`, spec.experts >= 2): see
`growth_ops.spec` for its canonical tensors (`mlp.router.weight` [E, hidden],
`mlp.experts.{up,gate}.weight` [E, ffn, hidden], `mlp.experts.down.weight` [E, hidden, ffn]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from growth_ops.init import init_tensor
from growth_ops.masks import MaskState
from growth_ops.spec import (INPUT_SCALE, ModelSpec, attention_flops_per_token, buffer_axes,  # noqa: F401
                             count_parameters, flops_per_token, parameter_axes)


class Norm(nn.Module):
    """RMSNorm or LayerNorm. Under a hidden-size mask the statistics are taken over the
    masked coordinates (divided by the mask's sum), so at mask 0 the new residual
    coordinates, which are then zero, leave the old output exactly unchanged."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.kind, self.eps = spec.norm, spec.norm_eps
        self.weight = nn.Parameter(torch.ones(spec.hidden))
        self.bias = nn.Parameter(torch.zeros(spec.hidden)) if spec.norm == "layernorm" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            if self.kind == "rmsnorm":
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        dtype, x, mask = x.dtype, x.float(), mask.float()  # statistics in fp32, as F.rms_norm's
        count = mask.sum()  # exact in fp32 (a bf16 sum of 3000 ones is not 3000)
        if self.kind == "layernorm":
            mean = (x * mask).sum(-1, keepdim=True) / count
            x = x - mean
        var = (x * x * mask).sum(-1, keepdim=True) / count
        y = x * torch.rsqrt(var + self.eps) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return (y * mask).to(dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device,
                interpolation: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angle position x theta^(-2i/head_dim) per position and frequency i.
    Linear position interpolation (Chen et al. 2023) divides the positions by
    `interpolation`, so a context `interpolation` times longer spans the angles the model
    was trained on; a larger `theta` (base-frequency adjustment) slows every rotation."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    if interpolation != 1.0:
        positions = positions / interpolation
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout (as Llama)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_bias(slopes: torch.Tensor, seq_len: int) -> torch.Tensor:
    pos = torch.arange(seq_len, device=slopes.device)
    distance = (pos[None, :] - pos[:, None]).float()  # j - i, <= 0 below the diagonal
    bias = slopes.float()[:, None, None] * distance[None]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=slopes.device).tril()
    return bias.masked_fill(~causal, float("-inf"))[None]  # [1, heads, T, T]


class PositionTables:
    """What a block needs for positions at a length: RoPE's cos/sin tables (cached for the
    last two lengths and device: a stage that mixes two contexts alternates between them)
    or ALiBi's bias from the given slopes. An engine swaps in new tables when a stage
    changes RoPE's scaling (`spec.rope_scaling()`)."""

    CACHED = 2

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._rope: dict = {}

    def __call__(self, seq_len: int, device, alibi_slopes: torch.Tensor | None = None):
        if self.spec.position == "alibi":
            return None, alibi_bias(alibi_slopes, seq_len)
        key = (seq_len, device)
        if key not in self._rope:
            if len(self._rope) >= self.CACHED:
                del self._rope[next(iter(self._rope))]
            self._rope[key] = rope_tables(seq_len, self.spec.head_dim, self.spec.rope_theta, device,
                                          self.spec.rope_interpolation)
        return self._rope[key], None


@dataclass
class MaskTensors:
    """A growth ramp's masks at its current value: 1 on old structure, the ramp value on new."""

    hidden: torch.Tensor | None
    heads: torch.Tensor | None
    ffn: torch.Tensor | None
    layer: torch.Tensor
    layers_new: list[int]


def mask_tensors(masks: MaskState | None, spec: ModelSpec, device, dtype: torch.dtype) -> MaskTensors | None:
    """None outside a ramp (or when it is finished): the forward pass is then the plain one."""
    if masks is None or masks.done:
        return None

    def vector(size: int, new: list[int]) -> torch.Tensor | None:
        if not new:
            return None
        v = torch.ones(size, device=device, dtype=dtype)
        v[new] = masks.value
        return v

    return MaskTensors(hidden=vector(spec.hidden, masks.hidden_new), heads=vector(spec.heads, masks.heads_new),
                       ffn=vector(spec.ffn, masks.ffn_new), layer=torch.tensor(masks.value, device=device, dtype=dtype),
                       layers_new=list(masks.layers_new))


def install_block_masks(blocks, tensors: MaskTensors | None, tp: int = 1, tp_rank: int = 0) -> None:
    """Set each (index, Block)'s masks: new layers get the layer mask, old ones the head and
    FFN masks (this TP rank's slice of them)."""
    heads = ffn = None
    if tensors is not None:
        heads = None if tensors.heads is None else tensors.heads.chunk(tp)[tp_rank]
        ffn = None if tensors.ffn is None else tensors.ffn.chunk(tp)[tp_rank]
    for i, block in blocks:
        if tensors is None:
            block.masks = (None, None, None)
        else:
            block.masks = (None, None, tensors.layer) if i in tensors.layers_new else (heads, ffn, None)


def plain_linear(in_features: int, out_features: int, parallel: str) -> nn.Module:
    """The default linear factory. `parallel` says how a tensor-parallel engine splits it:
    "column" (output features: q, k, v, up, gate) or "row" (input features: o, down)."""
    return nn.Linear(in_features, out_features, bias=False)


class Attention(nn.Module):
    """`tp` > 1 holds heads/tp query and kv_heads/tp kv heads; `linear` then builds
    Megatron column/row-parallel layers (orchestrator.engines.parallel_model)."""

    def __init__(self, spec: ModelSpec, tp: int = 1, linear=plain_linear):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = spec.heads // tp, spec.kv_heads // tp, spec.head_dim
        self.scale = spec.attention_scale  # None: SDPA's 1/sqrt(head_dim)
        self.q = linear(spec.hidden, spec.q_dim, "column")
        self.k = linear(spec.hidden, spec.kv_dim, "column")
        self.v = linear(spec.hidden, spec.kv_dim, "column")
        self.o = linear(spec.q_dim, spec.hidden, "row")

    def forward(self, x, rope, bias, head_mask):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        gqa = self.kv_heads != self.heads
        if bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale,
                                               enable_gqa=gqa)
        if head_mask is not None:
            y = y * head_mask[None, :, None, None]
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, linear=plain_linear):
        super().__init__()
        self.swiglu = spec.mlp == "swiglu"
        self.up = linear(spec.hidden, spec.ffn, "column")
        self.gate = linear(spec.hidden, spec.ffn, "column") if self.swiglu else None
        self.down = linear(spec.ffn, spec.hidden, "row")

    def forward(self, x, ffn_mask):
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x))
        if ffn_mask is not None:
            h = h * ffn_mask
        return self.down(h)


class StackedWeight(nn.Module):
    """One weight per expert on a leading axis (`mlp.experts.<t>.weight`)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


class AuxLossToGradient(torch.autograd.Function):
    """Returns `x` unchanged; its backward gives `aux` the gradient `scale` (Megatron's
    MoEAuxLossAutoScaler): the load-balancing loss joins the training objective without
    travelling to the loss (a pipeline stage has no path to it), and without changing the
    loss the engines report or the validation loss a growth check compares."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


class MoE(nn.Module):
    """A mixture of experts: a softmax router picks each token's top_k experts and their
    weights (renormalised to sum 1, so identical experts give exactly the dense FFN's output
    whatever the routing: what makes `upcycle` function-preserving). Tokens are grouped by
    expert (one argsort) and each expert runs once on its tokens (a loop over experts, not
    tokens); outputs are scattered back with index_add. Dropless unless capacity_factor is
    set (then, in training, an expert keeps its first ceil(factor x N x top_k / E)
    assignments in token order and drops the rest: a dropped assignment adds nothing;
    evaluation, and so the validation loss and the growth check, is dropless).

    Load balance (transformers' Mixtral/Switch form): aux = E x sum_e f_e P_e, f_e = share
    of the N tokens routed to e (over all top_k slots), P_e = mean router probability;
    top_k at perfect balance. In training it joins the objective with aux_loss_coef x
    `aux_grad_scale` (the engine's micro-batch scaling) through `AuxLossToGradient`. Routing
    statistics accumulate while training until `moe_metrics` reads them.

    `tp` > 1 (Megatron tensor parallelism inside each expert): this rank holds ffn/tp of each
    expert's intermediate dims; `regions` = (copy into, reduce out of) the TP region."""

    def __init__(self, spec: ModelSpec, tp: int = 1, regions=None):
        super().__init__()
        e, ffn, hidden = spec.experts, spec.ffn // tp, spec.hidden
        self.experts_count, self.top_k = e, spec.top_k
        self.capacity_factor, self.aux_loss_coef = spec.capacity_factor, spec.aux_loss_coef
        self.swiglu = spec.mlp == "swiglu"
        self.router = nn.Linear(hidden, e, bias=False)
        self.experts = nn.Module()
        self.experts.up = StackedWeight(e, ffn, hidden)
        if self.swiglu:
            self.experts.gate = StackedWeight(e, ffn, hidden)
        self.experts.down = StackedWeight(e, hidden, ffn)
        self.regions = regions
        self.aux_grad_scale = 1.0
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stat_tokens = torch.zeros(self.experts_count, dtype=torch.float64, device="cpu")  # not meta
        self.stat_aux, self.stat_calls, self.stat_dropped = 0.0, 0, 0

    def capacity(self, tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.experts_count)

    def expert(self, e: int, x: torch.Tensor, ffn_mask) -> torch.Tensor:
        up = F.linear(x, self.experts.up.weight[e])
        h = F.silu(F.linear(x, self.experts.gate.weight[e])) * up if self.swiglu else F.gelu(up)
        if ffn_mask is not None:
            h = h * ffn_mask
        return F.linear(h, self.experts.down.weight[e])

    def forward(self, x, ffn_mask):
        return self.dispatch(x, ffn_mask)

    # Data-dependent shapes (tokens per expert) would recompile a torch.compile'd model at
    # every step: the routed part runs eagerly, the rest of the model compiles around it.
    @torch.compiler.disable
    def dispatch(self, x, ffn_mask):
        shape, flat = x.shape, x.reshape(-1, x.shape[-1])
        n, k, e_count = flat.shape[0], self.top_k, self.experts_count
        probs = self.router(flat).float().softmax(-1)  # [N, E]
        top_w, top_i = probs.topk(k, dim=-1)  # [N, k]
        top_w = top_w / top_w.sum(-1, keepdim=True)
        assigned = top_i.flatten()
        counts = torch.bincount(assigned, minlength=e_count)
        order = assigned.argsort(stable=True)  # assignments grouped by expert, in token order
        token_of, weight_of = order // k, top_w.flatten()[order]
        inner = flat if self.regions is None else self.regions[0](flat)
        cap = self.capacity(n) if self.training else None  # evaluation is dropless
        kept, outputs, start = [], [], 0
        for e, count in enumerate(counts.tolist()):
            take = count if cap is None else min(count, cap)
            if take:
                kept.append(torch.arange(start, start + take, device=flat.device))
                outputs.append(self.expert(e, inner.index_select(0, token_of[start:start + take]), ffn_mask))
            start += count
        keep = torch.cat(kept)
        dropped = n * k - keep.numel()
        y = torch.cat(outputs)
        if self.regions is not None:  # sum the TP ranks' partial outputs before the routing weights,
            y = self.regions[1](y)    # so every rank's router gradient is whole
        out = torch.zeros_like(flat).index_add_(0, token_of[keep], y * weight_of[keep, None].to(y.dtype))
        aux = e_count * (counts.to(probs.dtype) / n * probs.mean(0)).sum()
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.stat_tokens += counts.cpu().double()
                self.stat_aux += float(aux)
                self.stat_calls += 1
                self.stat_dropped += dropped
            if self.aux_loss_coef:
                out = AuxLossToGradient.apply(out, aux, self.aux_loss_coef * self.aux_grad_scale)
        return out.reshape(shape)


def moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_aux_grad_scale(model: nn.Module, scale: float) -> None:
    """The factor the engine applies to each micro-batch's loss (1 / micro-batches per step),
    applied to the load-balancing loss's gradient too."""
    for m in moe_modules(model):
        m.aux_grad_scale = scale


def moe_stats(model: nn.Module) -> tuple[torch.Tensor, float, int, int] | None:
    """(tokens per expert summed over layers, summed aux losses, forward calls, dropped
    assignments) accumulated by this module's MoE layers since the last call, which resets
    them; None for a dense model. A multi-rank engine sums these over ranks."""
    mods = moe_modules(model)
    if not mods:
        return None
    tokens = sum(m.stat_tokens for m in mods)
    aux, calls, dropped = sum(m.stat_aux for m in mods), sum(m.stat_calls for m in mods), \
        sum(m.stat_dropped for m in mods)
    for m in mods:
        m.reset_stats()
    return tokens, aux, calls, dropped


def moe_metrics(tokens: torch.Tensor, aux: float, calls: int, dropped: int) -> dict[str, float]:
    """MLflow-style metrics of `moe_stats`: mean aux loss per layer call, dropped token
    assignments, each expert's share of the routed assignments (1/E each at perfect balance)
    and the busiest expert's load relative to perfect balance (1.0 = balanced)."""
    total = float(tokens.sum())
    if not calls or not total:
        return {}
    share = tokens / total
    metrics = {"moe/aux_loss": aux / calls, "moe/dropped_tokens": float(dropped),
               "moe/max_load": float(share.max()) * len(share)}
    metrics.update({f"moe/tokens/expert_{e}": float(t) for e, t in enumerate(tokens.tolist())})
    return metrics


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, tp: int = 1, linear=plain_linear, regions=None):
        super().__init__()
        self.attn_norm, self.attn = Norm(spec), Attention(spec, tp, linear)
        self.mlp_norm = Norm(spec)
        self.mlp = MoE(spec, tp, regions) if spec.is_moe else MLP(spec, linear)
        # (head mask, ffn mask, layer mask); set by DecoderLM.set_masks
        self.masks: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None)

    def forward(self, x, hidden_mask, rope, bias):
        head_mask, ffn_mask, layer_mask = self.masks
        a = self.attn(self.attn_norm(x, hidden_mask), rope, bias, head_mask)
        if hidden_mask is not None:
            a = a * hidden_mask
        f = self.mlp(self.mlp_norm(x + a, hidden_mask), ffn_mask)
        if hidden_mask is not None:
            f = f * hidden_mask
        if layer_mask is not None:  # MSG depth: m * Block(x) + (1 - m) * x
            return x + layer_mask * (a + f)
        return x + a + f


def embed_output(x: torch.Tensor, spec: ModelSpec, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The embedding lookup's output under the parametrization: as it is (standard), or times
    muP's embeddings multiplier (and, tied, the recorded input scale: growth_ops.spec.INPUT_SCALE)."""
    if not spec.is_mup:
        return x
    x = x * spec.embed_mult
    return x if input_scale is None else x * input_scale.to(x.dtype)


def readout_input(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The final norm's output as the head reads it: muP's readout factor output_mult / m is
    applied here (on the hidden size, not the vocabulary; the logits are linear in it)."""
    return x if spec.readout_mult is None else x * spec.readout_mult


class DecoderLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.final_norm = Norm(spec)
        self.head = None if spec.tie_embeddings else nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.position == "alibi":
            self.register_buffer("alibi_slopes", torch.zeros(spec.heads))
        if spec.has_input_scale:
            self.register_buffer(INPUT_SCALE, torch.ones(()))
        self.hidden_mask: torch.Tensor | None = None
        self.positions = PositionTables(spec)

    # -- canonical state -------------------------------------------------------------
    def init_weights(self, generator: torch.Generator) -> None:
        state = {name: init_tensor(name, tuple(t.shape), self.spec, generator)
                 for name, t in self.canonical_state().items()}
        self.load_canonical(state)

    def canonical_state(self) -> dict[str, torch.Tensor]:
        names = {**parameter_axes(self.spec), **buffer_axes(self.spec)}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_canonical(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)

    # -- growth masks ----------------------------------------------------------------
    def set_masks(self, masks: MaskState | None) -> None:
        """Install mask tensors for the current ramp value; None (or a finished ramp)
        removes them so the forward pass is the plain one."""
        tensors = mask_tensors(masks, self.spec, self.embed.weight.device, torch.float32)
        self.hidden_mask = tensors.hidden if tensors else None
        install_block_masks(enumerate(self.layers), tensors)

    # -- forward ---------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = embed_output(self.embed(tokens), self.spec, getattr(self, INPUT_SCALE, None))
        if self.hidden_mask is not None:
            x = x * self.hidden_mask
        rope, bias = self.positions(tokens.shape[1], tokens.device, getattr(self, "alibi_slopes", None))
        for block in self.layers:
            x = block(x, self.hidden_mask, rope, bias)
        x = readout_input(self.final_norm(x, self.hidden_mask), self.spec)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, weight)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a [B, T+1] token batch, in fp32."""
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def build_model(spec: ModelSpec, seed: int | None = None) -> DecoderLM:
    model = DecoderLM(spec)
    if seed is not None:
        model.init_weights(torch.Generator().manual_seed(seed))
    return model
