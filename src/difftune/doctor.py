"""`difftune doctor`: validate config and dataset without training, and print the plan."""

from __future__ import annotations

from typing import Any

from difftune.config.schema import Config
from difftune.training.plan import make_plan


def diagnose(config: Config) -> dict[str, Any]:
    """Everything doctor reports, as JSON-ready data. Raises DatasetError on unusable data."""
    plan = make_plan(config)
    report = {"config_ok": True, "plan": plan.to_json(), "warnings": list(plan.warnings)}
    report["warnings"] += advice(config, plan.total_steps)
    from difftune.optim.advice import lr_summary

    report["extra"] = {**report.get("extra", {}), **lr_summary(config, plan.total_steps)}
    if config.network.type not in (None, "none"):
        from difftune.network.facts import format_facts, network_facts

        report["network"] = network_facts(config)  # built on a weightless copy of the model
        report["extra"] = {**report["extra"], **format_facts(report["network"])}
    return report


def advice(config: Config, total_steps: int) -> list[str]:
    """Experience-based warnings from the optimizer/schedule catalogue."""
    from difftune.optim.advice import optimizer_warnings

    return optimizer_warnings(config, total_steps, full_finetune=config.network.type in (None, "none"))


def format_report(report: dict[str, Any]) -> str:
    plan = report["plan"]
    lines = ["config: OK", "", "images per folder (repeats, train, val):"]
    for folder, c in sorted(plan["folders"].items()):
        lines.append(f"  {folder:<40} x{c['repeats']:<4} train {c['train']:<6} val {c['val']}")
    lines += [
        "",
        f"train images          {plan['train_images']}",
        f"validation images     {plan['val_images']}",
        f"samples per epoch     {plan['samples_per_epoch']} (with repeats)",
        f"effective batch size  {plan['effective_batch_size']}",
        f"steps per epoch       {plan['steps_per_epoch']}",
        f"epochs                {plan['epochs']}",
        f"total steps           {plan['total_steps']}",
    ]
    for key, value in report.get("extra", {}).items():
        lines.append(f"{key:<21} {value}")
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines)
