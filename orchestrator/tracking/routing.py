"""A mixture of experts' router load balance per stage, read back from metrics.jsonl.

Every training step of a mixture logs its routing (orchestrator.model.moe_metrics, through
the engine): moe/aux_loss (the load-balancing loss, top_k at perfect balance), moe/max_load
(the busiest expert's share x experts, 1.0 = balanced), moe/dropped_tokens (assignments over
capacity; 0 when dropless) and moe/tokens/expert_<e>. Those reach the stage's MLflow run as
step metrics; this module sums a stage's steps into one record for summary.json (an MLflow
artifact too) and the loss plot. Reading the file, not the loop's memory, keeps a resumed
stage's record whole (a step redone after a resume counts once: MetricsLog.read).
"""
from __future__ import annotations

EXPERT_PREFIX = "moe/tokens/expert_"


def stage_routing(points: list[dict]) -> dict[str, dict]:
    """{stage: its routing over all its logged steps} for the stages that logged any:
    token assignments per expert (summed over steps and layers, dropped ones included), each expert's share, the busiest
    expert's load over the stage (share x experts), the mean and last aux loss, the last
    step's max load, and dropped assignments (count and share)."""
    acc: dict[str, dict] = {}
    for p in points:
        if "moe/max_load" not in p:
            continue
        a = acc.setdefault(p["stage"], {"tokens": {}, "aux": [], "dropped": 0.0, "last": None})
        for k, v in p.items():
            if k.startswith(EXPERT_PREFIX):
                e = int(k[len(EXPERT_PREFIX):])
                a["tokens"][e] = a["tokens"].get(e, 0.0) + v
        a["aux"].append(p.get("moe/aux_loss", float("nan")))
        a["dropped"] += p.get("moe/dropped_tokens", 0.0)
        a["last"] = p
    out = {}
    for stage, a in acc.items():
        tokens = [a["tokens"].get(e, 0.0) for e in range(max(a["tokens"], default=-1) + 1)]
        total = sum(tokens)
        share = [t / total for t in tokens] if total else []
        out[stage] = {"steps": len(a["aux"]), "tokens_per_expert": tokens, "expert_share": share,
                      "max_load": max(share) * len(share) if share else None,
                      "max_load_last_step": a["last"]["moe/max_load"],
                      "aux_loss_mean": sum(a["aux"]) / len(a["aux"]),
                      "aux_loss_last_step": a["last"].get("moe/aux_loss"),
                      "dropped_tokens": a["dropped"],
                      "dropped_share": a["dropped"] / total if total else 0.0}  # the counts include the dropped
    return out


def with_routing(summary: dict, points: list[dict]) -> dict:
    """summary.json's stage entries with their `routing` (None for a dense stage)."""
    routing = stage_routing(points)
    for entry in summary["stages"]:
        entry["routing"] = routing.get(entry["name"])
    return summary
