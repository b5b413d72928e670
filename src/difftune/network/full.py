"""Full fine-tune: the UNet and/or text encoder train directly; exports are diffusers folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftune.models.base import DiffusionModel

SINGLE_FILE_NAME = "model.safetensors"


class FullFineTune:
    def __init__(self, model: DiffusionModel, train_unet: bool, train_text_encoder: bool, export_format: str = "diffusers"):
        self.model = model
        self.export_format = export_format
        self.parts: dict[str, torch.nn.Module] = {}
        if train_unet:
            self.parts["unet"] = model.unet
        if train_text_encoder:
            for i, encoder in enumerate(model.text_encoders):
                self.parts["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
        for module in [model.unet, model.vae, *model.text_encoders]:
            module.requires_grad_(False)
        for module in self.parts.values():
            module.requires_grad_(True)

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
        groups = []
        for name, module in self.parts.items():
            lr = unet_lr if name == "unet" else text_encoder_lr
            groups.append({"params": [p for p in module.parameters() if p.requires_grad], "lr": lr, "name": name})
        return groups

    def trained_modules(self) -> list[torch.nn.Module]:
        return list(self.parts.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, module in self.parts.items() for k, v in module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, module in self.parts.items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)

    def export(self, directory: Path, model: DiffusionModel, metadata: dict[str, str], dtype: torch.dtype) -> None:
        """A diffusers folder and/or `model.safetensors` in the original single-file layout."""
        if self.export_format in ("diffusers", "both"):
            model.save_pretrained(directory, dtype=dtype)
        if self.export_format in ("single_file", "both"):
            from difftune.checkpoint.single_file_export import save_single_file

            save_single_file(
                directory / SINGLE_FILE_NAME, model.unet, model.vae, model.text_encoders[0], dtype=dtype, metadata=metadata
            )

    def describe(self) -> dict[str, Any]:
        trainable = sum(p.numel() for m in self.parts.values() for p in m.parameters() if p.requires_grad)
        return {"type": "full", "trains": list(self.parts), "trainable_parameters": trainable}
