"""Two memory techniques that wrap any optimizer without changing it.

Stochastic rounding (`optimizer.stochastic_rounding`, with `train.weight_dtype = "bf16"`): bf16
weights lose updates smaller than their rounding step (~0.4% of the weight), which is most updates
at fine-tuning LRs. A step pre-hook gives the optimizer fp32 copies of the bf16 weights (and of
their gradients); the post-hook writes the result back to bf16 rounding up or down at random in
proportion to the distance (pytorch-optimizer's `copy_stochastic`), so small updates survive on
average. The optimizer's own state stays fp32. The fp32 copies live only during the step.

Fused backward pass (`optimizer.fused_back_pass`): each parameter is stepped from a
post-accumulate-grad hook as soon as its gradient is complete, and the gradient is freed at once, so
the gradients of the whole model never exist together. The single optimizer keeps all state (one
state_dict for checkpoints, one scheduler): for each hook call its groups are narrowed to the one
parameter. This is exact only for optimizers whose state is per parameter (torch, bitsandbytes,
Adafactor); config validation refuses the others, and refuses grad_accum > 1 and clip_grad_norm,
which need every gradient before any step.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch


def attach_stochastic_rounding(optimizer: torch.optim.Optimizer) -> list[Any]:
    """Register the fp32-step / stochastic-round-to-bf16 hooks; returns their handles."""
    from pytorch_optimizer import copy_stochastic

    stash: dict[torch.nn.Parameter, torch.Tensor] = {}

    def before(opt, args, kwargs) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16 or p.grad is None:
                    continue
                stash[p] = p.data
                p.data = p.data.float()  # the update is computed on this fp32 copy
                p.grad = p.grad.float()
                state = opt.state.get(p)
                for key, value in (state or {}).items():
                    # A resumed run loads state cast to the (bf16) parameter dtype; keep it fp32.
                    if torch.is_tensor(value) and value.dtype == torch.bfloat16:
                        state[key] = value.float()

    def after(opt, args, kwargs) -> None:
        for p, low in stash.items():
            copy_stochastic(low, p.data)
            p.grad = None  # fp32 gradient; the loop zeroes gradients right after the step anyway
            p.data = low
        stash.clear()

    return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]


class FusedBackPass:
    """Steps every parameter from its post-accumulate-grad hook and frees its gradient."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.handles = [
            p.register_post_accumulate_grad_hook(partial(self._step_one, index))
            for index, group in enumerate(optimizer.param_groups)
            for p in group["params"]
            if p.requires_grad
        ]

    @torch.no_grad()
    def _step_one(self, group_index: int, param: torch.nn.Parameter) -> None:
        groups = self.optimizer.param_groups
        saved = [g["params"] for g in groups]
        try:
            for i, g in enumerate(groups):
                g["params"] = [param] if i == group_index else []
            self.optimizer.step()
        finally:
            for g, params in zip(groups, saved, strict=True):
                g["params"] = params
        param.grad = None  # the memory saving: this gradient is gone before the next one is computed

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
