"""Optimizers, LR schedules, LR scaling, the schedule preview and doctor's advice (issue 3).

Every optimizer name trains the tiny model; every schedule is checked against its formula at chosen
steps, and the diffusers-named ones step for step against diffusers (what EveryDream2 and kohya run).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import tomli_w
import torch

from conftest import quick_config_dict
from difftune.cli.main import main
from difftune.config.loading import ConfigError, load_config
from difftune.optim.advice import optimizer_warnings
from difftune.optim.optimizers import OPTIMIZERS, default_lr_range, get_spec, usual_lr
from difftune.optim.registry import lr_multiplier
from difftune.training.loop import Trainer, train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NO_VALIDATION = {"every_n_steps": None, "every_n_epochs": 0}


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small to split across threads: on 2 shared cores intra-op threads
    spin against other processes and a step takes 50x longer (measured 7.1 s vs 0.13 s for 3 steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_steps(trainer: Trainer, n: int) -> list[float]:
    groups = trainer.step_groups()
    return [trainer.train_step(next(groups)) for _ in range(n)]


def first_group(config) -> dict:
    """The first optimizer parameter group of a Trainer built (not run) for `config`."""
    trainer = Trainer(config, show_progress=False)
    trainer.close()
    return trainer.optimizer.param_groups[0]


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}


def schedule(lr_scheduler: str, total: int = 100, **train) -> list[float]:
    """Multipliers for steps 0..total+99 of a config built from train.* overrides."""
    sets = [f"train.lr_scheduler={lr_scheduler}"] + [f"train.{k}={v!r}".replace("'", '"') for k, v in train.items()]
    fn = lr_multiplier(load_config(None, sets), total)
    return [fn(s) for s in range(total + 100)]


# ------------------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_trains_the_tiny_model(name, quick_config):
    spec = get_spec(name)
    lr = 1.0 if spec.lr_free else usual_lr(name, "network")  # the tiny model learns like a LoRA
    config = quick_config(train={"max_steps": 3, "batch_size": 2, "lr": lr}, validation=NO_VALIDATION,
                          optimizer={"name": name})
    trainer = Trainer(config, show_progress=False)
    assert type(trainer.optimizer).__module__.split(".")[0] == spec.library
    before = snapshot(trainer)
    losses = run_steps(trainer, 3)
    after = snapshot(trainer)
    assert all(math.isfinite(x) for x in losses)
    # Every weight moved (trust-ratio optimizers leave all-zero tensors, here norm biases, at zero).
    # SGD-like steps are proportional to the gradient, so weights with near-zero gradients may not move in
    # 3 steps; LR-free optimizers start from a tiny step size (d0).
    unchanged = [k for k in before if torch.equal(before[k], after[k]) and before[k].any()]
    allowed = 0.5 if spec.lr_free or spec.family in ("sgd", "lars") else 0.0
    assert len(unchanged) <= allowed * len(before), f"{name}: {len(unchanged)} weights did not change, e.g. {unchanged[:3]}"
    if "8bit" in name:  # the state really is 8-bit
        dtypes = {v.dtype for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
        assert torch.uint8 in dtypes
    trainer.close()


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit", "lion8bit", "paged_lion8bit"])
def test_8bit_and_paged_optimizers_on_cuda(name, quick_config):
    config = quick_config(train={"max_steps": 2, "batch_size": 2, "lr": 1e-4}, validation=NO_VALIDATION,
                          optimizer={"name": name})
    trainer = Trainer(config, show_progress=False)
    losses = run_steps(trainer, 2)
    trainer.close()
    assert all(math.isfinite(x) for x in losses)
    state = next(iter(trainer.optimizer.state.values()))
    assert state["state1"].device.type == "cuda" and state["state1"].dtype == torch.uint8


def test_fused_kernel_only_for_cuda_parameters_and_never_over_the_users_choice():
    from difftune.optim.optimizers import cuda_kernel_defaults

    def groups(*devices):
        return [{"params": [SimpleNamespace(device=torch.device(d), is_floating_point=lambda: True)
                            for d in devices]}]

    adamw = get_spec("adamw")
    assert cuda_kernel_defaults(adamw, groups("cuda", "cuda"), {}) == {"fused": True}
    assert cuda_kernel_defaults(adamw, groups("cuda", "cpu"), {}) == {}
    assert cuda_kernel_defaults(adamw, groups("cpu"), {}) == {}
    assert cuda_kernel_defaults(adamw, groups("cuda"), {"foreach": False}) == {}
    assert cuda_kernel_defaults(adamw, groups("cuda"), {"fused": False}) == {}
    assert cuda_kernel_defaults(get_spec("lion"), groups("cuda"), {}) == {}


@pytest.mark.gpu
@CUDA
def test_adamw_on_cuda_takes_the_fused_kernel(quick_config):
    config = quick_config(train={"max_steps": 2, "batch_size": 2, "lr": 1e-4}, validation=NO_VALIDATION)
    trainer = Trainer(config, show_progress=False)
    losses = run_steps(trainer, 2)
    trainer.close()
    assert all(math.isfinite(x) for x in losses)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)


def test_unsupported_setting_names_the_optimizer_and_what_it_accepts():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optimizer.name=lion", "optimizer.eps=1e-8", "optimizer.dcoef=2"])
    message = str(err.value)
    assert "optimizer.eps = 1e-08: lion (pytorch_optimizer) does not accept 'eps'" in message
    assert "Settings lion accepts: betas, fixed_decay, foreach, weight_decay, weight_decouple" in message
    assert "optimizer.dcoef" in message  # every problem at once
    with pytest.raises(ConfigError, match=r"prodigy \(prodigyopt\) does not accept 'dcoef'. Did you mean 'd_coef'"):
        load_config(None, ["optimizer.name=prodigy", "optimizer.dcoef=2"])
    with pytest.raises(ConfigError, match=r"optimizer.betas = .*expected a list of 3 values .* for adan"):
        load_config(None, ["optimizer.name=adan", "optimizer.betas=[0.9, 0.99]"])
    with pytest.raises(ConfigError, match="optimizer.safeguard_warmup = 'yes': expected true or false"):
        load_config(None, ["optimizer.name=prodigy", "optimizer.safeguard_warmup='yes'"])
    with pytest.raises(ConfigError, match="bitsandbytes refuses these settings.*SGD without momentum"):
        load_config(None, ["optimizer.name=sgd8bit", "optimizer.momentum=0.0"])
    with pytest.raises(ConfigError, match="set the learning rate with train.lr"):
        load_config(None, ["optimizer.lr=1e-4"])


def test_settings_reach_the_optimizer_and_other_trainers_spellings_work(quick_config):
    config = quick_config(optimizer={"name": "DAdaptAdam", "decouple": True, "d0": 1e-5}, train={"lr": 1.0})
    trainer = Trainer(config, show_progress=False)
    trainer.close()
    group = trainer.optimizer.param_groups[0]
    assert type(trainer.optimizer).__name__ == "DAdaptAdam"
    assert group["weight_decouple"] is True and group["d"] == 1e-5  # `decouple` is dadaptation's name; d starts at d0
    config = quick_config(optimizer={"name": "SGDNesterov"})
    group = first_group(config)
    assert group["nesterov"] is True and group["momentum"] == 0.9
    # bitsandbytes' 8-bit SGD takes `nesterov` and ignores it: refused with the reason, not passed silently.
    with pytest.raises(ConfigError, match="optimizer.nesterov = True: refused for sgd8bit: bitsandbytes' 8-bit SGD"):
        load_config(None, ["optimizer.name=sgd8bit", "optimizer.nesterov=true"])
    assert first_group(quick_config(optimizer={"name": "SGDNesterov8bit"}))["betas"][0] == 0.9
    # Typed defaults are not forced on optimizers: AdamW keeps torch's 0.01, Lion gets no eps at all.
    assert first_group(quick_config())["weight_decay"] == 0.01
    group = first_group(quick_config(optimizer={"name": "adamw", "betas": [0.8, 0.9], "amsgrad": True}))
    assert group["betas"] == (0.8, 0.9) and group["amsgrad"] is True


def test_prodigy_and_dadapt_refuse_unequal_group_lrs(quick_config):
    base = ["train.lr=1.0", "train.train_text_encoder=true"]
    for name in ("prodigy", "dadapt_adam"):
        with pytest.raises(ConfigError, match=rf"text_encoder_lr = 0.5: {name} adapts one step size .* needs the same lr"):
            load_config(None, base + [f"optimizer.name={name}", "train.text_encoder_lr=0.5"])
        load_config(None, base + [f"optimizer.name={name}", "train.text_encoder_lr=1.0"])  # equal is fine
    with pytest.raises(ConfigError, match="scale_lr = 'sqrt': prodigy estimates its own step size"):
        load_config(None, ["optimizer.name=prodigy", "train.scale_lr=sqrt"])
    config = quick_config(train={"lr": 1.0, "train_text_encoder": True}, optimizer={"name": "prodigy"})
    trainer = Trainer(config, show_progress=False)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1.0, 1.0]
    assert all(math.isfinite(x) for x in run_steps(trainer, 2))
    trainer.close()


def test_fused_back_pass_is_exact_and_refuses_what_it_cannot_do(quick_config):
    def weights(**opt):
        config = quick_config(train={"max_steps": 3, "batch_size": 2}, validation=NO_VALIDATION, optimizer=opt)
        trainer = Trainer(config, show_progress=False)
        losses = run_steps(trainer, 3)
        trainer.close()
        return snapshot(trainer), losses

    (plain, plain_losses), (fused, fused_losses) = weights(), weights(fused_back_pass=True)
    assert fused_losses == plain_losses and all(torch.equal(plain[k], fused[k]) for k in plain)
    with pytest.raises(ConfigError, match="train.grad_accum must be 1 .got 2.") as err:
        load_config(None, ["optimizer.fused_back_pass=true", "train.grad_accum=2", "train.clip_grad_norm=1.0"])
    assert "train.clip_grad_norm" in str(err.value)
    with pytest.raises(ConfigError, match="lion keeps state across parameters.*Available with: adamw"):
        load_config(None, ["optimizer.fused_back_pass=true", "optimizer.name=lion"])


def test_stochastic_rounding_keeps_small_bf16_updates(quick_config):
    """At a fine-tuning LR most bf16 updates round away; stochastic rounding keeps them on average,
    so training follows the fp32-weight run much more closely."""

    def losses(weight_dtype, rounding):
        config = quick_config(train={"batch_size": 2, "lr": 1e-5, "mixed_precision": "bf16", "weight_dtype": weight_dtype},
                              validation=NO_VALIDATION, optimizer={"stochastic_rounding": rounding})
        trainer = Trainer(config, show_progress=False)
        result = run_steps(trainer, 4)
        trainer.close()
        assert next(iter(trainer.network.state_dict().values())).dtype == getattr(torch, {"fp32": "float32"}.get(weight_dtype, "bfloat16"))
        return result

    reference, plain, rounded = losses("fp32", False), losses("bf16", False), losses("bf16", True)
    assert abs(rounded[-1] - reference[-1]) < 0.5 * abs(plain[-1] - reference[-1])
    with pytest.raises(ConfigError, match="stochastic_rounding = true: only bf16 weights"):
        load_config(None, ["optimizer.stochastic_rounding=true"])
    with pytest.raises(ConfigError, match="weight_dtype = 'bf16' needs train.mixed_precision = 'bf16'"):
        load_config(None, ["train.weight_dtype=bf16"])


def test_adafactor_both_modes(quick_config):
    # Adaptive: lr is ignored and the `adafactor` schedule reports the LR Adafactor computed itself
    # (also with fused_back_pass, where gradients are gone when the scheduler looks).
    for fused in (False, True):
        config = quick_config(train={"lr_scheduler": "adafactor", "batch_size": 2}, validation=NO_VALIDATION,
                              optimizer={"name": "adafactor", "fused_back_pass": fused})
        trainer = Trainer(config, show_progress=False)
        run_steps(trainer, 2)
        opt = trainer.optimizer
        group = opt.param_groups[0]
        internal = opt._get_lr(group, opt.state[group["params"][0]])
        assert trainer.current_lrs()["lr"] == pytest.approx(internal) and internal != config.train.lr
        trainer.close()
    # Fixed-LR mode: the configured lr and schedule apply.
    config = quick_config(train={"lr_scheduler": "linear", "batch_size": 2, "max_steps": 4}, validation=NO_VALIDATION,
                          optimizer={"name": "adafactor", "relative_step": False, "scale_parameter": False})
    trainer = Trainer(config, show_progress=False)
    run_steps(trainer, 2)
    trainer.close()
    assert trainer.current_lrs()["lr"] == pytest.approx(config.train.lr * 0.5)
    with pytest.raises(ConfigError, match="lr_scheduler = 'adafactor' reports the LR adaptive Adafactor"):
        load_config(None, ["train.lr_scheduler=adafactor"])


def test_schedule_free_evaluates_and_resumes_with_its_averaged_weights(quick_config, tmp_path):
    config = quick_config(train={"batch_size": 2}, validation={"every_n_steps": 2}, optimizer={"name": "adamw_schedulefree"})
    trainer = Trainer(config, show_progress=False)
    run_steps(trainer, 2)
    train_weights = snapshot(trainer)
    with_train_weights = trainer.val_probe.evaluate(trainer.model, trainer.objective, trainer.accelerator.autocast).loss
    val_loss = trainer.validate()["val_loss"]
    trainer.close()
    assert val_loss != with_train_weights  # validation used the averaged (eval-mode) weights
    assert trainer.optimizer.param_groups[0]["train_mode"] is True
    assert all(torch.equal(train_weights[k], v) for k, v in snapshot(trainer).items())  # given back bit for bit

    common = {"train": {"max_steps": 4, "batch_size": 2}, "validation": {"every_n_steps": 2},
              "optimizer": {"name": "adamw_schedulefree"}}
    whole = quick_config(output={"dir": str(tmp_path / "whole")}, **common)
    train(whole, show_progress=False)
    part = quick_config(output={"dir": str(tmp_path / "part"), "save_every_n_steps": 2}, **common)
    part.train.max_steps = 2
    train(part, show_progress=False)
    part.train.max_steps = 4
    train(part, resume=tmp_path / "part", show_progress=False)
    from safetensors.torch import load_file

    # The uninterrupted run saved nothing at step 2: the resumed one must still match it exactly, tensor by
    # tensor, in both the export (averaged weights) and the training state (training weights).
    for name in ("unet/diffusion_pytorch_model.safetensors", "training_state/trainable.safetensors"):
        a = load_file(tmp_path / "whole/checkpoints/final" / name)
        b = load_file(tmp_path / "part/checkpoints/final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# -------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("constant_with_warmup", {}),
        ("linear", {}),
        ("cosine", {}),
        ("cosine_with_restarts", {"num_cycles": 3}),
        ("polynomial", {"power": 2.0, "lr_end": 0.05}),
    ],
)
@pytest.mark.parametrize("decay_steps", [None, 60])
def test_diffusers_named_schedules_match_diffusers_step_for_step(name, kwargs, decay_steps):
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    total, warmup = 100, 10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if name == "polynomial":  # get_scheduler cannot pass lr_end
        ref = get_polynomial_decay_schedule_with_warmup(opt, warmup, decay_steps or total, **kwargs)
    else:
        ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=decay_steps or total, **kwargs)
    expected = []
    for _ in range(total + 100):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    ours = schedule(name, total, lr=1.0, lr_warmup_steps=warmup, lr_cycles=kwargs.get("num_cycles", 1),
                    lr_power=kwargs.get("power", 1.0), lr_min=kwargs.get("lr_end", 0.0),
                    **({"lr_decay_steps": decay_steps} if decay_steps else {}))
    assert ours == pytest.approx(expected, abs=1e-12)


def test_every_schedule_against_its_formula():
    # lr 1, lr_min 0.1 (floor), warmup W = 10, decay ends at D = 90: span 80, midpoint 50.
    common = {"lr": 1.0, "lr_min": 0.1, "lr_warmup_steps": 10, "lr_decay_steps": 90}
    m = {name: schedule(name, 100, **common, **extra) for name, extra in [
        ("constant", {}), ("constant_with_warmup", {}), ("linear", {}), ("cosine", {}),
        ("cosine_with_restarts", {"lr_cycles": 2}), ("polynomial", {"lr_power": 2.0}), ("rex", {}),
        ("exponential", {}), ("one_cycle", {}), ("warmup_stable_decay", {"wsd_decay_ratio": 0.25}),
    ]}
    assert [m["constant"][s] for s in (0, 5, 50, 150)] == [0.0, 0.5, 1.0, 1.0]  # warmup step/W
    assert m["constant_with_warmup"][5] == 0.5
    assert [m["linear"][s] for s in (10, 50, 90, 150)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    # cosine: 0.55 at the midpoint, lr_min at D, and past D it climbs back (EveryDream2): 0.55 at 130, 1 at 170.
    assert [m["cosine"][s] for s in (10, 50, 90, 130, 170)] == pytest.approx([1.0, 0.55, 0.1, 0.55, 1.0])
    # Two restarts of 40 steps: half-way down at 30, restart at 50, floor after D.
    assert [m["cosine_with_restarts"][s] for s in (30, 49, 50, 70, 90)] == pytest.approx(
        [0.55, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 40)), 1.0, 0.55, 0.1])
    assert [m["polynomial"][s] for s in (10, 50, 90, 120)] == pytest.approx([1.0, 0.1 + 0.9 * 0.25, 0.1, 0.1])
    # REX with d = 0.9: (1 - p) / (0.1 + 0.9 (1 - p)) = 0.5 / 0.55 at the midpoint.
    assert [m["rex"][s] for s in (10, 50, 90)] == pytest.approx([1.0, 0.1 + 0.9 * (0.5 / 0.55), 0.1])
    # exponential without lr_gamma reaches lr_min at D: 0.1^(1/2) at the midpoint.
    assert [m["exponential"][s] for s in (10, 50, 90, 150)] == pytest.approx([1.0, 0.1**0.5, 0.1, 0.1])
    assert schedule("exponential", 100, lr=1.0, lr_gamma=0.5)[3] == 0.125
    # one_cycle: cosine rise over the warmup from lr_min, cosine fall to lr_min at D.
    assert [m["one_cycle"][s] for s in (0, 5, 10, 50, 90)] == pytest.approx([0.1, 0.55, 1.0, 0.55, 0.1])
    # warmup_stable_decay: last 25% of W..D (20 steps from 70) is a cosine to lr_min.
    assert [m["warmup_stable_decay"][s] for s in (50, 70, 80, 90)] == pytest.approx([1.0, 1.0, 0.55, 0.1])


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclic_matches_torch_cyclic_lr(mode):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.1, max_lr=1.0, step_size_up=10, mode=mode, gamma=0.97,
                                            cycle_momentum=False)
    expected = []
    for _ in range(200):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    ours = schedule("cyclic", 100, lr=1.0, lr_min=0.1, cycle_steps=20, cyclic_mode=mode, lr_gamma=0.97)
    assert ours == pytest.approx(expected, abs=1e-9)
    assert ours[0] == pytest.approx(0.1) and ours[10] == pytest.approx(0.1 + 0.9 * {"exp_range": 0.97**10}.get(mode, 1.0))
    assert ours[30] == pytest.approx(0.1 + 0.9 * {"triangular2": 0.5, "exp_range": 0.97**30}.get(mode, 1.0))


def test_warmup_ratio_and_everydream2_linear_ramp():
    assert schedule("constant", 200, lr_warmup_ratio=0.25)[:51:10] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # EveryDream2's LR range test: linear with warmup = total steps climbs 0 → lr over the whole run.
    ramp = schedule("linear", 100, lr_warmup_steps=100)[:100]
    assert ramp == pytest.approx([s / 100 for s in range(100)])
    with pytest.raises(ConfigError, match="set one of them"):
        load_config(None, ["train.lr_warmup_ratio=0.1", "train.lr_warmup_steps=5"])
    with pytest.raises(ConfigError, match="cyclic' rises from lr_min to lr in every cycle"):
        load_config(None, ["train.lr_scheduler=cyclic", "train.lr_warmup_steps=5"])


def test_scale_lr_arithmetic_reaches_the_optimizer(quick_config):
    from difftune.optim.scaling import effective_lrs

    # batch 4 x accum 2 = 8 against base 2: sqrt → x2, linear → x4, for both groups.
    for mode, factor in (("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)):
        config = load_config(None, ["train.lr=1e-4", "train.text_encoder_lr=5e-5", "train.batch_size=4",
                                    "train.grad_accum=2", f"train.scale_lr={mode}", "train.scale_lr_base_batch=2"])
        lrs = effective_lrs(config.train)
        assert (lrs["denoiser"], lrs["text_encoder"]) == pytest.approx((1e-4 * factor, 5e-5 * factor))
    config = quick_config(train={"lr": 1e-4, "scale_lr": "sqrt", "train_text_encoder": True, "text_encoder_lr": 2e-5})
    trainer = Trainer(config, show_progress=False)  # batch 4, base 1 → x2
    trainer.close()
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == pytest.approx([2e-4, 4e-5])


# ------------------------------------------------------------------------------ preview and doctor
def test_schedule_command_writes_png_and_table(digits_dir, tmp_path, capsys):
    from PIL import Image

    data = quick_config_dict(digits_dir, tmp_path / "run", train={"lr": 1e-4, "lr_scheduler": "cosine",
                             "lr_warmup_steps": 10, "train_text_encoder": True, "text_encoder_lr": 5e-5})
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(data))
    png = tmp_path / "lr.png"
    assert main(["schedule", str(path), "--out", str(png), "--steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "total steps   100" in out and "warmup end    step 10" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("denoiser", "text_encoder"))}
    assert lines["denoiser"] == ["0", "0.0001", "11", f"{1e-4 * 0.5 * (1 + math.cos(math.pi * 89 / 90)):.3g}"]
    assert lines["text_encoder"][1] == "5e-05"
    assert Image.open(png).size == (800, 400)
    # No model is loaded and no run directory appears.
    assert not (tmp_path / "run").exists()
    # Adaptive Adafactor: the table says the LR is internal.
    assert main(["schedule", str(path), "--out", str(png), "--steps", "50", "--set", "optimizer.name=adafactor",
                 "--set", "train.lr_scheduler=adafactor", "--set", "train.lr_warmup_steps=0"]) == 0
    assert "computes its LR inside the optimizer" in capsys.readouterr().out


def test_doctor_advice_gives_reasons(digits_dir, tmp_path, capsys):
    def warnings(*sets, full=True, steps=100):
        sets = list(sets) + ([] if full or any(s.startswith("network.type") for s in sets) else ["network.type=lora"])
        return " | ".join(optimizer_warnings(load_config(None, sets), steps))

    assert "should stay 1.0" in warnings("optimizer.name=prodigy", "train.lr=0.5")
    assert warnings("optimizer.name=prodigy", "train.lr=1.0") == ""
    assert "this schedule changes nothing" in warnings("optimizer.name=adafactor", "train.lr_scheduler=cosine")
    assert "climbs back up (to lr at step 100)" in warnings("train.lr_scheduler=cosine", "train.lr_decay_steps=50")
    assert "60% of the 100-step run" in warnings("train.lr_scheduler=linear", "train.lr_warmup_steps=60")
    assert "above the usual range for adamw (full fine-tune: 1e-06 to 1e-05)" in warnings("train.lr=1e-3")
    assert warnings("train.lr=1e-4", full=False) == ""  # a normal LoRA LR
    # textual-inversion vectors train at ~10x a LoRA's LR (A1111's 5e-3)
    ti = ("network.type=textual_inversion", "network.token=<a>")
    assert warnings(*ti, "train.lr=5e-3", full=False) == ""
    assert "above the usual range for adamw (textual inversion: 0.0005 to 0.005)" in warnings(*ti, "train.lr=0.5")
    assert "below the usual range for lion" in warnings("optimizer.name=lion", "train.lr=1e-9")
    assert "expect a constant LR" in warnings("optimizer.name=adamw_schedulefree", "train.lr=5e-6",
                                               "train.lr_scheduler=cosine")
    assert "train.lr_cycles = 3 has no effect" in warnings("train.lr_cycles=3", "train.lr=2e-6")
    lora = load_config(None, ["train.lr=1e-4"]).model_copy(update={"network": SimpleNamespace(type="lora", rank=8, alpha=32)})
    assert "alpha / rank = 4 > 1" in " ".join(optimizer_warnings(lora, 100))
    assert default_lr_range("adamw", "full") == pytest.approx((1e-7, 1e-4))
    # doctor prints the effective LR (after scale_lr) and the schedule.
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(quick_config_dict(digits_dir, tmp_path / "run", train={
        "lr": 1e-4, "scale_lr": "sqrt", "lr_scheduler": "cosine", "lr_warmup_ratio": 0.1, "max_steps": 50})))
    assert main(["doctor", str(path)]) == 0
    out = capsys.readouterr().out
    assert "effective lr          0.0002 (0.0001 x 2, scale_lr = sqrt)" in out
    assert "lr schedule           cosine, warmup 5 steps" in out and "total steps           50" in out


def test_docs_list_every_optimizer_and_schedule():
    from pathlib import Path

    from difftune.optim.schedules import SCHEDULES

    root = Path(__file__).resolve().parents[1]
    for doc in (root / "docs/optimizers.md", root / "README.md"):
        text = doc.read_text()
        missing = [n for n in [*OPTIMIZERS, *SCHEDULES] if f"`{n}`" not in text]
        assert not missing, f"{doc.name} does not list {missing}"
