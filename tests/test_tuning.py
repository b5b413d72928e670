"""find-lr, find-steps, auto: the curve analysis on synthetic curves, early stopping, lr_from, and each
command end to end on the tiny model (user's files untouched, JSON keys, plots, best checkpoint)."""

from __future__ import annotations

import hashlib
import json
import math
import tomllib

import numpy as np
import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from conftest import quick_config_dict
from difftune.cli.main import main
from difftune.config.loading import ConfigError, validate_config
from difftune.tuning.curve import (
    EDGE_DIVISOR,
    EarlyStopping,
    analyze_lr_sweep,
    analyze_steps,
    bucket_scores,
    curve_features,
    noise_level,
    rule_steepest,
    rule_valley,
    should_stop,
)

BUCKET_SCALES = np.array([2.0, 1.0, 0.5, 0.2, 0.1])  # diffusion loss differs ~20x across noise levels


def synthetic_sweep(relative_loss, lrs, items=80, item_noise=0.01, seed=0):
    """Probe losses whose every item follows `relative_loss(lr)` times its own baseline, plus noise."""
    rng = np.random.default_rng(seed)
    buckets = np.arange(items) % 5
    baseline = BUCKET_SCALES[buckets] * (1 + 0.2 * rng.standard_normal(items)).clip(0.5)
    factors = np.array([relative_loss(lr) for lr in lrs])
    losses = baseline[None, :] * factors[:, None] * (1 + item_noise * rng.standard_normal((len(lrs), items)))
    return losses, baseline, buckets


def u_shape(lr):
    """Falls by 60% between ~3e-5 and ~3e-4 (centre 1e-4), flat, then climbs past ~1e-2."""
    x = math.log10(lr)
    fall = 0.6 / (1 + math.exp(-(x + 4) / 0.2))
    rise = 3.0 / (1 + math.exp(-(x + 1.7) / 0.15))
    return 1.0 - fall + rise


LRS = np.geomspace(1e-6, 1e-1, 31)


# --------------------------------------------------------------------------------------------- score
def test_bucket_score_weighs_every_noise_level_equally():
    buckets = np.array([0, 0, 1, 1])
    baseline = np.array([10.0, 10.0, 0.1, 0.1])
    # The high-loss bucket halves, the low-loss bucket is unchanged: a plain mean would say -50%.
    losses = np.array([[5.0, 5.0, 0.1, 0.1]])
    assert bucket_scores(losses, baseline, buckets)[0] == pytest.approx(0.75)
    assert losses.mean() / baseline.mean() == pytest.approx(0.505, abs=1e-3)
    assert math.isinf(bucket_scores(np.array([[np.nan, 1, 1, 1.0]]), baseline, buckets)[0])


def test_noise_level_ignores_a_linear_trend():
    rng = np.random.default_rng(0)
    trend = np.linspace(1, 0, 200)
    assert noise_level(trend) == pytest.approx(0, abs=1e-9)
    assert noise_level(trend + 0.05 * rng.standard_normal(200)) == pytest.approx(0.05, rel=0.2)


# -------------------------------------------------------------------------------------------- rules
def test_u_shaped_curve_gives_ordered_bounds_and_a_recommendation_between_them():
    losses, baseline, buckets = synthetic_sweep(u_shape, LRS)
    a = analyze_lr_sweep(LRS, losses, baseline, buckets, bootstrap_samples=100)
    assert a.status == "ok", a.verdict
    # The fall starts around 3e-5 (1.3% down at 2.2e-5) and ends around 3e-4 (within noise of the floor).
    assert 1e-5 <= a.lr_min <= 6e-5
    assert 2e-4 <= a.lr_max <= 2e-3
    # The climb crosses the start near 1.2e-2 (rise > 0.6 where log10 lr > -1.91): that is the stability
    # edge, and the default rule trains a fixed factor below it, above where the sweep's fall flattened.
    assert 0.7e-2 <= a.lr_edge <= 2e-2
    assert a.lr == pytest.approx(a.lr_edge / EDGE_DIVISOR)
    assert a.lr_min < a.lr < a.lr_edge
    assert a.lr_band[0] <= a.lr <= a.lr_band[2]
    assert a.lr_band[2] / a.lr_band[0] >= LRS[1] / LRS[0] * 0.99  # at least the sweep's resolution wide
    # Every rule reads the same curve; steepest lands on the sigmoid's centre (1e-4).
    assert a.suggestions["steepest"] == pytest.approx(1e-4, rel=0.5)
    assert a.suggestions["midpoint"] == pytest.approx(math.sqrt(a.lr_min * a.lr_max))
    assert a.suggestions["min_div10"] == pytest.approx(a.lr_at_minimum / 10)
    assert a.lr_min < a.suggestions["valley"] < a.lr_max


def test_valley_is_the_middle_of_the_longest_decreasing_run():
    lrs = np.geomspace(1e-5, 1e-1, 9)
    score = np.array([1.0, 1.01, 0.9, 0.8, 0.7, 0.6, 0.5, 0.9, 2.0])  # decreasing run: points 1..6
    f = curve_features(lrs, score, sigma=0)
    assert rule_valley(f) == pytest.approx(lrs[3])
    assert rule_steepest(f) == pytest.approx(lrs[2])  # the biggest drop per log-LR is 1.01 -> 0.9


def test_loss_that_never_falls_is_unusable_and_says_raise_the_range():
    losses, baseline, buckets = synthetic_sweep(lambda lr: 1.0, LRS, item_noise=0.002)
    a = analyze_lr_sweep(LRS, losses, baseline, buckets)
    assert a.status == "unusable" and a.lr is None and a.lr_band is None
    assert "never fell" in a.verdict and "raise the range" in a.verdict


def test_divergence_at_the_first_point_says_lower_it():
    losses, baseline, buckets = synthetic_sweep(lambda lr: 1.0, LRS[:3])
    losses[0] = np.nan
    a = analyze_lr_sweep(LRS[:3], losses, baseline, buckets)
    assert a.status == "unusable" and "diverged at the first point" in a.verdict and "lower" in a.verdict
    losses, baseline, buckets = synthetic_sweep(lambda lr: 3.0, LRS[:5])  # finite but far above the start
    assert "diverged at the first point" in analyze_lr_sweep(LRS[:5], losses, baseline, buckets).verdict


def test_noisy_plateau_is_reported_as_noise_not_as_a_result():
    # A 1.5% drift under 5% point-to-point noise (every item of a point moves together, like training noise).
    rng = np.random.default_rng(1)
    point_noise = 1 + 0.05 * rng.standard_normal(len(LRS))
    losses, baseline, buckets = synthetic_sweep(lambda lr: 1.0 - 0.015 * (math.log10(lr) + 6) / 5, LRS, item_noise=0.0)
    a = analyze_lr_sweep(LRS, losses * point_noise[:, None], baseline, buckets)
    assert a.status == "unusable" and "noisy plateau" in a.verdict


def test_still_falling_at_the_end_is_a_warning_with_advice():
    lrs = LRS[:18]  # stops at ~4.6e-4, before the U-shape's floor is reached
    losses, baseline, buckets = synthetic_sweep(lambda lr: 1.0 - 0.6 * (math.log10(lr) + 6) / 3, lrs)
    a = analyze_lr_sweep(lrs, losses, baseline, buckets)
    assert a.status == "warning" and "still falling" in a.verdict and "end_lr" in a.verdict
    assert a.lr is not None


def test_bootstrap_band_covers_the_noise_free_answer():
    """Over independent noisy probes, the 10-90% band holds the noise-free recommendation most of the time."""
    clean = synthetic_sweep(u_shape, LRS, item_noise=0.0)
    truth = analyze_lr_sweep(LRS, *clean, bootstrap_samples=0).lr
    covered = 0
    for seed in range(12):
        losses, baseline, buckets = synthetic_sweep(u_shape, LRS, items=60, item_noise=0.08, seed=seed)
        band = analyze_lr_sweep(LRS, losses, baseline, buckets, bootstrap_samples=100, seed=seed).lr_band
        covered += band[0] <= truth <= band[2]
    assert covered >= 8


def test_sweep_stops_on_nan_on_4x_and_on_climbing_back_above_the_start():
    assert should_stop([1.0, 0.8, 0.7]) is None
    assert "nan" in should_stop([1.0, 0.8, float("nan")])
    assert "4x" in should_stop([1.0, 0.2, 0.9])
    assert "above its starting value" in should_stop([1.0, 0.6, 1.05])
    assert should_stop([1.0, 1.005, 1.02]) is None  # never fell: not a climb back


# --------------------------------------------------------------------------------------------- steps
def test_early_stopping_patience_and_generalization_loss():
    stopper = EarlyStopping(patience=3, gl_alpha=None)
    flat = [1.0, 0.8, 0.7, 0.71, 0.70, 0.705]
    assert [stopper.update(i, v) for i, v in enumerate(flat)] == [False] * 5 + [True]
    assert stopper.best_step == 2 and "patience 3" in stopper.reason
    # GL5 as published (gl_consecutive=1): 6% above the best stops at once, long before patience would.
    stopper = EarlyStopping(patience=10, gl_alpha=5.0, gl_consecutive=1)
    assert [stopper.update(i, v) for i, v in enumerate([1.0, 0.5, 0.52, 0.51])] == [False] * 4  # 4% above: GL5 waits
    assert stopper.generalization_loss(0.53) == pytest.approx(6.0)
    assert stopper.update(4, 0.53) is True and "GL = 6.0%" in stopper.reason
    # Default: a single bump above GL5 is ridden out (the count resets below alpha); two in a row stop.
    stopper = EarlyStopping(patience=10, gl_alpha=5.0)
    bumpy = [1.0, 0.5, 0.53, 0.51, 0.54, 0.49, 0.53, 0.52]
    assert [stopper.update(i, v) for i, v in enumerate(bumpy)] == [False] * 7 + [True]
    assert stopper.best_step == 5 and "2 validations in a row" in stopper.reason
    assert EarlyStopping(patience=None, gl_alpha=5).update(0, float("inf")) is True
    with pytest.raises(ValueError):
        EarlyStopping(patience=None, gl_alpha=None)


def test_step_analysis_best_step_band_and_verdicts():
    a = analyze_steps([0, 10, 20, 30, 40, 50], [1.0, 0.5, 0.402, 0.40, 0.403, 0.45], margin=0.01)
    assert (a.best_step, a.step_band, a.earliest_good_step, a.status) == (30, [20, 40], 20, "ok")
    assert analyze_steps([0, 10, 20], [1.0, 0.8, 0.7]).status == "warning"  # still falling
    assert "never improved" in analyze_steps([0, 10], [1.0, 1.2]).verdict


# ------------------------------------------------------------------------------------------- lr_from
def test_lr_from_sets_lr_or_cyclic_bounds(tmp_path):
    result = tmp_path / "find_lr.json"
    result.write_text(json.dumps({"lr": 3e-4, "lr_min": 5e-5, "lr_max": 2e-3, "verdict": "ok"}))
    assert validate_config({"train": {"lr_from": str(result)}}).train.lr == pytest.approx(3e-4)
    cyclic = validate_config({"train": {"lr_from": str(tmp_path), "lr_scheduler": "cyclic"}})  # folder works too
    assert (cyclic.train.lr_min, cyclic.train.lr) == (pytest.approx(5e-5), pytest.approx(2e-3))
    with pytest.raises(ConfigError, match="train.lr_from = .*missing.json.*file not found"):
        validate_config({"train": {"lr_from": str(tmp_path / "missing.json")}})
    result.write_text(json.dumps({"lr": None, "lr_min": None, "lr_max": None, "verdict": "the loss never fell"}))
    with pytest.raises(ConfigError, match="recommends no LR .*never fell"):
        validate_config({"train": {"lr_from": str(result)}})
    for bad in ("abc", [1], -1e-3, True):  # an edited file: a clear error, never a traceback or a silent lr 1
        result.write_text(json.dumps({"lr": bad, "lr_min": 1e-5, "lr_max": bad}))
        with pytest.raises(ConfigError, match="'lr' is .*not a positive learning rate"):
            validate_config({"train": {"lr_from": str(result)}})
        with pytest.raises(ConfigError, match="'lr_max' is .*not a positive learning rate"):
            validate_config({"train": {"lr_from": str(result), "lr_scheduler": "cyclic"}})


def test_tuners_refuse_an_optimizer_that_ignores_the_lr(quick_config):
    from difftune.tuning.lr_finder import find_lr
    from difftune.tuning.step_finder import find_steps

    config = quick_config(optimizer={"name": "adafactor"})  # relative_step = true by default: its own LR
    with pytest.raises(ConfigError, match="find-lr: .*ignores train.lr.*relative_step = false"):
        find_lr(config, show_progress=False)
    with pytest.raises(ConfigError, match="find-steps: .*ignores train.lr"):
        find_steps(config, 1e-3, show_progress=False)


# -------------------------------------------------------------------------------------- integration
def tree_digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def model_folder(tmp_path_factory):
    """The tiny model as a diffusers folder on disk, to check that tuning never writes to the user's model."""
    from difftune.config.schema import ModelConfig
    from difftune.models import load_model

    folder = tmp_path_factory.mktemp("model") / "tiny"
    load_model(ModelConfig(path="tiny-sd")).save_pretrained(folder)
    return folder


SWEEP = {"start_lr": 1e-5, "end_lr": 0.3, "num_points": 10, "steps_per_point": 2, "bootstrap_samples": 50,
         "probe_items": 24}


def test_find_lr_command_leaves_the_users_model_and_run_untouched(digits_dir, model_folder, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')  # an existing run of the user's
    data = quick_config_dict(digits_dir, run, model={"path": str(model_folder)}, find_lr=SWEEP)
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(data))
    model_before, run_before = tree_digest(model_folder), tree_digest(run)
    code = main(["find-lr", str(config), "--no-progress", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "out.json").read_text())
    assert code == 0, out
    for key in ("lr_min", "lr_max", "lr", "lr_band", "curve", "rule", "verdict", "status", "cost", "suggestions"):
        assert key in result
    assert result["lr_min"] < result["lr_max"]
    edge = result["lr_edge"] or result["curve"][-1]["lr"]  # without divergence the last point stands in
    assert result["lr"] == pytest.approx(edge / EDGE_DIVISOR)
    assert result["lr_band"][0] <= result["lr_band"][1] <= result["lr_band"][2]
    assert result["curve"][0]["lr"] == pytest.approx(1e-5) and result["curve"][0]["score"] < 1.01
    assert 0 < result["cost"]["steps"] <= 10 * 2 and result["cost"]["fraction_of_training_run"] > 0
    assert "recommended lr" in out and "lr_min" in out
    folder = run / "find-lr"
    for name in ("find_lr.json", "curve.csv", "find_lr.png", "probe_losses.npz"):
        assert (folder / name).is_file(), name
    assert (folder / "curve.csv").read_text().splitlines()[0].startswith("point,lr,step,train_loss,score")
    # The probe's loss sits beside the training batches' loss, never over it, and the header says what it probed.
    assert result["curve"][0]["val_probe_loss"] != result["curve"][0]["train_loss"]
    assert result["sweep"]["probe"] == "val" and "probe: 12 validation images" in out
    assert tree_digest(model_folder) == model_before
    # The user's own run files are byte-identical; only the find-lr/ subfolder was added.
    assert tree_digest(run) != run_before and (run / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert sorted(p.name for p in run.iterdir()) == ["find-lr", "metrics.jsonl"]


def test_sweep_restores_weights_and_optimizer_for_reuse(quick_config):
    from difftune.training.loop import Trainer
    from difftune.tuning.lr_finder import Ramp, ramp, run_sweep

    config = quick_config(find_lr={**SWEEP, "num_points": 5, "extend": False})
    point_lrs, step_lrs = ramp(1e-4, 1e-2, 5, 2, "log")
    ramp_fn = Ramp(step_lrs, config.train.lr)
    trainer = Trainer(config, show_progress=False, lr_multiplier=ramp_fn)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    raw = run_sweep(trainer, config, ramp_fn, point_lrs)
    assert raw["steps"] == 10 and raw["item_losses"].shape == (5, raw["probe_items"])
    trainer.close()
    after = trainer.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.state.step == 0 and not trainer.optimizer.state  # fresh AdamW state again


def test_find_steps_stops_early_and_keeps_the_best_checkpoint(digits_dir, tmp_path, capsys):
    data = quick_config_dict(digits_dir, tmp_path / "run", train={"max_steps": 60},
                             find_steps={"every_n_steps": 3, "patience": 2, "gl_alpha": 2.0})
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(data))
    # 0.05 is far too high for AdamW on this model: the loss rises after a few steps and the rule stops it.
    assert main(["find-steps", str(config), "--lr", "0.05", "--no-progress", "--json", str(tmp_path / "s.json")]) in (0, 1)
    result = json.loads((tmp_path / "s.json").read_text())
    for key in ("best_step", "best_loss", "step_band", "early_stop", "curve", "best_checkpoint", "lr"):
        assert key in result
    assert result["lr"] == 0.05 and result["stopped_at"] < 60 and result["early_stop"]
    assert all(p["step"] % 3 == 0 for p in result["curve"])  # its own cadence only, no epoch-end extras
    out = capsys.readouterr().out
    assert "stopped early" in out
    run = tmp_path / "run" / "find-steps"
    assert (run / "find_steps.png").is_file() and (run / "metrics.jsonl").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("early_stop" in r for r in metrics)
    if result["best_step"]:
        assert (run / "checkpoints" / "best" / "unet").is_dir()
        assert not (run / "checkpoints" / "best" / "training_state").exists()  # export only


def test_find_steps_reports_what_it_measured_when_training_diverges_between_validations(digits_dir, tmp_path, capsys):
    data = quick_config_dict(digits_dir, tmp_path / "run", find_steps={"max_steps": 30, "every_n_steps": 10})
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(data))
    # lr 10 turns the loss into NaN within a few steps, before the first validation after step 0.
    code = main(["find-steps", str(config), "--lr", "10", "--no-progress", "--json", str(tmp_path / "s.json")])
    result = json.loads((tmp_path / "s.json").read_text())
    assert code == 1  # the untrained model stayed the best: a failure a script can see
    assert result["best_step"] == 0 and result["early_stop"].startswith("training diverged: loss is nan at step")
    assert "never improved on the untrained model" in capsys.readouterr().out


def run_auto(data: dict, tmp_path, capsys) -> tuple[int, str, dict]:
    """`difftune auto` on the config dict from the CLI: exit code, printed output and auto.json's result."""
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(data))
    code = main(["auto", str(config), "--no-progress", "--json", str(tmp_path / "a.json")])
    return code, capsys.readouterr().out, json.loads((tmp_path / "a.json").read_text())


def test_auto_end_to_end_and_the_final_model_equals_the_best_checkpoint(digits_dir, tmp_path, capsys):
    data = quick_config_dict(
        digits_dir, tmp_path / "run", train={"max_steps": 24},
        find_lr=SWEEP, find_steps={"every_n_steps": 4}, auto={"final_run": "retrain"},
    )
    code, out, result = run_auto(data, tmp_path, capsys)
    assert code == 0, out
    assert result["chosen"]["lr"] == result["find_lr"]["lr"]
    assert result["chosen"]["steps"] == result["find_steps"]["best_step"]
    assert result["find_steps"]["lr"] == result["find_lr"]["lr"]
    report = (tmp_path / "run" / "report.html").read_text()
    assert "find-lr/find_lr.png" in report and "find-steps/find_steps.png" in report and "learning rate" in report
    # Deterministic training: retraining to the best step reproduces find-steps' best weights exactly.
    best = load_file(tmp_path / "run" / "find-steps" / "checkpoints" / "best" / "unet" / "diffusion_pytorch_model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "checkpoints" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    assert "chosen: lr" in out and "report:" in out


def test_auto_compares_with_prodigy_on_the_same_budget_when_asked(digits_dir, tmp_path, capsys):
    data = quick_config_dict(
        digits_dir, tmp_path / "run", train={"max_steps": 12, "seed": 7}, optimizer={"name": "adamw", "weight_decay": 0.05},
        find_lr=SWEEP, find_steps={"every_n_steps": 4}, auto={"compare_prodigy": True},
    )
    code, out, result = run_auto(data, tmp_path, capsys)
    assert code == 0, out
    prodigy = result["prodigy"]
    # trained as users pick Prodigy (lr 1, OneTrainer's settings), not with the configured AdamW's settings
    resolved = tomllib.loads((tmp_path / "run" / "compare-prodigy" / "config.resolved.toml").read_text())
    assert resolved["optimizer"]["name"] == "prodigy" and resolved["optimizer"]["weight_decay"] == 0.0
    assert resolved["optimizer"]["d_coef"] == 1.0 and resolved["train"]["lr"] == 1.0
    assert resolved["train"]["seed"] == 7
    # the same budget and cadence as find-steps' run, so the two curves are comparable point for point
    ours = result["find_steps"]
    assert prodigy["result"]["max_steps"] == ours["max_steps"] and prodigy["result"]["every_n_steps"] == 4
    assert [p["step"] for p in prodigy["result"]["curve"]][:2] == [p["step"] for p in ours["curve"]][:2]
    assert prodigy["best_loss"] == min(p["val_loss"] for p in prodigy["result"]["curve"])
    assert prodigy["find_lr_better_by"] == pytest.approx((prodigy["best_loss"] - ours["best_loss"]) / ours["best_loss"])
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Prodigy, same budget" in report and "compare-prodigy/find_steps.png" in report
    assert "Prodigy, same budget: best validation loss" in out
    assert result["chosen"]["lr"] == result["find_lr"]["lr"]  # the choice stays find-lr's


def test_tuners_keep_each_text_encoders_lr_ratio():
    from difftune.config.loading import load_config
    from difftune.tuning.common import constant_lr_changes

    config = load_config(None, ["train.lr=1e-4", "train.text_encoder_lr=5e-5", "train.text_encoder_2_lr=2e-5"])
    changes = constant_lr_changes(config, 4e-4)
    assert changes["text_encoder_lr"] == pytest.approx(2e-4) and changes["text_encoder_2_lr"] == pytest.approx(8e-5)


def test_a_text_encoder_sweep_ramps_its_groups_and_holds_the_unets(quick_config):
    from difftune.training.loop import Trainer
    from difftune.tuning.lr_finder import Ramp, ramp, swept_base_lr

    config = quick_config(network={"type": "lora", "rank": 4, "loraplus_lr_ratio": 4},
                          train={"lr": 1e-3, "text_encoder_lr": 1e-4, "train_text_encoder": True},
                          find_lr={"group": "text_encoder"})
    _, step_lrs = ramp(1e-5, 1e-2, 4, 1, "log")
    assert swept_base_lr(config) == pytest.approx(1e-4)
    trainer = Trainer(config, show_progress=False, lr_multiplier=Ramp(step_lrs, swept_base_lr(config), "text_encoder"))
    try:
        groups = trainer.step_groups()
        for step in range(4):
            lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
            assert lrs["denoiser"] == pytest.approx(1e-3) and lrs["denoiser x4"] == pytest.approx(4e-3)
            assert lrs["text_encoder"] == pytest.approx(step_lrs[step])  # the sweep's LR, absolute
            assert lrs["text_encoder x4"] == pytest.approx(4 * step_lrs[step])  # LoRA+ keeps its ratio
            trainer.train_step(next(groups))
    finally:
        trainer.close()


def test_a_text_encoder_sweep_needs_a_trained_text_encoder_and_lr_from_sets_its_lr(quick_config, tmp_path):
    from difftune.tuning.lr_finder import find_lr

    with pytest.raises(ConfigError, match="find_lr.group = 'text_encoder': this run does not train it"):
        find_lr(quick_config(network={"type": "lora", "rank": 4}, find_lr={"group": "text_encoder"}),
                show_progress=False)
    result = tmp_path / "find_lr.json"
    result.write_text(json.dumps({"lr": 2e-5, "lr_key": "train.text_encoder_lr", "verdict": "ok"}))
    config = validate_config({"train": {"lr": 1e-4, "lr_from": str(result)}})
    assert (config.train.lr, config.train.text_encoder_lr) == (pytest.approx(1e-4), pytest.approx(2e-5))
    result.write_text(json.dumps({"lr": 2e-5, "lr_key": "train.seed", "verdict": "ok"}))
    with pytest.raises(ConfigError, match="lr_key 'seed' is not an LR"):
        validate_config({"train": {"lr_from": str(result)}})


def test_auto_sweeps_the_text_encoders_lr_with_the_unets_held(digits_dir, tmp_path, capsys):
    data = quick_config_dict(
        digits_dir, tmp_path / "run", network={"type": "lora", "rank": 4},
        train={"max_steps": 12, "lr": 1e-3, "text_encoder_lr": 1e-4, "train_text_encoder": True},
        find_lr=SWEEP, find_steps={"every_n_steps": 4},
    )
    code, out, result = run_auto(data, tmp_path, capsys)
    assert code == 0, out
    entry = result["text_encoders"]["text_encoder"]
    swept = json.loads((tmp_path / "run" / "find-lr-text_encoder" / "find_lr.json").read_text())
    assert swept["lr_key"] == "train.text_encoder_lr" and entry["lr"] == swept["lr"]
    assert entry["unet_to_text_encoder_ratio"] == pytest.approx(result["chosen"]["lr"] / swept["lr"])
    # find-steps trained at both found LRs
    steps_config = tomllib.loads((tmp_path / "run" / "find-steps" / "config.resolved.toml").read_text())
    assert steps_config["train"]["lr"] == pytest.approx(result["chosen"]["lr"])
    assert steps_config["train"]["text_encoder_lr"] == pytest.approx(swept["lr"])
    assert "text_encoder learning rate" in (tmp_path / "run" / "report.html").read_text()
    assert "chosen: text_encoder lr" in out


def test_the_report_shows_sample_grids_nearest_to_half_one_and_two_times_the_chosen_step(tmp_path):
    from difftune.tuning.auto import render_report, sample_grids_near

    samples = tmp_path / "find-steps" / "samples"
    samples.mkdir(parents=True)
    for step in (20, 40, 60, 80):
        (samples / f"step-{step:06d}.png").write_bytes(b"png")
    steps_result = {"run_dir": str(tmp_path / "find-steps")}
    grids = sample_grids_near(steps_result, 40)
    assert [p.name for _, p in grids] == ["step-000020.png", "step-000040.png", "step-000080.png"]
    assert "step 80 (nearest to twice the chosen step, 80)" == grids[-1][0]
    # an early stop before twice the step: the last grid stands for it once, not twice
    assert [p.name for _, p in sample_grids_near(steps_result, 80)] == ["step-000040.png", "step-000080.png"]
    page = render_report({"status": "ok", "find_steps": steps_result, "chosen": {"lr": 1e-3, "steps": 40}}, tmp_path)
    assert page.count("find-steps/samples/step-0000") == 6  # link and image of each of the three grids


def test_a_fall_barely_above_the_noise_keeps_lr_min_below_lr_max():
    from difftune.tuning.curve import curve_features

    # a textual-inversion sweep of the tiny model: the probe loss moves by 0.3% over the whole range
    lrs = np.geomspace(5e-5, 2.32, 15)
    score = np.array([0.999999, 0.999995, 0.999989, 0.999992, 0.999994, 0.999983, 0.999849, 0.999369, 0.998463,
                      0.997567, 0.997199, 0.997156, 0.997110, 0.996996, 0.996861])
    f = curve_features(lrs, score, sigma=1.0)
    assert f.lr_onset is not None and f.lr_flat is not None and f.lr_onset <= f.lr_flat
