"""Storage dtypes of the frozen parts, and float8 storage of the denoiser (model.base_precision = "fp8").

fp8 uses diffusers' layerwise casting (`diffusers.hooks.apply_layerwise_casting`): each Linear/Conv/Embedding
weight is stored as float8 e4m3 and cast to the compute dtype around its own forward, then back. The
layers kept out of it (`FP8_SKIP`: position embeddings, input and output layers) are stored in the
frozen dtype instead. It is applied before
the LoRA network is built, so LyCORIS captures the casting forward of each layer and adds its update to
that layer's output (bypass mode; the algorithms that read the base weight themselves are refused in
memory_plan). Text encoders (transformers models) are never fp8: they are cached or trained.

Backward: the casting swaps each layer's Parameter data (compute copy in, float8 back out). An op that
saved the Parameter itself (a conv saves its weight) would read float8 in backward, and checkpointing's
recomputation would see a changed tensor. So each Linear and Conv of the denoiser computes with a view
of its weight (`_VIEW_FORWARDS`): a view keeps the compute copy it was made from, and saved_weights.py
recognises it as that Parameter's (and, outside checkpointed blocks, rebuilds it in backward instead
of keeping it). Transposed convs, whose forward has other arguments, stay out of fp8.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from difftune.models.base import DENOISER, VAE
from difftune.training.memory import MemoryPlan

FP8 = torch.float8_e4m3fn
FP8_SKIP = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$", "^norm_out")
"""Layers kept out of fp8 (module-name patterns, re.search): position/patch embeddings and the model's
input and output layers, as diffusers' default skips. Unlike diffusers' default (and the models'
`_skip_layerwise_casting_patterns`), the blocks' modulation Linears (`norm1.linear`, `norm.linear`) are
stored in fp8 as kohya's fp8_base and the released fp8 Flux files do: diffusers' "norm" pattern would
keep 3.2 B of Flux's 11.9 B parameters (6.4 GB) in bf16. Norm layers themselves are never cast (they are
not among the layer types layerwise casting handles)."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": FP8}


def frozen_dtype(plan: MemoryPlan, role: str, module: torch.nn.Module) -> torch.dtype:
    """The dtype a frozen part is stored in (for an fp8 denoiser: its layers that stay out of fp8)."""
    if role == VAE and plan.vae_precision != "auto":
        return DTYPES[plan.vae_precision]  # explicit (kohya's no_half_vae is fp32)
    dtype = DTYPES[plan.base_precision] if role == DENOISER and not plan.fp8 else DTYPES[plan.frozen_precision]
    if dtype == torch.float16 and getattr(getattr(module, "config", None), "force_upcast", False):
        dtype = torch.float32  # diffusers' flag for VAEs that overflow in fp16 (SDXL's)
    return dtype


def store_in_fp8(denoiser: torch.nn.Module, compute: str) -> list[torch.nn.Parameter]:
    """Layerwise float8 storage with `compute` ("bf16", "fp16", "fp32") for the forward; returns the
    parameters now stored in float8."""
    for layer in denoiser.modules():
        if type(layer) in _VIEW_FORWARDS:  # innermost: the casting hook wraps it, LyCORIS wraps that
            layer.forward = functools.partial(_VIEW_FORWARDS[type(layer)], layer)
    from diffusers.hooks import apply_layerwise_casting

    skip = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    apply_layerwise_casting(denoiser, storage_dtype=FP8, compute_dtype=DTYPES[compute], skip_modules_pattern=FP8_SKIP,
                            skip_modules_classes=skip)
    return [p for p in denoiser.parameters() if p.dtype == FP8]


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight.view_as(layer.weight), layer.bias)


def _conv(layer: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return layer._conv_forward(x, layer.weight.view_as(layer.weight), layer.bias)


_VIEW_FORWARDS = {torch.nn.Linear: _linear, torch.nn.Conv1d: _conv, torch.nn.Conv2d: _conv, torch.nn.Conv3d: _conv}


def move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, exclude: frozenset[int] = frozenset()) -> None:
    """`module.to(device, dtype)` except that float8 tensors keep their dtype and the parameters in
    `exclude` (ids; block swap keeps them in CPU memory) stay where they are."""
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None and id(param) not in exclude:
                param.data = _convert(param.data, device, dtype)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = _convert(buffer, device, dtype)


def _convert(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.dtype != FP8:
        return tensor.to(device, dtype)
    return tensor.to(device)
