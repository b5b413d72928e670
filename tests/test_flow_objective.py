"""Rectified-flow objective: the loss of a fixed batch by hand, and every σ sampler against its formula.

The formulas here are written independently of models/objectives.py (statistics.NormalDist for the
normal quantiles, plain Python for the shifts), so a change to a sampler's definition fails here.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from difftune.config.schema import TrainConfig
from difftune.models.objectives import FlowMatchObjective, flux_mu, make_flow_objective
from difftune.training.step import per_sample_loss

N = 200_000
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def shifted(u: float, s: float) -> float:
    return s * u / (1 + (s - 1) * u)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def mode_f(u: float, scale: float) -> float:
    return 1 - u - scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)


def expected_quantile(sampling: str, q: float, *, shift: float = 1.0, mean: float = 0.0, std: float = 1.0,
                      scale: float = 1.0, mode_scale: float = 1.29, tokens: int | None = None) -> float:
    """The q-quantile of σ under each sampler, from its definition."""
    z = NormalDist().inv_cdf(q)
    if sampling == "uniform":
        return shifted(q, shift)
    if sampling == "logit_normal":
        return shifted(sigmoid(mean + std * z), shift)
    if sampling == "sigmoid":
        return shifted(sigmoid(scale * z), shift)
    if sampling == "mode":
        return shifted(mode_f(1 - q, mode_scale), shift)  # f falls from 1 to 0
    if sampling == "shift":
        return shifted(sigmoid(scale * z), shift)
    if sampling == "flux_shift":
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
        u = sigmoid(scale * z)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    raise AssertionError(sampling)


CASES = [
    ("uniform", dict(shift=1.0), {}),
    ("uniform", dict(shift=3.0), {}),  # SD3's scheduler shift applies to the base draw
    ("logit_normal", dict(shift=1.0, logit_mean=0.0, logit_std=1.0), dict(mean=0.0, std=1.0)),
    ("logit_normal", dict(shift=3.0, logit_mean=0.5, logit_std=0.8), dict(mean=0.5, std=0.8)),
    ("sigmoid", dict(shift=1.0, sigmoid_scale=1.5), dict(scale=1.5)),
    ("mode", dict(shift=1.0, mode_scale=1.29), dict(mode_scale=1.29)),
    ("mode", dict(shift=3.0, mode_scale=0.5), dict(mode_scale=0.5)),
    ("shift", dict(shift=1.0, discrete_flow_shift=3.1582, sigmoid_scale=1.0), dict(scale=1.0)),
    ("flux_shift", dict(shift=1.0, sigmoid_scale=1.0), dict(scale=1.0)),
]


@pytest.mark.parametrize(("sampling", "settings", "formula"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_sampler_quantiles_match_their_formula(sampling, settings, formula):
    objective = FlowMatchObjective(sampling=sampling, **settings)
    hw = (64, 64)  # 1024 image tokens at patch 2: μ between Flux's 0.5 and 1.15
    shift = settings.get("discrete_flow_shift") or settings.get("shift", 1.0)
    sigma = objective.sample_t(N, torch.Generator().manual_seed(0), hw).double().numpy()
    assert sigma.dtype == np.float64 and sigma.min() > 0 and sigma.max() < 1
    for q in QUANTILES:
        want = expected_quantile(sampling, q, shift=shift, tokens=32 * 32, **formula)
        assert np.quantile(sigma, q) == pytest.approx(want, abs=4e-3), (sampling, q)
    # The probe's stratified σ sit exactly at the quantiles (i + 0.5) / n, and `level` inverts them.
    n = 10
    probe = objective.probe_t(n, torch.Generator().manual_seed(1), hw)
    wanted = sorted(expected_quantile(sampling, (i + 0.5) / n, shift=shift, tokens=32 * 32, **formula) for i in range(n))
    assert sorted(probe.tolist()) == pytest.approx(wanted, abs=1e-5)
    levels = objective.level(probe, hw)
    assert sorted(levels.tolist()) == pytest.approx([(i + 0.5) / n for i in range(n)], abs=1e-4)


def test_draws_come_from_the_generator_only():
    objective = FlowMatchObjective(sampling="logit_normal", shift=3.0)
    torch.manual_seed(123)  # the global RNG must not matter
    a = objective.sample_t(16, torch.Generator().manual_seed(7))
    torch.manual_seed(999)
    b = objective.sample_t(16, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, objective.sample_t(16, torch.Generator().manual_seed(8)))


def test_flux_shift_follows_the_resolution():
    """Flux's shift grows with the image's token count: larger images train at higher noise."""
    objective = FlowMatchObjective(sampling="flux_shift")
    medians = [float(objective.sample_t(N, torch.Generator().manual_seed(0), (side, side)).median())
               for side in (32, 64, 128)]  # 256, 1024 and 4096 tokens
    assert medians[0] < medians[1] < medians[2]
    assert medians[0] == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1), abs=2e-3)  # u's median is 1/2
    assert medians[2] == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), abs=2e-3)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)


def test_weighting_schemes():
    sigma = torch.tensor([0.1, 0.5, 0.9])
    none = FlowMatchObjective(weighting_scheme="none").weight(sigma)
    sqrt = FlowMatchObjective(weighting_scheme="sigma_sqrt").weight(sigma)
    cosmap = FlowMatchObjective(weighting_scheme="cosmap").weight(sigma)
    assert none.tolist() == [1.0, 1.0, 1.0]
    assert sqrt.tolist() == pytest.approx([100.0, 4.0, 1 / 0.81])
    assert cosmap.tolist() == pytest.approx([2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.1, 0.5, 0.9)])


class _LinearVelocity:
    """A stand-in denoiser whose prediction is a fixed function of its inputs (so the loss is computable by hand)."""

    def predict(self, noisy, t, cond):
        return 0.5 * noisy + t.view(-1, 1, 1, 1) * cond["bias"]


def test_flow_loss_of_a_fixed_batch_by_hand():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sigma = torch.tensor([0.25, 0.8])
    bias = torch.full((1, 4, 1, 1), 0.1)
    for scheme in ("none", "sigma_sqrt", "cosmap"):
        objective = FlowMatchObjective(weighting_scheme=scheme)
        got = per_sample_loss(_LinearVelocity(), objective, x0, {"bias": bias}, noise, sigma)
        for i, s in enumerate(sigma.tolist()):
            noisy = [(1 - s) * a + s * b for a, b in zip(x0[i].flatten().tolist(), noise[i].flatten().tolist(), strict=True)]
            target = [b - a for a, b in zip(x0[i].flatten().tolist(), noise[i].flatten().tolist(), strict=True)]
            pred = [0.5 * v + s * 0.1 for v in noisy]
            mse = sum((p - q) ** 2 for p, q in zip(pred, target, strict=True)) / len(pred)
            weight = {"none": 1.0, "sigma_sqrt": s ** -2, "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s * s))}[scheme]
            assert got[i].item() == pytest.approx(mse * weight, rel=1e-6), (scheme, i)
    unweighted = per_sample_loss(_LinearVelocity(), FlowMatchObjective(weighting_scheme="sigma_sqrt"), x0,
                                 {"bias": bias}, noise, sigma, weighted=False)
    plain = per_sample_loss(_LinearVelocity(), FlowMatchObjective(), x0, {"bias": bias}, noise, sigma)
    assert torch.equal(unweighted, plain)  # validation measures the plain velocity MSE


def test_train_config_selects_the_objective():
    train = TrainConfig(timestep_sampling="shift", discrete_flow_shift=3.0, weighting_scheme="cosmap", sigmoid_scale=2.0)
    objective = make_flow_objective(train, shift=1.0, default_sampling="logit_normal")
    assert (objective.sampling, objective.discrete_flow_shift, objective.weighting_scheme, objective.sigmoid_scale) \
        == ("shift", 3.0, "cosmap", 2.0)
    assert make_flow_objective(TrainConfig(), shift=3.0, default_sampling="flux_shift").sampling == "flux_shift"
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatchObjective(sampling="sigma")
    with pytest.raises(ValueError, match="latent size"):
        FlowMatchObjective(sampling="flux_shift").sample_t(2, torch.Generator())


def test_ddpm_models_refuse_flow_settings():
    from difftune.config.schema import ModelConfig
    from difftune.errors import ConfigError
    from difftune.models import load_model

    model = load_model(ModelConfig(path="tiny-sd"))
    with pytest.raises(ConfigError, match="train.timestep_sampling = 'logit_normal' is for flow-matching"):
        model.make_objective(TrainConfig(timestep_sampling="logit_normal"))
    assert model.make_objective(TrainConfig(min_snr_gamma=5.0)).min_snr_gamma == 5.0
