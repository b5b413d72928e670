"""SDXL on the family seams (issue 13): the built-in tiny-sdxl trains, resumes and conditions on each
image's size and crop; its LoRA files of every type reload, use kohya's SDXL names (what ComfyUI,
A1111/Forge, kohya and diffusers map) and load in diffusers; single files round-trip; refiners and
other architectures are refused clearly; doctor sizes SDXL itself on the meta device."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import quick_config_dict
from difftune.checkpoint import lora_formats as formats
from difftune.config.loading import validate_config
from difftune.config.schema import ModelConfig
from difftune.data.batch import Batch
from difftune.errors import ModelLoadError, SingleFileError
from difftune.models import load_model
from difftune.network.lycoris_net import load_lora_file
from difftune.training.loop import Trainer, train

TYPES = ["lora", "locon", "loha", "lokr", "dylora", "glora", "ia3", "diag-oft", "boft", "full"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sdxl_config(digits_dir, tmp_path):
    def make(**sections):
        sections.setdefault("model", {})["path"] = "tiny-sdxl"
        return validate_config(quick_config_dict(digits_dir, tmp_path / "run", **sections), "test")

    return make


def meta(n: int = 2, original=(16, 16), crop=(0, 0)) -> Batch:
    return Batch(pixels=None, captions=["a handwritten 3", "a handwritten 7"][:n], original_sizes=[original] * n,
                 crop_top_lefts=[crop] * n, target_sizes=[(16, 16)] * n)


@torch.no_grad()
def outputs(model, batch: Batch | None = None):
    """UNet output for fixed latents, timesteps, prompts and sizes (both text encoders included)."""
    batch = batch or meta()
    latents = torch.randn(len(batch), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = model.condition(model.encode_text(batch.captions), batch)
    return model.predict(latents, torch.tensor([50, 700][: len(batch)]), cond)


# ------------------------------------------------------------------------------ conditioning
def test_conditioning_is_both_encoders_and_each_images_size_and_crop():
    model = load_model(ModelConfig(path="tiny-sdxl"))
    text = model.encode_text(["a handwritten 3", ""])
    # penultimate hidden states of both encoders, side by side; pooled projection of the second
    assert text["encoder_hidden_states"].shape == (2, 77, 32 + 48) and text["text_embeds"].shape == (2, 48)
    out = model.text_encoder_2(model.tokenizer_2(["a handwritten 3"], padding="max_length", max_length=77,
                                                 return_tensors="pt").input_ids, output_hidden_states=True)
    torch.testing.assert_close(text["encoder_hidden_states"][0, :, 32:], out.hidden_states[-2][0])
    cond = model.condition(text, meta(2, original=(40, 24), crop=(3, 5)))
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[40, 24, 3, 5, 16, 16]] * 2
    # the micro-conditioning reaches the UNet: another original size or crop changes the prediction
    base = outputs(model)
    assert (outputs(model, meta(original=(64, 16))) - base).abs().max() > 1e-5
    assert (outputs(model, meta(crop=(8, 0))) - base).abs().max() > 1e-5


def test_training_batches_carry_the_crop_and_original_size(sdxl_config, tmp_path):
    from PIL import Image

    folder = tmp_path / "wide"
    folder.mkdir()
    Image.new("RGB", (48, 16), "gray").save(folder / "a.png")
    (folder / "a.txt").write_text("a wide image")
    config = validate_config(quick_config_dict(folder, tmp_path / "w", model={"path": "tiny-sdxl"},
                                               data={"val_split": 0.0, "center_crop": False, "flip_p": 1.0},
                                               train={"batch_size": 1}), "t")
    trainer = Trainer(config, show_progress=False)
    batch = next(trainer.step_groups())[0]
    trainer.close()
    (top, left), = batch.crop_top_lefts
    assert batch.original_sizes == [(16, 48)] and batch.target_sizes == [(16, 16)] and top == 0
    # a random crop of the 48-wide image, measured from the right after the flip
    assert 0 <= left <= 32


# ------------------------------------------------------------------------------ training
def test_tiny_sdxl_full_fine_tune_learns_and_resumes_bit_exactly(sdxl_config, tmp_path):
    common = {"train": {"max_steps": 8, "lr": 1e-3}, "validation": {"every_n_steps": 4}}
    whole = train(sdxl_config(output={"dir": str(tmp_path / "whole")}, **common), show_progress=False)
    assert whole["best_val_loss"] < 0.6 * whole["first_val_loss"]
    part = sdxl_config(output={"dir": str(tmp_path / "part"), "save_every_n_steps": 4}, **common)
    part.train.max_steps = 4
    train(part, show_progress=False)
    part.train.max_steps = 8
    train(part, resume=tmp_path / "part", show_progress=False)
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        a, b = load_file(tmp_path / "whole/checkpoints/final" / name), load_file(tmp_path / "part/checkpoints/final" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_each_text_encoder_gets_its_own_lr_and_can_train_alone(sdxl_config):
    trainer = Trainer(sdxl_config(network={"type": "lora", "rank": 2},
                                  train={"lr": 1e-3, "text_encoder_lr": 1e-4, "text_encoder_2_lr": 3e-5,
                                         "train_text_encoder": True}), show_progress=False)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    trainer.close()
    assert groups == {"denoiser": 1e-3, "text_encoder": 1e-4, "text_encoder_2": 3e-5}
    only_first = Trainer(sdxl_config(network={"type": "lora", "rank": 2},
                                     train={"train_unet": False, "train_text_encoder": ["text_encoder"]}),
                         show_progress=False)
    names = [m.lora_name for m in only_first.network.loras]
    only_first.close()
    assert names and all(n.startswith("lora_te1_") for n in names)


@pytest.mark.parametrize("network", [{"type": t} for t in TYPES] + [{"type": "lora", "dora": True}])
def test_every_lora_type_trains_saves_and_reloads_on_sdxl(sdxl_config, network):
    config = sdxl_config(network=network, train={"max_steps": 2, "lr": 1e-2, "train_text_encoder": True},
                         data={"val_split": 0.0}, output={"save_state": False})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    path = trainer.run_dir.checkpoints / "final" / "run.safetensors"
    trained, base = outputs(trainer.model), outputs(load_model(ModelConfig(path="tiny-sdxl")))
    assert (trained - base).abs().max() > 1e-4
    fresh = load_model(ModelConfig(path="tiny-sdxl"))
    load_lora_file(fresh, path)
    torch.testing.assert_close(outputs(fresh), trained, rtol=1e-4, atol=1e-5)
    keys = load_file(path).keys()
    assert {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}


# ------------------------------------------------------------------------ files people load
KOHYA_SDXL = re.compile(r"^lora_(unet_(input_blocks|middle_block|output_blocks|time_embed)_[0-9a-z_]+|"
                        r"te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12]))$")


def test_lora_file_uses_kohyas_sdxl_names_that_comfyui_maps(sdxl_config, tmp_path):
    """ComfyUI (comfy/lora.py) names an SDXL UNet layer `lora_unet_` + its key in the SGM checkpoint
    (`model.diffusion_model.<path>.weight`) with dots as underscores, and the text encoders
    `lora_te1_text_model_encoder_layers_N_...` (CLIP-L) and `lora_te2_...` (bigG); A1111/Forge match the
    same SGM names. Every layer of our file must be one of those."""
    config = sdxl_config(network={"type": "locon", "rank": 2, "preset": "full-lin"},
                         train={"max_steps": 1, "train_text_encoder": True}, data={"val_split": 0.0})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    with safe_open(str(trainer.run_dir.checkpoints / "final" / "run.safetensors"), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        metadata = f.metadata()
    trainer.model.save_single_file(tmp_path / "model.safetensors", dtype=torch.float32)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        sgm = {"lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
               for k in f.keys() if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert unet and unet <= sgm, sorted(unet - sgm)[:5]
    assert all(KOHYA_SDXL.match(m) for m in modules), sorted(m for m in modules if not KOHYA_SDXL.match(m))[:5]
    for example in ("lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q", "lora_unet_middle_block_1_proj_in",
                    "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                    "lora_te2_text_model_encoder_layers_2_mlp_fc1"):
        assert example in modules, example
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_sdxl_lora_loads_in_diffusers_and_changes_the_pipeline_as_trained(sdxl_config):
    config = sdxl_config(network={"type": "lora", "alpha": 8}, data={"val_split": 0.0},
                         train={"max_steps": 2, "lr": 1e-2, "train_text_encoder": True},
                         output={"lora_format": "both", "save_state": False})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    base = outputs(load_model(ModelConfig(path="tiny-sdxl")))
    for name in ("run.safetensors", formats.DIFFUSERS_WEIGHTS):
        fresh = load_model(ModelConfig(path="tiny-sdxl"))
        fresh.pipeline("euler").load_lora_weights(str(trainer.run_dir.checkpoints / "final" / name))
        torch.testing.assert_close(outputs(fresh), outputs(trainer.model), rtol=1e-4, atol=1e-5)
    assert (outputs(trainer.model) - base).abs().max() > 1e-4


def test_sdxl_lora_converts_between_layouts_and_merges(sdxl_config, tmp_path):
    from difftune.network.tools import convert_file, merge_into_model

    config = sdxl_config(network={"type": "lora", "rank": 4, "alpha": 2}, data={"val_split": 0.0},
                         train={"max_steps": 2, "lr": 1e-2, "train_text_encoder": True}, output={"save_state": False})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    kohya = trainer.run_dir.checkpoints / "final" / "run.safetensors"
    convert_file(kohya, tmp_path / "d.safetensors", "diffusers", model_path="tiny-sdxl")
    assert any(k.startswith("text_encoder_2.") for k in load_file(tmp_path / "d.safetensors"))
    convert_file(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya", model_path="tiny-sdxl")
    again = load_model(ModelConfig(path="tiny-sdxl"))
    load_lora_file(again, tmp_path / "k.safetensors")
    torch.testing.assert_close(outputs(again), outputs(trainer.model), rtol=1e-4, atol=1e-5)
    merge_into_model("tiny-sdxl", kohya, 1.0, tmp_path / "merged")
    merged = load_model(ModelConfig(path=str(tmp_path / "merged")))
    torch.testing.assert_close(outputs(merged), outputs(trainer.model), rtol=1e-4, atol=1e-5)


def test_full_fine_tune_exports_a_single_file_that_reads_back_bit_exactly(sdxl_config, tmp_path):
    from diffusers import UNet2DConditionModel

    config = sdxl_config(train={"max_steps": 1}, data={"val_split": 0.0},
                         output={"checkpoint_format": "both", "save_state": False})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    final = trainer.run_dir.checkpoints / "final"
    single = final / "model.safetensors"
    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    # the diffusers folder beside it holds the configs of this (tiny) architecture
    config_dir = str(final)
    back = load_model(ModelConfig(path=str(single), config_dir=config_dir))
    for role, module in trainer.model.parts.items():
        mine, theirs = module.state_dict(), back.parts[role].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), role
    unet = UNet2DConditionModel.from_single_file(str(single), config=config_dir, subfolder="unet", local_files_only=True)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in trainer.model.unet.state_dict().items())


# ---------------------------------------------------------------------------- what is refused
def test_refiner_and_other_architectures_are_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.text_projection": torch.zeros(2, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, refiner)
    with pytest.raises(SingleFileError, match="SDXL refiner"):
        load_model(ModelConfig(path=str(refiner)))
    folder = tmp_path / "refiner-folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder_2").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"projection_class_embeddings_input_dim": 2560}))
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        load_model(ModelConfig(path=str(folder)))
    # A one-key Flux or SD3 file is now another family's (incomplete) file, named as such, not an SDXL error.
    for key, what in (("double_blocks.0.img_attn.qkv.weight", "Flux"), ("joint_blocks.0.x_block.attn.qkv.weight", "SD3")):
        path = tmp_path / f"{what}.safetensors"
        save_file({key: torch.zeros(1)}, path)
        with pytest.raises(SingleFileError, match=what) as caught:
            load_model(ModelConfig(path=str(path)))
        assert "SDXL" not in str(caught.value)
    aura = tmp_path / "aura.safetensors"
    save_file({"double_layers.0.attn.w1q.weight": torch.zeros(1)}, aura)
    with pytest.raises(SingleFileError, match="AuraFlow checkpoint, which difftune does not train yet"):
        load_model(ModelConfig(path=str(aura)))


# ------------------------------------------------------------------------------ real size, weightless
def test_doctor_sizes_a_real_sdxl_lora_on_the_meta_device(tmp_path, digits_dir):
    from difftune.doctor import diagnose
    from difftune.models import weightless_model
    from difftune.models.single_file_io import shipped_config_dir

    sdxl = weightless_model(ModelConfig(path=str(shipped_config_dir("sdxl"))))
    counts = {role: sum(p.numel() for p in m.parameters()) for role, m in sdxl.parts.items()}
    assert counts == {"denoiser": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "vae": 83_653_863}
    config = validate_config(quick_config_dict(digits_dir, tmp_path / "r", model={"path": str(shipped_config_dir("sdxl"))},
                                               network={"type": "lora", "rank": 16}), "t")
    report = diagnose(config)
    # attn-mlp (kohya's LoRA default) wraps every linear layer of the UNet's transformer blocks with a
    # rank-16 pair: rank x (in + out) parameters each, counted here from the architecture itself
    linears = [m for block in sdxl.unet.modules() if type(block).__name__ == "Transformer2DModel"
               for m in block.modules() if isinstance(m, torch.nn.Linear)]
    assert report["network"]["trains"] == ["denoiser"] and report["network"]["layers"] == len(linears)
    assert report["network"]["trainable_parameters"] == sum(16 * (m.in_features + m.out_features) for m in linears)


def test_find_lr_reads_a_curve_on_tiny_sdxl(digits_dir, tmp_path):
    from difftune.tuning.lr_finder import find_lr

    data = quick_config_dict(digits_dir, tmp_path / "run", model={"path": "tiny-sdxl"}, train={"max_steps": 24},
                             find_lr={"num_points": 8, "steps_per_point": 2, "start_lr": 1e-5, "end_lr": 1e-1,
                                      "bootstrap_samples": 0, "probe_items": 16})
    result = find_lr(validate_config(data, "t"), show_progress=False)
    assert result["curve"] and Path(result["files"]["plot"]).is_file()
    assert result["lr"] is not None and 1e-5 <= result["lr"] <= 1e-1, result["verdict"]


def test_a_v_prediction_sdxl_file_is_recognised_by_its_flag(tmp_path):
    model = load_model(ModelConfig(path="tiny-sdxl", prediction_type="v_prediction"))
    model.save_pretrained(tmp_path / "folder")  # the configs of this (tiny) architecture
    model.save_single_file(tmp_path / "v.safetensors", dtype=torch.float32)
    with safe_open(str(tmp_path / "v.safetensors"), "pt") as f:
        assert "v_pred" in f.keys()  # the flag A1111 and ComfyUI read
    back = load_model(ModelConfig(path=str(tmp_path / "v.safetensors"), config_dir=str(tmp_path / "folder")))
    assert back.family == "sdxl-v" and back.prediction_type == "v_prediction"
    assert load_model(ModelConfig(path=str(tmp_path / "folder"))).family == "sdxl-v"


def test_real_sdxl_tokenizers_are_built_offline():
    """SDXL's two CLIP BPE tokenizers from open_clip's vocabulary: ViT-L pads with its end token, bigG with "!"."""
    from difftune.models import weightless_model
    from difftune.models.sd.single_file import tokenizer_for
    from difftune.models.single_file_io import shipped_config_dir

    folder = shipped_config_dir("sdxl")
    model = weightless_model(ModelConfig(path=str(folder)))
    first, second = tokenizer_for(model.text_encoder, folder), tokenizer_for(model.text_encoder_2, folder, "tokenizer_2")
    assert first.pad_token == "<|endoftext|>" and second.pad_token == "!"
    ids = first(["a photo of a cat"]).input_ids[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 7  # BOS a photo of a cat EOS
    assert second(["a photo of a cat"]).input_ids == [ids]


def test_size_conditioning_is_exact_under_bf16_autocast():
    model = load_model(ModelConfig(path="tiny-sdxl"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = model.condition(model.encode_text(["x"]), meta(1, original=(1023, 3001), crop=(301, 0)))
    time_ids = cond["added_cond_kwargs"]["time_ids"]
    assert time_ids.dtype == torch.float32 and time_ids.tolist() == [[1023, 3001, 301, 0, 16, 16]]


def test_convert_without_a_model_names_real_sdxl_layers():
    table = formats.reference_module_table("sdxl")
    assert table["lora_unet_output_blocks_2_0_in_layers_2"] == "unet.up_blocks.0.resnets.2.conv1"
    assert table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert table["lora_te2_text_model_encoder_layers_31_mlp_fc1"] == "text_encoder_2.text_model.encoder.layers.31.mlp.fc1"


def test_sdxl_samples_during_training_and_from_the_command_line(sdxl_config, tmp_path):
    from PIL import Image

    from difftune.generate import generate

    config = sdxl_config(network={"type": "lora", "rank": 2}, train={"max_steps": 1}, data={"val_split": 0.0},
                         sample={"prompts": ["a handwritten 3", "a handwritten 7"], "steps": 2},
                         output={"save_state": False})
    summary = train(config, show_progress=False)
    grid = Path(config.output.dir) / "samples" / f"step-{summary['steps']:06d}.png"
    assert grid.is_file() and Image.open(grid).width >= 2 * 16
    lora = Path(config.output.dir) / "checkpoints" / "final" / "run.safetensors"
    plain = generate("tiny-sdxl", ["a handwritten 3"], tmp_path / "plain.png", steps=2, width=16, height=16)
    with_lora = generate("tiny-sdxl", ["a handwritten 3"], tmp_path / "lora.png", lora=str(lora), scale=50.0, steps=2,
                         width=16, height=16)
    a = torch.tensor(list(Image.open(plain[0]).getdata()), dtype=torch.float32)
    b = torch.tensor(list(Image.open(with_lora[0]).getdata()), dtype=torch.float32)
    assert a.shape == b.shape and (a - b).abs().max() > 0  # the LoRA reaches the sampling pipeline
