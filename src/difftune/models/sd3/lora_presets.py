"""Layer selections for LyCORIS on diffusers' SD3Transformer2DModel and SD3's two CLIP encoders.

The same preset names as the UNet families (models/sd/lora_presets.py), for the MMDiT's module classes
in diffusers 0.42: every joint block has an `Attention` (`attn`: to_q/k/v and to_out.0 for the image
tokens, add_q/k/v_proj and to_add_out for the text tokens; SD3.5-medium's `attn2` too), two
`FeedForward`s (ff, ff_context) and adaptive-norm modulation linears (`norm1.linear`,
`norm1_context.linear`, and the final `norm_out.linear`). The T5 encoder is never a LoRA target.
"""

from __future__ import annotations

from typing import Any

from difftune.models.sd.lora_presets import TE_ATTENTION, TE_MLP, _preset

ATTENTION = ["Attention"]  # diffusers.models.attention_processor.Attention
FEED_FORWARD = ["FeedForward"]  # diffusers.models.attention.FeedForward
MODULATION = ["AdaLayerNormZero", "SD35AdaLayerNormZeroX", "AdaLayerNormContinuous"]
"""The norms whose `linear` computes each block's shift/scale/gate from the timestep + pooled text."""

SD3_PRESETS: dict[str, dict[str, Any]] = {
    "attn-only": _preset(ATTENTION, [], TE_ATTENTION),
    "attn-mlp": _preset(ATTENTION + FEED_FORWARD, [], TE_ATTENTION + TE_MLP),
    "full-lin": _preset(ATTENTION + FEED_FORWARD + MODULATION, [], TE_ATTENTION + TE_MLP),
    # The MMDiT has no convolution but its patch embedding: `full` is `full-lin`.
    "full": _preset(ATTENTION + FEED_FORWARD + MODULATION, [], TE_ATTENTION + TE_MLP),
    # (IA)^3: rescale keys, values (image and text tokens) and the input of each feed-forward's second layer.
    "ia3": _preset(
        [], ["*.to_k", "*.to_v", "*.add_k_proj", "*.add_v_proj", "*.ff.net.2", "*.ff_context.net.2"], [],
        ["*.k_proj", "*.v_proj", "*.mlp.fc2"], fnmatch=True,
        name_algo_map={"*.ff.net.2": {"train_on_input": True}, "*.ff_context.net.2": {"train_on_input": True},
                       "*.mlp.fc2": {"train_on_input": True}},
    ),
}
