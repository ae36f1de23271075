"""`grow import-hf` and `grow export-hf`: Hugging Face Llama or Mixtral <-> canonical checkpoint.

    grow import-hf src=HF_DIR out=CKPT [overwrite=false]
        (prints the `grow run` overrides that state the imported model; a tokenizer.json in
        HF_DIR is recorded, and a run from the import must use it)
    grow export-hf ckpt=CKPT out=HF_DIR [max_positions=2048] [masks=drop] [overwrite=false]

An existing non-empty out= is replaced only with overwrite=true, never the input; the
output appears whole or not at all. export-hf verifies the checkpoint first; an msg
checkpoint whose masks are below 1 exports only with masks=drop (the model before growth).
"""
from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.checkpoint.init_model import model_overrides
from orchestrator.commands.options import bool_option, int_option, parse_options, run_reporting_errors


def import_hf_args(args: list[str]) -> int:
    from orchestrator.offline.hf import import_hf

    opts = parse_options(args, ("src", "out"), ("src", "out", "overwrite"))
    out = Path(opts["out"])
    spec, tokenizer = import_hf(Path(opts["src"]), out, overwrite=bool_option(opts, "overwrite", False))
    experts = f" experts={spec.experts} top_k={spec.top_k}" if spec.is_moe else ""
    print(f"imported layers={spec.layers} hidden={spec.hidden} heads={spec.heads}/{spec.kv_heads} "
          f"vocab={spec.vocab}{experts} -> {opts['out']}")
    print(f"train it further (stage 1 of your schedule at this shape, or larger to grow it):\n  "
          f"{' '.join(continue_command(out, spec, tokenizer))}")
    return 0


def continue_command(out: Path, spec, tokenizer: dict | None) -> list[str]:
    """`grow run` from the import: its model stated as overrides, on its own tokenizer when
    the directory had one."""
    own = ["data.tokenizer.kind=hf", f"data.tokenizer.path={Path(tokenizer['file']).parent}"] if tokenizer else []
    return ["grow", "run", f"init_from={out.resolve()}", *own, *model_overrides(spec)]


def export_hf_args(args: list[str]) -> int:
    from orchestrator.offline.hf import export_hf

    opts = parse_options(args, ("ckpt", "out"), ("ckpt", "out", "max_positions", "masks", "overwrite"))
    spec, warnings = export_hf(Path(opts["ckpt"]), Path(opts["out"]),
                               max_positions=int_option(opts, "max_positions", 2048, minimum=1),
                               masks=opts.get("masks"), overwrite=bool_option(opts, "overwrite", False))
    for w in warnings:
        print(f"grow: export-hf: warning: {w}", file=sys.stderr)
    print(f"exported layers={spec.layers} hidden={spec.hidden} heads={spec.heads}/{spec.kv_heads} "
          f"-> {opts['out']} ({'MixtralForCausalLM' if spec.is_moe else 'LlamaForCausalLM'})")
    return 0


def import_command(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    return run_reporting_errors("import-hf", lambda: import_hf_args(args))


def export_command(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    return run_reporting_errors("export-hf", lambda: export_hf_args(args))
