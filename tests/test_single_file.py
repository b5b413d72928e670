"""Single-file checkpoints: original-layout export, loading through diffusers' converter, family detection."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from difftune.config.schema import ModelConfig
from difftune.models import load_model
from difftune.models.loading import ModelLoadError
from difftune.models.registry import describe_unknown_file
from difftune.models.sd.adapter import StableDiffusionModel
from difftune.models.sd.ldm_export import save_single_file, unet_to_ldm
from difftune.models.sd.single_file import CROSS_ATTENTION_KEY, is_sd_layout, variant_from_weights
from difftune.models.sd.tiny import build_tiny_components
from difftune.models.single_file_io import shipped_config_dir
from difftune.training.loop import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny components, their diffusers folder (the configs a single file needs) and a perturbed copy."""
    root = tmp_path_factory.mktemp("single")
    parts = build_tiny_components("tiny-sd")
    with torch.no_grad():  # not the seeded init, so a reload that silently re-initialised would show
        for p in parts["unet"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    StableDiffusionModel(family="tiny-sd", clip_skip=1, source="test", **parts).save_pretrained(root / "folder")
    return parts, root


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module):
    theirs = actual.state_dict()
    mismatched = [k for k, v in expected.state_dict().items() if not torch.equal(v, theirs[k])]
    assert not mismatched


@pytest.mark.parametrize("layout", ["clip", "open_clip"])
def test_single_file_round_trip_is_exact(tiny, tmp_path, layout):
    parts, root = tiny
    file = tmp_path / "model.safetensors"
    save_single_file(file, parts["unet"], parts["vae"], parts["text_encoder"], dtype=torch.float32, text_layout=layout)
    keys = load_file(file)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    text_key = {"clip": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "open_clip": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"}[layout]
    assert text_key in keys
    model = load_model(ModelConfig(path=str(file), config_dir=str(root / "folder")))
    assert_same_weights(parts["unet"], model.unet)
    assert_same_weights(parts["vae"], model.vae)
    assert_same_weights(parts["text_encoder"], model.parts["text_encoder"])


def test_ckpt_file_loads_like_safetensors(tiny, tmp_path):
    parts, root = tiny
    st = tmp_path / "m.safetensors"
    save_single_file(st, parts["unet"], parts["vae"], parts["text_encoder"], dtype=torch.float32)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(st), "global_step": 10}, ckpt)  # the old LDM pickle layout
    model = load_model(ModelConfig(path=str(ckpt), config_dir=str(root / "folder")))
    assert_same_weights(parts["unet"], model.unet)


def test_unet_key_layout_matches_the_original_for_sd15_blocks():
    """Spot-check the block arithmetic on the real SD 1.5 config (meta tensors: no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped_config_dir("sd1") / "unet"))
    keys = set(unet_to_ldm(unet))
    prefix = "model.diffusion_model."
    for key in [
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",  # first cross-attention
        "input_blocks.3.0.op.weight",  # first downsampler
        "input_blocks.4.0.skip_connection.weight",  # 320 → 640 resnet shortcut
        "input_blocks.11.0.out_layers.3.weight",  # last down resnet
        "middle_block.2.emb_layers.1.weight",
        "output_blocks.2.1.conv.weight",  # upsampler of a block without attention
        "output_blocks.5.2.conv.weight",  # upsampler after attention
        "output_blocks.11.1.proj_out.weight",
        "out.2.weight",
    ]:
        assert prefix + key in keys, key
    assert len(keys) == 686  # every UNet tensor of SD 1.5, each with a single name


def test_detect_family_from_weights(tmp_path):
    path = tmp_path / "x.safetensors"
    assert variant_from_weights({CROSS_ATTENTION_KEY: torch.zeros(320, 768)}, path) == "sd1"
    assert variant_from_weights({CROSS_ATTENTION_KEY: torch.zeros(320, 1024)}, path) == "sd2-v"
    assert variant_from_weights({CROSS_ATTENTION_KEY: torch.zeros(320, 1024), "global_step": 875000}, path) == "sd2"
    # SDXL files (a `conditioner`, not a `cond_stage_model`) are not the SD 1.x/2.x layout: the SDXL family takes them.
    sdxl = [CROSS_ATTENTION_KEY, "conditioner.embedders.1.model.ln_final.weight"]
    assert not is_sd_layout(sdxl)
    assert is_sd_layout([CROSS_ATTENTION_KEY, "cond_stage_model.transformer.text_model.final_layer_norm.weight"])
    assert "Flux" in describe_unknown_file(["double_blocks.0.img_attn.norm.key_norm.scale"])
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1)}, str(flux))
    with pytest.raises(ModelLoadError, match="Flux"):
        load_model(ModelConfig(path=str(flux)))


def test_files_that_are_not_checkpoints_get_clear_errors(tiny, tmp_path):
    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(ModelLoadError, match="LoRA file.*network.init_from"):
        load_model(ModelConfig(path=str(lora)))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="broken.safetensors.*not a readable"):
        load_model(ModelConfig(path=str(broken)))
    # An SD-layout file with a config_dir that holds no configs: the error names model.config_dir.
    parts, _ = tiny
    checkpoint = tmp_path / "model.safetensors"
    save_single_file(checkpoint, parts["unet"], parts["vae"], parts["text_encoder"], dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="model.config_dir"):
        load_model(ModelConfig(path=str(checkpoint), config_dir=str(tmp_path)))


def test_full_finetune_exports_a_single_file_that_trains_again(quick_config, tiny, tmp_path):
    _, root = tiny
    config = quick_config(output={"dir": str(tmp_path / "a"), "checkpoint_format": "both"}, train={"max_steps": 2})
    train(config, show_progress=False)
    final = tmp_path / "a" / "checkpoints" / "final"
    assert (final / "model_index.json").is_file() and (final / "model.safetensors").is_file()
    # The exported file is a model source of its own (with the tiny configs), and matches the folder.
    again = quick_config(
        model={"path": str(final / "model.safetensors"), "config_dir": str(final)},
        output={"dir": str(tmp_path / "b")},
        train={"max_steps": 2},
    )
    summary = train(again, show_progress=False)
    assert summary["steps"] == 2
    reloaded = load_model(ModelConfig(path=str(final / "model.safetensors"), config_dir=str(final)))
    folder = load_model(ModelConfig(path=str(final)))
    assert_same_weights(folder.unet, reloaded.unet)
