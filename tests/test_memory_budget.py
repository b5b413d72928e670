"""The GPU memory budget doctor prints, counted on the full-size Flux.1-dev architecture without weights."""

from __future__ import annotations

import pytest

from difftune.config.schema import Config
from difftune.models import weightless_model
from difftune.models.single_file_io import shipped_config_dir
from difftune.training.memory_budget import memory_budget, optimizer_state_bytes_per_param

FLUX_DEV_TRANSFORMER = 11_901_408_320  # parameters of the shipped flux-dev transformer config


def budget(**train_and_model):
    model = {"path": str(shipped_config_dir("flux-dev")), **train_and_model.pop("model", {})}
    config = Config.model_validate({"model": model, "network": {"type": "lora", "rank": 16},
                                    "train": {"mixed_precision": "bf16", **train_and_model}})
    architecture = weightless_model(config.model)
    return memory_budget(config, architecture, trainable_parameters=1_000_000), architecture


def test_flux_dev_in_bf16_fp8_and_with_block_swap():
    bf16, architecture = budget(model={"base_precision": "bf16"})
    assert sum(p.numel() for p in architecture.transformer.parameters()) == FLUX_DEV_TRANSFORMER
    assert bf16["bytes"]["denoiser"] == 2 * FLUX_DEV_TRANSFORMER
    # Cached text embeddings (auto for Flux) with the encoders on the CPU: T5-XXL costs no GPU memory.
    assert bf16["bytes"]["text_encoder"] == bf16["bytes"]["text_encoder_2"] == 0

    fp8, _ = budget(model={"base_precision": "fp8"})
    # Everything but the embeddings and the input/output layers in one byte: the 11.9 GB of the released fp8 files.
    assert FLUX_DEV_TRANSFORMER < fp8["bytes"]["denoiser"] < 1.003 * FLUX_DEV_TRANSFORMER

    swapped, architecture = budget(model={"base_precision": "fp8"}, blocks_to_swap=20)
    blocks = architecture.denoiser_blocks()
    sizes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks[-20:]]
    assert swapped["bytes"]["denoiser"] == fp8["bytes"]["denoiser"] - sum(sizes) + max(sizes)

    # Trained weights, gradients and AdamW's two fp32 moments for the 1M network parameters.
    assert (fp8["bytes"]["trained weights"], fp8["bytes"]["gradients"]) == (4_000_000, 4_000_000)
    assert fp8["bytes"]["optimizer state"] == pytest.approx(8_000_000, rel=1e-3)


def test_optimizer_state_is_measured_from_the_optimizer():
    assert optimizer_state_bytes_per_param("adamw") == pytest.approx(8.0, abs=1e-3)  # exp_avg + exp_avg_sq, fp32
    assert optimizer_state_bytes_per_param("lion") == pytest.approx(4.0)
    assert optimizer_state_bytes_per_param("adamw8bit") < 2.5  # two 8-bit moments and their block scales
    assert optimizer_state_bytes_per_param("sgd") == 0.0
