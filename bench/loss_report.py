"""The figures of bench/loss_prediction.py from its finished runs: the law's parameters with
intervals, each held-out target predicted (with its interval) against its measured loss, the
grown-schedule correction measured on the small schedules, the fixed-token special case,
and the proxy grid's cost as a fraction of the targets'."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.common import RESULTS, console, table
from orchestrator.budget.law_fit import fit_report
from orchestrator.budget.loss_law import law_of, plot_fit, relative_error, schedule_prediction, stage_sizes
from orchestrator.commands.compose import CommandLine, load
from orchestrator.schedule import resolve


def _summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def measured(run_dirs: list[Path]) -> dict:
    """(N, tokens) of each stage (from the run's own overrides), the final val loss per seed,
    their mean, and the FLOPs of one seed's run."""
    overrides = json.loads(Path(str(run_dirs[0]) + ".overrides.json").read_text())
    stages = stage_sizes(resolve(load(CommandLine(overrides), planning=True)))
    losses = [_summary(d)["stages"][-1]["val_loss"] for d in run_dirs]
    return {"stages": stages, "losses": losses, "loss": statistics.fmean(losses),
            "flops": _summary(run_dirs[0])["totals"]["flops"]}


def growth_correction(fit: dict, small: dict[str, list[Path]]) -> dict:
    """The small grown schedules' relative gap to the law's carry-over prediction (no
    correction); its mean is the correction."""
    rows = {}
    for name, dirs in small.items():
        m = measured(dirs)
        predicted = schedule_prediction({**fit, "growth_correction": 0.0}, m["stages"])[-1]["predicted_loss"]
        rows[name] = {"stages": m["stages"], "loss": m["loss"], "law_carry_over": predicted,
                      "gap": m["loss"] / predicted - 1}
    gaps = [r["gap"] for r in rows.values()]
    if not gaps:
        return {"schedules": {}, "correction": 0.0, "spread": None, "note": "no small grown schedule finished"}
    return {"schedules": rows, "correction": statistics.fmean(gaps),
            "spread": (max(gaps) - min(gaps)) / 2 if len(gaps) > 1 else None}


def check(fit: dict, name: str, dirs: list[Path]) -> dict:
    m = measured(dirs)
    p = schedule_prediction(fit, m["stages"])[-1]
    return {"name": name, "n": m["stages"][-1][0], "tokens": sum(d for _, d in m["stages"]),
            "stages": len(m["stages"]), "loss": m["loss"], "seed_losses": m["losses"],
            "predicted": p["predicted_loss"], "lo": p["lo"], "hi": p["hi"],
            "rel_error": relative_error(p["predicted_loss"], m["loss"]),
            "interval_rel": [(m["loss"] - p["hi"]) / m["loss"], (m["loss"] - p["lo"]) / m["loss"]],
            "within_interval": p["lo"] <= m["loss"] <= p["hi"], "flops": m["flops"]}


def fixed_token_case(fit: dict, checks: list[dict], samples: int) -> dict:
    """The fixed-token law L(N) fitted to the proxies at the largest token count alone, and
    its error on the size targets at those tokens (the previous figure's method)."""
    d = max(p["tokens"] for p in fit["points"])
    points = [{"n": p["n"], "tokens": d, "width": p["width"], "loss": x}
              for p in fit["points"] if p["tokens"] == d for x in p["seed_losses"]]
    fixed = fit_report(points, samples=samples)
    law = law_of(fixed)
    return {"tokens": d, "parameters": fixed["parameters"], "lawful": fixed["lawful"], "verdict": fixed["verdict"],
            "checks": [{"name": c["name"], "predicted": law(c["n"]), "loss": c["loss"],
                        "rel_error": relative_error(law(c["n"]), c["loss"])}
                       for c in checks if c["tokens"] == d and c["stages"] == 1]}


def grid_flops(fit: dict) -> float:
    sweep = Path(fit["sweep_dir"])
    return sum(_summary(sweep / str(m))["totals"]["flops"] for p in fit["points"] for m in p["members"])


def report(a, fit: dict, held: dict[str, list[Path]], small: dict[str, list[Path]], chosen: dict, name: str) -> dict:
    correction = growth_correction(fit, small)
    fit = {**fit, "growth_correction": correction["correction"]}
    checks = [check(fit, name, dirs) for name, dirs in held.items()]
    proxies = grid_flops(fit)
    targets = sum(c["flops"] for c in checks) or float("nan")
    for c in checks:
        c["grid_cost_fraction"] = proxies / c["flops"]
    fixed = fixed_token_case(fit, checks, a.bootstrap)
    p = fit["parameters"]
    verdict = f"{'a law' if fit['lawful'] else 'NOT a law'}: {fit['verdict']}"
    table(f"{fit['law']} ({a.parametrization}): {verdict}",
          ["parameter", "value", "95% lo", "95% hi", "interval / value"],
          [[k, v["value"], v["lo"], v["hi"], f"{v['rel_width']:.2f}"] for k, v in {**p, **fit["derived"]}.items()])
    table(f"held out ({a.parametrization}; grid cost {proxies:.3g} FLOPs = {100 * proxies / targets:.1f}% of the "
          f"targets' {targets:.3g}; grown correction {100 * correction['correction']:+.2f}%)",
          ["target", "N", "tokens", "measured", "predicted [95%]", "rel. error", "in interval", "grid / target"],
          [[c["name"], c["n"], c["tokens"], c["loss"], f"{c['predicted']:.4f} [{c['lo']:.4f}, {c['hi']:.4f}]",
            f"{100 * c['rel_error']:.2f}%", c["within_interval"], f"{c['grid_cost_fraction']:.2f}"] for c in checks])
    extra = [{"n": c["n"], "tokens": c["tokens"], "loss": c["loss"], "predicted": c["predicted"], "lo": c["lo"],
              "hi": c["hi"], "label": f"{c['name']} ({100 * c['rel_error']:.2f}%)"} for c in checks]
    plot = plot_fit(fit, RESULTS / f"{name}.png", extra=extra,
                    title=f"{fit['law']}, {a.parametrization}: {'a law' if fit['lawful'] else 'NOT a law'}; "
                          "bands and bars: 95% bootstrap")
    console.print(f"wrote {plot}")
    return {"law": fit["law"], "form": fit["form"], "n": fit["n"], "parametrization": a.parametrization,
            "lawful": fit["lawful"],
            "verdict": fit["verdict"], "max_interval": fit["max_interval"], "parameters": p,
            "derived": fit["derived"], "reference": fit["reference"], "search": chosen,
            "points": fit["points"], "held_out_in_grid": fit["held_out"], "held_out": checks,
            "max_rel_error": max((c["rel_error"] for c in checks), default=None), "growth_correction": correction,
            "fixed_token_law": fixed, "grid_flops": proxies, "targets_flops": targets,
            "grid_cost_fraction_of_targets": proxies / targets, "bootstrap_samples": fit["bootstrap"]["samples"],
            "loss_fit": str(Path(fit["sweep_dir"]) / f"loss_fit.{fit['form']}.json"), "plot": str(plot),
            "note": "losses and FLOPs do not depend on the machine's load"}
