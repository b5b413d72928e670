"""Loss and noise options (issue 18): each against its formula, so removing or breaking one fails here.

loss_type / huber_c / huber_schedule, debiased_estimation, zero_terminal_snr, min/max_timestep, offset
noise with random strength, pyramid noise, input perturbation, and EveryDream2's spelling of offset noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from difftune.config.loading import ConfigError, validate_config
from difftune.config.schema import ModelConfig, TrainConfig
from difftune.models import load_model
from difftune.models.element_loss import ElementLoss
from difftune.models.objectives import FlowMatchObjective, check_objective_settings
from difftune.training.noise import NoiseOptions, draw_noise, input_noise
from difftune.training.option_advice import loss_and_noise_lines, option_warnings
from difftune.training.step import per_sample_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd():
    return load_model(ModelConfig(path="tiny-sd"))


def objective_with(model, **train):
    return model.make_objective(TrainConfig(**train))


def pair(seed=0, shape=(3, 4, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ------------------------------------------------------------------------------------ element-wise loss
def test_huber_with_a_huge_threshold_is_l2_and_the_variants_follow_kohyas_formulas(tiny_sd):
    prediction, target = pair()
    t = torch.tensor([0, 500, 999])
    d = prediction - target
    l2 = objective_with(tiny_sd).elementwise_loss(prediction, target, t)
    assert torch.equal(l2, d**2)
    huge = objective_with(tiny_sd, loss_type="huber", huber_c=1e6, huber_schedule="constant")
    assert torch.allclose(huge.elementwise_loss(prediction, target, t), l2, rtol=1e-5, atol=0)

    c = 0.1
    huber = objective_with(tiny_sd, loss_type="huber", huber_c=c, huber_schedule="constant")
    kohya = 2 * c * (torch.sqrt(d.double() ** 2 + c**2) - c)  # sd-scripts' conditional_loss, in float64
    value = huber.elementwise_loss(prediction, target, t)
    assert torch.allclose(value.double(), kohya, rtol=1e-5, atol=1e-7)
    assert (value < l2).all() and value.mean() < 0.5 * l2.mean()  # far above c it grows like 2c|d|, not d²
    smooth = objective_with(tiny_sd, loss_type="smooth_l1", huber_c=c, huber_schedule="constant")
    assert torch.allclose(smooth.elementwise_loss(prediction, target, t), value / c, rtol=1e-6)
    l1 = objective_with(tiny_sd, loss_type="l1").elementwise_loss(prediction, target, t)
    assert torch.equal(l1, d.abs())


def test_huber_threshold_schedules_are_kohyas_on_ddpm_and_the_same_ratios_on_flow(tiny_sd):
    c, scale = 0.2, 1.5
    t = torch.tensor([0, 1, 250, 500, 999])
    alphas = tiny_sd.noise_scheduler.alphas_cumprod.double()[t]
    exponential = objective_with(tiny_sd, loss_type="huber", huber_c=c, huber_schedule="exponential", huber_scale=scale)
    alpha = -math.log(c) / 1000  # kohya: exp(-alpha · t) · huber_scale
    assert torch.allclose(exponential.loss.threshold(exponential, t).double(), torch.exp(-alpha * t.double()) * scale,
                          rtol=1e-6)
    snr = objective_with(tiny_sd, loss_type="huber", huber_c=c, huber_schedule="snr")
    sigmas = ((1 - alphas) / alphas) ** 0.5
    assert torch.allclose(snr.loss.threshold(snr, t).double(), (1 - c) / (1 + sigmas) ** 2 + c, rtol=1e-5)
    constant = objective_with(tiny_sd, loss_type="huber", huber_c=c, huber_schedule="constant", huber_scale=scale)
    assert torch.equal(constant.loss.threshold(constant, t), torch.full((5,), c * scale))

    flow = FlowMatchObjective(loss=ElementLoss("huber", c, "snr"))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow.loss.threshold(flow, sigma), (1 - c) / (1 + sigma / (1 - sigma)) ** 2 + c)
    flow_exp = FlowMatchObjective(loss=ElementLoss("huber", c, "exponential", scale))
    assert torch.allclose(flow_exp.loss.threshold(flow_exp, sigma), c**sigma * scale)


def test_training_with_huber_runs_and_moves_the_loss(quick_config):
    from difftune.training.loop import Trainer

    losses = {}
    for name, train in (("l2", {}), ("huber", {"loss_type": "huber", "huber_c": 0.05})):
        trainer = Trainer(quick_config(train={"max_steps": 1, **train}, validation={"every_n_epochs": 0}),
                          show_progress=False)
        try:
            losses[name] = trainer.train_step(next(trainer.step_groups()))
        finally:
            trainer.close()
    assert math.isfinite(losses["huber"]) and losses["huber"] < losses["l2"]


# --------------------------------------------------------------------------------------------- weights
def test_debiased_estimation_is_one_over_sqrt_snr_capped_and_multiplies_min_snr(tiny_sd):
    t = torch.tensor([0, 10, 400, 999])
    snr = tiny_sd.noise_scheduler.alphas_cumprod[t] / (1 - tiny_sd.noise_scheduler.alphas_cumprod[t])
    capped = snr.clamp(max=1000)
    debiased = objective_with(tiny_sd, debiased_estimation=True)
    assert torch.allclose(debiased.weight(t), 1 / torch.sqrt(capped), rtol=1e-6)
    assert debiased.weight(t)[0] == pytest.approx(1 / math.sqrt(1000), rel=1e-6)  # t = 0: SNR ~ 1e4 is capped
    both = objective_with(tiny_sd, debiased_estimation=True, min_snr_gamma=5.0)
    min_snr = objective_with(tiny_sd, min_snr_gamma=5.0)
    assert torch.allclose(both.weight(t), min_snr.weight(t) / torch.sqrt(capped), rtol=1e-6)
    v_model = load_model(ModelConfig(path="tiny-sd-v"))
    v_debiased = objective_with(v_model, debiased_estimation=True)
    v_snr = v_model.noise_scheduler.alphas_cumprod[t] / (1 - v_model.noise_scheduler.alphas_cumprod[t])
    assert torch.allclose(v_debiased.weight(t), 1 / (v_snr.clamp(max=1000) + 1), rtol=1e-6)


def test_timestep_range_bounds_the_draw_the_probe_and_the_level(tiny_sd):
    objective = objective_with(tiny_sd, min_timestep=200, max_timestep=700)
    draws = objective.sample_t(4000, torch.Generator().manual_seed(0))
    assert draws.min() == 200 and draws.max() == 699
    probe = objective.probe_t(50, torch.Generator().manual_seed(1)).sort().values
    assert probe.min() >= 200 and probe.max() <= 699 and (probe.diff() == 10).all()  # 500 timesteps / 50
    assert objective.level(torch.tensor([200])).item() == 0.0
    assert objective.level(torch.tensor([450])).item() == pytest.approx(0.5)
    plain = objective_with(tiny_sd)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(plain.sample_t(64, g1), torch.randint(0, 1000, (64,), generator=g2))  # defaults unchanged
    with pytest.raises(ConfigError, match="max_timestep <= 1000"):
        objective_with(tiny_sd, max_timestep=1200)
    with pytest.raises(ValueError, match="min_timestep = 500 must be below"):
        TrainConfig(min_timestep=500, max_timestep=500)


def test_zero_terminal_snr_rescales_the_models_own_schedule(tiny_sd):
    model = load_model(ModelConfig(path="tiny-sd-v"))
    objective = objective_with(model, zero_terminal_snr=True, min_snr_gamma=5.0)
    alphas = model.noise_scheduler.alphas_cumprod
    assert alphas[-1].item() == pytest.approx(0.0, abs=1e-12) and alphas[0] > 0.99
    assert model.noise_scheduler.config.rescale_betas_zero_snr and model.noise_scheduler.config.timestep_spacing == "trailing"
    assert objective.scheduler is model.noise_scheduler
    assert model.pipeline("euler").scheduler.config.rescale_betas_zero_snr  # samples use what was trained
    assert torch.isfinite(objective.weight(torch.tensor([999]))).all()
    eps = load_model(ModelConfig(path="tiny-sd"))
    eps_objective = objective_with(eps, zero_terminal_snr=True, min_snr_gamma=5.0)
    assert eps_objective.weight(torch.tensor([999])).item() == 1.0  # Min-SNR's limit at SNR 0, not 0/0
    unchanged = objective_with(tiny_sd).scheduler.alphas_cumprod[-1].item()
    assert unchanged > 1e-4


# ----------------------------------------------------------------------------------------------- noise
def test_offset_noise_with_random_strength_is_the_formula():
    latents = torch.zeros(2, 4, 8, 8)
    got = draw_noise(latents, torch.Generator().manual_seed(5), NoiseOptions(offset=0.1, offset_random_strength=True))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=g)
    strength = 0.1 * torch.rand(1, generator=g).item()
    assert 0 < strength < 0.1
    assert torch.equal(got, noise + strength * torch.randn((2, 4, 1, 1), generator=g))
    fixed = draw_noise(latents, torch.Generator().manual_seed(5), 0.1)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(fixed, torch.randn(latents.shape, generator=g) + 0.1 * torch.randn((2, 4, 1, 1), generator=g))


def test_pyramid_noise_adds_low_frequencies_at_unit_std():
    latents = torch.zeros(16, 4, 32, 32)
    plain = draw_noise(latents, torch.Generator().manual_seed(0))
    pyramid = draw_noise(latents, torch.Generator().manual_seed(0), NoiseOptions(multires_iterations=6,
                                                                                 multires_discount=0.8))
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    # The variance of each (sample, channel)'s spatial mean: 1/1024 for white noise, far more with the
    # coarse levels (kohya's point: the model learns to move large areas' brightness).
    assert plain.mean(dim=(2, 3)).var().item() < 0.003
    assert pyramid.mean(dim=(2, 3)).var().item() > 0.05
    g = torch.Generator().manual_seed(0)
    expected = torch.randn(latents.shape, generator=g)
    for i in range(6):  # kohya's pyramid_noise_like, written out
        r = torch.rand(1, generator=g).item() * 2 + 2
        h, w = max(1, int(32 / r**i)), max(1, int(32 / r**i))
        expected = expected + torch.nn.functional.interpolate(
            torch.randn((16, 4, h, w), generator=g), size=(32, 32), mode="bilinear") * 0.8**i
        if h == 1 or w == 1:
            break
    assert torch.allclose(pyramid, expected / expected.std(), atol=1e-6)


class _Identity:
    """A denoiser that returns its input: the loss then shows which noise made the input and which is the target."""

    def predict(self, noisy, t, cond):
        return noisy


def test_input_perturbation_noises_the_input_but_not_the_target(tiny_sd):
    objective = objective_with(tiny_sd)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100, 800])
    options = NoiseOptions(perturbation=0.1)
    perturbed = input_noise(noise, torch.Generator().manual_seed(3), options)
    extra = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(perturbed, noise + 0.1 * extra)
    assert input_noise(noise, torch.Generator().manual_seed(3), NoiseOptions()) is noise
    loss = per_sample_loss(_Identity(), objective, x0, {}, noise, t, noisy_with=perturbed)
    expected = ((objective.noisy(x0, noise + 0.1 * extra, t) - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected)
    plain = per_sample_loss(_Identity(), objective, x0, {}, noise, t)
    assert not torch.allclose(loss, plain)
    g = torch.Generator().manual_seed(4)
    random = input_noise(noise, g, NoiseOptions(perturbation=0.1, perturbation_random_strength=True))
    g = torch.Generator().manual_seed(4)
    strength = 0.1 * torch.rand(1, generator=g).item()
    assert torch.equal(random, noise + strength * torch.randn(x0.shape, generator=g))


def test_every_noise_option_trains_and_the_defaults_draw_as_before(quick_config):
    from difftune.training.loop import Trainer

    options = {"noise_offset": 0.05, "noise_offset_random_strength": True, "multires_noise_iterations": 4,
               "input_perturbation": 0.1, "debiased_estimation": True, "min_timestep": 100, "max_timestep": 900,
               "loss_type": "smooth_l1", "huber_schedule": "exponential"}
    first = {}
    for name, train in (("default", {}), ("options", options)):
        trainer = Trainer(quick_config(train={"max_steps": 2, **train}, validation={"every_n_epochs": 0}),
                          show_progress=False)
        try:
            groups = trainer.step_groups()
            first[name] = [trainer.train_step(next(groups)) for _ in range(2)]
        finally:
            trainer.close()
    assert all(math.isfinite(x) for x in first["options"]) and first["options"] != first["default"]


# ------------------------------------------------------------------------------------ spellings, checks
def test_everydream2_zero_frequency_noise_ratio_is_noise_offset(digits_dir, tmp_path):
    from conftest import quick_config_dict

    ed2 = validate_config(quick_config_dict(digits_dir, tmp_path, train={"zero_frequency_noise_ratio": 0.1}))
    kohya = validate_config(quick_config_dict(digits_dir, tmp_path, train={"noise_offset": 0.1}))
    assert NoiseOptions.from_train(ed2.train) == NoiseOptions.from_train(kohya.train) == NoiseOptions(offset=0.1)
    assert any("EveryDream2's name for offset noise" in w for w in option_warnings(ed2, "epsilon"))
    with pytest.raises(ConfigError, match="same offset noise; set one"):
        validate_config(quick_config_dict(digits_dir, tmp_path, train={"zero_frequency_noise_ratio": 0.1,
                                                                       "noise_offset": 0.2}))


def test_flow_models_refuse_the_ddpm_only_options():
    for key, value in (("debiased_estimation", True), ("zero_terminal_snr", True), ("min_timestep", 100),
                       ("max_timestep", 900), ("min_snr_gamma", 5.0)):
        with pytest.raises(ConfigError, match=f"train.{key} is for DDPM models; flux"):
            check_objective_settings(TrainConfig(**{key: value}), "flow", "flux")


def test_warnings_name_the_combinations_that_do_not_make_sense(digits_dir, tmp_path):
    from conftest import quick_config_dict

    def warnings(prediction="epsilon", **train):
        return " | ".join(option_warnings(validate_config(quick_config_dict(digits_dir, tmp_path, train=train)),
                                          prediction))

    assert "zero_terminal_snr with an epsilon-prediction model" in warnings(zero_terminal_snr=True)
    assert "epsilon-prediction" not in warnings("v_prediction", zero_terminal_snr=True)
    assert "only shape the huber and smooth_l1 losses" in warnings(huber_c=0.3)
    assert "has no effect while train.noise_offset is 0" in warnings(noise_offset_random_strength=True)
    assert "has no effect while train.multires_noise_iterations is 0" in warnings(multires_noise_discount=0.5)
    assert "both reweight the loss by SNR" in warnings(min_snr_gamma=5.0, debiased_estimation=True)
    assert warnings() == ""
    config = validate_config(quick_config_dict(digits_dir, tmp_path, train={
        "loss_type": "huber", "min_snr_gamma": 5.0, "multires_noise_iterations": 6, "noise_offset": 0.05}))
    assert loss_and_noise_lines(config) == {"loss": "huber (huber_c 0.1, snr schedule), Min-SNR gamma 5.0",
                                            "noise": "offset 0.05, pyramid 6 levels, discount 0.3"}


def test_doctor_prints_the_loss_line_and_the_zero_terminal_snr_warning(digits_dir, tmp_path, capsys):
    import tomli_w

    from conftest import quick_config_dict
    from difftune.cli.main import main

    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(quick_config_dict(digits_dir, tmp_path / "run", train={
        "zero_terminal_snr": True, "loss_type": "l1"})))
    assert main(["doctor", str(path)]) == 0
    out = capsys.readouterr().out
    assert "loss                  l1, zero terminal SNR" in out
    assert "zero_terminal_snr with an epsilon-prediction model" in out


def test_debiased_estimation_stays_finite_at_zero_terminal_snr():
    model = load_model(ModelConfig(path="tiny-sd"))  # epsilon: the weight is 1/sqrt(snr), infinite at snr 0
    objective = model.make_objective(TrainConfig(debiased_estimation=True, zero_terminal_snr=True))
    last = torch.tensor([objective.num_train_timesteps - 1])
    assert objective.snr(last).item() == 0.0
    assert objective.weight(last).item() == pytest.approx(1 / math.sqrt(1e-3), rel=1e-5)
