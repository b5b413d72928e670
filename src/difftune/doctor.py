"""`difftune doctor`: validate config and dataset without training, and print the plan."""

from __future__ import annotations

from typing import Any

from difftune.config.schema import Config
from difftune.training.plan import make_plan


def diagnose(config: Config) -> dict[str, Any]:
    """Everything doctor reports, as JSON-ready data. Raises DatasetError on unusable data."""
    plan = make_plan(config)
    from difftune.models.registry import check_family_settings

    report = {"config_ok": True, "plan": plan.to_json(), "warnings": list(plan.warnings)}
    report["warnings"] += check_family_settings(config)  # a setting of the other objective raises here
    from difftune.network.textual_inversion import token_notes

    report["warnings"] += token_notes(config.network, plan.train_records)  # a token in no caption raises here
    report["warnings"] += advice(config, plan.total_steps)
    from difftune.optim.advice import lr_summary

    report["extra"] = {**report.get("extra", {}), **lr_summary(config, plan.total_steps)}
    from difftune.model_facts import model_facts

    facts = model_facts(config)  # counted on a weightless copy of the model, or remembered
    from difftune.training.option_advice import loss_and_noise_lines, option_warnings

    report["warnings"] += option_warnings(config, prediction_type(config, facts), plan.total_steps)
    report["extra"] = {**report["extra"], **loss_and_noise_lines(config)}
    if config.network.type not in (None, "none"):
        from difftune.network.facts import format_facts

        report["network"] = facts["network"]
        report["extra"] = {**report["extra"], **format_facts(report["network"])}
    memory, memory_warnings = memory_lines(config)
    from difftune.data.latent_cache import describe

    memory["latents"] = describe(config.data, plan.train_records, config.output.dir)
    masking = mask_line(config, plan.train_records)
    if masking:
        report["extra"]["masked loss"] = masking
    report["extra"] = {**report["extra"], **memory}
    report["warnings"] += memory_warnings
    budget = facts["memory_budget"]
    if budget is not None:
        from difftune.training.memory_budget import format_budget

        report["memory_budget"] = budget
        report["extra"] = {**report["extra"], **format_budget(budget)}
    return report


def prediction_type(config: Config, facts: dict[str, Any]) -> str | None:
    """What the denoiser predicts: the config's choice, else the model's (None when unknown)."""
    if config.model.prediction_type != "auto":
        return config.model.prediction_type
    return facts.get("prediction_type")


def memory_lines(config: Config) -> tuple[dict[str, str], list[str]]:
    """What training will cache, the dtype of the frozen weights and the blocks swapped (training/memory),
    as a GPU run resolves them, with the checks that need no GPU: doctor may run on another machine than
    the training (a CPU run stores every frozen part in fp32)."""
    import torch

    from difftune.training.memory import memory_plan

    cuda = torch.cuda.is_available()
    plan = memory_plan(config, cuda=True, check_device=False)  # what a GPU run holds, wherever doctor runs
    warnings = list(plan.notes)
    blocks = None
    if plan.blocks_to_swap:
        if not cuda:
            warnings.append(f"train.blocks_to_swap = {plan.blocks_to_swap} needs a CUDA GPU, and this machine has none")
        from difftune.models import weightless_model
        from difftune.training.memory.block_swap import BlockSwap

        architecture = weightless_model(config.model)
        if architecture is not None:
            blocks = len(architecture.denoiser_blocks()) if hasattr(architecture, "denoiser_blocks") else None
            BlockSwap.for_model(architecture, plan.blocks_to_swap, torch.device("cpu"))  # the same errors as train
    return plan.lines(blocks), warnings


def mask_line(config: Config, records) -> str | None:
    """Which training images weight their loss by a mask (data.alpha_mask, data.mask_dir, a subset's)."""
    if config.data.alpha_mask:
        return "each image's alpha channel weights its loss (data.alpha_mask; an image without one trains everywhere)"
    masked = sum(r.mask_path is not None for r in records if not r.is_reg)
    if not masked:
        return None
    trained = sum(not r.is_reg for r in records)
    return f"{masked} of {trained} training images weight their loss by a mask file (mask_dir)"


def advice(config: Config, total_steps: int) -> list[str]:
    """Experience-based warnings from the optimizer/schedule catalogue."""
    from difftune.optim.advice import optimizer_warnings

    return optimizer_warnings(config, total_steps)


def bucket_lines(buckets: list[dict[str, Any]]) -> list[str]:
    """The training images' aspect-ratio buckets (data/buckets.py), tall to wide."""
    if not buckets:
        return []
    lines = ["", "buckets (width x height: images, batches per epoch):"]
    for row in buckets:
        width, height = row["resolution"]
        lines.append(f"  {f'{width}x{height}':<11} images {row['images']:<6} batches {row['batches']}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    plan = report["plan"]
    lines = ["config: OK", "", "images per folder (repeats, train, val, samples per epoch):"]
    for folder, c in sorted(plan["folders"].items()):
        kind = " (reg)" if c.get("reg") else ""
        lines.append(f"  {folder + kind:<40} x{c['repeats']:<4} train {c['train']:<6} val {c['val']:<5} "
                     f"samples {c.get('samples', 0)}")
    lines += [
        "",
        f"train images          {plan['train_images']}"
        + (f" (+ {plan['reg_images']} regularisation)" if plan.get("reg_images") else ""),
        f"validation images     {plan['val_images']}",
        f"samples per epoch     {plan['samples_per_epoch']} (with repeats)",
        f"effective batch size  {plan['effective_batch_size']}",
        f"steps per epoch       {plan['steps_per_epoch']}",
        f"epochs                {plan['epochs']}",
        f"total steps           {plan['total_steps']}",
    ]
    lines += bucket_lines(plan.get("buckets", []))
    for key, value in report.get("extra", {}).items():
        lines.append(f"{key:<21} {value}")
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines)
