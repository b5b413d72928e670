"""`difftune auto`: find-lr → find-steps → the final model → report.html.

1. find-lr sweeps the LR on the configured setup and recommends a constant LR (`<output.dir>/find-lr/`).
2. find-steps trains at that LR with early stopping and keeps the best weights (`<output.dir>/find-steps/`).
3. The final model. Training is deterministic, so a rerun at the chosen LR to the best step would
   reproduce find-steps' best checkpoint bit for bit; by default (`auto.final_run = "reuse"`) that
   checkpoint *is* the final model and no compute is spent twice. `auto.final_run = "retrain"` trains
   it again into `<output.dir>/final/`; `auto.add_validation_back = true` retrains with the validation
   images added back (same number of epochs), which the community does to use every image, at the
   price of a run nothing measures.
   With `auto.compare_prodigy`, Prodigy trains the same budget beside it (`<output.dir>/compare-prodigy/`).
4. `report.html` (and `auto.json`) in `<output.dir>` link the plots and say what was chosen and why.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

from difftune.config.schema import Config
from difftune.tuning.common import constant_lr_changes, format_lr, sub_config

FINAL_FOLDER = "final"
PRODIGY_FOLDER = "compare-prodigy"


def auto(config: Config, show_progress: bool = True, log=print) -> dict[str, Any]:
    """Run the whole search and return what auto.json holds (holding output.dir's lock throughout)."""
    from difftune.training.run_lock import lock_run_dir

    with lock_run_dir(config.output.dir, "auto"):
        return _auto(config, show_progress, log)


def _auto(config: Config, show_progress: bool, log) -> dict[str, Any]:
    from difftune.checkpoint.atomic import atomic_write_json
    from difftune.tuning import lr_finder, step_finder

    started = time.perf_counter()
    root = Path(config.output.dir)
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"output_dir": str(root), "status": "ok", "warnings": []}

    log("== 1/3 find-lr ==")
    lr_result = lr_finder.find_lr(config, show_progress=show_progress)
    log(lr_finder.format_result(lr_result))
    result["find_lr"] = lr_result
    if lr_result["lr"] is None:
        result["status"] = "stopped"
        result["reason"] = f"find-lr could not recommend an LR: {lr_result['verdict']}"
        return _finish(result, root, started, atomic_write_json)
    if lr_result["status"] != "ok":
        result["warnings"].append(f"find-lr: {lr_result['verdict']}")
    lr = lr_result["lr"]
    config = sweep_text_encoders(config, lr, result, show_progress, log)

    log(f"== 2/3 find-steps at lr {lr:.3g} ==")
    steps_result = step_finder.find_steps(config, lr, show_progress=show_progress)
    log(step_finder.format_result(steps_result))
    result["find_steps"] = steps_result
    if steps_result["status"] != "ok":
        result["warnings"].append(f"find-steps: {steps_result['verdict']}")
    best_step = steps_result["best_step"]
    if not best_step:
        result["status"] = "stopped"
        result["reason"] = f"find-steps found no step that improves on the untrained model: {steps_result['verdict']}"
        return _finish(result, root, started, atomic_write_json)

    settings = config.auto
    if settings.compare_prodigy:
        log("== compare: Prodigy for the same budget ==")
        result["prodigy"] = compare_prodigy(config, steps_result, show_progress, log)
    result["chosen"] = {"lr": lr, "steps": best_step,
                        **{lr_finder.LR_KEYS[role]: e["lr"] for role, e in result.get("text_encoders", {}).items()
                           if e.get("lr")}}
    if settings.final_run == "retrain" or settings.add_validation_back:
        log("== 3/3 final run ==")
        result["final"] = final_run(config, lr, best_step, steps_result, show_progress)
        if settings.add_validation_back:
            result["warnings"].append(
                "the final run trained with the validation images added back: no validation loss measures it "
                "(it trains blind); its step count keeps find-steps' number of epochs"
            )
    else:
        log("== 3/3 final model: find-steps' best checkpoint (a rerun would give the same weights) ==")
        result["final"] = {"mode": "reuse", "model": steps_result["best_checkpoint"], "steps": best_step,
                           "val_loss": steps_result["best_loss"]}
    return _finish(result, root, started, atomic_write_json)


def sweep_text_encoders(config: Config, lr: float, result: dict[str, Any], show_progress: bool, log) -> Config:
    """With a trained text encoder (and auto.sweep_text_encoder): sweep each one's LR with the UNet held at
    `lr`, the first sweep's answer, and return the config that trains at all of them. The kohya guides'
    rule of thumb is a text-encoder LR 5-10x below the UNet's; the measured ratio goes in the report."""
    from difftune.models.registry import trained_roles
    from difftune.optim.optimizers import get_spec
    from difftune.tuning import lr_finder

    encoders = [r for r in trained_roles(config) if r in ("text_encoder", "text_encoder_2")]
    if not encoders or not config.auto.sweep_text_encoder:
        return config
    if get_spec(config.optimizer.name).equal_group_lr:
        result["warnings"].append(f"{config.optimizer.name} needs one LR for every group: the text encoders train at "
                                  "the UNet's LR, not swept")
        return config
    changes = dict(constant_lr_changes(config, lr))  # the text encoders' configured ratios, at the found lr
    result["text_encoders"] = {}
    for role in encoders:
        current = sub_config(config, None, train=changes, find_lr={"group": role})
        log(f"== 1/3 find-lr of train.{lr_finder.LR_KEYS[role]} (UNet held at {lr:.3g}) ==")
        swept = lr_finder.find_lr(current, show_progress=show_progress)
        log(lr_finder.format_result(swept))
        key = lr_finder.LR_KEYS[role]
        entry = {"result": swept, "lr": swept["lr"], "configured": changes.get(key, getattr(current.train, key) or lr)}
        if swept["lr"] is None:
            result["warnings"].append(f"find-lr of {key} recommends no LR ({swept['verdict']}): kept "
                                      f"{format_lr(entry['configured'])}")
        else:
            changes[key] = swept["lr"]
            entry["unet_to_text_encoder_ratio"] = lr / swept["lr"]
        result["text_encoders"][role] = entry
    return sub_config(config, None, train=changes)


def compare_prodigy(config: Config, steps_result: dict[str, Any], show_progress: bool, log) -> dict[str, Any]:
    """Prodigy as users pick it when they do not want to choose an LR, trained like find-steps' run (same
    budget, validation cadence, seed, data and stopping rule): its best validation loss against find-lr's."""
    from difftune.config.loading import config_to_dict
    from difftune.errors import ConfigError
    from difftune.optim.optimizers import PRODIGY_AS_RECOMMENDED
    from difftune.tuning import step_finder

    try:
        prodigy_config = sub_config(
            config, None,
            optimizer={**dict.fromkeys(config_to_dict(config)["optimizer"]), **PRODIGY_AS_RECOMMENDED},
            train={"text_encoder_lr": None, "text_encoder_2_lr": None, "embedding_lr": None},  # one LR: Prodigy's d
            find_steps={"max_steps": steps_result["max_steps"], "every_n_steps": steps_result["every_n_steps"]},
        )
    except ConfigError as e:
        return {"status": "skipped", "reason": f"this setup cannot train with Prodigy: {e}"}
    run = step_finder.find_steps(prodigy_config, 1.0, show_progress=show_progress, folder=PRODIGY_FOLDER)
    log(f"Prodigy: best validation loss {run['best_loss']} at step {run['best_step']}; "
        f"find-lr's LR: {steps_result['best_loss']} at step {steps_result['best_step']}")
    ours, theirs = steps_result.get("best_loss"), run.get("best_loss")
    better_by = (theirs - ours) / ours if ours and theirs is not None else None
    return {"status": "ok", "best_loss": theirs, "best_step": run.get("best_step"), "find_lr_better_by": better_by,
            "result": run}


def final_run(config: Config, lr: float, best_step: int, steps_result: dict[str, Any], show_progress: bool) -> dict[str, Any]:
    """Train the final model at the chosen LR and steps into `<output.dir>/final/`."""
    from difftune.training.loop import train
    from difftune.training.plan import make_plan

    changes: dict[str, Any] = {"train": {**constant_lr_changes(config, lr), "max_steps": best_step, "max_epochs": None}}
    steps = best_step
    if config.auto.add_validation_back:
        before = make_plan(config)
        changes["data"] = {"val_split": 0.0, "val_dir": None}
        added = sub_config(config, FINAL_FOLDER, **changes)
        after = make_plan(added)
        # The same passes over each image: more images per epoch means proportionally more steps.
        steps = max(1, math.ceil(best_step * after.steps_per_epoch / before.steps_per_epoch))
        changes["train"]["max_steps"] = steps
    final_config = sub_config(config, FINAL_FOLDER, **changes)
    summary = train(final_config, show_progress=show_progress)
    model = Path(final_config.output.dir) / "checkpoints" / "final"
    return {
        "mode": "retrain_with_validation_images" if config.auto.add_validation_back else "retrain",
        "model": str(model), "steps": steps, "run_dir": final_config.output.dir,
        "val_loss": summary.get("final_val_loss"),
    }


def _finish(result: dict[str, Any], root: Path, started: float, write_json) -> dict[str, Any]:
    result["seconds"] = time.perf_counter() - started
    result["files"] = {"report": str(root / "report.html"), "json": str(root / "auto.json")}
    (root / "report.html").write_text(render_report(result, root), encoding="utf-8")
    write_json(root / "auto.json", result)
    return result


def _rel(path: str | None, root: Path) -> str | None:
    if not path:
        return None
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_uri()


def render_report(result: dict[str, Any], root: Path) -> str:
    """A self-contained HTML page: chosen values, why, the plots, costs and where the files are."""
    e = html.escape
    lr_r, st_r = result.get("find_lr") or {}, result.get("find_steps") or {}
    rows = []
    if lr_r:
        band = lr_r.get("lr_band")
        rows += [
            ("learning rate", format_lr(lr_r.get("lr")),
             f"{lr_r.get('rule')} rule on the find-lr curve; verdict: {lr_r.get('verdict')}"),
            ("LR band (10/50/90%)", " / ".join(format_lr(x) for x in band) if band else "n/a",
             "bootstrap over the probe items: how much the recommendation depends on which items were measured"),
            ("lr_min / lr_max", f"{format_lr(lr_r.get('lr_min'))} / {format_lr(lr_r.get('lr_max'))}",
             "where the probe loss starts to fall / where the fall ends (use both for train.lr_scheduler = 'cyclic' "
             "with train.lr_from)"),
        ]
    for role, entry in (result.get("text_encoders") or {}).items():
        ratio = entry.get("unet_to_text_encoder_ratio")
        rows.append((f"{role} learning rate", format_lr(entry.get("lr") or entry.get("configured")),
                     (f"its own sweep with the UNet held at the learning rate above: the UNet's LR is {ratio:.3g}x this "
                      "one (the kohya guides' rule of thumb: 5-10x)") if ratio else
                     f"its sweep recommended none ({entry['result'].get('verdict')}): the configured ratio is kept"))
    if st_r:
        band = st_r.get("step_band")
        rows += [
            ("steps", str(st_r.get("best_step")), f"lowest validation loss ({st_r.get('best_loss')}); {st_r.get('verdict')}"),
            ("steps within margin", f"{band[0]}..{band[1]}" if band else "n/a",
             f"validation loss within {100 * st_r.get('margin', 0):g}% of the best"),
            ("early stop", e(str(st_r.get("early_stop") or "none: trained to max_steps")), "patience / Prechelt GL_alpha"),
        ]
    prodigy = result.get("prodigy") or {}
    if prodigy.get("status") == "ok":
        by = prodigy.get("find_lr_better_by")
        rows.append(("Prodigy, same budget", f"{prodigy.get('best_loss')} at step {prodigy.get('best_step')}",
                     "lr 1, OneTrainer's recommended settings, same seed, data, validation and stopping rule: "
                     + ("n/a" if by is None else (f"find-lr's LR is {100 * by:.1f}% lower in validation loss" if by > 0 else
                                                  f"Prodigy is {-100 * by:.1f}% lower in validation loss"))))
    elif prodigy:
        rows.append(("Prodigy, same budget", "not run", prodigy.get("reason", "")))
    final = result.get("final")
    if final:
        rows.append(("final model", final.get("model") or "n/a", f"mode: {final.get('mode')}"))
    table = "\n".join(f"<tr><th>{e(k)}</th><td><b>{e(str(v))}</b></td><td>{e(str(why))}</td></tr>" for k, v, why in rows)
    images = []
    for title, path in (
        ("find-lr: probe loss against LR", lr_r.get("files", {}).get("plot")),
        ("find-steps: validation loss against step", st_r.get("files", {}).get("plot")),
        ("find-steps run: losses and LR", str(Path(st_r["run_dir"]) / "plots" / "loss.png") if st_r.get("run_dir") else None),
        ("Prodigy, same budget: validation loss against step",
         (prodigy.get("result") or {}).get("files", {}).get("plot")),
    ):
        rel = _rel(path, root)
        if rel and Path(path).is_file():
            images.append(f'<h3>{e(title)}</h3><a href="{e(rel)}"><img src="{e(rel)}" style="max-width:100%"></a>')
    grids = sample_grids_near(st_r, result.get("chosen", {}).get("steps"))
    if grids:
        cells = "".join(f'<figure style="display:inline-block;margin:4px"><a href="{e(_rel(str(path), root))}">'
                        f'<img src="{e(_rel(str(path), root))}" style="max-width:300px"></a>'
                        f"<figcaption>{e(label)}</figcaption></figure>" for label, path in grids)
        images.append(f"<h3>Samples around the chosen step</h3>{cells}")
    costs = []
    if lr_r.get("cost"):
        c = lr_r["cost"]
        frac = c.get("fraction_of_training_run")
        costs.append(f"find-lr: {c['steps']} steps + {c['probe_evaluations']} probe evaluations, {c['seconds']:.1f}s"
                     + (f" (~{100 * frac:.0f}% of one configured training run)" if frac is not None else ""))
    if st_r.get("cost"):
        costs.append(f"find-steps: {st_r['cost']['steps']} steps, {st_r['cost']['seconds']:.1f}s")
    if (prodigy.get("result") or {}).get("cost"):
        c = prodigy["result"]["cost"]
        costs.append(f"Prodigy comparison: {c['steps']} steps, {c['seconds']:.1f}s")
    warnings = "".join(f"<li>{e(w)}</li>" for w in result.get("warnings", []))
    status = result.get("reason") or "done"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>difftune auto report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}</style>
</head><body>
<h1>difftune auto</h1>
<p>Status: <b>{e(result.get("status", ""))}</b> — {e(status)}. Total time {result.get("seconds", 0):.1f}s.</p>
<table><tr><th>setting</th><th>value</th><th>why</th></tr>
{table}
</table>
{f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else ""}
<h2>Plots</h2>
{"".join(images) or "<p>none</p>"}
<h2>Cost</h2><ul>{"".join(f"<li>{e(c)}</li>" for c in costs)}</ul>
<h2>Files</h2><ul>
<li>find-lr: {e(str(lr_r.get("files", {}).get("json", "n/a")))}</li>
<li>find-steps: {e(str(st_r.get("files", {}).get("json", "n/a")))}</li>
<li>machine-readable summary: auto.json</li>
</ul>
<p>Method: docs/tuning.md in the difftune repository.</p>
</body></html>
"""


def sample_grids_near(steps_result: dict[str, Any], chosen: int | None) -> list[tuple[str, Path]]:
    """find-steps' sample grids nearest to half, one and two times the chosen step (labelled with the step
    each was made at: a run samples on its own cadence, and an early stop may end before 2x)."""
    if not chosen or not steps_result.get("run_dir"):
        return []
    folder = Path(steps_result["run_dir"]) / "samples"
    made = {}
    for path in folder.glob("step-*.png"):
        try:
            made[int(path.stem.removeprefix("step-"))] = path
        except ValueError:
            continue
    if not made:
        return []
    picked: dict[int, str] = {}
    for factor, name in ((0.5, "half the chosen step"), (1.0, "the chosen step"), (2.0, "twice the chosen step")):
        step = min(made, key=lambda s: (abs(s - factor * chosen), s))
        picked.setdefault(step, f"step {step} (nearest to {name}, {round(factor * chosen)})")
    return [(label, made[step]) for step, label in sorted(picked.items())]


def format_result(result: dict[str, Any]) -> str:
    lines = [f"auto: {result['status']}" + (f" — {result['reason']}" if result.get("reason") else "")]
    if result.get("chosen"):
        lines.append(f"chosen: lr {result['chosen']['lr']:.3g}, {result['chosen']['steps']} steps")
    for role, entry in (result.get("text_encoders") or {}).items():
        if entry.get("lr"):
            lines.append(f"chosen: {role} lr {entry['lr']:.3g} (the UNet's is {entry['unet_to_text_encoder_ratio']:.3g}x)")
    prodigy = result.get("prodigy") or {}
    if prodigy.get("status") == "ok":
        lines.append(f"Prodigy, same budget: best validation loss {prodigy['best_loss']} at step {prodigy['best_step']}")
    if result.get("final"):
        lines.append(f"final model ({result['final']['mode']}): {result['final']['model']}")
    for warning in result.get("warnings", []):
        lines.append(f"warning: {warning}")
    lines.append(f"report: {result['files']['report']}")
    return "\n".join(lines)
