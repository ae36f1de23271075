"""The budget's checks (registered with orchestrator.config.checks): measured rates against
the cluster's peak, a loss fit the plan reads, and caps that pay for at least one step."""
from __future__ import annotations

from orchestrator.budget.loss_law import read_fit
from orchestrator.config.checks import check
from orchestrator.config.errors import ConfigError
from orchestrator.schedule import Schedule


@check("settings")
def cluster_rates(schedule: Schedule) -> None:
    c = schedule.cfg.cluster
    for name, tflops in c.achieved_tflops_per_gpu.items():
        if tflops > c.peak_tflops_per_gpu:
            raise ConfigError(f"cluster.achieved_tflops_per_gpu.{name}",
                              f"{tflops} is above cluster.peak_tflops_per_gpu={c.peak_tflops_per_gpu}")


@check("settings")
def loss_fit(schedule: Schedule) -> None:
    if schedule.cfg.plan.loss_fit is not None:
        read_fit(schedule.cfg.plan.loss_fit)  # a missing or foreign file is refused before anything runs


@check("schedule")
def caps_cover_a_step(schedule: Schedule) -> None:
    """A cap below the first step would stop a run before it starts: refuse it here."""
    b, first = schedule.cfg.budget, schedule[0]
    tokens = first.tokens_at(0)
    if b.max_tokens is not None and b.max_tokens < tokens:
        raise ConfigError("budget.max_tokens", f"{b.max_tokens} is below one step of stage "
                                               f"{first.name!r}; allowed: >= {tokens}")
    flops = first.flops_at(0)
    if b.max_flops is not None and b.max_flops < flops:
        raise ConfigError("budget.max_flops", f"{b.max_flops:.4g} is below one step of stage "
                                              f"{first.name!r}; allowed: >= {flops:.4g}")
