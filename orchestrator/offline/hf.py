"""Hugging Face Llama (and Mixtral) <-> canonical checkpoint, so a published model can be a starting point
and a grown model can be used with `transformers`.

    grow import-hf src=HF_DIR out=CKPT      # config.json + *.safetensors -> canonical checkpoint
    grow export-hf ckpt=CKPT out=HF_DIR     # canonical checkpoint -> LlamaForCausalLM directory
                                            # (MixtralForCausalLM for a mixture of experts)

Both follow the output rules of offline/outputs.py (no writing over an input, a non-empty
output only with overwrite=true, atomic publication); export verifies the checkpoint
against its manifest first. head_dim may differ from hidden / heads (config.json says
`head_dim`), but transformers' LlamaConfig requires hidden to be a multiple of heads.

Only the Llama architecture maps one to one: RMSNorm, SwiGLU, RoPE (default rope type,
rotate-half layout, which our `apply_rope` uses too), any GQA ratio, tied or untied
embeddings, no biases. Tensors are streamed one at a time in both directions; import
writes fp32 with zero optimizer moments (step 0). transformers is not needed to import,
and is only used on export to write a complete config.json. A muP checkpoint exports with
its multipliers folded into the weights (`folded_mup`), tied embeddings as two matrices.
A mixture of experts maps to Mixtral (model_type "mixtral"): orchestrator/offline/hf_mixtral.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from growth_ops import MaskState, ModelSpec, iter_grown
from growth_ops.mup_reparam import mup_reparam
from growth_ops.msg import unmasked_plan
from growth_ops.spec import INPUT_SCALE, axis_size, parameter_axes
from orchestrator.checkpoint.canonical import LazyTensors, open_checkpoint
from orchestrator.config.tokenizer_file import TOKENIZER_FILE, hf_vocab_digest, hf_vocab_size
from orchestrator.offline.expand import check_state
from orchestrator.offline import hf_mixtral
from orchestrator.offline.outputs import (OfflineError, check_output, publish_dir, staged_dir,
                                          write_checkpoint_dir, write_safetensors_stream)

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
HF_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
             torch.float64: "float64"}
MASK_CHOICES = ("drop",)


def hf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{LAYER_NAMES[rest]}"
    return TOP_NAMES[name]


def hf_sources(name: str, spec: ModelSpec, tensors) -> list[str]:
    """The HF tensors canonical `name` is made of (a mixture's experts: one per expert)."""
    return hf_mixtral.hf_sources(name, spec, tensors) if hf_mixtral.is_moe_tensor(name) else [hf_name(name)]


def hf_named(named):
    """(canonical name, tensor) -> (HF name, tensor); a stacked expert tensor becomes one per expert."""
    for name, t in named:
        if hf_mixtral.is_moe_tensor(name):
            yield from hf_mixtral.split_experts(name, t)
        else:
            yield hf_name(name), t


# -- import ----------------------------------------------------------------------------------

def read_hf_config(src: Path) -> dict:
    try:
        cfg = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise OfflineError("src", f"no config.json in {src}; expected a Hugging Face model directory") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise OfflineError("config.json", f"not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise OfflineError("config.json", "not a JSON object")
    return cfg


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    def need(key: str):
        if cfg.get(key) is None:
            raise OfflineError(f"config.json: {key}", "missing; a Llama config.json has it")
        return cfg[key]

    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "mixtral"):
        raise OfflineError("model_type", f"{model_type!r} is not supported; allowed: llama, mixtral")
    moe = hf_mixtral.moe_fields(cfg) if model_type == "mixtral" else {}
    if cfg.get("hidden_act", "silu") != "silu":
        raise OfflineError("hidden_act", f"{cfg['hidden_act']!r} is not supported; allowed: silu (SwiGLU)")
    for f in ("attention_bias", "mlp_bias"):
        if cfg.get(f):
            raise OfflineError(f, "biases are not supported; allowed: false")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise OfflineError("rope_parameters.rope_type", f"{rope_type!r} is not supported; allowed: default")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    heads, hidden = need("num_attention_heads"), need("hidden_size")
    return ModelSpec(layers=need("num_hidden_layers"), hidden=hidden, ffn=need("intermediate_size"),
                     heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                     head_dim=cfg.get("head_dim") or hidden // heads, vocab=need("vocab_size"),
                     norm="rmsnorm", mlp="swiglu", position="rope", rope_theta=float(theta),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                     init_std=float(cfg.get("initializer_range", 0.02)), **moe)


def hf_tensors(src: Path) -> LazyTensors:
    """The tensors of a (possibly sharded) safetensors HF checkpoint, read lazily."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise OfflineError(index.name, "not a valid safetensors index (no weight_map)") from None
    elif (src / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise OfflineError("src", f"no model.safetensors(.index.json) in {src}; only safetensors checkpoints "
                                  "are supported")
    for f in files:
        if not (src / f).is_file():
            raise OfflineError("src", f"{src / f} is missing or not a file")
    try:
        return LazyTensors([src / f for f in files])
    except SafetensorError as e:
        raise OfflineError("src", f"a weight file in {src} is damaged or truncated ({e})") from None


def own_tokenizer(src: Path, spec: ModelSpec) -> dict | None:
    """The model directory's tokenizer.json (file, ids, digest), which a run from the import must use
    (orchestrator.checkpoint.checks); None without one. Its ids must fit the embedding."""
    file = src.resolve() / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        ids, digest = hf_vocab_size(str(file)), hf_vocab_digest(str(file))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise OfflineError(TOKENIZER_FILE, f"{file} is not a tokenizer.json ({e})") from None
    if ids > spec.vocab:
        raise OfflineError(TOKENIZER_FILE, f"{file} has {ids} ids, more than the model's {spec.vocab} "
                                           "vocabulary rows (config.json vocab_size): not this model's tokenizer")
    return {"file": str(file), "ids": ids, "digest": digest}


def import_hf(src: Path, out: Path, overwrite: bool = False) -> tuple[ModelSpec, dict | None]:
    """Write `src` as a canonical checkpoint at `out`; returns its shape and the directory's
    own tokenizer (`own_tokenizer`)."""
    src = Path(src)
    if not src.is_dir():
        raise OfflineError("src", f"{src} is not a directory; expected a Hugging Face model directory")
    out = check_output(out, {"src": src}, overwrite)
    cfg = read_hf_config(src)
    spec = spec_from_hf_config(cfg)
    tensors = hf_tensors(src)
    layout = [(name, torch.float32, tuple(axis_size(spec, k) for k in kinds))
              for name, kinds in parameter_axes(spec).items()]
    for name, _, _ in layout:  # before writing anything
        for key in hf_sources(name, spec, tensors):
            if key not in tensors:
                raise OfflineError(name, f"{key} is missing from {src}")

    def stream():
        for name, _, shape in layout:
            t = hf_mixtral.read_moe_tensor(name, spec, tensors) if hf_mixtral.is_moe_tensor(name) \
                else tensors[hf_name(name)]
            if tuple(t.shape) != shape:
                what = hf_sources(name, spec, tensors)
                what = what[0] if len(what) == 1 else f"{what[0]} .. {what[-1]} (stacked)"
                raise OfflineError(name, f"{what} has shape {tuple(t.shape)}, config says {shape}")
            yield name, t.float()

    def write_files(tmp: Path) -> None:
        write_safetensors_stream(tmp / "model.safetensors", layout, stream())
        write_safetensors_stream(tmp / "optimizer.safetensors", [], iter(()))

    tokenizer = own_tokenizer(src, spec)
    meta = {"spec": spec.to_dict(), "masks": None, "step": 0, "global_step": 0, "optimizer_step": 0,
            "stage_index": -1, "stage_name": "import-hf", "stage_complete": True,
            "imported_from": {"hf_dir": str(src), "model_type": cfg.get("model_type", "llama"),
                              "torch_dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
                              "tokenizer": tokenizer}}
    write_checkpoint_dir(out, write_files, meta)
    return spec, tokenizer


# -- export ----------------------------------------------------------------------------------

def check_exportable(spec: ModelSpec) -> None:
    for field, want in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("position", "rope")):
        if getattr(spec, field) != want:
            raise OfflineError(f"model.{field}", f"{getattr(spec, field)!r} has no Llama equivalent; "
                                                 f"allowed: {want}")
    if spec.rope_interpolation < 1:
        raise OfflineError("rope_interpolation", f"{spec.rope_interpolation:g} has no transformers equivalent "
                                                 "(its linear RoPE scaling factor must be >= 1); allowed: >= 1")
    if spec.hidden % spec.heads:
        raise OfflineError("model.hidden", f"{spec.hidden} is not a multiple of heads={spec.heads}: transformers' "
                                           f"LlamaConfig requires it even with head_dim={spec.head_dim}, so "
                                           "this shape cannot be exported")


def hf_rope_parameters(spec: ModelSpec) -> dict:
    """RoPE's base frequency, and linear position interpolation as transformers' "linear"
    type (it divides the frequencies by `factor`, which is dividing the positions)."""
    if spec.rope_interpolation == 1.0:
        return {"rope_type": "default", "rope_theta": spec.rope_theta}
    return {"rope_type": "linear", "rope_theta": spec.rope_theta, "factor": spec.rope_interpolation}


def hf_config(spec: ModelSpec, max_positions: int = 2048):
    if spec.is_moe:
        return hf_mixtral.mixtral_config(spec, max_positions, hf_rope_parameters(spec), hf_tied(spec))
    from transformers import LlamaConfig  # only export needs transformers
    return LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, hidden_act="silu",
                       rms_norm_eps=spec.norm_eps, initializer_range=spec.init_std,
                       rope_parameters=hf_rope_parameters(spec),
                       tie_word_embeddings=hf_tied(spec), attention_bias=False, mlp_bias=False,
                       max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None)


def hf_tied(spec: ModelSpec) -> bool:
    """muP's tied matrix reads differently as input and readout (multipliers), so it is
    exported as two matrices."""
    return spec.tie_embeddings and not spec.is_mup


def hf_layout(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) in the order the export writes them."""
    layout = []
    for n, kinds in parameter_axes(spec).items():
        shape = tuple(axis_size(spec, k) for k in kinds)
        if hf_mixtral.is_moe_tensor(n) and len(shape) == 3:  # one tensor per expert
            layout += [(hf, shape[1:]) for hf in hf_mixtral.hf_expert_names(n, spec.experts)]
        else:
            layout.append((hf_mixtral.hf_expert_names(n, spec.experts)[0] if hf_mixtral.is_moe_tensor(n)
                           else hf_name(n), shape))
    if spec.tie_embeddings and not hf_tied(spec):
        layout.append(("lm_head.weight", (spec.vocab, spec.hidden)))
    return layout


def folded_mup(spec: ModelSpec, tensors, input_scale: float):
    """(canonical name, tensor) with muP's multipliers folded into the weights, so transformers'
    Llama (which has none) computes the same logits: the embedding times embed_mult (and the
    tied input scale), the readout times output_mult / m (tied: a separate lm_head), and
    with attn_scale=inv the query projection times 1/sqrt(head_dim) (Llama divides q.k by
    sqrt(head_dim); RoPE is linear, so the factor passes through it)."""
    q_factor = spec.attention_scale * spec.head_dim ** 0.5 if spec.attention_scale is not None else 1.0
    for name, t in tensors:
        if name == "embed.weight":
            if spec.tie_embeddings:
                readout = t * spec.readout_mult
            t = t * (spec.embed_mult * input_scale)
        elif name == "head.weight":
            t = t * spec.readout_mult
        elif name.endswith("attn.q.weight") and q_factor != 1.0:
            t = t * q_factor
        yield name, t
    if spec.tie_embeddings:
        yield "head.weight", readout  # lm_head.weight


def _no_new_entries(*_):
    raise RuntimeError("internal: taking out masked structure never creates entries")


def exported_tensors(spec: ModelSpec, masks: MaskState | None, model: LazyTensors, choice: str | None,
                     warnings: list[str]):
    """(spec to export, iterator of (canonical name, tensor)): the checkpoint as it is, or
    without its masked structure (masks=drop). Anything else with masks below 1 is refused."""
    ramping = masks is not None and not masks.done
    if choice is not None and choice not in MASK_CHOICES:
        raise OfflineError("masks", f"{choice!r} is not allowed; allowed: {', '.join(MASK_CHOICES)}")
    if choice == "drop" and not ramping:
        raise OfflineError("masks", "the checkpoint has no masks below 1, so there is nothing to drop: its new "
                                    "structure is part of its function; export without masks=")
    if not ramping:
        return spec, ((n, model[n]) for n in parameter_axes(spec))
    if choice is None:
        raise OfflineError("masks", f"the checkpoint was grown with msg and its masks are at {masks.value:.3g} "
                                    f"({masks.steps_done}/{masks.ramp_steps} steps): they are part of its "
                                    "function and Llama has no masks. Train until they reach 1 "
                                    f"({masks.ramp_steps - masks.steps_done} more steps) and export then, or "
                                    "pass masks=drop to export the model without the new structure (the "
                                    "function at mask 0: the model before growth)")
    plan = unmasked_plan(spec, masks)
    if masks.value > 0:
        warnings.append(f"masks=drop at mask value {masks.value:.3g}: the export is the model without its new "
                        "structure, not this checkpoint's current function (that is so only at mask 0)")
    names = set(parameter_axes(plan.new))
    return plan.new, ((n, t) for n, t in iter_grown(plan, _no_new_entries, model.get) if n in names)


def export_hf(ckpt: Path, out: Path, *, max_positions: int = 2048, masks: str | None = None,
              overwrite: bool = False) -> tuple[ModelSpec, list[str]]:
    """Write `ckpt` as a LlamaForCausalLM (a mixture of experts: MixtralForCausalLM) directory at `out`; returns the exported shape and
    warnings for the user."""
    ckpt = Path(ckpt)
    if not (ckpt / "manifest.json").is_file():
        raise OfflineError("ckpt", f"{ckpt} is not a canonical checkpoint directory (no manifest.json)")
    out = check_output(out, {"ckpt": ckpt}, overwrite)
    model, _, meta = open_checkpoint(ckpt)  # verifies every file against the manifest
    stored_spec = ModelSpec.from_dict(meta["spec"])
    dtype = check_state(model, stored_spec, ckpt)
    warnings: list[str] = []
    spec, tensors = exported_tensors(stored_spec, MaskState.from_dict(meta.get("masks")), model, masks, warnings)
    if spec.is_moe:
        hf_mixtral.check_exportable(spec, warnings)
    check_exportable(spec)
    try:
        cfg = hf_config(spec, max_positions)
    except ValueError as e:  # transformers' own validation, in one line
        raise OfflineError("model", f"transformers refuses this shape: {str(e).splitlines()[-1].strip()}") from None
    cfg.dtype = HF_DTYPES[dtype]
    layout = [(n, dtype, shape) for n, shape in hf_layout(spec)]
    if spec.is_mup:
        # the tied input scale of the exported shape (masks=drop narrows it: muP's reparametrization)
        input_scale = (float(model[INPUT_SCALE]) * mup_reparam(stored_spec, spec).get(INPUT_SCALE, 1.0)
                       if spec.has_input_scale else 1.0)
        named = hf_named(folded_mup(spec, tensors, input_scale))
    else:
        named = hf_named(tensors)
    with staged_dir(out) as tmp:
        write_safetensors_stream(tmp / "model.safetensors", layout, named)
        cfg.save_pretrained(tmp)
        publish_dir(tmp, out)
    return spec, warnings
