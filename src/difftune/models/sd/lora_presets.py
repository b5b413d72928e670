"""Layer selections for LyCORIS on diffusers' Stable Diffusion UNet and the CLIP text encoder.

They carry LyCORIS's preset names (config/network_rules.PRESETS) but target diffusers' module classes:
LyCORIS's own `attn-only` names the original LDM classes (CrossAttention, SelfAttention), which a
diffusers UNet does not have, and its `ia3` preset anchors regular expressions at the start of module
paths, so neither would match anything here. Matching by class (kohya's way) keeps the kohya module
names that ComfyUI and A1111 map: `lora_unet_<diffusers path with _>`.
"""

from __future__ import annotations

from typing import Any

ATTENTION = ["Attention"]  # diffusers.models.attention_processor.Attention (attn1 / attn2)
TRANSFORMER = ["Transformer2DModel"]
CONV_BLOCKS = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
TE_ATTENTION = ["CLIPAttention", "CLIPSdpaAttention"]  # transformers 5 has one class; 4.x had the Sdpa variant
TE_MLP = ["CLIPMLP"]
TIME_EMBEDDING = ["time_embedding.linear_1", "time_embedding.linear_2"]


def _preset(unet_modules, unet_names, te_modules, te_names=(), *, conv=False, fnmatch=False, name_algo_map=None):
    # Every key LycorisNetworkKohya.apply_preset reads is set, because presets are class attributes there:
    # a key left out would keep the previous network's value.
    return {
        "enable_conv": conv,
        "unet_target_module": list(unet_modules),
        "unet_target_name": list(unet_names),
        "text_encoder_target_module": list(te_modules),
        "text_encoder_target_name": list(te_names),
        "module_algo_map": {},
        "name_algo_map": dict(name_algo_map or {}),
        "use_fnmatch": fnmatch,
        "exclude_name": [],
    }


UNET_CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "attn-only": _preset(ATTENTION, [], TE_ATTENTION),
    "attn-mlp": _preset(TRANSFORMER, [], TE_ATTENTION + TE_MLP),
    "full-lin": _preset(TRANSFORMER + CONV_BLOCKS, TIME_EMBEDDING, TE_ATTENTION + TE_MLP),
    "full": _preset(TRANSFORMER + CONV_BLOCKS, TIME_EMBEDDING + ["conv_in", "conv_out"], TE_ATTENTION + TE_MLP, conv=True),
    # (IA)^3: rescale keys, values and the input of the feed-forward's second layer.
    "ia3": _preset(
        [], ["*.to_k", "*.to_v", "*.ff.net.2"], [], ["*.k_proj", "*.v_proj", "*.mlp.fc2"], fnmatch=True,
        name_algo_map={"*.ff.net.2": {"train_on_input": True}, "*.mlp.fc2": {"train_on_input": True}},
    ),
}
