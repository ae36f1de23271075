"""Typed schema of a run's configuration.

Hydra composes plain YAML; `orchestrator.config.validate.load_config` checks it against these
dataclasses (unknown keys, types, ranges, shapes, growth reachability) and returns a
`RunConfig` before any compute is spent. Field comments document the allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from growth_ops.spec import ModelSpec


@dataclass
class MupConfig:
    """muP's base shape and multipliers (used when model.parametrization=mup; see
    growth_ops.spec.ModelSpec). model.init_std is the base shape's init std."""

    base_hidden: Optional[int] = None  # the base shape's hidden size; null: the first stage's
    output_mult: float = 1.0  # logits x output_mult / m, m = hidden / base_hidden
    embed_mult: float = 1.0  # embedding output x embed_mult
    attn_scale: str = "inv"  # inv: scores / head_dim (muP) | sqrt: / sqrt(head_dim)


@dataclass
class ModelConfig:
    """Architecture options fixed for the whole schedule (shapes live in the stages); the
    defaults are the canonical model's (growth_ops.spec.ModelSpec)."""

    norm: str = ModelSpec.norm  # rmsnorm | layernorm
    mlp: str = ModelSpec.mlp  # swiglu | gelu
    position: str = ModelSpec.position  # rope | alibi
    rope_theta: float = ModelSpec.rope_theta
    tie_embeddings: bool = ModelSpec.tie_embeddings
    norm_eps: float = ModelSpec.norm_eps
    init_std: float = ModelSpec.init_std
    parametrization: str = ModelSpec.parametrization  # standard | mup (model.mup.* then applies)
    mup: MupConfig = field(default_factory=MupConfig)
    vocab_size: Optional[int] = None  # null: the tokenizer's, padded to vocab_multiple
    vocab_multiple: int = 64


@dataclass
class ShapeConfig:
    """head_dim = hidden / heads, and it must stay fixed across growth (RoPE's
    frequencies depend on it), so width growth adds heads."""

    layers: int = 2
    hidden: int = 64
    ffn: int = 172
    heads: int = 2
    kv_heads: Optional[int] = None  # null: same as heads (multi-head attention)


@dataclass
class LRConfig:
    peak: Optional[float] = None  # null: inherit the learning rate the last stage ended at
    warmup_steps: int = 0  # linear 0 -> peak; after a growth this is the re-warm
    min: float = 0.0  # floor of the decay
    decay: str = "cosine"  # cosine | linear | constant | wsd
    # wsd (warmup-stable-decay, across stages): every stage holds its peak after the warmup;
    # the last stage alone decays, linearly to `min`, over its final decay_fraction of the
    # whole schedule's tokens (read from the last stage; it must fit after its warmup).
    decay_fraction: float = 0.2


@dataclass
class GrowthConfig:
    """How a stage's shape is reached from the previous one. Null fields inherit the
    top-level `growth` group."""

    operator: Optional[str] = None  # msg | zero | clone | stack (stack does not preserve the function)
    ramp_steps: Optional[int] = None  # steps for the masks to go 0 -> 1 (msg only)
    layer_insert: Optional[str] = None  # append | interleave | "i,j": positions of the new blocks
    tolerance: Optional[float] = None  # max |val_after - val_before| for preserving operators
    tolerance_bf16: Optional[float] = None  # the same where the check itself runs in bf16 (deepspeed bf16)
    init: Optional[str] = None  # new weights: random | copy (msg); null: the operator's own
    moments: Optional[str] = None  # Adam moments: keep | staged; null: the operator's default


@dataclass
class PositionConfig:
    """RoPE's scaling from this stage on (model.position=rope only); neither option preserves
    the function, so the runner reports the validation loss change at the switch. Null:
    as the stage before (the first stage: model.rope_theta, no interpolation)."""

    rope_theta: Optional[float] = None  # base frequency (base-frequency adjustment), > 0
    interpolation: Optional[float] = None  # linear position interpolation: positions / this; 1: none


@dataclass
class LayoutConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: Optional[int] = None  # null: the whole per-rank batch at once


@dataclass
class StageConfig:
    name: str = "???"
    shape: ShapeConfig = field(default_factory=ShapeConfig)
    tokens: int = 0  # training tokens; rounded down to whole steps (batch_size x the step's context)
    batch_size: int = 16  # sequences per global batch
    seq_len: int = 128
    # BTLM-style mixture of contexts within the stage: this fraction of the steps (spread
    # evenly, fixed by the step number) trains batch_size sequences of long_seq_len tokens.
    long_seq_len: Optional[int] = None
    long_fraction: float = 0.0  # in [0, 1]
    position: PositionConfig = field(default_factory=PositionConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    growth: Optional[GrowthConfig] = None  # null on the first stage
    mixture: Dict[str, float] = field(default_factory=dict)  # weights over data.sources; {}: all equal
    layout: LayoutConfig = field(default_factory=LayoutConfig)


@dataclass
class ScheduleConfig:
    name: str = "default"
    stages: List[StageConfig] = field(default_factory=list)


@dataclass
class TokenizerConfig:
    kind: str = "byte"  # byte | bpe
    vocab_size: int = 4096  # bpe only
    train_chars: int = 20_000_000  # bpe only: characters of training text to learn from
    # bpe only: each source's share of those characters, ratios summing to 1 (e.g. English
    # 0.535, Chinese 0.465); {}: the first train_chars of the sources in config order.
    train_mix: Dict[str, float] = field(default_factory=dict)


@dataclass
class SourceConfig:
    kind: str = "embedded"  # embedded | stdlib_code | stdlib_prose | people_daily | files
    paths: List[str] = field(default_factory=list)  # files: files or directories
    format: str = "auto"  # auto | text | jsonl
    jsonl_key: str = "text"
    glob: str = "*"  # files in directories that are read


@dataclass
class DataConfig:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    val_fraction: float = 0.02  # of documents, chosen by a hash of their name
    cache_dir: str = "~/.cache/growth-orchestrator"


@dataclass
class TrainConfig:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    eval_every_steps: int = 100
    eval_batches: int = 4
    log_every_steps: int = 10


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep: int = 2  # newest mid-stage checkpoints kept per stage; stage-final ones are kept
    # With checkpoints present but none intact, a run refuses to start over unless this is true.
    allow_fresh_start: bool = False


@dataclass
class EngineConfig:
    name: str = "local"  # local | deepspeed (tp/pp/dp per stage in schedule.stages.N.layout)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16
    threads: Optional[int] = None  # torch intra-op threads; null: torch's default
    zero_stage: int = 1  # deepspeed: ZeRO stage (1 or 2; 2 only with pp=1; 3 refused)
    timeout_s: float = 120.0  # deepspeed: process-group timeout, how long a stalled rank is awaited


@dataclass
class ClusterConfig:
    """The machine a schedule runs on, for `grow plan` and the in-run budget projection.
    Time = FLOPs / (GPUs x TFLOP/s per GPU); a stage's TFLOP/s per GPU is its entry in
    `achieved_tflops_per_gpu` if there is one, else peak x expected_mfu."""

    name: str = "local"
    usd_per_gpu_hour: float = 0.0
    peak_tflops_per_gpu: float = 1.0  # for MFU
    gpus: int = 1  # GPUs a stage's layout may use (tp x pp x dp <= gpus)
    gpus_per_node: Optional[int] = None  # null: one node; tensor parallelism should stay within a node
    gpu_memory_gb: Optional[float] = None  # null: not checked; else model states must fit per GPU
    expected_mfu: float = 0.4  # fraction of peak a stage reaches when not measured
    achieved_tflops_per_gpu: Dict[str, float] = field(default_factory=dict)  # stage name -> measured
    # checkpoint storage bandwidth in GB/s, for the time of a growth transition in `grow plan`;
    # 0.078 was measured on the development machine's disk (dd, 2 GiB, fdatasync)
    storage_gbps: float = 0.078


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # null: MLflow's default, sqlite:///<cwd>/mlflow.db
    experiment: str = "growth"
    flush_every_s: float = 15.0  # metrics.jsonl has every point at once; MLflow gets them in batches


@dataclass
class BudgetConfig:
    max_usd: Optional[float] = None
    max_flops: Optional[float] = None
    max_tokens: Optional[int] = None
    warn_at: List[float] = field(default_factory=lambda: [0.5, 0.8, 0.9])  # fractions of each cap
    project_after_steps: int = 5  # measured steps of a stage before the cost projection speaks


@dataclass
class PlanConfig:
    """`grow plan`: the cost of a schedule before anything runs (orchestrator/planner.py)."""

    fit: bool = False  # scale the stages' tokens so the plan fits budget.max_* (and uses it)
    fit_rule: str = "proportional"  # proportional: every stage's tokens x the same factor
    recompute: str = "none"  # none | selective | full: activation recomputation (time, not model FLOPs)
    # A loss fit from `grow predict` (loss_fit.json): grow plan shows each stage's predicted
    # loss; a finished grow run records predicted vs actual final val loss
    loss_fit: Optional[str] = None


@dataclass
class SubmitConfig:
    """`grow submit`: one sbatch job per stage, chained with --dependency=afterok.
    Templates live in slurm/; `grow run` inside the job runs just that stage."""

    template: str = "stage.sbatch"  # file in slurm/ (or a path): string.Template placeholders
    nodes: int = 1  # at least this many; more when a stage's layout needs more ranks than fit
    tasks_per_node: int = 1  # max ranks (torchrun --nproc_per_node) per node; a stage runs tp*pp*dp ranks
    gpus_per_node: int = 0  # 0: no --gpus-per-node line
    cpus_per_task: int = 1
    mem: Optional[str] = None  # e.g. 64G; null: the partition's default
    time: str = "01:00:00"  # per job (per requeue); [D-]HH:MM:SS or minutes
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    extra_sbatch: List[str] = field(default_factory=list)  # extra lines, e.g. "--constraint=h100"
    setup: List[str] = field(default_factory=list)  # shell lines before srun: module load, source venv
    container: List[str] = field(default_factory=list)  # srun flags, e.g. --container-image=...
    launcher: str = "auto"  # auto | torchrun | python (auto: torchrun when a stage has > 1 rank)
    rdzv_port: int = 29500
    python: Optional[str] = None  # interpreter inside the job; null: the one running grow submit
    signal_delay_s: int = 120  # --signal=B:USR1@this: save and requeue this long before the limit
    max_failures: int = 3  # consecutive failed attempts of a stage before it stops requeueing
    dry_run: bool = False  # write and print the scripts, submit nothing


@dataclass
class RunSelectConfig:
    only_stage: Optional[str] = None  # run just this stage (growing into it first), then stop


@dataclass
class RunConfig:
    seed: int = 0
    run_dir: str = "???"
    # A canonical checkpoint (e.g. from `grow import-hf`) that stage 1 starts from instead
    # of a fresh init; grown into stage 1's shape with stage 1's growth settings if smaller.
    init_from: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    run: RunSelectConfig = field(default_factory=RunSelectConfig)


def register_schema() -> None:
    """Make the schema Hydra's base config (`- schema` in conf/config.yaml), so every key
    of a stage exists with its default and can be overridden without a `+`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=RunConfig)
