"""Render one sbatch script per stage from a template in slurm/ (shipped with the package).

Templates use `{{name}}` placeholders (so bash's own `${...}` stays untouched); an unknown
placeholder is an error. Secrets never land in a script: the job inherits the submitting
environment (sbatch's default --export=ALL), and any value that contains the value of a
secret-named environment variable (orchestrator.secrets: HF_TOKEN, *_PASSWORD, *_API_KEY, ...)
is written as a reference to that variable instead; credentials inside a URL are refused.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from orchestrator.config.schema import RunConfig, StageConfig
from orchestrator.config.errors import ConfigError
from orchestrator.package_data import SLURM_TEMPLATE_DIR
from orchestrator.secrets import URL_USERINFO, secret_values

PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# a job's rendezvous port is submit.rdzv_port + its job id modulo this: two jobs that run at
# the same time get different ports unless their ids are a multiple of it apart
RDZV_PORT_SPAN = 1000


def _dq(text: str) -> str:
    return re.sub(r'([\\"$`])', r"\\\1", text)


def shell_word(text: str, secrets: dict[str, str]) -> str:
    """Quote `text` for bash; secret values become "${VAR}" references."""
    hits = [(text.find(v), v, n) for v, n in secrets.items() if v in text]
    if not hits:
        return shlex.quote(text)
    out, rest = '"', text
    while True:
        hits = sorted((rest.find(v), -len(v), v, n) for v, n in secrets.items() if v in rest)
        if not hits:
            return out + _dq(rest) + '"'
        pos, _, value, name = hits[0]
        out += _dq(rest[:pos]) + "${" + name + "}"
        rest = rest[pos + len(value):]


def scrub_line(line: str, secrets: dict[str, str]) -> str:
    """A raw shell line (setup, extra #SBATCH): secret values become ${VAR} references."""
    for value, name in sorted(secrets.items(), key=lambda kv: -len(kv[0])):
        line = line.replace(value, "${" + name + "}")
    return line


def check_no_url_credentials(texts: list[str]) -> None:
    for t in texts:
        if URL_USERINFO.search(t):
            raise ConfigError("submit", "a URL with user:password@ would be written into the sbatch "
                                        "script; pass credentials through the environment instead "
                                        "(e.g. MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")


def fill(template: str, values: dict[str, str], source: str) -> str:
    def sub(m):
        if m.group(1) not in values:
            raise ConfigError("submit.template", f"{source}: unknown placeholder {{{{{m.group(1)}}}}}; "
                                                 f"allowed: {', '.join(sorted(values))}")
        return str(values[m.group(1)])
    return PLACEHOLDER.sub(sub, template)


def template_path(name: str) -> Path:
    p = Path(name).expanduser()
    if not p.is_absolute() and not p.exists():
        p = SLURM_TEMPLATE_DIR / name
    if not p.is_file():
        raise ConfigError("submit.template", f"{name!r} not found (looked in {SLURM_TEMPLATE_DIR})")
    return p


def stage_ranks(cfg: RunConfig, index: int, stage: StageConfig) -> tuple[int, int]:
    """(nodes, ranks per node) for a stage: its layout's tp x pp x dp ranks, at most
    submit.tasks_per_node per node, on at least submit.nodes nodes. So each job gets the
    layout its stage needs, and the layout can change between stages."""
    s, lay = cfg.submit, stage.layout
    ranks = lay.tp * lay.pp * lay.dp
    nodes = max(s.nodes, -(-ranks // s.tasks_per_node))
    if ranks % nodes:
        raise ConfigError(f"schedule.stages.{index}.layout",
                          f"{ranks} ranks (tp={lay.tp} pp={lay.pp} dp={lay.dp}) do not split evenly over "
                          f"{nodes} nodes (submit.nodes={s.nodes}, submit.tasks_per_node={s.tasks_per_node})")
    return nodes, ranks // nodes


def elastic_nodes(cfg: RunConfig, index: int, stage: StageConfig) -> int | None:
    """The fewest nodes the stage may go on with (submit.min_nodes, elastic), or None when it
    needs all of them. Every node count from there up must give a whole data-parallel size
    that divides the batch: dp' = nodes' x ranks per node / (tp x pp)."""
    least = cfg.submit.min_nodes
    nodes, per_node = stage_ranks(cfg, index, stage)
    if least is None or least >= nodes:
        return None
    lay, mp = stage.layout, stage.layout.tp * stage.layout.pp
    micro = lay.micro_batch_size or stage.batch_size // lay.dp  # kept: micro-batches make up the rest
    for n in range(least, nodes):
        ranks = n * per_node
        dp = ranks // mp
        if ranks % mp or stage.batch_size % dp or (stage.batch_size // dp) % micro:
            raise ConfigError("submit.min_nodes", f"stage {stage.name} on {n} of its {nodes} nodes would have "
                                                  f"{ranks} ranks, which tp x pp = {mp} and batch_size="
                                                  f"{stage.batch_size} do not split into whole data-parallel "
                                                  f"ranks; allowed: a node count that does, or null")
    return least


def split_tensor_parallel(cfg: RunConfig, index: int, stage: StageConfig) -> str | None:
    """A warning when the stage's tensor-parallel groups would span nodes (Megatron puts a
    TP group on consecutive ranks, so it stays inside a node when tp divides the ranks per
    node); TP exchanges activations every layer and is slow across nodes."""
    nodes, per_node = stage_ranks(cfg, index, stage)
    tp = stage.layout.tp
    if nodes > 1 and per_node % tp:
        return (f"stage {stage.name}: tp={tp} does not divide the {per_node} ranks per node: its tensor-parallel "
                "groups span nodes, which is slow (raise submit.tasks_per_node or lower tp)")
    return None


def render_stage(cfg: RunConfig, index: int, stage: StageConfig, run_dir: Path, workdir: Path,
                 overrides: list[str], environ=None) -> str:
    s = cfg.submit
    secrets = secret_values(environ)
    check_no_url_credentials([*overrides, *s.setup, *s.extra_sbatch, *s.container])
    python = s.python or __import__("sys").executable
    nodes, per_node = stage_ranks(cfg, index, stage)
    use_torchrun = s.launcher == "torchrun" or (s.launcher == "auto" and nodes * per_node > 1)
    least = elastic_nodes(cfg, index, stage) if use_torchrun else None
    py = shlex.quote(python)
    if use_torchrun:
        # One agent per node (srun --ntasks-per-node=1). bash -c so that each node reads its own
        # SLURM_NODEID: the first node's agent hosts the rendezvous store (else whichever binds
        # first does, and losing that node loses the rendezvous); the endpoint is the head
        # node's address as Slurm knows it and a port of this job's own (see the template).
        # elastic (submit.min_nodes): torchrun re-forms the group on the nodes left after one dies
        # and restarts the ranks, which resume from the last checkpoint on the smaller layout
        nnodes = f"{least}:{nodes} --max-restarts=3" if least else str(nodes)
        launch = ("bash -c 'exec \"$PYTHON\" -m torch.distributed.run "
                  f"--nnodes={nnodes} --nproc_per_node={per_node} --rdzv_backend=c10d "
                  '--rdzv_endpoint="$HEAD_ADDR:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID" '
                  '--rdzv_conf="is_host=$(( SLURM_NODEID == 0 ))" -m orchestrator.cli "$@"\' grow')
    else:
        launch = f"{py} -m orchestrator.cli"
    sbatch = []
    if s.gpus_per_node:
        sbatch.append(f"--gpus-per-node={s.gpus_per_node}")
    for key in ("mem", "partition", "account", "qos"):
        if getattr(s, key) is not None:
            sbatch.append(f"--{key}={getattr(s, key)}")
    if least:
        sbatch.append("--no-kill")  # a node's death leaves the job running on the others
    sbatch += s.extra_sbatch
    sbatch_lines = "\n".join("#SBATCH " + scrub_line(x if x.startswith("-") else "--" + x, secrets)
                             for x in sbatch)
    values = {
        "index": str(index), "stage": stage.name, "stage_q": shlex.quote(stage.name),
        "job_name": f"grow-{run_dir.name}-{index}-{stage.name}"[:120],
        "run_dir": str(run_dir), "run_dir_q": shlex.quote(str(run_dir)),
        "log_dir": str(run_dir / "slurm" / "logs"), "workdir": shlex.quote(str(workdir)),
        "nodes": str(nodes), "tasks_per_node": str(per_node),
        "cpus_per_task": str(s.cpus_per_task), "time": s.time,
        "signal_delay_s": str(s.signal_delay_s), "max_failures": str(s.max_failures),
        "sbatch_lines": sbatch_lines,
        "setup_lines": "\n".join(scrub_line(x, secrets) for x in s.setup),
        "container": " ".join(shell_word(x, secrets) for x in s.container),
        "python": py, "launch": launch, "rdzv_port": str(s.rdzv_port),
        "srun_kill": "--no-kill --kill-on-bad-exit=0" if least else "--kill-on-bad-exit=1",
        "rdzv_port_span": str(min(RDZV_PORT_SPAN, 65536 - s.rdzv_port)),
        # srun passes USR1 on to its tasks; a torchrun task would die of it (and srun treats a
        # TERM to itself as a cancel), so TERM goes to every process of the job's steps:
        # the workers checkpoint, torchrun waits for them.
        "forward": ('scancel --signal=TERM "$SLURM_JOB_ID"' if use_torchrun
                    else 'kill -USR1 "$child" 2>/dev/null'),
        # the job's own grow run keeps the other submit.* settings out, but must know it is elastic
        "overrides": " ".join(shell_word(o, secrets) for o in
                              [*overrides, *([f"submit.min_nodes={least}"] if least else [])]),
    }
    path = template_path(s.template)
    return fill(path.read_text(), values, str(path))
