"""Hugging Face Llama <-> canonical checkpoint, so a published model can be a starting point
and a grown model can be used with `transformers`.

    grow import-hf src=HF_DIR out=CKPT      # config.json + *.safetensors -> canonical checkpoint
    grow export-hf ckpt=CKPT out=HF_DIR     # canonical checkpoint -> LlamaForCausalLM directory

Only the Llama architecture maps one to one: RMSNorm, SwiGLU, RoPE (default rope type,
rotate-half layout, which our `apply_rope` uses too), any GQA ratio, tied or untied
embeddings, no biases. Tensors are streamed one at a time in both directions; import
writes fp32 with zero optimizer moments (step 0). transformers is not needed to import,
and is only used on export to write a complete config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from growth_ops import ModelSpec
from growth_ops.spec import axis_size, parameter_axes

from orchestrator.exits import EXIT_CONFIG, fail
from orchestrator.offline.expand import (CommandError, LazyTensors, parse_args, write_checkpoint_dir,
                           write_safetensors_stream)

LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}


class InteropError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def hf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{LAYER_NAMES[rest]}"
    return TOP_NAMES[name]


# -- import ----------------------------------------------------------------------------------

def spec_from_hf_config(cfg: dict) -> ModelSpec:
    if cfg.get("model_type", "llama") != "llama":
        raise InteropError("model_type", f"{cfg.get('model_type')!r} is not supported; allowed: llama")
    if cfg.get("hidden_act", "silu") != "silu":
        raise InteropError("hidden_act", f"{cfg['hidden_act']!r} is not supported; allowed: silu (SwiGLU)")
    for f in ("attention_bias", "mlp_bias"):
        if cfg.get(f):
            raise InteropError(f, "biases are not supported; allowed: false")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise InteropError("rope_parameters.rope_type", f"{rope_type!r} is not supported; allowed: default")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    heads = cfg["num_attention_heads"]
    return ModelSpec(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], ffn=cfg["intermediate_size"],
                     heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                     head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                     norm="rmsnorm", mlp="swiglu", position="rope", rope_theta=float(theta),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                     init_std=float(cfg.get("initializer_range", 0.02)))


class HFTensors:
    """The tensors of a (possibly sharded) safetensors HF checkpoint, read lazily."""

    def __init__(self, src: Path):
        index = src / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {f: LazyTensors(src / f) for f in set(weight_map.values())}
            self._where = {k: files[f] for k, f in weight_map.items()}
        elif (src / "model.safetensors").exists():
            one = LazyTensors(src / "model.safetensors")
            self._where = {k: one for k in one._keys}
        else:
            raise InteropError("src", f"no model.safetensors(.index.json) in {src}; only safetensors "
                                      "checkpoints are supported")

    def __call__(self, name: str) -> torch.Tensor | None:
        f = self._where.get(name)
        return f(name) if f is not None else None


def import_hf(src: Path, out: Path) -> ModelSpec:
    src = Path(src)
    cfg = json.loads((src / "config.json").read_text())
    spec = spec_from_hf_config(cfg)
    tensors = HFTensors(src)
    layout = [(name, torch.float32, tuple(axis_size(spec, k) for k in kinds))
              for name, kinds in parameter_axes(spec).items()]

    def stream():
        for name, _, shape in layout:
            t = tensors(hf_name(name))
            if t is None:
                raise InteropError(name, f"{hf_name(name)} is missing from {src}")
            if tuple(t.shape) != shape:
                raise InteropError(name, f"{hf_name(name)} has shape {tuple(t.shape)}, config says {shape}")
            yield name, t.float()

    def write_files(tmp: Path) -> None:
        write_safetensors_stream(tmp / "model.safetensors", layout, stream())
        write_safetensors_stream(tmp / "optimizer.safetensors", [], iter(()))

    meta = {"spec": spec.to_dict(), "masks": None, "step": 0, "global_step": 0, "optimizer_step": 0,
            "stage_index": -1, "stage_name": "import-hf", "stage_complete": True,
            "imported_from": {"hf_dir": str(src), "model_type": cfg.get("model_type", "llama"),
                              "torch_dtype": cfg.get("torch_dtype") or cfg.get("dtype")}}
    write_checkpoint_dir(out, write_files, meta)
    return spec


# -- export ----------------------------------------------------------------------------------

def check_exportable(spec: ModelSpec, meta: dict) -> None:
    for field, want in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("position", "rope")):
        if getattr(spec, field) != want:
            raise InteropError(f"model.{field}", f"{getattr(spec, field)!r} has no Llama equivalent; "
                                                 f"allowed: {want}")
    masks = meta.get("masks")
    if masks and masks["steps_done"] < masks["ramp_steps"]:
        raise InteropError("masks", f"the checkpoint is mid-ramp ({masks['steps_done']}/{masks['ramp_steps']} "
                                    "steps): its masks are part of the function; export after the ramp")


def hf_config(spec: ModelSpec, max_positions: int = 2048):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, hidden_act="silu",
                       rms_norm_eps=spec.norm_eps, initializer_range=spec.init_std,
                       rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
                       tie_word_embeddings=spec.tie_embeddings, attention_bias=False, mlp_bias=False,
                       max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None)


def export_hf(ckpt: Path, out: Path, max_positions: int = 2048) -> ModelSpec:
    ckpt, out = Path(ckpt), Path(out)
    meta = json.loads((ckpt / "meta.json").read_text())
    spec = ModelSpec.from_dict(meta["spec"])
    check_exportable(spec, meta)
    model = LazyTensors(ckpt / "model.safetensors")
    dtype = model.dtype()
    layout = [(hf_name(n), dtype, tuple(axis_size(spec, k) for k in kinds))
              for n, kinds in parameter_axes(spec).items()]
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_stream(out / "model.safetensors", layout,
                             ((hf_name(n), model(n)) for n in parameter_axes(spec)))
    cfg = hf_config(spec, max_positions)
    cfg.torch_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    cfg.save_pretrained(out)
    return spec


# -- commands --------------------------------------------------------------------------------

def import_command(args: list[str]) -> int:
    try:
        opts = parse_args(args, ("src", "out"), ("src", "out"))
        spec = import_hf(Path(opts["src"]), Path(opts["out"]))
    except (CommandError, InteropError, KeyError, FileNotFoundError) as e:
        return fail(EXIT_CONFIG, f"import-hf: {e}")
    print(f"imported layers={spec.layers} hidden={spec.hidden} heads={spec.heads}/{spec.kv_heads} "
          f"vocab={spec.vocab} -> {opts['out']}")
    return 0


def export_command(args: list[str]) -> int:
    try:
        opts = parse_args(args, ("ckpt", "out"), ("ckpt", "out", "max_positions"))
        spec = export_hf(Path(opts["ckpt"]), Path(opts["out"]), int(opts.get("max_positions", 2048)))
    except (CommandError, InteropError, KeyError, FileNotFoundError, ValueError) as e:
        return fail(EXIT_CONFIG, f"export-hf: {e}")
    print(f"exported layers={spec.layers} hidden={spec.hidden} heads={spec.heads}/{spec.kv_heads} "
          f"-> {opts['out']} (LlamaForCausalLM)")
    return 0
