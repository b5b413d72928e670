"""The `adafactor` LR schedule: reports the LR adaptive Adafactor computes for itself.

transformers' `AdafactorSchedule` is the proxy kohya and EveryDream2 use. Its `get_lr` only looks at
groups whose first parameter still holds a gradient, which is never the case with
`optimizer.fused_back_pass` (gradients are freed during backward), so this subclass reads the
optimizer state instead: the reported LR is the same either way.
"""

from __future__ import annotations

import torch
from transformers.optimization import AdafactorSchedule


class AdafactorLR(AdafactorSchedule):
    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__(optimizer, initial_lr=0.0)

    def get_lr(self) -> list[float]:
        opt = self.optimizer
        lrs = []
        for group, base in zip(opt.param_groups, self.base_lrs, strict=True):
            state = next((opt.state[p] for p in group["params"] if "step" in opt.state.get(p, {})), None)
            lrs.append(opt._get_lr(group, state) if state is not None else base)
        return lrs
