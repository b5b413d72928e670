"""What a configured run keeps in GPU memory, counted on a weightless (meta-device) copy of the model.

For `difftune doctor` and bench/flow_memory_plan.py. Counted, not guessed: each part's bytes come from
its parameters in the dtype they will be stored in (fp8 storage is applied to the weightless copy with
the same diffusers call the trainer makes, so the layers it skips are skipped here too), and the
optimizer's state bytes per trained parameter are measured by stepping the real optimizer once on a
small weight. Activations depend on the batch, the resolution, the attention kernel and checkpointing;
they are not counted here (bench/gpu_flux_lora.py measures the peak on a GPU).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

GIB = 2**30


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


@cache
def optimizer_state_bytes_per_param(name: str) -> float:
    """Bytes of optimizer state per trained parameter, measured by one step of the real optimizer on a
    256×256 weight (8-bit and factored optimizers included, as their libraries implement them)."""
    from difftune.config.schema import Config
    from difftune.optim.registry import build_optimizer

    weight = torch.nn.Parameter(torch.zeros(256, 256))
    config = Config.model_validate({"optimizer": {"name": name}, "train": {"lr": 1e-4}})
    optimizer = build_optimizer(config, [{"params": [weight], "lr": 1e-4, "name": "probe"}])
    weight.grad = torch.full_like(weight, 1e-3)
    optimizer.step()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total / weight.numel()


def memory_budget(config, architecture, trainable_parameters: int | None) -> dict[str, Any]:
    """Bytes on the training GPU by part, for `config` on the weightless `architecture`: what the trainer
    would hold with the settings training/memory resolves for a CUDA device.

    `trainable_parameters`: the network's (network_facts), or None for a full fine-tune of the trained roles.
    """
    from difftune.models.base import DENOISER, VAE
    from difftune.network.base import roles_to_train
    from difftune.training.memory import memory_plan
    from difftune.training.memory.precision import DTYPES, frozen_dtype, store_in_fp8

    plan = memory_plan(config, cuda=True, check_device=False)
    roles = roles_to_train(architecture, config)
    network = config.network.type not in (None, "none")
    parts: dict[str, int] = {}
    notes: list[str] = []
    for role, module in architecture.parts.items():
        if role in roles and not network:
            continue  # trained in full: counted with the trained weights below
        if role == DENOISER and plan.fp8:
            store_in_fp8(module, plan.compute_precision)  # the trainer's own call: the same layers stay out
            _cast_unset(module, DTYPES[plan.frozen_precision])
        else:
            module.to(dtype=frozen_dtype(plan, role, module))
        if role not in (DENOISER, VAE) and plan.offload_encoders:
            parts[role] = 0
            continue
        parts[role] = module_bytes(module)
    if plan.cache_text:
        notes.append("text embeddings cached" + (", the encoders kept on the CPU" if plan.offload_encoders else ""))
    if plan.blocks_to_swap and hasattr(architecture, "denoiser_blocks"):
        blocks = architecture.denoiser_blocks()
        swapped = blocks[len(blocks) - plan.blocks_to_swap:]  # block_swap.BlockSwap.for_model: the last N
        moved = sum(module_bytes(b) for b in swapped)
        in_flight = max(module_bytes(b) for b in swapped)
        parts[DENOISER] += in_flight - moved
        notes.append(f"{plan.blocks_to_swap} of {len(blocks)} blocks swapped: {moved / GIB:.2f} GiB in CPU memory, "
                     f"one block ({in_flight / GIB:.2f} GiB) on the GPU at a time")
    if trainable_parameters is None:
        trainable_parameters = sum(p.numel() for r in roles for p in architecture.parts[r].parameters())
    weight_bytes = 2 if config.train.weight_dtype == "bf16" else 4
    parts["trained weights"] = trainable_parameters * weight_bytes
    parts["gradients"] = 0 if config.optimizer.fused_back_pass else trainable_parameters * weight_bytes
    parts["optimizer state"] = int(trainable_parameters * optimizer_state_bytes_per_param(config.optimizer.name))
    return {"bytes": parts, "total_bytes": sum(parts.values()), "base_dtype": plan.base_precision,
            "compute_dtype": plan.compute_precision, "notes": notes,
            "excludes": "activations (they depend on batch, resolution and checkpointing; measured on a GPU)"}


def _cast_unset(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """The layers fp8 leaves alone are stored in the frozen dtype (float8 tensors keep theirs)."""
    for param in module.parameters():
        if param.dtype != torch.float8_e4m3fn:
            param.data = param.data.to(dtype)


def format_budget(budget: dict[str, Any]) -> dict[str, str]:
    """Doctor lines."""
    parts = ", ".join(f"{part} {value / GIB:.2f}" for part, value in budget["bytes"].items() if value)
    return {"GPU memory (GiB)": f"{budget['total_bytes'] / GIB:.2f} before activations: {parts}",
            **({"memory notes": "; ".join(budget["notes"])} if budget["notes"] else {})}
