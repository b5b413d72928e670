"""The element-wise loss between prediction and target: l2, l1, or kohya's Huber variants.

    l2          (p − y)²
    l1          |p − y|
    huber       2c·(sqrt((p − y)² + c²) − c)     pseudo-Huber: ≈ (p − y)² below c, ≈ 2c·|p − y| above
    smooth_l1   2·(sqrt((p − y)² + c²) − c)      the same divided by c: ≈ (p − y)²/c below, 2|p − y| above

as kohya sd-scripts' `conditional_loss`, computed as 2c·d²/(sqrt(d² + c²) + c), the same value
without the cancellation that loses every digit when c is large. The threshold c depends on each
sample's noise level through `huber_schedule` (kohya's `get_huber_threshold_if_needed`):

    constant     huber_c · huber_scale
    exponential  huber_c ** noise_fraction · huber_scale    (1·scale at no noise → huber_c·scale at pure noise)
    snr          (1 − huber_c) / (1 + noise_to_signal)² + huber_c

with noise_fraction = t / T (DDPM) or σ (flow) and noise_to_signal = sqrt((1 − ᾱ)/ᾱ) (DDPM, kohya's
"sigmas") or σ/(1 − σ) (flow: the same ratio of the noisy input's noise and signal scales), from the
objective, so one definition serves every family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass(frozen=True)
class ElementLoss:
    kind: str = "l2"
    huber_c: float = 0.1
    schedule: str = "snr"
    scale: float = 1.0

    def __post_init__(self):
        if self.kind not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.kind!r}: expected one of {', '.join(LOSS_TYPES)}")
        if self.schedule not in HUBER_SCHEDULES:
            raise ValueError(f"huber_schedule {self.schedule!r}: expected one of {', '.join(HUBER_SCHEDULES)}")

    @classmethod
    def from_train(cls, train) -> ElementLoss:
        return cls(train.loss_type, train.huber_c, train.huber_schedule, train.huber_scale)

    def threshold(self, objective, t: torch.Tensor) -> torch.Tensor:
        """Per-sample Huber threshold c (shape (B,)) at timesteps t."""
        if self.schedule == "constant":
            return torch.full(t.shape, self.huber_c * self.scale, device=t.device)
        if self.schedule == "exponential":
            return torch.exp(math.log(self.huber_c) * objective.noise_fraction(t)) * self.scale
        return (1.0 - self.huber_c) / (1.0 + objective.noise_to_signal(t)) ** 2 + self.huber_c

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor, objective, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "l2":
            return F.mse_loss(prediction, target, reduction="none")
        if self.kind == "l1":
            return F.l1_loss(prediction, target, reduction="none")
        c = self.threshold(objective, t).to(prediction.device, prediction.dtype)
        c = c.view(-1, *([1] * (prediction.dim() - 1)))
        squared = (prediction - target) ** 2
        huber = 2.0 * c * squared / (torch.sqrt(squared + c**2) + c)
        return huber if self.kind == "huber" else huber / c
