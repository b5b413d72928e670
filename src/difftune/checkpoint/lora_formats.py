"""LoRA files in the two layouts people load, and the metadata the tools read.

kohya/LyCORIS layout (ComfyUI, A1111/Forge, kohya's scripts): one key prefix per layer, the module path
with dots as underscores, e.g. `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`
and `lora_te_text_model_encoder_layers_0_self_attn_q_proj`, followed by the algorithm's own tensor
names (`lora_down.weight`, `lora_up.weight`, `alpha`, `hada_w1_a`, `lokr_w1`, `oft_blocks`, `diff`, ...).

diffusers/PEFT layout (`pipeline.load_lora_weights`): `unet.<module path>.lora_A.weight` /
`lora_B.weight` and `text_encoder.text_model.<module path>...`, without alphas: the diffusers loader
then uses scale 1, so writing this layout folds alpha/rank into `lora_B`. It only holds plain low-rank
pairs; the other algorithms stay in the kohya layout.

Converting between the two needs the dotted module path behind each kohya name (underscores are
ambiguous); it comes from a model's own modules, or from the architectures difftune ships for the family.

A family's kohya files may hold a network otherwise than LyCORIS names it (`file_layout`): SDXL's name
UNet layers by SGM paths (a rename), Flux's fuse q, k and v into BFL's layers (tensors change). Every
kohya-file write and read passes through that layout, so the rest works on LyCORIS's names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file

from difftune.checkpoint.atomic import atomic_path
from difftune.errors import LoraFormatError  # noqa: F401  (re-exported for callers)
from difftune.models.registry import lora_key_prefixes

KOHYA_PREFIXES = lora_key_prefixes("kohya")
"""Every registered family's kohya-layout key prefixes (lora_unet_, lora_te_, ...)."""
TE_PREFIXES = tuple(p for p in KOHYA_PREFIXES if p.startswith("lora_te"))
DIFFUSERS_PREFIXES = lora_key_prefixes("diffusers")
SPLIT_LAYER_PREFIXES = ("lora_transformer_",)
"""kohya-style names of a transformer's diffusers layers where the family's own layout fuses them (Flux:
OneTrainer's layout, which ComfyUI maps onto slices of the fused weights); read through the family's layout."""
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_PAIR = ("lora_down.weight", "lora_up.weight")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32"}


# ------------------------------------------------------------------------------------------ names
def kohya_text_encoder(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text encoder as seen under `text_model.` (transformers 5's CLIPTextModel dropped that wrapper,
    but shared files and ComfyUI/A1111 use `lora_te_text_model_...`)."""
    return text_encoder if hasattr(text_encoder, "text_model") else _TextModelNames(text_encoder)


class _TextModelNames(torch.nn.Module):
    """Naming shim only: holds the encoder under `text_model`; never called, never saved."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_model = text_encoder


def lora_hosts(model) -> dict[str, torch.nn.Module]:
    """Role → the module whose layers a LoRA names (text encoders as seen under `text_model.`)."""
    hosts = {"denoiser": model.parts["denoiser"]}
    for role in model.text_encoder_roles:
        hosts[role] = kohya_text_encoder(model.parts[role])
    return hosts


def lycoris_name(model, role: str, module_path: str) -> str:
    """The name LyCORIS's kohya front end gives a layer: the role's prefix + its dotted path with `_`."""
    return f"{model.kohya_prefixes[role]}_{module_path.replace('.', '_')}"


def file_name(model, role: str, module_path: str) -> str:
    """The layer's name in a kohya-layout file: LyCORIS's name unless the family names it otherwise
    (SDXL files name UNet layers by the original SGM module paths)."""
    rename = getattr(model, "kohya_file_name", None)
    return (rename(role, module_path) if rename else None) or lycoris_name(model, role, module_path)


class RenameLayout:
    """A family whose kohya files differ from LyCORIS's layer names by name only (SDXL: SGM UNet paths;
    SD 1.x/2.x: not at all)."""

    def __init__(self, renames: dict[str, str]):
        self.renames = renames

    def to_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rename_modules(tensors, self.renames)

    def from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rename_modules(tensors, {theirs: ours for ours, theirs in self.renames.items()})


def file_layout(model):
    """How the family's kohya files hold a network's tensors, as an object with `to_file(tensors)` and
    `from_file(tensors)` over LyCORIS-named tensors: the family's optional `kohya_file_layout` when its
    files differ tensor by tensor (Flux fuses q, k and v into one layer), else renames by `kohya_file_name`.
    Every write of a kohya-layout file goes through `to_file` and every read through `from_file`."""
    layout = getattr(model, "kohya_file_layout", None)
    return layout if layout is not None else RenameLayout(file_renames(model))


class LayerTable(dict):
    """kohya name → diffusers-layout key of every layer. With a tensor-level `layout` (see file_layout) the
    names are LyCORIS's and conversions pass through the layout; otherwise they are the files' own names."""

    layout = None


def _layers(model):
    for role, root in lora_hosts(model).items():
        for path, module in root.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                yield role, path


def module_table(model) -> LayerTable:
    """kohya name of every layer → its diffusers-layout key (`unet.<path>`, `text_encoder.text_model.<path>`):
    the file names, or LyCORIS's names for a family with a tensor-level file layout (then `table.layout`)."""
    layout = getattr(model, "kohya_file_layout", None)
    name = lycoris_name if layout is not None else file_name
    table = LayerTable({name(model, role, path): f"{model.diffusers_prefixes[role]}.{path}"
                        for role, path in _layers(model)})
    table.layout = layout
    return table


def file_renames(model) -> dict[str, str]:
    """LyCORIS name → kohya file name, for the layers where the two differ (none for SD 1.x/2.x)."""
    renames = {}
    for role, path in _layers(model):
        ours, theirs = lycoris_name(model, role, path), file_name(model, role, path)
        if ours != theirs:
            renames[ours] = theirs
    return renames


def rename_modules(tensors: dict[str, torch.Tensor], renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename the module part of kohya keys (`<module>.<tensor>`) by `renames`; others stay."""
    if not renames:
        return dict(tensors)
    out = {}
    for key, value in tensors.items():
        module, dot, tensor = key.partition(".")
        out[renames.get(module, module) + dot + tensor] = value
    return out


@lru_cache(maxsize=1)
def reference_module_table(family: str) -> dict[str, str]:
    """Module names of the architectures difftune ships for `family` (built without weights), for
    converting files when no model is given."""
    from difftune.models.registry import FAMILIES

    table = LayerTable()
    for model in FAMILIES[family].api("reference_models")():  # real architectures first: their names win
        own = module_table(model)
        table.layout = table.layout or own.layout
        for name, key in own.items():
            table.setdefault(name, key)
    return table


def normalise_kohya_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files written against a flattened CLIPTextModel lack `text_model_`; put it back."""
    out = {}
    for key, value in tensors.items():
        prefix = next((p for p in TE_PREFIXES if key.startswith(p)), None)
        if prefix and not key.startswith(prefix + "text_model_"):
            key = prefix + "text_model_" + key[len(prefix):]
        out[key] = value
    return out


def split_key(key: str) -> tuple[str, str]:
    """`lora_unet_x_y.lora_down.weight` → (`lora_unet_x_y`, `lora_down.weight`)."""
    module, _, tensor = key.partition(".")
    return module, tensor


# ----------------------------------------------------------------------------------------- layouts
def detect_layout(keys: Iterable[str], source: str = "file") -> str:
    keys = list(keys)
    if not keys:
        raise LoraFormatError(f"{source}: holds no tensors")
    if all(k.startswith(KOHYA_PREFIXES + SPLIT_LAYER_PREFIXES) for k in keys):
        return "kohya"
    if all(k.startswith(DIFFUSERS_PREFIXES) for k in keys):
        return "diffusers"
    odd = next(k for k in keys if not k.startswith(KOHYA_PREFIXES + DIFFUSERS_PREFIXES))
    raise LoraFormatError(
        f"{source}: not a LoRA in the kohya ({'/'.join(KOHYA_PREFIXES)}) or diffusers ({'/'.join(DIFFUSERS_PREFIXES)}) "
        f"layout; first unexpected key: {odd!r}"
    )


def kohya_to_diffusers(tensors: dict[str, torch.Tensor], table: dict[str, str]) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors → diffusers/PEFT layout, alpha/rank folded into lora_B."""
    tensors = normalise_kohya_keys(tensors)
    if getattr(table, "layout", None) is not None:
        tensors = table.layout.from_file(tensors)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, tensor = split_key(key)
        modules.setdefault(module, {})[tensor] = value
    out = {}
    for module, parts in modules.items():
        extra = sorted(set(parts) - {*LORA_PAIR, "alpha"})
        if extra or not set(LORA_PAIR) <= set(parts):
            raise LoraFormatError(
                f"{module}: tensors {sorted(parts)} are not a plain LoRA pair (lora_down/lora_up/alpha); the diffusers "
                f"layout cannot express {', '.join(extra) or 'a missing half'} (DoRA, LoHa, LoKr, OFT, IA3, GLoRA and "
                "native fine-tuning stay in the kohya layout)"
            )
        if module not in table:
            raise LoraFormatError(f"{module}: no such layer in the model (is the LoRA for another architecture?)")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        if scale != 1.0:
            up = (up.float() * scale).to(up.dtype)
        out[f"{table[module]}.lora_A.weight"] = down
        out[f"{table[module]}.lora_B.weight"] = up
    return out


_PEFT_TO_KOHYA_SUFFIX = ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"), (".alpha", "alpha"))


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], table: dict[str, str]) -> dict[str, torch.Tensor]:
    """diffusers/PEFT layout → kohya layout with alpha = rank (the scale diffusers applies); `table` is
    module_table() of the model (kohya file name → diffusers key)."""
    tensors = _as_peft(tensors)
    inverse = {v: k for k, v in table.items()}
    out = {}
    for key, value in tensors.items():
        if "lora_magnitude_vector" in key:
            raise LoraFormatError(f"{key}: DoRA in the diffusers layout is not supported; use a kohya-layout DoRA file")
        match = next((pair for pair in _PEFT_TO_KOHYA_SUFFIX if key.endswith(pair[0])), None)
        if match is None:
            raise LoraFormatError(f"{key}: not a LoRA tensor (expected .lora_A.weight / .lora_B.weight)")
        suffix, kohya = match
        module_key = key[: -len(suffix)]
        part, _, path = module_key.partition(".")
        if part.startswith("text_encoder") and not path.startswith("text_model."):
            module_key = f"{part}.text_model.{path}"
        if module_key not in inverse:
            raise LoraFormatError(f"{key}: no such layer in the model (is the LoRA for another architecture?)")
        out[f"{inverse[module_key]}.{kohya}"] = value
    for key in list(out):
        if key.endswith(".lora_down.weight"):
            alpha_key = key.replace(".lora_down.weight", ".alpha")
            out.setdefault(alpha_key, torch.tensor(float(out[key].shape[0]), dtype=out[key].dtype))
    if getattr(table, "layout", None) is not None:
        out = table.layout.to_file(out)
    return out


def _as_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older diffusers spellings (`to_q_lora.down`, `lora_linear_layer`) → PEFT names, with diffusers' own converters."""
    if all(".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in tensors):
        return tensors
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    unet = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    text = {k: v for k, v in tensors.items() if k.startswith(DIFFUSERS_PREFIXES) and not k.startswith("unet.")}
    try:
        converted = convert_unet_state_dict_to_peft(unet) if unet else {}
        if text:
            converted.update(convert_state_dict_to_peft(text))
    except ValueError as e:
        raise LoraFormatError(f"diffusers-layout LoRA in an unknown spelling: {e}") from e
    return {k.replace(".processor.", "."): v for k, v in converted.items()}


# ---------------------------------------------------------------------------------------- files
def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, metadata, layout) of a .safetensors LoRA file (bundled embeddings left out)."""
    tensors, metadata = read_safetensors(path, "LoRA files")
    tensors, _ = split_bundle(tensors)
    return tensors, metadata, detect_layout(tensors, str(path))


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a user's .safetensors file (`what` it should be, for the messages); a
    LoraFormatError naming the file when it is missing, pickled or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path}: file not found")
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path}: {what} are read as .safetensors only (pickled .pt/.ckpt/.bin files can run "
                              "code); convert it to .safetensors first")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise LoraFormatError(f"{path}: not a readable .safetensors file ({e}); was it fully downloaded?") from e


BUNDLE_PREFIX = "bundle_emb."
"""Textual-inversion vectors carried in a LoRA file (kohya/A1111: bundle_emb.<name>.string_to_param.* on SD
1.x/2.x, bundle_emb.<name>.clip_l / .clip_g on SDXL); network/textual_inversion.py reads and writes them."""


def split_bundle(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the network's tensors, the bundled embeddings' tensors) of a LoRA file."""
    bundle = {k: v for k, v in tensors.items() if k.startswith(BUNDLE_PREFIX)}
    return ({k: v for k, v in tensors.items() if k not in bundle} if bundle else tensors), bundle


def read_header(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """(tensor names, metadata) of a .safetensors file, without reading its tensors."""
    with _opened(path) as f:
        return list(f.keys()), dict(f.metadata() or {})


def read_bundle(path: str | Path) -> dict[str, torch.Tensor]:
    """The bundle_emb tensors of a LoRA file (empty when it has none)."""
    with _opened(path) as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(BUNDLE_PREFIX)}


@contextlib.contextmanager
def _opened(path: str | Path):
    """safe_open with read_safetensors' errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path}: file not found")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise LoraFormatError(f"{path}: not a readable .safetensors file ({e}); was it fully downloaded?") from e
    with handle as f:
        yield f


def read_as_kohya(path: str | Path, table: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Any supported LoRA file as kohya-layout tensors (TE names with `text_model_`), plus its metadata;
    `table`: module_table() of the model the file is for."""
    tensors, metadata, layout = read_lora_file(path)
    if layout == "diffusers":
        tensors = diffusers_to_kohya(tensors, table)
    return normalise_kohya_keys(tensors), metadata


def data_hash(serialized: bytes) -> str:
    """sha256 of the tensor data after the header: the hash A1111 (and kohya's sshs_model_hash) gives a
    .safetensors LoRA, unchanged by metadata edits."""
    (header_len,) = struct.unpack("<Q", serialized[:8])
    return hashlib.sha256(serialized[8 + header_len:]).hexdigest()


def write_lora_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], add_hash: bool = True) -> Path:
    """Atomically write a LoRA file; `sshs_model_hash` is the file's own data hash (A1111 reads it)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {k: str(v) for k, v in metadata.items()}
    if add_hash:
        metadata["sshs_model_hash"] = data_hash(save(tensors))
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def safetensors_size(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]) -> int:
    """Bytes of a .safetensors file with these tensors and metadata, without writing it: 8-byte length,
    compact JSON header padded to 8 bytes, then the data."""
    header, offset = {}, 0
    # Data order (and so the digits of each offset) as safetensors writes it: wider dtypes first, then by name.
    order = sorted(shapes, key=lambda name: (-torch.empty((), dtype=shapes[name][1]).element_size(), name))
    for name in order:
        shape, dtype = shapes[name]
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(text) + (-len(text) % 8) + offset


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ------------------------------------------------------------------------------------- metadata
def lora_metadata(*, network: dict, run: dict[str, str], family_keys: dict[str, str], prediction_type: str,
                  train_config: dict | None = None) -> dict[str, str]:
    """Metadata for a LoRA file: kohya's `ss_*` keys (A1111 reads ss_output_name, ss_v2,
    ss_base_model_version and sshs_model_hash; kohya's tools ss_network_*), the SAI model spec, and
    difftune's own keys (the full network settings, so difftune reloads the file exactly).

    `network`: NetworkSettings.to_dict(); `run`: the trainer's metadata (step, epoch, resolution, ...);
    `family_keys`: the model's lora_metadata() (ss_base_model_version, ss_v2, modelspec.architecture).
    """
    algo = network["type"]
    plain_lora = algo in ("lora", "locon", "dylora") and not network.get("dora")
    args = {"algo": network["lycoris_algo"], "preset": network["preset"]}
    for ours, theirs in (("conv_rank", "conv_dim"), ("conv_alpha", "conv_alpha"), ("factor", "factor"),
                         ("block_size", "block_size"), ("constraint", "constraint"), ("rank_dropout", "rank_dropout"),
                         ("module_dropout", "module_dropout")):
        if network.get(ours) not in (None, 0, 0.0):
            args[theirs] = str(network[ours])
    if network.get("dora"):
        args["dora_wd"] = "True"
    if network.get("rescaled"):
        args["rescaled"] = "True"
    train_config = train_config or {}
    resolution = run.get("resolution", "")
    meta = {
        "ss_network_module": (family_keys.get("ss_network_module", "networks.lora") if plain_lora
                              else "difftune.network.glokr" if algo == "glokr" else "lycoris.kohya"),  # glokr: ours
        "ss_network_dim": str(network.get("rank") or network.get("block_size") or "None"),
        "ss_network_alpha": str(network.get("alpha") or "None"),
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": str(network.get("dropout") or 0.0),
        **{k: v for k, v in family_keys.items() if k != "ss_network_module"},
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": Path(run.get("base_model", "")).name or run.get("base_model", ""),
        "ss_output_name": run.get("output_name", "lora"),
        "ss_resolution": f"({resolution}, {resolution})" if resolution else "",
        "ss_steps": run.get("step", ""),
        "ss_epoch": run.get("epoch", ""),
        "ss_num_epochs": run.get("planned_epochs", ""),
        "ss_num_train_images": run.get("train_samples", run.get("train_images", "")),
        "ss_training_started_at": run.get("training_started_at", ""),
        "ss_learning_rate": str(train_config.get("lr", "")),
        "ss_unet_lr": str(train_config.get("lr", "")),
        "ss_text_encoder_lr": str(train_config.get("text_encoder_lr") or train_config.get("lr", "")),
        "ss_seed": str(train_config.get("seed", "")),
        "ss_clip_skip": run.get("clip_skip", ""),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "diffusers",
        "modelspec.title": run.get("output_name", "lora"),
        "modelspec.date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{resolution}x{resolution}" if resolution else "",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "difftune_network": json.dumps(network, sort_keys=True),
    }
    meta.update({(k if k.startswith("difftune_") else f"difftune_{k}"): v for k, v in run.items()})
    return {k: v for k, v in meta.items() if v != ""}
