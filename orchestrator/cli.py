"""`grow` command line: the registry of commands and main().

Each command lives in orchestrator/commands/ (one module per verb, offline tools in
orchestrator/offline/); exit statuses and their one-line messages are orchestrator/exits.py.
"""
from __future__ import annotations

import importlib
import signal
import sys

from orchestrator.exits import EXIT_CONFIG, fail
from orchestrator.secrets import masked_output

# name -> ("module:function", help). A command function takes the remaining argv and
# returns an exit status; modules are imported only when their command runs (so `grow run`
# installs its signal handlers before torch loads, and `grow status` never loads it).
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("orchestrator.commands.run:run_command",
            "train a growth schedule (grow run hydra.run.dir=runs/x schedule=tiny [--config-dir DIR]);\n"
            "          again on the same hydra.run.dir resumes where it stopped"),
    "plan": ("orchestrator.commands.plan:plan_command",
             "cost of a schedule before it runs: per stage and vs from scratch, budget check\n"
             "          (grow plan schedule=flm101b cluster=a800_192 [budget.max_usd=N plan.fit=true])"),
    "search": ("orchestrator.commands.search:search_command",
               "sweep hyperparameters on a proxy, choose the best by val loss, print the overrides for a target\n"
               "          (grow search schedule=proxy search.space=lr_init [search.target=SCHEDULE hydra/launcher=slurm_cpu])"),
    "predict": ("orchestrator.commands.predict:predict_command",
                "fit L(N, D) = E + A/N^alpha + B/D^beta, with intervals, to a grid of proxies; predict a\n"
                "          schedule's losses (grow predict schedule=proxy predict.widths=16,24,32,48\n"
                "          predict.tokens=131072,262144,524288 predict.seeds=0,1,2 [predict.target=SCHEDULE])"),
    "submit": ("orchestrator.commands.submit:submit_command",
               "one chained Slurm job per stage (grow submit hydra.run.dir=runs/x [submit.dry_run=true])"),
    "status": ("orchestrator.commands.status:status_command",
               "a submitted run's stages: job ids, state, requeues, tokens, spend (grow status run_dir=DIR)"),
    "prepare": ("orchestrator.commands.prepare:prepare_command",
                "text or JSONL -> a Megatron indexed dataset (.bin/.idx/.json), parallel and resumable\n"
                "          (grow prepare input=corpus.jsonl output=DIR/name_text_document [workers=2\n"
                "          jsonl_key=text data.tokenizer.kind=hf data.tokenizer.path=DIR overwrite=false])"),
    "grow": ("orchestrator.commands.expand:expand_command",
             "grow a checkpoint on disk, tensor by tensor, checked (grow grow ckpt=SRC out=DST growth=clone\n"
             "          hidden=256 ffn=1024 [layers= heads= kv_heads= layer_insert= init= moments= ramp_steps=\n"
             "          seed= check=true overwrite=false]; defaults from conf/growth/<growth>.yaml"),
    "expand": ("orchestrator.commands.expand:expand_command", "same as grow grow"),
    "import-hf": ("orchestrator.commands.hf:import_command",
                  "Hugging Face Llama -> canonical checkpoint (grow import-hf src=HF_DIR out=CKPT [overwrite=])"),
    "export-hf": ("orchestrator.commands.hf:export_command",
                  "canonical checkpoint -> LlamaForCausalLM dir (grow export-hf ckpt=CKPT out=HF_DIR\n"
                  "          [masks=drop max_positions=2048 overwrite=])"),
}


def usage() -> str:
    lines = ["usage: grow <command> [args]", "", "commands:"]
    width = max(map(len, COMMANDS)) + 2
    lines += [f"  {name:<{width}}{help_.replace(chr(10) + ' ' * 10, chr(10) + ' ' * (width + 2))}"
              for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run, plan and submit read the shipped configs plus your own: --config-dir DIR "
                  "(DIR/schedule/mine.yaml is schedule=mine)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return fail(EXIT_CONFIG, f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
    module, func = COMMANDS[command][0].split(":")
    with masked_output():  # whatever a command prints (Hydra's and MLflow's lines too): secrets masked
        return getattr(importlib.import_module(module), func)(rest)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
