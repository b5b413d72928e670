"""Full fine-tune: the denoiser and/or text encoders train directly; exports are diffusers folders
and/or one original-layout checkpoint file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftune.models.base import DiffusionModel

SINGLE_FILE_NAME = "model.safetensors"
LEGACY_PREFIXES = {"unet.": "denoiser."}
"""Resume state written before parts were named by role (difftune 0.1)."""


class FullFineTune:
    def __init__(self, model: DiffusionModel, roles: list[str], export_format: str = "diffusers"):
        self.model = model
        self.export_format = export_format
        self.parts: dict[str, torch.nn.Module] = {role: model.parts[role] for role in roles}
        for module in model.parts.values():
            module.requires_grad_(False)
        for module in self.parts.values():
            module.requires_grad_(True)

    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "lr": lrs[role], "name": role}
                for role, module in self.parts.items()]

    def trained_roles(self) -> list[str]:
        return list(self.parts)

    def trained_modules(self) -> list[torch.nn.Module]:
        return list(self.parts.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{role}.{k}": v for role, module in self.parts.items() for k, v in module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for old, new in LEGACY_PREFIXES.items():
            state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
        for role, module in self.parts.items():
            prefix = role + "."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)

    def export(self, directory: Path, model: DiffusionModel, metadata: dict[str, str], dtype: torch.dtype) -> None:
        """A diffusers folder and/or `model.safetensors` in the original single-file layout."""
        if self.export_format in ("diffusers", "both"):
            model.save_pretrained(directory, dtype=dtype)
        if self.export_format in ("single_file", "both"):
            model.save_single_file(directory / SINGLE_FILE_NAME, dtype=dtype, metadata=metadata)

    def describe(self) -> dict[str, Any]:
        trainable = sum(p.numel() for m in self.parts.values() for p in m.parameters() if p.requires_grad)
        return {"type": "full", "trains": list(self.parts), "trainable_parameters": trainable}
