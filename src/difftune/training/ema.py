"""An exponential moving average of the trained weights (`[ema]`), for full fine-tunes and networks.

After optimizer step s, every `update_every` steps, each EMA tensor moves toward the weights:

    ema ← d_s^N · ema + (1 − d_s^N) · weight        N = update_every

with d_s the decay at update step s = step − 1:

    d_s = decay                                         warmup = false: a fixed decay from the first step
    d_s = min(decay, 1 − (1 + s / inv_gamma)^−power)    warmup = true: diffusers EMAModel's use_ema_warmup
                                                        (d_0 = 0: with update_every 1 the first update
                                                        copies the weights)

The average starts as the weights before training (the base model, or the network's initial
weights), so with a fixed decay it leaves them at the rate decay^steps; doctor warns when a run
ends with most of its average still the starting weights.
Raising the decay to the N-th power keeps `decay` a per-step rate: updating every N steps changes
the cost, not how many steps the average spans (about 1 / (1 − decay)).

Written here rather than taken from diffusers' EMAModel because `device = "cpu"` must keep the average
off the GPU while the weights train on it (EMAModel subtracts across devices), and because the
average is kept in fp32 whatever the weights' dtype: at decay 0.999 a bf16 average would round most
updates away. A save stores the average (training_state, keys "ema/<i>") and its update count in
the trainer state, so a resume continues it bit for bit.
"""

from __future__ import annotations

import contextlib
import math

import torch

STATE_PREFIX = "ema/"
"""Keys of the average's tensors in a save's trainable.safetensors."""


def decay_at(step: int, decay: float, warmup: bool, inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """The decay of the update at update step `step` (optimizer step − 1, as diffusers counts)."""
    if not warmup:
        return decay
    return min(decay, max(0.0, 1 - (1 + step / inv_gamma) ** -power))


def start_weight_left(total_steps: int, decay: float, warmup: bool, update_every: int = 1,
                      inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """The share of the average that is still the starting weights after `total_steps` steps (1: it
    never moved). doctor warns when a run ends with most of it left."""
    log_left = 0.0
    for step in range(update_every, total_steps + 1, update_every):
        d = decay_at(step - 1, decay, warmup, inv_gamma, power)
        if d <= 0.0:
            return 0.0
        log_left += update_every * math.log(d)
    return math.exp(log_left)


@contextlib.contextmanager
def kept_aside(params: list[torch.Tensor]):
    """The parameters copied to CPU memory for the duration and put back bit for bit afterwards, whatever
    the block did to them (the EMA swapped in, a schedule-free optimizer's evaluation weights)."""
    kept = [p.detach().to("cpu", copy=True) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, saved in zip(params, kept, strict=True):
                param.copy_(saved)


class EMAWeights:
    def __init__(self, params: list[torch.Tensor], decay: float, update_every: int = 1, warmup: bool = False,
                 inv_gamma: float = 1.0, power: float = 2 / 3, device: str = "auto"):
        self.params = list(params)
        self.decay, self.update_every, self.warmup = decay, update_every, warmup
        self.inv_gamma, self.power = inv_gamma, power
        self.updates = 0
        """Updates made so far (saved with the trainer state)."""
        self.device = device
        self.restart()

    def restart(self) -> None:
        """The average set to the current weights (the start, or a resume from a save without one)."""
        self.shadow = [p.detach().to(self._device(p, self.device), torch.float32, copy=True) for p in self.params]

    @staticmethod
    def _device(param: torch.Tensor, device: str) -> torch.device:
        return param.device if device == "auto" else torch.device(device)

    def current_decay(self, step: int) -> float:
        """The factor an update after optimizer step `step` (1-based) applies: d_(step−1) ** update_every."""
        return decay_at(step - 1, self.decay, self.warmup, self.inv_gamma, self.power) ** self.update_every

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Move the average after optimizer step `step` (1-based); True when this step updates."""
        if step % self.update_every:
            return False
        weight = 1.0 - self.current_decay(step)
        for average, param in zip(self.shadow, self.params, strict=True):
            average.lerp_(param.detach().to(average.device, torch.float32), weight)
        self.updates += 1
        return True

    @contextlib.contextmanager
    def applied(self):
        """The average in the trained parameters for the duration, the training weights put back bit
        for bit afterwards (kept in CPU memory meanwhile, not as a second copy on the GPU)."""
        with kept_aside(self.params):
            with torch.no_grad():
                for param, average in zip(self.params, self.shadow, strict=True):
                    param.copy_(average)
            yield

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{STATE_PREFIX}{i}": average for i, average in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"the save's EMA has {len(state)} tensors, the network trains {len(self.shadow)}")
        for i, average in enumerate(self.shadow):
            saved = state[f"{STATE_PREFIX}{i}"]
            if saved.shape != average.shape:
                raise ValueError(f"EMA tensor {i}: saved shape {tuple(saved.shape)}, trained {tuple(average.shape)}")
            average.copy_(saved)
        self.updates = updates


def split_state(trainable: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A save's trainable tensors as (the network's, the EMA's)."""
    network = {k: v for k, v in trainable.items() if not k.startswith(STATE_PREFIX)}
    return network, {k: v for k, v in trainable.items() if k.startswith(STATE_PREFIX)}
