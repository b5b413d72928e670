"""Model FLOPs of one training step, counted with torch.utils.flop_counter on the meta device.

The denoiser of a model folder is built from its config on the meta device (no weights, no
arithmetic: counting SDXL at 1024² takes a second on any machine), given the job's trainable part
(PEFT LoRA of `rank` on to_q/to_k/to_v/to_out.0, or the whole UNet), and run forward and backward
once at the job's batch and resolution under FlopCounterMode. Model FLOPs, as MFU counts them: the
recomputation of gradient checkpointing and the VAE and text encoders (which diffusers' scripts run
every step and difftune's caches skip) are not included, so both tools divide the same numerator.
On the meta device attention runs torch's math path, whose matmuls the counter sees; the CPU's
flash-attention kernel is not one it counts, so counting there would come out low.
"""

from __future__ import annotations

from pathlib import Path


def denoiser_step_flops(model_dir: Path, lora_rank: int | None, batch_size: int, resolution: int) -> int:
    """FLOPs of one forward + backward of the UNet in `model_dir` (diffusers layout)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(model_dir, subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(lora_rank is None)
    if lora_rank is not None:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    c = unet.config
    side = resolution // 8
    inputs = {
        "sample": torch.zeros(batch_size, c.in_channels, side, side, device="meta"),
        "timestep": torch.zeros(batch_size, dtype=torch.long, device="meta"),
        "encoder_hidden_states": torch.zeros(batch_size, 77, c.cross_attention_dim, device="meta"),
    }
    if c.addition_embed_type == "text_time":  # SDXL: pooled text embedding and the six size/crop numbers
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch_size, pooled, device="meta"),
                                       "time_ids": torch.zeros(batch_size, 6, device="meta")}
    with FlopCounterMode(display=False) as counter:
        unet(**inputs).sample.float().pow(2).mean().backward()
    return int(counter.get_total_flops())
