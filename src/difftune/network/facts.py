"""Size of a configured network without loading the model: for doctor and bench/network_sizes.py.

The UNet and text encoder are built from their configs with no weights (meta tensors), the network is
attached to them, and its parameters and export shapes are counted. Two LyCORIS modules read the base
weights when they are built (DoRA's magnitude, native fine-tuning's copy), which weightless layers do
not have; for those a LoCon network finds the same layers and the extra tensors are added from the
layers' shapes.
"""

from __future__ import annotations

from typing import Any

from difftune.config.schema import Config
from difftune.network.base import roles_to_train
from difftune.network.lycoris_net import LoraFamilyNetwork, NetworkSettings


def network_facts(config: Config, architecture=None) -> dict[str, Any] | None:
    """describe() of the configured network on a weightless copy of the model (None if unknown)."""
    from difftune.models import weightless_model

    architecture = architecture or weightless_model(config.model)
    if architecture is None:
        return None
    settings = NetworkSettings.from_config(config.network)
    reads_weights = settings.dora or settings.type == "full"
    probe = settings.replace(type="locon", dora=False, rank=settings.rank or 1,
                                alpha=settings.alpha or 1.0, factor=None, block_size=None, constraint=None,
                                rescaled=False) if reads_weights else settings
    network = LoraFamilyNetwork.build(architecture, probe, roles_to_train(architecture, config), attach=False,
                                      config=config)
    shapes = network.export_shapes()
    trainable = sum(p.numel() for p in network.net.parameters())
    if reads_weights:
        shapes, trainable = _weight_reading_shapes(network, settings, shapes, trainable)
    network.settings = settings  # the file metadata describes what is configured, not the probe
    return {
        "type": settings.type,
        "preset": settings.preset,
        "trains": network.trained_roles(),
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
        plain = settings.replace(dora=False)
        other = LoraFamilyNetwork.build(network.model, plain, network.trained_roles(), attach=False,
                                        config=network.config)
        shapes, trainable = other.export_shapes(), sum(p.numel() for p in other.net.parameters())
    for module in network.loras:
        weight = module.org_module[0].weight
        shapes[f"{module.lora_name}.dora_scale"] = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        trainable += weight.shape[0]
    return shapes, trainable


def format_facts(facts: dict[str, Any] | None) -> dict[str, str]:
    """Doctor lines."""
    if facts is None:
        return {"network": "size unknown until the model loads (set model.family for a .ckpt file)"}
    return {
        "network": f"{facts['type']} ({facts['preset']}) on {' + '.join(facts['trains'])}, {facts['layers']} layers",
        "trainable params": f"{facts['trainable_parameters']:,}",
        "network file size": f"{facts['file_bytes'] / 2**20:.2f} MiB",
    }
