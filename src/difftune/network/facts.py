"""Size of a configured network without loading the model: for doctor and bench/network_sizes.py.

The UNet and text encoder are built from their configs with no weights (meta tensors), the network is
attached to them, and its parameters and export shapes are counted. Two LyCORIS modules read the base
weights when they are built (DoRA's magnitude, native fine-tuning's copy), which weightless layers do
not have; for those a LoCon network finds the same layers and the extra tensors are added from the
layers' shapes.
"""

from __future__ import annotations

from typing import Any

from difftune.config.network_rules import EMBEDDING_ROLE, TEXTUAL_INVERSION
from difftune.config.schema import Config
from difftune.network.base import roles_to_train
from difftune.network.lycoris_net import LoraFamilyNetwork, NetworkSettings


def network_facts(config: Config, architecture=None) -> dict[str, Any] | None:
    """describe() of the configured network on a weightless copy of the model (None if unknown)."""
    from difftune.models import weightless_model

    architecture = architecture or weightless_model(config.model)
    if architecture is None:
        return None
    if config.network.type == TEXTUAL_INVERSION:
        return embedding_facts(config, architecture)
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
    facts = {
        "type": settings.type,
        "preset": settings.preset,
        "trains": network.trained_roles(),
        "layers": len(network.loras),
        "trainable_parameters": trainable,
        "file_bytes": network.file_bytes(shapes),
    }
    if config.network.pivotal:
        vectors = embedding_facts(config, architecture)
        facts.update(type=f"{settings.type} + textual_inversion", trains=facts["trains"] + vectors["trains"],
                     trainable_parameters=trainable + vectors["trainable_parameters"],
                     file_bytes=facts["file_bytes"] + vectors["vector_bytes"], embedding_file_bytes=vectors["file_bytes"])
    return facts


def embedding_facts(config: Config, architecture) -> dict[str, Any]:
    """Textual inversion's vectors: num_vectors per text encoder of the family's embedding files."""
    from difftune.checkpoint.lora_formats import safetensors_size
    from difftune.network.lycoris_net import _save_dtype
    from difftune.network.textual_inversion import check_family, check_new_token

    check_family(architecture)
    n = config.network.num_vectors
    for role, tokenizer in getattr(architecture, "tokenizers", {}).items():
        if tokenizer is not None and role in architecture.embedding_keys:
            check_new_token(tokenizer, config.network.token, n, role)  # what training would refuse, said now
    widths = {key: architecture.parts[role].get_input_embeddings().weight.shape[1]
              for role, key in architecture.embedding_keys.items()}
    dtype = _save_dtype(config)
    return {
        "type": TEXTUAL_INVERSION, "preset": None, "trains": [EMBEDDING_ROLE], "layers": 0,
        "encoders": list(architecture.embedding_keys), "trainable_parameters": n * sum(widths.values()),
        "file_bytes": safetensors_size({key: ((n, w), dtype) for key, w in widths.items()}, {}),
        "vector_bytes": n * sum(widths.values()) * dtype.itemsize,
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
    if facts["type"] == TEXTUAL_INVERSION:
        return {"network": f"textual inversion for {' + '.join(facts['encoders'])}",
                "trainable params": f"{facts['trainable_parameters']:,}",
                "embedding file size": f"{facts['file_bytes'] / 2**10:.1f} KiB"}
    return {
        "network": f"{facts['type']} ({facts['preset']}) on {' + '.join(facts['trains'])}, {facts['layers']} layers",
        "trainable params": f"{facts['trainable_parameters']:,}",
        "network file size": f"{facts['file_bytes'] / 2**20:.2f} MiB",
    }
