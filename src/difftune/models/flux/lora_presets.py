"""Layer selections for LyCORIS on diffusers' FluxTransformer2DModel and its CLIP-L text encoder.

The preset names are LyCORIS's (config/network_rules.PRESETS); the targets are diffusers 0.42's Flux
classes: `FluxAttention` (double blocks: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; single
blocks: to_q/k/v), `FeedForward` (ff, ff_context), the blocks `FluxTransformerBlock` and
`FluxSingleTransformerBlock`. T5 is never a target (difftune does not train it, as kohya does not).

- attn-only: the attention layers of both block kinds.
- attn-mlp: + the feed-forwards and the single blocks' proj_mlp / proj_out (kohya's LoRA default).
- full-lin (and full, the same: Flux has no convolutions): every linear layer of the blocks (their
  modulation linears norm1.linear, norm1_context.linear, norm.linear too) and the embedders
  (x_embedder, context_embedder, the time/text/guidance embedders, the final proj_out). norm_out's
  modulation is left out: BFL stores it with its halves swapped.
- ia3: keys, values and the input of the feed-forwards' second layer.
"""

from __future__ import annotations

from typing import Any

from difftune.models.sd.lora_presets import TE_ATTENTION, TE_MLP

ATTENTION = ["FluxAttention"]
BLOCKS = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
SINGLE_MLP = ["single_transformer_blocks.*.proj_mlp", "single_transformer_blocks.*.proj_out"]
EMBEDDERS = ["x_embedder", "context_embedder", "time_text_embed.*", "proj_out"]


def _preset(modules, names, te_modules, te_names=(), *, name_algo_map=None) -> dict[str, Any]:
    # Every key LycorisNetworkKohya.apply_preset reads is set (presets are class attributes there).
    return {
        "enable_conv": False,
        "unet_target_module": list(modules),
        "unet_target_name": list(names),
        "text_encoder_target_module": list(te_modules),
        "text_encoder_target_name": list(te_names),
        "module_algo_map": {},
        "name_algo_map": dict(name_algo_map or {}),
        "use_fnmatch": True,
        "exclude_name": [],
    }


FULL = _preset(BLOCKS, EMBEDDERS, TE_ATTENTION + TE_MLP)

FLUX_PRESETS: dict[str, dict[str, Any]] = {
    "attn-only": _preset(ATTENTION, [], TE_ATTENTION),
    "attn-mlp": _preset(ATTENTION + ["FeedForward"], SINGLE_MLP, TE_ATTENTION + TE_MLP),
    "full-lin": FULL,
    "full": FULL,
    "ia3": _preset(
        [], ["*.to_k", "*.to_v", "*.ff.net.2", "*.ff_context.net.2"], [], ["*.k_proj", "*.v_proj", "*.mlp.fc2"],
        name_algo_map={"*.ff.net.2": {"train_on_input": True}, "*.ff_context.net.2": {"train_on_input": True},
                       "*.mlp.fc2": {"train_on_input": True}},
    ),
}
