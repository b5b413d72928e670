"""`difftune convert` and `difftune merge`: LoRA files between layouts, and baked into a model."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import torch

from difftune.checkpoint import lora_formats as formats
from difftune.models.registry import family_of_lora_keys

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def convert_file(source: str | Path, target: str | Path, to: str, model_path: str | None = None) -> dict[str, Any]:
    """Rewrite a LoRA file in the kohya or diffusers layout; returns what was done.

    kohya → diffusers folds each layer's alpha/rank into lora_B (diffusers applies scale 1);
    diffusers → kohya writes alpha = rank, so converting back gives the same tensors.
    Module paths come from `model_path`'s architecture, else from the SD 1.x/2.x ones difftune ships.
    """
    if to not in ("kohya", "diffusers"):
        raise formats.LoraFormatError(f"--to {to!r}: expected 'kohya' or 'diffusers'")
    tensors, metadata, layout = formats.read_lora_file(source)
    metadata.pop("sshs_model_hash", None)  # describes the old bytes
    table = _table(model_path, tensors)
    kohya = formats.normalise_kohya_keys(tensors) if layout == "kohya" else formats.diffusers_to_kohya(tensors, table)
    bundle = formats.read_bundle(source)
    if bundle and to == "diffusers":
        refuse_existing_embeddings(bundle, Path(target).parent)
    if to == "diffusers":
        out = formats.kohya_to_diffusers(kohya, table)
        meta = {**metadata, "format": "pt"}
    else:
        out = {**kohya, **bundle}
        meta = {**metadata, **_kohya_rank_metadata(kohya)}
    formats.write_lora_file(Path(target), out, meta, add_hash=to == "kohya")
    done = {"from": layout, "to": to, "tensors": len(out), "target": str(target)}
    if bundle and to == "diffusers":  # diffusers' LoRA layout has no place for them
        done["embeddings"] = write_bundled_embeddings(bundle, Path(target).parent, metadata)
    return done


def embedding_targets(bundle: dict[str, torch.Tensor], folder: Path) -> dict[str, Path]:
    from difftune.network.textual_inversion import bundled_names, embedding_file_name

    return {name: folder / embedding_file_name(name) for name in bundled_names(bundle)}


def refuse_existing_embeddings(bundle: dict[str, torch.Tensor], folder: Path) -> None:
    """Nothing the user has is overwritten: checked before any file is written."""
    taken = [str(path) for path in embedding_targets(bundle, folder).values() if path.exists()]
    if taken:
        raise formats.LoraFormatError(f"{taken[0]} exists: the LoRA's bundled embedding would be written there; move "
                                      "it, or write the output to another folder")


def write_bundled_embeddings(bundle: dict[str, torch.Tensor], folder: Path,
                             metadata: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Each bundled embedding of a LoRA file as its own embedding file (<name>.safetensors) in `folder`, with the
    LoRA's difftune_embedding metadata (the trained token); returns each file and the word it answers to."""
    from difftune.network.textual_inversion import embedding_entries

    written = []
    for name, path in embedding_targets(bundle, folder).items():
        tensors = embedding_entries(bundle, name, "bundle")
        if list(tensors) == ["*"]:
            tensors = {"emb_params": tensors["*"]}  # SD 1.x/2.x: A1111's string_to_param.* is emb_params in files
        meta = {"modelspec.title": name}
        if metadata and "difftune_embedding" in metadata:
            meta["difftune_embedding"] = metadata["difftune_embedding"]
        formats.write_lora_file(path, tensors, meta, add_hash=False)
        written.append({"file": str(path), "token": name, "file_name_word": path.stem})
    return written


def _table(model_path: str | None, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Layer names of `model_path`'s architecture, or of the shipped ones of the family the keys show."""
    if model_path is None:
        return formats.reference_module_table(family_of_lora_keys(tensors))
    from difftune.config.schema import ModelConfig
    from difftune.models import load_model, weightless_model

    architecture = weightless_model(ModelConfig(path=model_path)) or load_model(ModelConfig(path=model_path))
    return formats.module_table(architecture)


def _kohya_rank_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """ss_network_dim/alpha of a plain LoRA: its most common rank and alpha."""
    ranks = collections.Counter(v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight"))
    alphas = collections.Counter(float(v) for k, v in tensors.items() if k.endswith(".alpha"))
    if not ranks:
        return {}
    meta = {"ss_network_dim": str(ranks.most_common(1)[0][0]), "ss_network_module": "networks.lora"}
    if alphas:
        meta["ss_network_alpha"] = f"{alphas.most_common(1)[0][0]:g}"
    return meta


def merge_into_model(base: str, lora: str | Path, scale: float, target: str | Path, precision: str | None = None,
                     model_settings: dict | None = None) -> dict[str, Any]:
    """Load `base`, bake `lora` in at `scale`, and save a full model: one original-layout .safetensors
    when `target` ends with .safetensors (A1111/Forge/ComfyUI checkpoints), else a diffusers folder."""
    from difftune.config.schema import ModelConfig
    from difftune.models import load_model
    from difftune.network.lycoris_net import load_lora_file

    target = Path(target)
    _, metadata = formats.read_header(lora)
    bundle = formats.read_bundle(lora)
    # a checkpoint has no place for new words: they stay embedding files, beside a .safetensors, in a folder
    embedding_folder = target.parent if target.suffix.lower() == ".safetensors" else target
    if bundle:
        refuse_existing_embeddings(bundle, embedding_folder)
    model = load_model(ModelConfig(**{"path": base, **(model_settings or {})}))
    network = load_lora_file(model, lora, multiplier=scale, attach=False)
    network.merge(scale)
    if target.suffix.lower() == ".safetensors":
        # fp16 for SD/SDXL checkpoints; bf16 for the flow transformers, as BFL's and StabilityAI's files are
        dtype = PRECISIONS[precision or ("bf16" if model.prediction_type == "flow" else "fp16")]
        model.save_single_file(target, dtype=dtype,
                               metadata={"difftune_merged_lora": Path(lora).name, "difftune_merge_scale": str(scale),
                                         "difftune_base_model": str(base)})
    else:
        if target.exists() and any(target.iterdir()):
            raise formats.LoraFormatError(f"{target}: folder exists and is not empty")
        from difftune.checkpoint.atomic import atomic_directory

        with atomic_directory(target) as tmp:  # never a half-written model folder; usual file permissions
            model.save_pretrained(tmp, dtype=PRECISIONS[precision or "fp32"])
    done = {"layers": len(network.loras), "scale": scale, "target": str(target)}
    if bundle:
        done["embeddings"] = write_bundled_embeddings(bundle, embedding_folder, metadata)
    return done
