"""transformers' Mixtral (`MixtralForCausalLM`) <-> our mixture-of-experts tensors: the
part of `grow import-hf` / `grow export-hf` (orchestrator/offline/hf.py) that differs from
Llama. Attention, norms, embeddings and head are named as in Llama.

A Mixtral block's FFN is a router and `num_local_experts` SwiGLU experts; per layer i, in
the per-expert layout the Hub's checkpoints have and that transformers 5.x's
`save_pretrained` writes (its loader fuses them on load):

    model.layers.i.block_sparse_moe.gate.weight          [E, hidden]  <- layers.i.mlp.router.weight
    model.layers.i.block_sparse_moe.experts.e.w1.weight  [ffn, hidden] <- layers.i.mlp.experts.gate.weight[e]
    model.layers.i.block_sparse_moe.experts.e.w3.weight  [ffn, hidden] <- layers.i.mlp.experts.up.weight[e]
    model.layers.i.block_sparse_moe.experts.e.w2.weight  [hidden, ffn] <- layers.i.mlp.experts.down.weight[e]

Import also reads the fused layout of transformers 5.x's own module (`mlp.gate.weight`,
`mlp.experts.gate_up_proj` [E, 2 ffn, hidden] with gate first, `mlp.experts.down_proj`).
Mixtral's router is ours: softmax over all experts in fp32, top-k, the k weights divided by
their sum; it is dropless, so a capacity factor (a training setting) does not export.
"""
from __future__ import annotations

import torch

from growth_ops import ModelSpec
from growth_ops.spec import is_expert_tensor, is_router

from orchestrator.offline.outputs import OfflineError

EXPERT_W = {"gate": "w1", "up": "w3", "down": "w2"}  # mlp.experts.<ours>.weight <-> experts.e.<w>.weight


def is_moe_tensor(name: str) -> bool:
    return is_expert_tensor(name) or is_router(name)


def _split(name: str) -> tuple[str, str]:
    """'layers.3.mlp.experts.up.weight' -> ('3', 'up'); the router -> ('3', 'router')."""
    _, i, rest = name.split(".", 2)
    return i, "router" if is_router(name) else rest.split(".")[2]


def hf_expert_names(name: str, experts: int) -> list[str]:
    """The per-expert HF names a canonical router or expert tensor is made of, in expert order."""
    i, part = _split(name)
    block = f"model.layers.{i}.block_sparse_moe"
    if part == "router":
        return [f"{block}.gate.weight"]
    return [f"{block}.experts.{e}.{EXPERT_W[part]}.weight" for e in range(experts)]


def split_experts(name: str, t: torch.Tensor):
    """(HF name, tensor) of a canonical router or stacked expert tensor, expert by expert."""
    names = hf_expert_names(name, t.shape[0])
    if len(names) == 1:
        yield names[0], t
        return
    for e, hf in enumerate(names):
        yield hf, t[e]


# -- import ----------------------------------------------------------------------------------

def moe_fields(cfg: dict) -> dict:
    """ModelSpec's mixture-of-experts fields from a Mixtral config.json (dropless, as Mixtral)."""
    def need(key: str) -> int:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise OfflineError(f"config.json: {key}", f"{v!r}; a Mixtral config.json has an integer here")
        return v

    experts, top_k = need("num_local_experts"), need("num_experts_per_tok")
    if experts < 2:
        raise OfflineError("num_local_experts", f"{experts}: a mixture needs >= 2 experts")
    if not 1 <= top_k <= experts:
        raise OfflineError("num_experts_per_tok", f"{top_k} is not in [1, num_local_experts={experts}]")
    if cfg.get("sliding_window") is not None:
        raise OfflineError("sliding_window", f"{cfg['sliding_window']!r} is not supported (our attention is full "
                                             "causal); allowed: null")
    coef = float(cfg.get("router_aux_loss_coef", 0.001))
    return {"experts": experts, "top_k": top_k, "capacity_factor": None, "aux_loss_coef": coef}


def _fused(tensors, i: str) -> bool:
    return f"model.layers.{i}.mlp.experts.down_proj" in tensors


def hf_sources(name: str, spec: ModelSpec, tensors) -> list[str]:
    """The HF tensors `name` is read from (either layout), for the check before writing."""
    i, part = _split(name)
    if _fused(tensors, i):
        return [f"model.layers.{i}.mlp." + {"router": "gate.weight", "gate": "experts.gate_up_proj",
                                            "up": "experts.gate_up_proj", "down": "experts.down_proj"}[part]]
    return hf_expert_names(name, spec.experts)


def read_moe_tensor(name: str, spec: ModelSpec, tensors) -> torch.Tensor:
    """A canonical router or stacked expert tensor from an HF checkpoint in either layout."""
    i, part = _split(name)
    sources = hf_sources(name, spec, tensors)
    if _fused(tensors, i) and part in ("gate", "up"):
        gate_up = tensors[sources[0]]  # [E, 2 ffn, hidden]: gate then up (MixtralExperts.forward's chunk)
        if gate_up.shape[1] != 2 * spec.ffn:
            raise OfflineError(name, f"{sources[0]} has shape {tuple(gate_up.shape)}, config says "
                                     f"({spec.experts}, {2 * spec.ffn}, {spec.hidden})")
        return gate_up.chunk(2, dim=1)[0 if part == "gate" else 1].contiguous()
    if len(sources) == 1:
        return tensors[sources[0]]
    parts = [tensors[s] for s in sources]
    for s, t in zip(sources, parts):  # one expert's shape, named, before stacking
        if t.shape != parts[0].shape:
            raise OfflineError(name, f"{s} has shape {tuple(t.shape)}, {sources[0]} has {tuple(parts[0].shape)}")
    return torch.stack(parts)


# -- export ----------------------------------------------------------------------------------

def check_exportable(spec: ModelSpec, warnings: list[str]) -> None:
    if spec.mlp != "swiglu":
        raise OfflineError("model.mlp", f"{spec.mlp!r} has no Mixtral equivalent (its experts are SwiGLU); "
                                        "allowed: swiglu")
    if spec.capacity_factor is not None:
        warnings.append(f"capacity_factor={spec.capacity_factor:g} is a training setting Mixtral does not have: "
                        "transformers routes every token (dropless)")


def mixtral_config(spec: ModelSpec, max_positions: int, rope_parameters: dict, tied: bool):
    from transformers import MixtralConfig  # only export needs transformers
    return MixtralConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, hidden_act="silu",
                         rms_norm_eps=spec.norm_eps, initializer_range=spec.init_std,
                         rope_parameters=rope_parameters, tie_word_embeddings=tied,
                         max_position_embeddings=max_positions, sliding_window=None,
                         num_local_experts=spec.experts, num_experts_per_tok=spec.top_k,
                         router_aux_loss_coef=spec.aux_loss_coef, router_jitter_noise=0.0,
                         output_router_logits=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
