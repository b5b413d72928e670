"""Per-layer LR multipliers of a LoRA-family network: kohya's block LR weights and LoRA+.

Block LR weights (kohya's network_args down_lr_weight / mid_lr_weight / up_lr_weight) scale the LR of
the UNet's blocks in the LDM numbering A1111's block-weight tools use: IN00..IN11 (IN00 is conv_in, which
has no LoRA), MID, OUT00..OUT11 on SD 1.x/2.x; IN00..IN08, MID, OUT00..OUT08 on SDXL. From diffusers'
module names, as kohya's get_block_index: down_blocks.i.{resnets,attentions}.j is IN(1 + 3i + j),
its downsampler IN(3 + 3i); up_blocks.i.{resnets,attentions}.j is OUT(3i + j), its upsampler OUT(2 + 3i);
mid_block is MID. A list shorter than the block count is padded with 1.0 (kohya); a longer one is cut
there, with a note. Presets (kohya's) fill the list: sine, cosine, linear, reverse_linear, zeros, each
optionally "+offset" ("sine+0.5"). A weight of 0 freezes the block's layers (kohya does not create
them; here they stay at their initial, zero, update). Layers outside the blocks (conv_in, time
embedding, conv_out) and the text encoders keep weight 1.

LoRA+ (Hayou et al. 2024; kohya's loraplus_lr_ratio): the B ("lora_up") matrices train at ratio × the
LR of their A matrices, for the algorithms that have them (lora, locon).

Layer LR weights (network.layer_lr_weights) serve every family, the transformer ones (Flux, SD3)
included, whose blocks have no IN/MID/OUT numbering: fnmatch patterns over the layer's name as the
network names it, "lora_unet_" + the diffusers module path with "_" (Flux:
lora_unet_transformer_blocks_0_attn_add_q_proj for the text stream of a double block,
lora_unet_single_transformer_blocks_3_proj_mlp; SD3: lora_unet_transformer_blocks_...) and lora_te1_...
for the text encoders; the first matching pattern gives the multiplier. (Flux files are written with
BFL's names, double_blocks/single_blocks; the patterns match the diffusers paths.) The multipliers multiply: layer × block × LoRA+.
"""

from __future__ import annotations

import math
import re

BLOCK_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
LORA_PLUS_TYPES = ("lora", "locon")
_UPDOWN = re.compile(r"_(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")


def check_block_spec(value: str | list[float] | None) -> str | list[float] | None:
    """A preset name (optionally +offset) or a list of non-negative numbers; the error lists the presets."""
    if value is None or isinstance(value, list):
        if value is not None and any(w < 0 for w in value):
            raise ValueError("block LR weights must be >= 0 (0 freezes a block)")
        return value
    name, _, offset = value.partition("+")
    if name not in BLOCK_PRESETS:
        raise ValueError(f"{value!r}: expected a list of numbers or a preset: {', '.join(BLOCK_PRESETS)} "
                         "(optionally +offset, e.g. 'sine+0.5')")
    if offset:
        try:
            float(offset)
        except ValueError:
            raise ValueError(f"{value!r}: the part after '+' must be a number") from None
    return value


def block_weights(spec: str | list[float] | None, count: int, where: str, notes: list[str]) -> list[float] | None:
    """The spec as `count` weights (None: not set)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        name, _, offset = spec.partition("+")
        base = float(offset) if offset else 0.0
        ramp = [i / (count - 1) for i in range(count)]
        values = {"sine": [math.sin(math.pi * r / 2) for r in ramp],
                  "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
                  "linear": ramp, "reverse_linear": list(reversed(ramp)), "zeros": [0.0] * count}[name]
        return [v + base for v in values]
    if len(spec) > count:
        notes.append(f"{where} has {len(spec)} values; this UNet has {count} blocks there: the last "
                     f"{len(spec) - count} are not used")
        return list(spec[:count])
    return list(spec) + [1.0] * (count - len(spec))


def block_of(lora_name: str) -> tuple[str, int] | None:
    """("down", index) / ("mid", 0) / ("up", index) of a UNet LoRA module, None outside the blocks."""
    match = _UPDOWN.search(lora_name)
    if match:
        side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        index = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return (side, index + 1) if side == "down" else (side, index)
    if "_mid_block_" in lora_name:
        return ("mid", 0)
    return None


class LrWeights:
    """The multiplier of each (module, parameter) of a network, from the [network] settings."""

    def __init__(self, network_config, down_blocks: int | None, notes: list[str]):
        count = 3 * down_blocks if down_blocks else 0
        if not down_blocks and any(v is not None for v in (network_config.down_lr_weight, network_config.up_lr_weight,
                                                            network_config.mid_lr_weight)):
            notes.append("network.down_lr_weight / mid_lr_weight / up_lr_weight number a UNet's blocks, and this "
                         "model's denoiser has none (a transformer): they change nothing; use "
                         "network.layer_lr_weights with patterns over its layer names")
        self.down = block_weights(network_config.down_lr_weight, count, "network.down_lr_weight", notes)
        self.up = block_weights(network_config.up_lr_weight, count, "network.up_lr_weight", notes)
        self.mid = network_config.mid_lr_weight
        self.plus = {"denoiser": network_config.loraplus_unet_lr_ratio or network_config.loraplus_lr_ratio,
                     "text": network_config.loraplus_text_encoder_lr_ratio or network_config.loraplus_lr_ratio}
        self.layers = dict(network_config.layer_lr_weights or {})
        self.matched: set[str] = set()

    @property
    def any(self) -> bool:
        return bool(self.layers) or any(w is not None for w in (self.down, self.up, self.mid, *self.plus.values()))

    def layer(self, lora_name: str) -> float:
        """network.layer_lr_weights: the first pattern that matches the layer's name, else 1."""
        import fnmatch

        for pattern, weight in self.layers.items():
            if fnmatch.fnmatchcase(lora_name, pattern):
                self.matched.add(pattern)
                return weight
        return 1.0

    def unmatched_notes(self) -> list[str]:
        """A note per layer_lr_weights pattern no layer matched (a typo would otherwise do nothing)."""
        return [f"network.layer_lr_weights: {pattern!r} matches no layer of this network (names look like "
                "lora_unet_ + the diffusers module path with _, e.g. lora_unet_single_transformer_blocks_0_proj_mlp, "
                "lora_te1_...)" for pattern in self.layers if pattern not in self.matched]

    def block(self, lora_name: str, is_denoiser: bool) -> float:
        place = block_of(lora_name) if is_denoiser else None
        if place is None:
            return 1.0
        side, index = place
        weights = {"down": self.down, "up": self.up}.get(side)
        if side == "mid":
            return 1.0 if self.mid is None else self.mid
        return 1.0 if weights is None or index >= len(weights) else weights[index]

    def parameter(self, lora_name: str, param_name: str, is_denoiser: bool) -> float:
        ratio = self.plus["denoiser" if is_denoiser else "text"]
        plus = ratio if ratio is not None and "lora_up" in param_name else 1.0
        return self.layer(lora_name) * self.block(lora_name, is_denoiser) * plus
