"""Size of a configured network without loading the model: for doctor and bench/network_sizes.py.

The UNet and text encoder are built from their configs with no weights (meta tensors), the network is
attached to them, and its parameters and export shapes are counted. Two LyCORIS modules read the base
weights when they are built (DoRA's magnitude, native fine-tuning's copy), which weightless layers do
not have; for those a LoCon network finds the same layers and the extra tensors are added from the
layers' shapes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from difftune.config.schema import Config, ModelConfig
from difftune.network.lycoris_net import LoraFamilyNetwork, NetworkSettings


def weightless_architecture(model: ModelConfig) -> SimpleNamespace | None:
    """unet, text_encoder (on the meta device), family and prediction type of `model.path`, read from
    configs only; None when that needs the weights (a .ckpt with model.family = auto)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftune.models.single_file import CROSS_ATTENTION_KEY, shipped_config_dir
    from difftune.models.tiny import BUILTIN_MODELS, tiny_text_encoder, tiny_unet

    path = Path(model.path).expanduser()
    if model.path in BUILTIN_MODELS:
        with init_empty_weights():
            return SimpleNamespace(unet=tiny_unet(), text_encoder=tiny_text_encoder(), family="tiny-sd",
                                   prediction_type=BUILTIN_MODELS[model.path])
    if path.is_dir():
        folder, family = path, None
    else:
        family = model.family if model.family != "auto" else _peek_family(path, CROSS_ATTENTION_KEY)
        if family is None:
            return None
        folder = Path(model.config_dir) if model.config_dir else shipped_config_dir(family)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) \
        if (folder / "scheduler" / "scheduler_config.json").is_file() else {}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
    prediction = model.prediction_type if model.prediction_type != "auto" else scheduler.get("prediction_type", "epsilon")
    if family is None:
        width = unet.config.cross_attention_dim
        family = "sd1" if width == 768 else ("sd2-v" if prediction == "v_prediction" else "sd2") if width == 1024 else "sd-custom"
    return SimpleNamespace(unet=unet, text_encoder=text, family=family, prediction_type=prediction)


def _peek_family(path: Path, cross_attention_key: str) -> str | None:
    """sd1/sd2 from one tensor's shape in a .safetensors header (no weights read)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        if cross_attention_key not in f.keys():
            return None
        width = f.get_slice(cross_attention_key).get_shape()[-1]
    return {768: "sd1", 1024: "sd2"}.get(width)


def network_facts(config: Config, architecture: SimpleNamespace | None = None) -> dict[str, Any] | None:
    """describe() of the configured network on a weightless copy of the model (None if unknown)."""
    architecture = architecture or weightless_architecture(config.model)
    if architecture is None:
        return None
    settings = NetworkSettings.from_config(config.network)
    reads_weights = settings.dora or settings.type == "full"
    probe = dataclasses.replace(settings, type="locon", dora=False, rank=settings.rank or 1,
                                alpha=settings.alpha or 1.0, factor=None, block_size=None, constraint=None,
                                rescaled=False) if reads_weights else settings
    network = LoraFamilyNetwork.build(architecture, probe, train_unet=config.train.train_unet,
                                      train_text_encoder=config.train.train_text_encoder, attach=False, config=config)
    shapes = network.export_shapes()
    trainable = sum(p.numel() for p in network.net.parameters())
    if reads_weights:
        shapes, trainable = _weight_reading_shapes(network, settings, shapes, trainable)
    network.settings = settings  # the file metadata describes what is configured, not the probe
    return {
        "type": settings.type,
        "preset": settings.preset,
        "trains": [name for part, name in (("unet", "unet"), ("te", "text_encoder")) if _has(network, part)],
        "layers": len(network.loras),
        "trainable_parameters": trainable,
        "file_bytes": network.file_bytes(shapes),
    }


def _weight_reading_shapes(network: LoraFamilyNetwork, settings: NetworkSettings, shapes: dict, trainable: int):
    if settings.type == "full":
        # Native fine-tuning trains (and exports the difference of) each targeted weight and bias.
        shapes, trainable = {}, 0
        for module in network.loras:
            layer = module.org_module[0]
            shapes[f"{module.lora_name}.diff"] = tuple(layer.weight.shape)
            trainable += layer.weight.numel()
            if layer.bias is not None:
                shapes[f"{module.lora_name}.diff_b"] = tuple(layer.bias.shape)
                trainable += layer.bias.numel()
        return shapes, trainable
    # DoRA: one magnitude per output channel and layer, on top of the probe's own tensors. The probe is a
    # LoCon of the configured rank; LoHa/LoKr layouts differ, so count theirs on a weightless build.
    if settings.type not in ("lora", "locon"):
        plain = dataclasses.replace(settings, dora=False)
        other = LoraFamilyNetwork.build(network.model, plain, train_unet=_has(network, "unet"),
                                        train_text_encoder=_has(network, "te"), attach=False, config=network.config)
        shapes, trainable = other.export_shapes(), sum(p.numel() for p in other.net.parameters())
    for module in network.loras:
        weight = module.org_module[0].weight
        shapes[f"{module.lora_name}.dora_scale"] = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        trainable += weight.shape[0]
    return shapes, trainable


def _has(network: LoraFamilyNetwork, part: str) -> bool:
    return any(m.lora_name.startswith(f"lora_{part}_") for m in network.loras)


def format_facts(facts: dict[str, Any] | None) -> dict[str, str]:
    """Doctor lines."""
    if facts is None:
        return {"network": "size unknown until the model loads (set model.family for a .ckpt file)"}
    return {
        "network": f"{facts['type']} ({facts['preset']}) on {' + '.join(facts['trains'])}, {facts['layers']} layers",
        "trainable params": f"{facts['trainable_parameters']:,}",
        "network file size": f"{facts['file_bytes'] / 2**20:.2f} MiB",
    }
