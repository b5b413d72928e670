"""Training end to end on the tiny model: loss falls, determinism, resume, run directory, options."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupted_then_resumed
from difftune.config.loading import ConfigError, load_config
from difftune.errors import CheckpointError
from difftune.reporting.metrics import read_metrics
from difftune.training.loop import train


def losses(run_dir):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run_dir / "metrics.jsonl")]


def unet_weights(checkpoint):
    return load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")


def test_validation_loss_falls(quick_config):
    config = quick_config(train={"max_steps": 30, "lr": 2e-3}, validation={"every_n_steps": 10})
    summary = train(config, show_progress=False)
    assert summary["first_val_loss"] > 0.5
    assert summary["final_val_loss"] < 0.6 * summary["first_val_loss"]
    assert summary["steps"] == 30


def test_same_config_gives_the_same_losses(quick_config, tmp_path):
    a = quick_config(output={"dir": str(tmp_path / "a")})
    b = quick_config(output={"dir": str(tmp_path / "b")})
    train(a, show_progress=False)
    train(b, show_progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    c = quick_config(output={"dir": str(tmp_path / "c")}, train={"seed": 8})
    train(c, show_progress=False)
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_validation_loss_ignores_training_seed_and_lr(quick_config, tmp_path):
    """Identical weights give an identical validation loss whatever the training seed or LR."""
    runs = []
    for i, (seed, lr) in enumerate([(1, 1e-3), (2, 5e-4)]):
        config = quick_config(output={"dir": str(tmp_path / str(i))}, train={"seed": seed, "lr": lr, "max_steps": 1})
        runs.append(read_metrics(tmp_path / str(i) / "metrics.jsonl") if train(config, show_progress=False) else None)
    assert runs[0][0]["step"] == 0 and runs[0][0]["val_loss"] == runs[1][0]["val_loss"]


def test_resume_is_bit_exact(quick_config, tmp_path):
    common = {"train": {"max_steps": 8, "grad_accum": 2}, "output": {"save_every_n_steps": 4}}
    whole = quick_config(output={"dir": str(tmp_path / "whole"), "save_every_n_steps": 4}, train=common["train"])
    train(whole, show_progress=False)
    # The interrupted run: the same config stopped after step 4 (a crash right after the save).
    part = quick_config(output={"dir": str(tmp_path / "part"), "save_every_n_steps": 4}, train=common["train"])
    interrupted_then_resumed(part, "step-000004", tmp_path / "part")
    a, b = unet_weights(tmp_path / "whole/checkpoints/final"), unet_weights(tmp_path / "part/checkpoints/final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "whole") == losses(tmp_path / "part")


def test_resume_without_checkpoint_is_a_clear_error(quick_config, tmp_path):
    config = quick_config(train={"max_steps": 1})
    with pytest.raises(CheckpointError, match="folder not found"):
        train(config, resume=tmp_path / "missing", show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no resumable save .*\n  no save with training state"):
        train(config, resume=tmp_path / "empty", show_progress=False)


def test_resume_refuses_a_changed_training_but_allows_a_longer_run(quick_config, tmp_path):
    """The optimizer and schedule come from the checkpoint: a new LR would be written but not used."""
    config = quick_config(train={"max_steps": 2}, output={"save_every_n_steps": 2}, validation={"every_n_epochs": 0})
    train(config, show_progress=False)
    changed = quick_config(train={"max_steps": 4, "lr": 0.01}, output={"save_every_n_steps": 2})
    with pytest.raises(ConfigError) as err:
        train(changed, resume=config.output.dir, show_progress=False)
    listing = str(err.value).split("\nA resume continues")[0].splitlines()[1:]
    assert listing == ["  train.lr: 0.001 in the run, 0.01 now"]  # run length and validation cadence may change
    assert "lr = 0.001" in (tmp_path / "run" / "config.resolved.toml").read_text()  # the run's record is kept
    longer = quick_config(train={"max_steps": 4}, output={"save_every_n_steps": 2})
    assert train(longer, resume=config.output.dir, show_progress=False)["steps"] == 4


def test_validation_folder_inside_the_training_folder_is_refused(quick_config, tmp_path, digits_dir):
    from difftune.data.records import DatasetError
    from difftune.training.plan import make_plan

    with pytest.raises(DatasetError, match="overlaps data.train_dir.*would be trained on"):
        make_plan(quick_config(data={"val_dir": str(digits_dir / "2_digits")}))


def test_run_directory_contract(quick_config, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = quick_config(
        train={"max_steps": 4},
        validation={"every_n_steps": 2, "stabilize_train_loss": True, "stabilize_train_count": 4},
        sample={"prompts": ["a handwritten digit one", "a handwritten digit two"], "every_n_steps": 2, "steps": 2},
        output={"save_every_n_steps": 2, "tensorboard": True},
    )
    train(config, show_progress=False)
    run = tmp_path / "run"
    for name in ["config.resolved.toml", "metrics.jsonl", "summary.json", "plots/loss.png", "plots/lr.png",
                 "samples/step-000002.png", "samples/step-000004.png", "checkpoints/step-000002/unet",
                 "checkpoints/final/model_index.json", "checkpoints/final/training_state/optimizer.pt"]:
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(run / "config.resolved.toml") == config
    records = read_metrics(run / "metrics.jsonl")
    assert {"step", "epoch", "lr", "loss"} <= set(records[1])
    assert "val_loss" in records[2] and "stable_train_loss" in records[2]
    summary = json.loads((run / "summary.json").read_text())
    for key in ["final_val_loss", "best_val_loss", "best_val_step", "steps_per_second", "wall_seconds", "peak_memory_mb"]:
        assert summary[key] is not None, key
    # Written atomically, yet readable like any file (a UI running as another user loads them).
    umask = os.umask(0)
    os.umask(umask)
    for path, usual in [(run / "summary.json", 0o666), (run / "checkpoints/final", 0o777)]:
        assert path.stat().st_mode & 0o777 == usual & ~umask, path
    pipe = StableDiffusionPipeline.from_pretrained(run / "checkpoints/final", local_files_only=True)
    trained = unet_weights(run / "checkpoints/final")
    assert torch.equal(pipe.unet.conv_out.weight, trained["conv_out.weight"])


def test_existing_run_is_not_overwritten(quick_config):
    config = quick_config(train={"max_steps": 1})
    train(config, show_progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, show_progress=False)


def test_accumulation_clipping_text_encoder_and_checkpointing(quick_config, tmp_path):
    config = quick_config(
        train={"max_steps": 3, "grad_accum": 2, "clip_grad_norm": 0.5, "train_text_encoder": True,
               "text_encoder_lr": 1e-4, "gradient_checkpointing": True, "min_snr_gamma": 5.0, "noise_offset": 0.05},
    )
    train(config, show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["lr/text_encoder"] == pytest.approx(1e-4)
    final = tmp_path / "run/checkpoints/final"
    te = load_file(next((final / "text_encoder").glob("*.safetensors")))
    from difftune.models.sd.tiny import build_tiny_components

    fresh = build_tiny_components("tiny-sd")["text_encoder"].state_dict()
    changed = [k for k in te if k in fresh and not torch.equal(te[k], fresh[k])]
    assert changed, "the text encoder should have trained"


def test_gradient_checkpointing_gives_the_same_losses(quick_config, tmp_path):
    a = quick_config(output={"dir": str(tmp_path / "a")}, train={"max_steps": 2})
    b = quick_config(output={"dir": str(tmp_path / "b")}, train={"max_steps": 2, "gradient_checkpointing": True})
    train(a, show_progress=False)
    train(b, show_progress=False)
    plain, checkpointed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _, _ in plain] == [s for s, _, _ in checkpointed]
    flat = [x for row in plain for x in row[1:] if x is not None]
    flat_ckpt = [x for row in checkpointed for x in row[1:] if x is not None]
    assert flat == pytest.approx(flat_ckpt, rel=1e-4)


def test_bf16_mixed_precision_trains_on_cpu(quick_config):
    summary = train(quick_config(train={"max_steps": 3, "mixed_precision": "bf16"}), show_progress=False)
    assert summary["final_val_loss"] < summary["first_val_loss"]


def test_fp16_on_cpu_is_a_clear_error(quick_config):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        train(quick_config(train={"mixed_precision": "fp16"}), show_progress=False)


def test_v_prediction_model_trains(quick_config):
    summary = train(quick_config(model={"path": "tiny-sd-v"}, train={"max_steps": 6, "lr": 2e-3}), show_progress=False)
    assert summary["model"]["prediction_type"] == "v_prediction"
    assert summary["final_val_loss"] < summary["first_val_loss"]


def test_epochs_and_separate_val_dir(digits_dir, tmp_path):
    from difftune.config.loading import validate_config
    from difftune.demo import export_digits

    val_dir = tmp_path / "val"
    export_digits(val_dir, size=16, limit=6)
    config = validate_config({
        "data": {"train_dir": str(digits_dir), "val_dir": str(val_dir), "resolution": 16},
        "train": {"batch_size": 16, "max_epochs": 2, "lr": 1e-3},
        "validation": {"every_n_epochs": 1},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False, "save_every_n_epochs": 1, "save_last_n": 1},
    })
    summary = train(config, show_progress=False)
    # 48 images x 2 repeats = 96 samples = 6 batches of 16 per epoch.
    assert summary["steps"] == 12 and summary["epochs"] == 2.0
    vals = [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "val_loss" in r]
    assert vals == [0, 6, 12]
    kept = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir() if p.is_dir())
    assert kept == ["final", "step-000006"]
