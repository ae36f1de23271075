"""Typed schema of a run's configuration: the ground floor every other package reads.

Hydra composes plain YAML; `orchestrator.config.parse` builds these dataclasses from it
(unknown keys, types, and each field's own constraints, declared beside it with
`Annotated`), before any compute is spent. What relates several fields, or needs the
resolved schedule, is checked by the package that owns it (orchestrator.config.checks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Dict, List, Optional

from growth_ops.spec import ModelSpec

from orchestrator.config.constraints import (ONE_LINE, Matches, NonNegative, NotEmpty, OneOf, Positive,
                                             Within)

_POS = Positive()
SEED_MAX = 2**32 - 1  # numpy's limit; torch seeds derived from it (seed x 1_000_003 + i) fit 64 bits
BYTE_VOCAB = 257  # data.tokenizer.kind=byte: 256 byte values and the end-of-document id
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_FRACTION = Within(0, 1, lo_open=True, message="must be in {interval}, got {value}")  # (0, 1]


@dataclass
class MupConfig:
    """muP's base shape and multipliers (used when model.parametrization=mup; see
    growth_ops.spec.ModelSpec). model.init_std is the base shape's init std."""

    base_hidden: Annotated[Optional[int], _POS] = None  # the base shape's hidden size; null: the first stage's
    output_mult: Annotated[float, _POS] = 1.0  # logits x output_mult / m, m = hidden / base_hidden
    embed_mult: Annotated[float, _POS] = 1.0  # embedding output x embed_mult
    attn_scale: Annotated[str, OneOf("inv", "sqrt")] = "inv"  # inv: scores / head_dim (muP) | sqrt: / sqrt(head_dim)


@dataclass
class ModelConfig:
    """Architecture options fixed for the whole schedule (shapes live in the stages); the
    defaults are the canonical model's (growth_ops.spec.ModelSpec)."""

    norm: Annotated[str, OneOf("rmsnorm", "layernorm")] = ModelSpec.norm
    mlp: Annotated[str, OneOf("swiglu", "gelu")] = ModelSpec.mlp
    position: Annotated[str, OneOf("rope", "alibi")] = ModelSpec.position
    rope_theta: Annotated[float, _POS] = ModelSpec.rope_theta
    tie_embeddings: bool = ModelSpec.tie_embeddings
    norm_eps: Annotated[float, _POS] = ModelSpec.norm_eps
    init_std: Annotated[float, _POS] = ModelSpec.init_std
    # standard | mup (model.mup.* then applies)
    parametrization: Annotated[str, OneOf("standard", "mup")] = ModelSpec.parametrization
    mup: MupConfig = field(default_factory=MupConfig)
    vocab_size: Annotated[Optional[int], _POS] = None  # null: the tokenizer's, padded to vocab_multiple
    vocab_multiple: Annotated[int, _POS] = 64


@dataclass
class ShapeConfig:
    """head_dim = hidden / heads, and it must stay fixed across growth (RoPE's
    frequencies depend on it), so width growth adds heads."""

    layers: Annotated[int, _POS] = 2
    hidden: Annotated[int, _POS] = 64
    ffn: Annotated[int, _POS] = 172
    heads: Annotated[int, _POS] = 2
    kv_heads: Annotated[Optional[int], _POS] = None  # null: same as heads (multi-head attention)


@dataclass
class LRConfig:
    peak: Annotated[Optional[float], _POS] = None  # null: inherit the learning rate the last stage ended at
    warmup_steps: Annotated[int, NonNegative] = 0  # linear 0 -> peak; after a growth this is the re-warm
    min: Annotated[float, NonNegative] = 0.0  # floor of the decay
    decay: Annotated[str, OneOf("cosine", "linear", "constant", "wsd")] = "cosine"
    # wsd (warmup-stable-decay, across stages): every stage holds its peak after the warmup;
    # the last stage alone decays, linearly to `min`, over its final decay_fraction of the
    # whole schedule's tokens (read from the last stage; it must fit after its warmup).
    decay_fraction: Annotated[float, Within(0, 1, lo_open=True, message="{value} is not in {interval}")] = 0.2


@dataclass
class GrowthConfig:
    """How a stage's shape is reached from the previous one. Null fields inherit the
    top-level `growth` group."""

    # msg | zero | clone | stack | upcycle | drop_upcycle (stack and drop_upcycle do not preserve the function)
    operator: Optional[str] = None
    ramp_steps: Optional[int] = None  # steps for the masks to go 0 -> 1 (msg only)
    layer_insert: Optional[str] = None  # append | interleave | "i,j": positions of the new blocks
    tolerance: Annotated[Optional[float], _POS] = None  # max |val_after - val_before| for preserving operators
    # the same where the check itself runs in bf16 (deepspeed bf16)
    tolerance_bf16: Annotated[Optional[float], _POS] = None
    init: Optional[str] = None  # new weights: random | copy (msg); null: the operator's own
    moments: Optional[str] = None  # Adam moments: keep | staged; null: the operator's default
    # drop_upcycle: share of each expert's intermediate dims re-initialised; null: 0.5 (Drop-Upcycling's)
    drop_ratio: Annotated[Optional[float], Within(0, 1)] = None


@dataclass
class MoEConfig:
    """A stage's mixture-of-experts FFN (orchestrator.model.MoE); a stage without it is dense.
    A dense stage followed by one with `moe` grows by `growth.operator: upcycle` (or
    drop_upcycle); a mixture keeps its experts and top_k from then on."""

    experts: Annotated[int, Within(2, 2**20, message="must be >= 2 (one expert is a dense FFN), got {value}")] = 8
    top_k: Annotated[int, _POS] = 2  # experts per token, <= experts
    router: Annotated[str, OneOf("softmax_topk")] = "softmax_topk"  # softmax, top-k, renormalised to sum 1
    aux_loss_coef: Annotated[float, NonNegative] = 0.01  # load-balancing loss weight in the training objective
    # null: dropless; else each expert trains on at most ceil(factor x tokens x top_k / experts)
    # token assignments per micro-batch (the rest are dropped); evaluation is always dropless
    capacity_factor: Annotated[Optional[float], _POS] = None
    # ranks the experts are spread over; only 1 for now (every rank holds every expert, tensor
    # parallelism splits each expert's FFN)
    expert_parallel: Annotated[int, _POS] = 1


@dataclass
class PositionConfig:
    """RoPE's scaling from this stage on (model.position=rope only); neither option preserves
    the function, so the runner reports the validation loss change at the switch. Null:
    as the stage before (the first stage: model.rope_theta, no interpolation)."""

    rope_theta: Annotated[Optional[float], _POS] = None  # base frequency (base-frequency adjustment)
    # linear position interpolation: positions / this; 1: none
    interpolation: Annotated[Optional[float], _POS] = None


@dataclass
class LayoutConfig:
    tp: Annotated[int, _POS] = 1
    pp: Annotated[int, _POS] = 1
    dp: Annotated[int, _POS] = 1
    micro_batch_size: Annotated[Optional[int], _POS] = None  # null: the whole per-rank batch at once


@dataclass
class StageConfig:
    name: Annotated[str, Matches(r"^[^/]+$", "must be a non-empty name without '/'")] = "???"
    shape: ShapeConfig = field(default_factory=ShapeConfig)
    # training tokens; rounded down to whole steps (batch_size x the step's context)
    tokens: Annotated[int, _POS] = 0
    batch_size: Annotated[int, _POS] = 16  # sequences per global batch
    seq_len: Annotated[int, _POS] = 128
    # BTLM-style mixture of contexts within the stage: this fraction of the steps (spread
    # evenly, fixed by the step number) trains batch_size sequences of long_seq_len tokens.
    long_seq_len: Annotated[Optional[int], _POS] = None
    long_fraction: Annotated[float, Within(0, 1)] = 0.0
    position: PositionConfig = field(default_factory=PositionConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    growth: Optional[GrowthConfig] = None  # null on the first stage
    moe: Optional[MoEConfig] = None  # null: a dense FFN
    mixture: Dict[str, float] = field(default_factory=dict)  # weights over data.sources; {}: all equal
    layout: LayoutConfig = field(default_factory=LayoutConfig)


@dataclass
class ScheduleConfig:
    name: str = "default"
    stages: Annotated[List[StageConfig], NotEmpty("needs at least one stage")] = field(default_factory=list)


@dataclass
class TokenizerConfig:
    kind: Annotated[str, OneOf("byte", "bpe", "hf")] = "byte"
    vocab_size: Annotated[int, _POS] = 4096  # bpe only
    # hf only: a Hugging Face tokenizer.json, or a directory holding one (a model directory;
    # its tokenizer_config.json / special_tokens_map.json name eos and bos)
    path: Annotated[Optional[str], ONE_LINE] = None
    train_chars: Annotated[int, _POS] = 20_000_000  # bpe only: characters of training text to learn from
    # bpe only: each source's share of those characters, ratios summing to 1 (e.g. English
    # 0.535, Chinese 0.465); {}: the first train_chars of the sources in config order.
    train_mix: Dict[str, float] = field(default_factory=dict)


@dataclass
class SourceConfig:
    kind: str = "embedded"  # embedded | stdlib_code | stdlib_prose | people_daily | files | indexed
    # files: files or directories; indexed: Megatron dataset prefixes (.../name_text_document)
    paths: List[str] = field(default_factory=list)
    format: Annotated[str, OneOf("auto", "text", "jsonl")] = "auto"
    jsonl_key: str = "text"
    glob: str = "*"  # files in directories that are read


@dataclass
class DataConfig:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sources: Annotated[Dict[str, SourceConfig], NotEmpty("needs at least one source")] = field(default_factory=dict)
    # of documents, chosen by a hash of their name
    val_fraction: Annotated[float, Within(0, 1, lo_open=True, hi_open=True)] = 0.02
    cache_dir: str = "~/.cache/growth-orchestrator"
    # processes that tokenize a source into the cache (grow prepare's workers=): 1 keeps a
    # laptop run to one core; more for a big corpus on a machine with cores to spare
    prepare_workers: Annotated[int, _POS] = 1


@dataclass
class TrainConfig:
    weight_decay: Annotated[float, NonNegative] = 0.1
    beta1: Annotated[float, Within(0, 1, hi_open=True)] = 0.9
    beta2: Annotated[float, Within(0, 1, hi_open=True)] = 0.95
    eps: Annotated[float, _POS] = 1e-8
    grad_clip: Annotated[float, NonNegative] = 1.0  # 0: off
    eval_every_steps: Annotated[int, _POS] = 100
    eval_batches: Annotated[int, _POS] = 4
    log_every_steps: Annotated[int, _POS] = 10
    # torch.compile of the model's forward and loss (each stage compiles once: a growth changes shapes)
    compile: bool = False
    # torch.compile's mode; on the CPU only default and max-autotune-no-cudagraphs (the others need CUDA graphs)
    compile_mode: Annotated[str, OneOf(*COMPILE_MODES)] = "default"


@dataclass
class CheckpointConfig:
    every_steps: Annotated[int, _POS] = 100
    keep: Annotated[int, _POS] = 2  # newest mid-stage checkpoints kept per stage; stage-final ones are kept
    # With checkpoints present but none intact, a run refuses to start over unless this is true.
    allow_fresh_start: bool = False


@dataclass
class EngineConfig:
    name: str = "local"  # local | deepspeed (tp/pp/dp per stage in schedule.stages.N.layout)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16
    threads: Annotated[Optional[int], _POS] = None  # torch intra-op threads; null: torch's default
    zero_stage: int = 1  # deepspeed: ZeRO stage (1 or 2; 2 only with pp=1; 3 refused)
    timeout_s: Annotated[float, _POS] = 120.0  # deepspeed: process-group timeout, how long a stalled rank is awaited


@dataclass
class ClusterConfig:
    """The machine a schedule runs on, for `grow plan` and the in-run budget projection.
    Time = FLOPs / (GPUs x TFLOP/s per GPU); a stage's TFLOP/s per GPU is its entry in
    `achieved_tflops_per_gpu` if there is one, else peak x expected_mfu."""

    name: str = "local"
    usd_per_gpu_hour: Annotated[float, NonNegative] = 0.0
    peak_tflops_per_gpu: Annotated[float, _POS] = 1.0  # for MFU
    gpus: Annotated[int, _POS] = 1  # GPUs a stage's layout may use (tp x pp x dp <= gpus)
    # null: one node; tensor parallelism should stay within a node
    gpus_per_node: Annotated[Optional[int], _POS] = None
    # null: not checked; else model states must fit per GPU
    gpu_memory_gb: Annotated[Optional[float], _POS] = None
    expected_mfu: Annotated[float, _FRACTION] = 0.4  # fraction of peak a stage reaches when not measured
    # stage name -> measured
    achieved_tflops_per_gpu: Dict[str, Annotated[float, _POS]] = field(default_factory=dict)
    # checkpoint storage bandwidth in GB/s, for the time of a growth transition in `grow plan`;
    # 0.078 was measured on the development machine's disk (dd, 2 GiB, fdatasync)
    storage_gbps: Annotated[float, _POS] = 0.078


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # null: MLflow's default, sqlite:///<cwd>/mlflow.db
    experiment: str = "growth"
    flush_every_s: Annotated[float, _POS] = 15.0  # metrics.jsonl has every point at once; MLflow gets them in batches


@dataclass
class BudgetConfig:
    max_usd: Annotated[Optional[float], _POS] = None
    max_flops: Annotated[Optional[float], _POS] = None
    max_tokens: Annotated[Optional[int], _POS] = None
    # fractions of each cap
    warn_at: List[Annotated[float, Within(0, 1, lo_open=True, message="must be a fraction in {interval}, got {value}")]] = \
        field(default_factory=lambda: [0.5, 0.8, 0.9])
    project_after_steps: Annotated[int, _POS] = 5  # measured steps of a stage before the cost projection speaks


@dataclass
class PlanConfig:
    """`grow plan`: the cost of a schedule before anything runs (orchestrator/planner.py)."""

    fit: bool = False  # scale the stages' tokens so the plan fits budget.max_* (and uses it)
    # proportional: every stage's tokens x the same factor
    fit_rule: Annotated[str, OneOf("proportional")] = "proportional"
    # activation recomputation (time, not model FLOPs)
    recompute: Annotated[str, OneOf("none", "selective", "full")] = "none"
    # A loss fit from `grow predict` (loss_fit.json): grow plan shows each stage's predicted
    # loss; a finished grow run records predicted vs actual final val loss
    loss_fit: Optional[str] = None


@dataclass
class SubmitConfig:
    """`grow submit`: one sbatch job per stage, chained with --dependency=afterok.
    Templates live in slurm/; `grow run` inside the job runs just that stage."""

    template: str = "stage.sbatch"  # file in slurm/ (or a path): string.Template placeholders
    nodes: Annotated[int, _POS] = 1  # at least this many; more when a stage's layout needs more ranks than fit
    # elastic: a stage whose (non-head) node dies goes on with this many nodes or more (torchrun
    # re-forms the group; data parallelism shrinks, micro-batches keep the global batch); null: never
    min_nodes: Annotated[Optional[int], _POS] = None
    # max ranks (torchrun --nproc_per_node) per node; a stage runs tp*pp*dp ranks
    tasks_per_node: Annotated[int, _POS] = 1
    gpus_per_node: Annotated[int, NonNegative] = 0  # 0: no --gpus-per-node line
    cpus_per_task: Annotated[int, _POS] = 1
    # e.g. 64G; null: the partition's default
    mem: Annotated[Optional[str], Matches(r"^\d+[KMGT]?$", "{value!r}; allowed: a number with K, M, G or T (e.g. 64G)")] = None
    # per job (per requeue); [D-]HH:MM:SS or minutes
    time: Annotated[str, Matches(r"^(\d+-)?\d+(:\d{1,2}){0,2}$",
                                 "{value!r} is not a Slurm time; allowed: MM, HH:MM:SS, D-HH:MM:SS")] = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    extra_sbatch: List[Annotated[str, ONE_LINE]] = field(default_factory=list)  # extra lines, e.g. "--constraint=h100"
    setup: List[Annotated[str, ONE_LINE]] = field(default_factory=list)  # shell lines before srun: module load, source venv
    container: List[Annotated[str, ONE_LINE]] = field(default_factory=list)  # srun flags, e.g. --container-image=...
    # auto: torchrun when a stage has > 1 rank
    launcher: Annotated[str, OneOf("auto", "torchrun", "python")] = "auto"
    rdzv_port: Annotated[int, _POS, Within(1, 65535, message="{value} is not a TCP port; allowed: 1..65535")] = 29500
    python: Optional[str] = None  # interpreter inside the job; null: the one running grow submit
    # --signal=B:USR1@this: save and requeue this long before the limit
    signal_delay_s: Annotated[int, NonNegative] = 120
    max_failures: Annotated[int, _POS] = 3  # consecutive failed attempts of a stage before it stops requeueing
    dry_run: bool = False  # write and print the scripts, submit nothing


@dataclass
class RunSelectConfig:
    only_stage: Optional[str] = None  # run just this stage (growing into it first), then stop


@dataclass
class RunConfig:
    seed: Annotated[int, Within(0, SEED_MAX)] = 0
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
