"""Full-size architectures with random weights, built on a device (for the GPU benchmarks).

The weightless (meta-device) model from the shipped configs gets storage on the device and normal
random values (norm scales 1, integer position ids counted up), so nothing is downloaded and no fp32
copy of a multi-GB model passes through host memory.
"""

from __future__ import annotations

import torch


def randomise(model, device: str, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.parts.values():
        module.to_empty(device=device)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "norm" in name and name.endswith(".weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
            for buffer in module.buffers():
                if not buffer.is_floating_point():  # position ids
                    buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand(buffer.shape))
    return model


def random_model(variant: str, device: str):
    """A shipped architecture (`sdxl`, `flux-dev`, `sd3.5-large`, ...) with random weights on `device`,
    with tokenizers that need no vocabulary file (token ids only need to be valid for the embeddings)."""
    from difftune.config.schema import ModelConfig
    from difftune.models import weightless_model
    from difftune.models.clip_tokenizers import byte_level_clip_tokenizer
    from difftune.models.single_file_io import shipped_config_dir
    from difftune.models.t5_text import tiny_t5_tokenizer

    model = randomise(weightless_model(ModelConfig(path=str(shipped_config_dir(variant)))), device)
    for attribute in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if not hasattr(model, attribute):
            continue
        encoder = model.parts.get({"tokenizer": "text_encoder"}.get(attribute, attribute.replace("tokenizer", "text_encoder")))
        is_t5 = encoder is not None and type(encoder).__name__.startswith("T5")
        setattr(model, attribute, tiny_t5_tokenizer(getattr(model, "max_sequence_length", 512)) if is_t5
                else byte_level_clip_tokenizer())
    return model
