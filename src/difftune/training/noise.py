"""The training noise: Gaussian, with the options users bring from kohya, diffusers and EveryDream2.

    noise  = randn                                                   (from the step's CPU generator)
    noise += s · randn(B, C, 1, 1)                                   offset noise, s = noise_offset
                                                                     (× U(0, 1) with noise_offset_random_strength)
    noise  = pyramid(noise) / std                                    multires_noise_iterations > 0
    input  = noise + g · randn                                       input_perturbation g (× U(0, 1) with
                                                                     input_perturbation_random_strength)

The model sees the noisy latents made with `input`; its target keeps `noise` (diffusers'
input_perturbation, kohya's ip_noise_gamma: the model learns to undo slightly more noise than it is
told about, which reduces exposure bias). Pyramid noise follows kohya's pyramid_noise_like: level i
adds a randn image of side / r^i (r drawn from [2, 4)), bilinearly upsampled, weighted by
discount^i, down to 1 pixel; the sum is rescaled to unit standard deviation.

Every draw comes from the step's generator in a fixed order (noise, [offset strength], offset,
[pyramid], then the timesteps, then [perturbation strength], perturbation), and a draw is only made
for an option that is on, so the losses of a run without these options are exactly what they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseOptions:
    offset: float = 0.0
    offset_random_strength: bool = False
    multires_iterations: int = 0
    multires_discount: float = 0.3
    perturbation: float = 0.0
    perturbation_random_strength: bool = False

    @classmethod
    def from_train(cls, train) -> NoiseOptions:
        return cls(offset=offset_noise_strength(train), offset_random_strength=train.noise_offset_random_strength,
                   multires_iterations=train.multires_noise_iterations,
                   multires_discount=train.multires_noise_discount, perturbation=train.input_perturbation,
                   perturbation_random_strength=train.input_perturbation_random_strength)


def offset_noise_strength(train) -> float:
    """train.noise_offset, or EveryDream2's zero_frequency_noise_ratio (the same offset noise)."""
    return train.noise_offset or (train.zero_frequency_noise_ratio or 0.0)


def _strength(value: float, random_strength: bool, generator: torch.Generator) -> float:
    return value * torch.rand(1, generator=generator).item() if random_strength else value


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    batch, channels, height, width = noise.shape
    for i in range(iterations):
        ratio = torch.rand(1, generator=generator).item() * 2 + 2
        h, w = max(1, int(height / ratio**i)), max(1, int(width / ratio**i))
        level = torch.randn((batch, channels, h, w), generator=generator)
        noise = noise + F.interpolate(level, size=(height, width), mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def draw_noise(latents: torch.Tensor, generator: torch.Generator, options: NoiseOptions | float = 0.0) -> torch.Tensor:
    """The target noise for `latents`, drawn on the CPU (identical on every device and on resume).
    A float is the offset strength alone."""
    if not isinstance(options, NoiseOptions):
        options = NoiseOptions(offset=float(options))
    shape = latents.shape
    noise = torch.randn(shape, generator=generator)
    if options.offset > 0:
        strength = _strength(options.offset, options.offset_random_strength, generator)
        noise = noise + strength * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    if options.multires_iterations:
        noise = pyramid_noise(noise, generator, options.multires_iterations, options.multires_discount)
    return noise.to(latents.device, latents.dtype)


def input_noise(noise: torch.Tensor, generator: torch.Generator, options: NoiseOptions) -> torch.Tensor:
    """The noise the noisy input is made with: `noise`, perturbed when input_perturbation is on."""
    if options.perturbation <= 0:
        return noise
    strength = _strength(options.perturbation, options.perturbation_random_strength, generator)
    extra = torch.randn(noise.shape, generator=generator).to(noise.device, noise.dtype)
    return noise + strength * extra
