"""EMA of the trained weights (issue 18): the formulas, the average after k steps, what uses it, the
saves it writes, and a bit-exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from difftune.reporting.metrics import read_metrics
from difftune.training.ema import EMAWeights, decay_at, start_weight_left
from difftune.training.loop import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")
NO_VALIDATION = {"every_n_steps": None, "every_n_epochs": 0}
LORA = {"type": "lora", "rank": 4, "preset": "attn-only"}


def test_warmup_decay_is_diffusers_emamodel_power_warmup():
    from diffusers.training_utils import EMAModel

    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999, use_ema_warmup=True, power=0.75)
    for step in (0, 1, 2, 10, 100, 5000, 10**6):
        # EMAModel.get_decay takes its optimization_step (1-based) and subtracts one
        assert decay_at(step, 0.999, True, 1.0, 0.75) == pytest.approx(reference.get_decay(step + 1), abs=1e-12)
    assert decay_at(7, 0.95, warmup=False) == 0.95


def test_the_average_is_the_hand_computed_one_with_update_every():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMAWeights([param], decay=0.9, update_every=2)
    expected = param.detach().clone()
    for step, value in enumerate([3.0, 5.0, -1.0, 4.0, 0.5, 2.0], start=1):
        param.data.fill_(value)
        updated = ema.update(step)
        assert updated == (step % 2 == 0)
        if updated:
            expected = 0.81 * expected + 0.19 * torch.full((2,), value)  # decay ** update_every per update
    assert ema.updates == 3
    assert torch.allclose(ema.shadow[0], expected, rtol=0, atol=1e-6)


def test_applied_swaps_the_average_in_and_puts_the_weights_back_bit_for_bit():
    param = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(0)))
    ema = EMAWeights([param], decay=0.5)
    original = param.detach().clone()
    ema.shadow[0].fill_(7.0)
    with ema.applied():
        assert torch.equal(param.detach(), torch.full((5,), 7.0))
    assert torch.equal(param.detach(), original)


@pytest.mark.parametrize("network", [LORA, {}], ids=["lora", "full"])
def test_trainer_ema_equals_the_average_of_the_weights_after_each_step(quick_config, network):
    config = quick_config(network=network, train={"max_steps": 4}, validation=NO_VALIDATION,
                          ema={"enabled": True, "decay": 0.6})
    trainer = Trainer(config, show_progress=False)
    try:
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        expected = [p.detach().clone() for p in params]  # the average starts as the initial weights
        groups = trainer.step_groups()
        for _ in range(4):
            trainer.train_step(next(groups))
            expected = [0.6 * e + 0.4 * p.detach() for e, p in zip(expected, params, strict=True)]
        assert trainer.ema.updates == 4
        for average, want in zip(trainer.ema.shadow, expected, strict=True):
            assert torch.allclose(average, want, rtol=0, atol=1e-6)  # lerp rounds in another order
        assert not all(torch.equal(a, p.detach()) for a, p in zip(trainer.ema.shadow, params, strict=True))
    finally:
        trainer.close()


def lora_file(folder):
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def test_validation_samples_and_export_use_the_ema_and_both_weights_are_saved(quick_config):
    config = quick_config(network=LORA, train={"max_steps": 3, "lr": 5e-3}, validation={"every_n_steps": 3},
                          ema={"enabled": True, "decay": 0.9})
    trainer = Trainer(config, show_progress=False)
    summary = trainer.run()
    records = read_metrics(trainer.run_dir.metrics)
    last = [r for r in records if "val_loss" in r][-1]
    assert last["step"] == 3 and last["val_loss"] != last["val_loss_raw"]
    assert summary["final_val_loss"] == last["val_loss"]  # what find-steps and the best save read: the EMA's
    assert [r["ema_decay"] for r in records if "loss" in r] == [pytest.approx(0.9)] * 3
    final = trainer.run_dir.checkpoints / "final"
    main, raw = lora_file(final), lora_file(final / "raw")
    assert main.keys() == raw.keys()
    # the main file is the EMA (trainable state's ema/ tensors), raw/ the weights as trained
    state = load_file(final / "training_state" / "trainable.safetensors")
    network_keys = [k for k in state if not k.startswith("ema/")]
    assert len([k for k in state if k.startswith("ema/")]) == len(network_keys)
    up = next(k for k in main if k.endswith("lora_up.weight"))
    assert not torch.equal(main[up], raw[up])
    with trainer.ema.applied():
        assert torch.allclose(trainer.network.file_tensors(torch.float32)[up], main[up])
    assert torch.allclose(trainer.network.file_tensors(torch.float32)[up], raw[up])


def test_without_export_in_use_for_the_ema_goes_in_its_subfolder(quick_config):
    config = quick_config(network=LORA, train={"max_steps": 2, "lr": 5e-3}, validation={"every_n_steps": 2},
                          ema={"enabled": True, "decay": 0.9, "use_for": ["samples"]},
                          sample={"prompts": ["a digit"], "steps": 2})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    final = trainer.run_dir.checkpoints / "final"
    assert (final / "ema").is_dir() and not (final / "raw").exists()
    assert sorted(trainer.run_dir.samples.glob("*.png"))  # rendered with the EMA weights (use_for = samples)
    up = next(k for k in lora_file(final) if k.endswith("lora_up.weight"))
    assert torch.allclose(trainer.network.file_tensors(torch.float32)[up], lora_file(final)[up])
    last = [r for r in read_metrics(trainer.run_dir.metrics)
            if "val_loss" in r][-1]
    assert "val_loss_ema" in last and "val_loss_raw" not in last


def test_resume_continues_the_average_bit_exact(quick_config, tmp_path):
    ema = {"enabled": True, "decay": 0.8, "warmup": True}

    def config_for(folder, steps):
        config = quick_config(network=LORA, train={"max_steps": steps, "lr": 5e-3}, validation=NO_VALIDATION,
                              ema=ema, output={"save_every_n_steps": 3})
        config.output.dir = str(tmp_path / folder)
        return config

    train(config_for("straight", 6), show_progress=False)
    train(config_for("resumed", 3), show_progress=False)
    resumed = config_for("resumed", 6)
    train(resumed, resume=resumed.output.dir, show_progress=False)
    for name in ("", "raw"):
        a = lora_file(tmp_path / "straight" / "checkpoints" / "final" / name)
        b = lora_file(tmp_path / "resumed" / "checkpoints" / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(tmp_path / "straight" / "checkpoints" / "final" / "training_state" / "trainable.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "final" / "training_state" / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("ema/"))


def test_doctor_warns_when_the_decay_never_lets_the_average_move(quick_config):
    from difftune.training.option_advice import ema_warnings

    assert start_weight_left(100, 0.9999, warmup=False) == pytest.approx(0.9999**100)
    assert start_weight_left(100, 0.9999, warmup=True) == 0.0  # the first warmup update copies the weights
    stuck = ema_warnings(quick_config(ema={"enabled": True, "decay": 0.9999}), total_steps=100)
    assert any("99% of the EMA is still the starting weights" in w for w in stuck)
    assert not ema_warnings(quick_config(ema={"enabled": True, "decay": 0.9}), total_steps=100)
    assert not ema_warnings(quick_config(ema={"enabled": True, "decay": 0.9999, "warmup": True}), total_steps=100)
    off = ema_warnings(quick_config(ema={"decay": 0.99}), total_steps=100)
    assert off == ["ema.decay set but ema.enabled = false: no EMA is kept"]


def test_ema_switched_on_at_a_resume_starts_from_the_resumed_weights(quick_config, tmp_path):
    config = quick_config(network=LORA, train={"max_steps": 2, "lr": 5e-3}, validation=NO_VALIDATION)
    train(config, show_progress=False)
    config.train.max_steps = 3
    config.ema.enabled, config.ema.decay = True, 0.5
    trainer = Trainer(config.model_copy(deep=True), resuming=True, show_progress=False)
    try:
        assert any("has no EMA (it was off); the average starts from its weights at step 2" in n for n in trainer.notes)
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        assert all(torch.equal(a, p.detach()) for a, p in zip(trainer.ema.shadow, params, strict=True))
    finally:
        trainer.close()
