"""`grow expand` (alias `grow grow`): grow a checkpoint on disk.

    grow expand ckpt=SRC out=DST growth=OP [layers= hidden= ffn= heads= kv_heads=]
                [experts= top_k=2 aux_loss_coef=0.01 capacity_factor= drop_ratio=]
                [layer_insert= init= moments= ramp_steps= seed=0 tolerance= check=true overwrite=false]

Options left out take the operator's defaults from conf/growth/<OP>.yaml, the same as in
`grow run` (msg: ramp_steps=40, so the masks start at 0 and the function is the old one).
The grown model is compared with the source on a fixed batch of tokens: max |logit diff|
must stay within tolerance x max(1, max |logit|) for msg, zero and clone (exit 3, nothing
written, otherwise); for stack it is reported. `tolerance=` overrides the yaml's
(`tolerance`, or `tolerance_bf16` for a bf16/fp16 checkpoint).

growth=upcycle (or drop_upcycle) with experts= turns a dense checkpoint into a mixture of
experts (top_k=, aux_loss_coef=, capacity_factor= as a stage's `moe`), with any width/depth
growth in the same pass; drop_upcycle re-initialises drop_ratio= (0.5) of each expert.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import yaml

from orchestrator.package_data import CONF_DIR
from orchestrator.commands.options import (UsageError, bool_option, float_option, int_option,
                                           parse_options, run_reporting_errors)

SHAPE_KEYS = ("layers", "hidden", "ffn", "heads", "kv_heads")
MOE_KEYS = ("experts", "top_k", "aux_loss_coef", "capacity_factor", "drop_ratio")
KEYS = ("ckpt", "out", "growth", *SHAPE_KEYS, *MOE_KEYS, "ramp_steps", "layer_insert", "init", "moments", "seed",
        "tolerance", "check", "overwrite")


def moe_options(opts: dict) -> dict:
    """ModelSpec's mixture-of-experts fields from experts= top_k= aux_loss_coef= capacity_factor=
    (none without experts=), checked as a stage's `moe` is."""
    if "experts" not in opts:
        for k in ("top_k", "aux_loss_coef", "capacity_factor"):
            if k in opts:
                raise UsageError(f"{k}: applies to a mixture of experts; give experts= too")
        return {}
    experts = int_option(opts, "experts", minimum=2)
    top_k = int_option(opts, "top_k", min(2, experts), minimum=1)
    if top_k > experts:
        raise UsageError(f"top_k: {top_k} is more than the {experts} experts; allowed: 1..{experts}")
    coef = float_option(opts, "aux_loss_coef", 0.01)
    if not math.isfinite(coef):
        raise UsageError(f"aux_loss_coef: {opts['aux_loss_coef']} is not a finite number; allowed: >= 0")
    capacity = float_option(opts, "capacity_factor", None) if "capacity_factor" in opts else None
    if capacity is not None and not (math.isfinite(capacity) and capacity > 0):
        raise UsageError(f"capacity_factor: {opts['capacity_factor']} is not allowed; allowed: > 0 (finite)")
    return {"experts": experts, "top_k": top_k, "aux_loss_coef": coef, "capacity_factor": capacity}


def operator_defaults(operator: str) -> dict:
    path = CONF_DIR / "growth" / f"{operator}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def shape_line(s: dict) -> str:
    experts = f" experts={s['experts']} top_k={s['top_k']}" if s.get("experts") else ""
    return f"layers={s['layers']} hidden={s['hidden']} ffn={s['ffn']} heads={s['heads']}/{s['kv_heads']}{experts}"


def expand(args: list[str]) -> int:
    from orchestrator.offline.check import describe
    from orchestrator.offline.expand import grow_checkpoint, operator_named

    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    opts = parse_options(args, ("ckpt", "out", "growth"), KEYS)
    operator_named(opts["growth"])  # a known name before its defaults file is read
    defaults = operator_defaults(opts["growth"])
    shape = {k: int_option(opts, k, minimum=1) for k in SHAPE_KEYS if k in opts}
    shape.update(moe_options(opts))
    if not shape:
        raise UsageError(f"nothing to grow: give at least one of {', '.join(SHAPE_KEYS)}, experts")
    drop_ratio = float_option(opts, "drop_ratio", None) if "drop_ratio" in opts else defaults.get("drop_ratio")
    tolerance = float_option(opts, "tolerance", defaults.get("tolerance", 1e-5))
    record = grow_checkpoint(
        Path(opts["ckpt"]), Path(opts["out"]), opts["growth"], shape,
        ramp_steps=int_option(opts, "ramp_steps", defaults.get("ramp_steps", 0), minimum=0),
        layer_insert=opts.get("layer_insert", defaults.get("layer_insert", "append")),
        init=opts.get("init", defaults.get("init")), moments=opts.get("moments", defaults.get("moments")),
        seed=int_option(opts, "seed", 0, minimum=0), tolerance=tolerance,
        tolerance_bf16=tolerance if "tolerance" in opts else float(defaults.get("tolerance_bf16", 5e-3)),
        check=bool_option(opts, "check", True), overwrite=bool_option(opts, "overwrite", False),
        drop_ratio=drop_ratio)
    print(f"grew {shape_line(record['from_spec'])} -> {shape_line(record['to_spec'])} with {record['operator']}: "
          f"{record['out']}")
    if record["check"] is not None:
        verdict = "function preserved" if record["preserves_function"] else "function changed (not preserving)"
        print(f"check: {describe(record['check'])}: {verdict}")
    for w in record["warnings"]:
        print(f"grow: expand: warning: {w}", file=sys.stderr)
    return 0


def expand_command(args: list[str]) -> int:
    return run_reporting_errors("expand", lambda: expand(args))
