"""LoRA-family networks: LyCORIS modules attached to the UNet and text encoder.

LyCORIS builds one module per targeted layer and patches that layer's `forward`; the base weights stay
frozen and untouched. Its kohya front end (`LycorisNetworkKohya`) names the modules `lora_unet_...` /
`lora_te_...` from the module paths, which is exactly the key layout ComfyUI, A1111/Forge and kohya's
scripts load. The text encoder is shown to it under `text_model.` (see lora_formats.kohya_text_encoder)
so those names match shared files on every transformers version.

What this wrapper adds to LyCORIS:
- the TrainableNetwork protocol (LR groups, bit-exact resume state, exports with metadata);
- deterministic evaluation: dropout and DyLoRA's random rank only act while gradients flow, so
  validation losses and samples depend on the weights alone;
- loading files back (ours exactly, from the settings in their metadata; others through LyCORIS's own
  key detection), merging, and the diffusers/PEFT layout for plain LoRAs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict
from safetensors import safe_open

from difftune.checkpoint import lora_formats as formats
from difftune.config import network_rules as rules
from difftune.config.schema import Config, NetworkConfig
from difftune.errors import ConfigError
from difftune.models.base import DENOISER, DiffusionModel
from difftune.network.base import roles_to_train


class NetworkSettings(NetworkConfig):
    """The `[network]` section with every default resolved: what the file metadata records.

    The same fields as NetworkConfig (declared once, there); built with `model_construct`, since the
    section was validated when the config loaded, and immutable from then on.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())

    @classmethod
    def from_config(cls, network: NetworkConfig) -> NetworkSettings:
        algo = rules.ALGORITHMS[network.type]
        uses = algo.keys
        rank = (network.rank or rules.DEFAULT_RANK) if "rank" in uses else None
        alpha = (network.alpha or float(rank)) if "alpha" in uses else None
        preset = rules.resolved_preset(network.type, network.preset)
        conv = "conv_rank" in uses and preset == "full"
        resolved = {
            "preset": preset,
            "rank": rank,
            "alpha": alpha,
            "conv_rank": (network.conv_rank or rank) if conv else None,
            "conv_alpha": (network.conv_alpha or alpha) if conv else None,
            "factor": (network.factor if network.factor is not None else -1) if "factor" in uses else None,
            "block_size": (network.block_size or rules.DEFAULT_BLOCK_SIZE[network.type]) if "block_size" in uses else None,
            "constraint": (network.constraint or 0.0) if "constraint" in uses else None,
            "init_from": None,  # where training started is run history, not part of the network
        }
        return cls.model_construct(**{**network.model_dump(), **resolved})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkSettings:
        defaults = {name: field.default for name, field in NetworkConfig.model_fields.items()}
        return cls.model_construct(**{**defaults, **{k: v for k, v in data.items() if k in defaults}})

    def replace(self, **changes) -> NetworkSettings:
        return self.model_copy(update=changes)

    def to_dict(self) -> dict[str, Any]:
        """The file metadata's network settings (the vectors' own settings only for pivotal tuning)."""
        ti = set() if self.pivotal else {"pivotal", *rules.TI_KEYS}
        return {**self.model_dump(exclude={"init_from", *ti}), "lycoris_algo": rules.ALGORITHMS[self.type].lycoris}

    @property
    def bypass(self) -> bool:
        """Add the update to the layer's output instead of rebuilding its weight each step: exact with
        bf16/fp16 base weights, and cheaper. LyCORIS's bypass path skips DoRA and mis-scales DyLoRA, and
        native fine-tuning has none, so those rebuild."""
        return self.type in ("lora", "locon", "loha", "lokr") and not self.dora

    def lycoris_kwargs(self) -> dict[str, Any]:
        """Arguments of LycorisNetworkKohya; extra keys reach every module's constructor."""
        oft = self.type in ("diag-oft", "boft")
        # ia3/full/OFT ignore the rank, but LyCORIS only wraps linear layers when it is positive.
        dim = self.block_size if oft else (self.rank or 1)
        return {
            "lora_dim": dim,
            "alpha": self.alpha or dim,
            "conv_lora_dim": (self.conv_rank or dim) if self.preset == "full" else 0,
            "conv_alpha": self.conv_alpha or self.alpha or dim,
            "dropout": self.dropout,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "network_module": rules.ALGORITHMS[self.type].lycoris,
            "weight_decompose": self.dora,
            "factor": self.factor if self.factor is not None else -1,
            "block_size": self.block_size or 4,
            "constraint": self.constraint or 0.0,
            "rescaled": self.rescaled,
            "bypass_mode": self.bypass,
            "train_norm": self.train_norm,
            "warn_on_unmatched": False,
        }


@contextlib.contextmanager
def _quiet_lycoris():
    """LyCORIS logs every module it creates, and warns when it picks a full factor for LoKr's small
    layers (its documented behaviour); keep the trainer's output readable."""
    from lycoris.logging import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def lycoris_inputs(model: DiffusionModel, roles: list[str]) -> tuple[Any, torch.nn.Module]:
    """(text encoder argument, denoiser) for LyCORIS's kohya front end, with roles not trained left
    empty. One text encoder is passed alone (its layers become lora_te_…); several as a list in the
    family's order (lora_te1_…, lora_te2_…, as kohya names SDXL's)."""
    empty = torch.nn.Module()
    encoders = [formats.kohya_text_encoder(model.parts[r]) if r in roles else empty for r in model.text_encoder_roles]
    text = encoders[0] if len(encoders) == 1 else encoders
    if len(encoders) == 1 and model.text_encoder_roles[0] not in roles:
        text = None
    return text, model.parts[DENOISER] if DENOISER in roles else empty


def _build_lycoris(model: DiffusionModel, roles: list[str], settings: NetworkSettings, multiplier: float):
    from lycoris.kohya import LycorisNetworkKohya

    if settings.type == "glokr":
        _require_glokr()
    text, denoiser = lycoris_inputs(model, roles)
    with _quiet_lycoris():
        # Presets are class attributes in LyCORIS: set every one of them right before building.
        LycorisNetworkKohya.apply_preset(model.lora_presets[settings.preset])
        try:
            net = LycorisNetworkKohya(text, denoiser, multiplier=multiplier, **settings.lycoris_kwargs())
        except ValueError as e:
            if settings.type == "boft" and "BOFT" in str(e):
                hosts = [model.parts[r] for r in roles]
                raise ConfigError(_boft_block_size_problem(settings.block_size, hosts, str(e))) from None
            raise
    return net


def _require_glokr() -> None:
    """GLoKr is difftune's own module (network/glokr.py); importing it registers it with LyCORIS's kohya front end."""
    try:
        from difftune.network import glokr
    except ImportError as e:
        raise ConfigError(f"network.type = 'glokr' is built on LyCORIS's module base, which this lycoris-lora does "
                          f"not provide: {e}") from e
    if glokr.REGISTRATION_PROBLEM:
        raise ConfigError(glokr.REGISTRATION_PROBLEM)


def _boft_block_size_problem(block_size: int | None, hosts: list, lycoris_message: str) -> str:
    """BOFT splits a layer's outputs into 2^k blocks of an even size b <= block_size; name the value that fits."""
    import re

    def smallest_block(width: int) -> int:  # 2 x the odd part of the width
        while width % 2 == 0:
            width //= 2
        return 2 * width

    widths = {m.weight.shape[0] for host in hosts if host is not None for m in host.modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.shape[0] % 2 == 0}
    needed = max((smallest_block(w) for w in widths), default=None)
    found = re.search(r"decompose (\d+)", lycoris_message)
    layer = f"a layer with {found.group(1)} output channels" if found else "a layer of this model"
    hint = f"; network.block_size = {needed} or more works for every layer of this model" if needed else ""
    return (f"network.block_size = {block_size}: BOFT cannot split {layer} (it needs output channels = b x 2^k "
            f"with an even b <= block_size){hint}")


class LoraFamilyNetwork:
    """A LyCORIS network on a model's UNet and/or text encoder (the TrainableNetwork protocol)."""

    def __init__(self, model: DiffusionModel, lycoris_net, settings: NetworkSettings | None, *,
                 attach: bool = True, config: Config | None = None, multiplier: float = 1.0):
        self.model = model
        self.net = lycoris_net
        self.settings = settings
        self.config = config
        self.multiplier = multiplier
        self.attached = False
        self._hooks: list = []
        self.notes: list[str] = []
        for module in self.loras:
            module.multiplier = multiplier
            self.net.add_module(module.lora_name, module)  # registered, so parameters()/state_dict() see them
        if settings is not None and settings.type == "dylora":
            for module in self.loras:
                _deterministic_dylora(module)
        if GROUP_NORM_CHANNELS_LAST_CRASH:
            for module in self.loras:
                if type(module).__name__ == "NormModule" and getattr(module, "op", None) is F.group_norm:
                    module.op = _group_norm_contiguous_on_cpu
        if attach:
            self.attach()

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def build(cls, model: DiffusionModel, settings: NetworkSettings, roles: list[str], *, attach: bool = True,
              config: Config | None = None, multiplier: float = 1.0) -> LoraFamilyNetwork:
        """A network of `settings` on the layers of `roles` ("denoiser", "text_encoder", ...)."""
        net = _build_lycoris(model, roles, settings, multiplier)
        return cls(model, net, settings, attach=attach, config=config, multiplier=multiplier)

    @classmethod
    def for_training(cls, model: DiffusionModel, config: Config) -> LoraFamilyNetwork:
        # LyCORIS draws initial weights from the global RNG; seed them, so a run does not depend on what
        # ran before it in the process (and two runs of one config start from the same network).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            network = cls.build(model, NetworkSettings.from_config(config.network), roles_to_train(model, config),
                                config=config)
        # Dropouts (and DyLoRA's rank) draw from the global RNG while training: start it from the seed, so
        # a run's masks do not depend on what ran before it (a resume restores the RNG from its checkpoint).
        torch.manual_seed(config.train.seed)
        if not network.loras:
            raise ConfigError(f"network.preset = '{network.settings.preset}' matched no layer of this model "
                              "(train.train_unet / train.train_text_encoder select the parts)")
        if config.network.train_norm and not any(type(m).__name__ == "NormModule" for m in network.loras):
            raise ConfigError(f"network.train_norm: network.preset = '{network.settings.preset}' holds no norm layer "
                              "of this model (it selects attention or linear layers only); use a preset whose modules "
                              "contain the LayerNorms and GroupNorms (attn-mlp, full-lin or full)")
        for module in model.parts.values():
            module.requires_grad_(False)
        network.net.requires_grad_(True)
        if config.network.init_from:
            tensors, _ = formats.read_as_kohya(config.network.init_from, network.name_table())
            network.load_export_tensors(tensors, source=f"network.init_from = '{config.network.init_from}'")
        return network

    @property
    def loras(self) -> list:
        return list(self.net.loras)

    def name_table(self) -> dict[str, str]:
        return formats.module_table(self.model)

    def role_of(self, lora_name: str) -> str | None:
        """The role whose layer a LyCORIS module wraps (from its name's prefix)."""
        return next((role for role, prefix in self.model.kohya_prefixes.items() if lora_name.startswith(prefix + "_")),
                    None)

    # ------------------------------------------------------------------------------- attach/merge
    def attach(self) -> None:
        """Patch the targeted layers' forward (LyCORIS apply_to)."""
        if self.attached:
            return
        for module in self.loras:
            module.apply_to()
        self.attached = True
        self._hooks = [host.register_forward_pre_hook(self._before_forward) for host in self._hosts()]

    def detach(self) -> None:
        """Give the layers their own forward (and, for native fine-tuning, their weights) back."""
        if not self.attached:
            return
        for module in reversed(self.loras):
            module.restore()
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.attached = [], False

    @torch.no_grad()
    def merge(self, scale: float = 1.0) -> None:
        """Bake the update into the base weights (the network must not be attached)."""
        if self.attached:
            raise RuntimeError("detach the network before merging it")
        for module in self.loras:
            if type(module).__name__ in _SCALED_TWICE_ON_MERGE:
                module.get_diff_weight = functools.partial(_live_diff_weight, module)
            module.merge_to(scale)

    def _hosts(self) -> list[torch.nn.Module]:
        return [self.model.parts[role] for role in self.trained_roles()]

    def _before_forward(self, module, args) -> None:
        # Training-time randomness (dropouts, DyLoRA's rank) only while gradients flow: validation and
        # sampling run under no_grad and see the deterministic network.
        training = torch.is_grad_enabled()
        if self.net.training != training:
            self.net.train(training)
        if training and self.settings is not None and self.settings.type == "dylora":
            # LyCORIS draws DyLoRA's rank from Python's `random`; seeding it from torch's RNG makes the
            # draw part of the state a checkpoint saves, so a resumed run draws the same ranks.
            random.seed(int(torch.randint(0, 2**62, (1,)).item()))

    # ----------------------------------------------------------------------------- the protocol
    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        """One group per trained role; with LoRA+ or block LR weights (network/lr_weights.py) one more per
        other multiplier, named "<role> x<multiplier>". Parameters at multiplier 0 are frozen."""
        weights = self.lr_weights()
        groups = []
        for role in self.trained_roles():
            by_weight: dict[float, list[torch.nn.Parameter]] = {}
            for module in self.loras:
                if self.role_of(module.lora_name) != role:
                    continue
                for name, param in module.named_parameters():
                    if not param.requires_grad:
                        continue
                    weight = 1.0 if weights is None else weights.parameter(module.lora_name, name, role == DENOISER)
                    if weight == 0:
                        param.requires_grad_(False)
                        continue
                    by_weight.setdefault(weight, []).append(param)
            for weight in sorted(by_weight, key=lambda w: (w != 1.0, w)):
                groups.append({"params": by_weight[weight], "lr": lrs[role] * weight,
                               "name": role if weight == 1.0 else f"{role} x{weight:g}"})
        if weights is not None:
            self.notes += weights.unmatched_notes()
        return groups

    def lr_weights(self):
        """The configured LoRA+ ratio and block LR weights, or None when there are none."""
        if self.config is None:
            return None
        from difftune.network.lr_weights import LrWeights

        down_blocks = getattr(getattr(self.model.parts.get(DENOISER), "down_blocks", None), "__len__", None)
        weights = LrWeights(self.config.network, down_blocks() if down_blocks else None, self.notes)
        return weights if weights.any else None

    def trained_roles(self) -> list[str]:
        """Roles with at least one layer of the network, in the model's order."""
        present = {self.role_of(m.lora_name) for m in self.loras}
        return [role for role in (DENOISER, *self.model.text_encoder_roles) if role in present]

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.net]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The raw parameters (not LyCORIS's export view), so a resume restores them bit for bit."""
        return {name: p.detach() for name, p in self.net.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.net.named_parameters())
        if set(params) != set(state):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"training state does not match the network: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, param in params.items():
            param.copy_(state[name])

    def export_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the exported tensors, without copying them (works on weightless models too)."""
        shapes = {k: tuple(v.shape) for k, v in self.net.state_dict().items()}
        if self.settings is not None and self.settings.type == "dylora":
            for module in self.loras:
                key = f"{module.lora_name}.lora_up.weight"
                shapes[key] = shapes[key] + (1,) * (len(module.shape) - 2)
        return shapes

    def export_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The kohya/LyCORIS-layout tensors LyCORIS writes for this network."""
        with torch.no_grad():
            tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.net.state_dict().items()}
        if self.settings is not None and self.settings.type == "dylora":
            # LyCORIS scales a DyLoRA slice of b blocks by alpha/b but writes `alpha` as for a plain LoRA
            # (scaled by alpha/rank); writing alpha*block_size makes the file reproduce the full-rank network.
            # Its conv lora_up also comes out 2-D; loaders (diffusers, kohya) expect the 1x1 conv shape.
            for module in self.loras:
                tensors[f"{module.lora_name}.alpha"] = (module.alpha * module.block_size).to(dtype)
                up = tensors[f"{module.lora_name}.lora_up.weight"]
                tensors[f"{module.lora_name}.lora_up.weight"] = up.reshape(*up.shape, *[1] * (len(module.shape) - 2))
        return tensors

    def file_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """export_tensors() in the family's kohya file layout (SDXL: SGM UNet names; Flux: BFL's fused layers)."""
        return formats.file_layout(self.model).to_file(self.export_tensors(dtype))

    def export(self, directory: Path, model: DiffusionModel, metadata: dict[str, str], dtype: torch.dtype,
               bundle: dict[str, torch.Tensor] | None = None) -> None:
        """The LoRA file(s) of output.lora_format; `bundle`: bundle_emb tensors for the kohya file (pivotal
        tuning), which the diffusers layout cannot hold."""
        lora_format = self.config.output.lora_format if self.config is not None else "kohya"
        tensors = self.file_tensors(dtype)
        meta = self.file_metadata(metadata)
        if lora_format in ("kohya", "both"):
            formats.write_lora_file(Path(directory) / f"{meta['ss_output_name']}.safetensors",
                                    {**tensors, **(bundle or {})}, meta)
        if lora_format in ("diffusers", "both"):
            converted = formats.kohya_to_diffusers(tensors, self.name_table())
            diffusers_meta = {"format": "pt", **{k: v for k, v in meta.items() if k.startswith("difftune_")}}
            formats.write_lora_file(Path(directory) / formats.DIFFUSERS_WEIGHTS, converted, diffusers_meta, add_hash=False)

    def file_metadata(self, run: dict[str, str]) -> dict[str, str]:
        run = dict(run)
        run.setdefault("output_name", _output_name(self.config))
        if self.config is not None:
            run.setdefault("clip_skip", str(self.config.model.clip_skip))
        train = self.config.train.model_dump() if self.config is not None else {}
        return formats.lora_metadata(network=self.settings.to_dict(), run=run, family_keys=self.model.lora_metadata(),
                                     prediction_type=self.model.prediction_type, train_config=train)

    def describe(self) -> dict[str, Any]:
        settings = self.settings.to_dict() if self.settings else {"type": "lora-file"}
        settings.pop("lycoris_algo", None)
        return {
            **{k: v for k, v in settings.items() if v not in (None, False, 0.0) or k == "type"},
            "trains": self.trained_roles(),
            "layers": len(self.loras),
            "trainable_parameters": sum(p.numel() for p in self.net.parameters() if p.requires_grad),
            "file_bytes": self.file_bytes(self.export_shapes()),
        }

    def file_bytes(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Size of the kohya-layout file: exact for the tensors; the metadata is that of a step-0 save
        (later saves differ by a few bytes)."""
        dtype = _save_dtype(self.config)
        run = {"step": "0", "epoch": "0"}
        if self.config is not None:
            from difftune import __version__

            run.update(difftune_version=__version__, base_model=self.config.model.path,
                       resolution=str(self.config.data.resolution), train_images="0", train_samples="0",
                       planned_epochs=str(self.config.train.max_epochs))
        meta = {**self.file_metadata(run), "sshs_model_hash": "0" * 64}
        return formats.safetensors_size({k: (shape, dtype) for k, shape in self._file_shapes(shapes).items()}, meta)

    def _file_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Export shapes as the family's file layout writes them, without data: meta tensors (alphas, which the
        layout reads, as ones) through the layout."""
        probe = {k: torch.ones(()) if not shape else torch.empty(shape, device="meta") for k, shape in shapes.items()}
        return {k: tuple(v.shape) for k, v in formats.file_layout(self.model).to_file(probe).items()}

    # ---------------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load_export_tensors(self, tensors: dict[str, torch.Tensor], source: str = "LoRA file") -> None:
        """Load kohya-layout tensors (a file of this network, or a compatible one) into the modules.

        Names and shapes must match; an `alpha` different from the network's is folded into the
        weights for plain LoRA pairs (same function), and is an error for other algorithms.
        """
        self.load_lycoris_tensors(to_lycoris_names(self.model, formats.normalise_kohya_keys(tensors)), source)

    @torch.no_grad()
    def load_lycoris_tensors(self, tensors: dict[str, torch.Tensor], source: str = "LoRA file") -> None:
        """load_export_tensors for tensors already under LyCORIS's names (read through the file layout once)."""
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            module, tensor = formats.split_key(key)
            by_module.setdefault(module, {})[tensor] = value
        modules = {m.lora_name: m for m in self.loras}
        unknown = sorted(set(by_module) - set(modules))
        if unknown:
            raise formats.LoraFormatError(
                f"{source}: {len(unknown)} layer(s) the network does not train, e.g. {unknown[0]} "
                f"(network {self.settings.type if self.settings else '?'} with preset "
                f"'{self.settings.preset if self.settings else '?'}', train_unet/train_text_encoder as configured)"
                + other_family_hint(self.model, source)
            )
        for name, parts in by_module.items():
            _load_module(modules[name], parts, f"{source}: {name}")


def _load_module(module, parts: dict[str, torch.Tensor], where: str) -> None:
    from lycoris.modules.dylora import DyLoraModule
    from lycoris.modules.locon import LoConModule

    parts = dict(parts)
    file_alpha = parts.pop("alpha", None)
    if isinstance(module, DyLoraModule):
        _load_dylora(module, parts, file_alpha, where)
        return
    expected = {k: v.shape for k, v in module.state_dict().items() if k != "alpha"}
    if set(parts) - set(expected):  # first: a wrong algorithm explains every other mismatch
        raise formats.LoraFormatError(f"{where}: tensors {sorted(set(parts) - set(expected))} do not belong to a "
                         f"{type(module).__name__} (expected {sorted(expected)}); is network.type the file's algorithm?")
    if set(expected) - set(parts):
        raise formats.LoraFormatError(f"{where}: the file lacks {sorted(set(expected) - set(parts))}, which this "
                         f"{type(module).__name__} has (network.dora, or the algorithm, differs from the file's)")
    if file_alpha is not None and hasattr(module, "alpha") and not torch.allclose(file_alpha.float(), module.alpha.float()):
        if isinstance(module, LoConModule) and "lora_up.weight" in parts:
            rank = parts["lora_down.weight"].shape[0]
            ratio = (float(file_alpha) / rank) / module.scale
            parts["lora_up.weight"] = parts["lora_up.weight"].float() * ratio
        else:
            raise formats.LoraFormatError(f"{where}: alpha {float(file_alpha):g} differs from the network's {float(module.alpha):g}; "
                             "set network.alpha to match the file")
    for key, value in parts.items():
        if tuple(value.shape) != tuple(expected[key]):
            raise formats.LoraFormatError(f"{where}.{key}: shape {tuple(value.shape)} but the network has {tuple(expected[key])} "
                             "(rank/factor/block_size differ from the file's)")
    if file_alpha is not None and hasattr(module, "alpha"):
        parts["alpha"] = module.alpha.clone()
    missing, unexpected = module.load_state_dict({k: v.to(module.dtype_tensor.device) for k, v in parts.items()}, strict=False)
    if unexpected:
        raise formats.LoraFormatError(f"{where}: unexpected tensors {unexpected}")


def _load_dylora(module, parts: dict[str, torch.Tensor], file_alpha, where: str) -> None:
    up, down = parts.get("lora_up.weight"), parts.get("lora_down.weight")
    if up is None or down is None or set(parts) - {"lora_up.weight", "lora_down.weight"}:
        raise formats.LoraFormatError(f"{where}: a DyLoRA layer loads a lora_up/lora_down pair, got {sorted(parts)}")
    if down.shape[0] != module.lora_dim:
        raise formats.LoraFormatError(f"{where}: rank {down.shape[0]} but network.rank is {module.lora_dim}")
    trained_scale = float(module.alpha) / module.block_count  # what the full-rank network applies
    file_scale = (float(file_alpha) if file_alpha is not None else module.lora_dim) / module.lora_dim
    up = up.float() * (file_scale / trained_scale)
    down = down.float().reshape(module.lora_dim, -1)
    for i in range(module.block_count):
        block = slice(i * module.block_size, (i + 1) * module.block_size)
        module.up_list[i].copy_(up.reshape(up.shape[0], -1)[:, block])
        module.down_list[i].copy_(down[block])


def _deterministic_dylora(module) -> None:
    """Out of training, a DyLoRA layer uses all its blocks with the scale LyCORIS gives the full rank
    (alpha / blocks), instead of a random rank on every call."""
    draw = module.get_random_rank_weight

    def rank_weight():
        if module.training:
            return draw()
        down = torch.cat(list(module.down_list))
        up = torch.cat(list(module.up_list), dim=1)
        return down, up, module.alpha / module.block_count

    module.get_random_rank_weight = rank_weight


def _output_name(config: Config | None) -> str:
    if config is None:
        return "lora"
    name = Path(config.output.dir).name
    return name if name and name not in (".", "..") else "lora"


def _save_dtype(config: Config | None) -> torch.dtype:
    precision = config.output.save_precision if config is not None else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


_SCALED_TWICE_ON_MERGE = ("LohaModule", "LokrModule")
"""In LyCORIS 4.1.3 these modules' get_weight() already applies alpha/rank and get_diff_weight() (what
merge_to uses) applies it again, so a merge with alpha != rank would bake in the wrong strength."""


GROUP_NORM_CHANNELS_LAST_CRASH = torch.__version__ < "2.14"
"""torch 2.13's CPU group_norm backward segfaults (GroupNormBackwardKernelImplChannelsLastInternal) when
the input is channels_last and needs no gradient while the weight needs one: train_norm's case,
since LyCORIS's NormModule normalises the frozen input again with its delta weight, and the CPU's
convolutions hand over channels_last activations. 2.14.1 does not crash (bench venv); earlier
releases are guarded like 2.13."""


def _group_norm_contiguous_on_cpu(x, **kwargs):
    """F.group_norm with a contiguous input on the CPU (GROUP_NORM_CHANNELS_LAST_CRASH); the same values."""
    return F.group_norm(x.contiguous() if x.device.type == "cpu" else x, **kwargs)


def _live_diff_weight(module, multiplier=1.0, shape=None, device=None):
    """The weight change the module applies in its forward (get_weight is scaled once), times `multiplier`."""
    diff = module.get_weight(shape) * module.scalar * multiplier
    return (diff.to(device) if device is not None else diff), None


# ------------------------------------------------------------------------------------ from files
def to_lycoris_names(model: DiffusionModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya-file tensors under the names LyCORIS gives the layers, through the family's file layout (SDXL
    files name UNet layers by SGM paths; Flux files fuse q, k and v)."""
    return formats.file_layout(model).from_file(tensors)


def load_lora_file(model: DiffusionModel, path: str | Path, multiplier: float = 1.0, attach: bool = True) -> LoraFamilyNetwork:
    """Put a LoRA-family file (kohya or diffusers layout) on `model`.

    difftune's own files carry their settings in the metadata and are rebuilt exactly; other files go
    through LyCORIS's detection of the algorithm from the tensor names.
    """
    tensors, metadata = formats.read_as_kohya(path, formats.module_table(model))
    tensors = to_lycoris_names(model, tensors)
    roles = [role for role, prefix in model.kohya_prefixes.items() if any(k.startswith(prefix + "_") for k in tensors)]
    if "difftune_network" in metadata:
        settings = NetworkSettings.from_dict(json.loads(metadata["difftune_network"]))
        network = LoraFamilyNetwork.build(model, settings, roles, attach=False, multiplier=multiplier)
        network.load_lycoris_tensors(tensors, source=str(path))
    else:
        network = _foreign(model, tensors, multiplier, str(path))
    network.net.requires_grad_(False)
    network.net.eval()
    if attach:
        network.attach()
    return network


def _foreign(model: DiffusionModel, tensors: dict[str, torch.Tensor], multiplier: float, source: str) -> LoraFamilyNetwork:
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    glokr_key = next((k for k in tensors if formats.split_key(k)[1].startswith("glokr_")), None)
    if glokr_key is not None:  # LyCORIS does not know these tensors (difftune's own algorithm)
        raise formats.LoraFormatError(
            f"{source}: a GLoKr file ({glokr_key}) without difftune's metadata (difftune_network): GLoKr layers are "
            "rebuilt from the settings difftune writes in the file, which this copy lacks; use the file as "
            "difftune saved it")

    text, denoiser = lycoris_inputs(model, [DENOISER, *model.text_encoder_roles])
    try:
        with _quiet_lycoris():
            # create_network_from_weights first builds (and discards) a network from LyCORIS's class-level
            # preset, whose default fails on a diffusers UNet ("duplicated lora name"): give it ours.
            LycorisNetworkKohya.apply_preset(model.lora_presets["attn-only"])
            net, _ = create_network_from_weights(multiplier, None, None, text, denoiser, weights_sd=tensors)
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as e:  # keys no LyCORIS module knows
        raise formats.LoraFormatError(f"{source}: LyCORIS could not rebuild this network: {e}") from e
    net.loras = net.text_encoder_loras + net.unet_loras
    loaded = {m.lora_name for m in net.loras}
    skipped = sorted({formats.split_key(k)[0] for k in tensors} - loaded)
    if skipped:
        raise formats.LoraFormatError(
            f"{source}: {len(skipped)} layer(s) could not be matched to this model or algorithm, e.g. {skipped[0]}"
            + other_family_hint(model, source)
        )
    return LoraFamilyNetwork(model, net, None, attach=False, multiplier=multiplier)


def other_family_hint(model: DiffusionModel, source: str) -> str:
    """'; the file looks like a Flux LoRA, and the model is SDXL' when the file's own keys say another family."""
    from difftune.models.registry import FAMILIES, family_of_lora_keys

    try:
        with safe_open(str(source), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception:  # not a readable file (a state dict from elsewhere): no hint
        return ""
    ours = next((f.name for f in FAMILIES.values() if f.kohya_prefixes == model.kohya_prefixes
                 and f.diffusers_prefixes == model.diffusers_prefixes), None)
    theirs = family_of_lora_keys(keys)
    if ours is None or theirs == ours:
        return ""
    return f"; the file looks like a {theirs} LoRA and {model.family} is a {ours} model: use a base of its family"
