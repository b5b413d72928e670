"""LR scaling with the effective batch size (train.scale_lr), and the LRs each parameter group gets.

`sqrt` keeps the gradient-noise scale of Adam-style optimizers roughly constant when the batch grows;
`linear` is the rule for SGD (and what some trainers call "scale_lr"). Both are relative to
`train.scale_lr_base_batch`, the effective batch the configured LR was found at.
"""

from __future__ import annotations

import math


def lr_scale_factor(train) -> float:
    """Multiplier applied to lr, text_encoder_lr (and so lr_min) for the effective batch size."""
    ratio = train.batch_size * train.grad_accum / train.scale_lr_base_batch
    if train.scale_lr == "sqrt":
        return math.sqrt(ratio)
    if train.scale_lr == "linear":
        return ratio
    return 1.0


def effective_lrs(train) -> tuple[float, float]:
    """(UNet LR, text-encoder LR) after scaling; text_encoder_lr defaults to lr."""
    factor = lr_scale_factor(train)
    te = train.text_encoder_lr if train.text_encoder_lr is not None else train.lr
    return train.lr * factor, te * factor
