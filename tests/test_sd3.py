"""SD3/3.5 on the family seams (issue 14): tiny-sd3 conditions exactly as diffusers' StableDiffusion3Pipeline
(with and without T5), trains with flow matching, resumes bit-exactly, samples; its LoRA files of each type
reload, name layers as ComfyUI maps them and load in diffusers; StabilityAI single files round-trip (with
the text encoders inside or beside them); T5 training is refused; real SD3.5 sizes are known weightless."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import quick_config_dict
from difftune.checkpoint import lora_formats as formats
from difftune.config.loading import validate_config
from difftune.config.schema import ModelConfig
from difftune.errors import ConfigError, ModelLoadError, SingleFileError
from difftune.models import load_model, weightless_model
from difftune.models.single_file_io import shipped_config_dir
from difftune.network.lycoris_net import load_lora_file
from difftune.training.loop import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a handwritten 3", "a handwritten 7"]


@pytest.fixture
def sd3_config(digits_dir, tmp_path):
    def make(**sections):
        sections["model"] = {"path": "tiny-sd3", **sections.get("model", {})}
        return validate_config(quick_config_dict(digits_dir, tmp_path / "run", **sections), "test")

    return make


@torch.no_grad()
def outputs(model):
    """Transformer output for fixed latents, σ and prompts (every text encoder included)."""
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    return model.predict(latents, torch.tensor([0.2, 0.8]), model.condition(model.encode_text(CAPTIONS), None))


# ------------------------------------------------------------------------------ conditioning
@torch.no_grad()
def test_conditioning_is_what_the_sd3_pipeline_builds_with_and_without_t5():
    model = load_model(ModelConfig(path="tiny-sd3"))
    text = model.encode_text(["a handwritten 3", ""])
    # 77 CLIP tokens (CLIP-L 32 + CLIP-G 48 features, zero-padded to T5's 96), then 256 T5 tokens
    assert text["encoder_hidden_states"].shape == (2, 77 + 256, 96) and text["pooled_projections"].shape == (2, 80)
    assert not text["encoder_hidden_states"][:, :77, 80:].any() and text["encoder_hidden_states"][:, 77:].abs().sum() > 0
    embeds, _, pooled, _ = model.pipeline().encode_prompt(["a handwritten 3", ""], None, None,
                                                          do_classifier_free_guidance=False)
    assert torch.equal(text["encoder_hidden_states"], embeds) and torch.equal(text["pooled_projections"], pooled)

    no_t5 = load_model(ModelConfig(path="tiny-sd3", use_t5=False))
    assert "text_encoder_3" not in no_t5.parts and no_t5.text_encoder_roles == ("text_encoder", "text_encoder_2")
    bare = no_t5.encode_text(["a handwritten 3", ""])
    embeds, _, pooled, _ = no_t5.pipeline().encode_prompt(["a handwritten 3", ""], None, None,
                                                          do_classifier_free_guidance=False)
    assert torch.equal(bare["encoder_hidden_states"], embeds) and torch.equal(bare["pooled_projections"], pooled)
    assert not bare["encoder_hidden_states"][:, 77:].any()  # T5's part: zeros, as the pipeline without text_encoder_3
    torch.testing.assert_close(bare["encoder_hidden_states"][:, :77], text["encoder_hidden_states"][:, :77])

    # the transformer is given 1000·σ
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.25, 0.75])
    direct = model.transformer(hidden_states=noisy, timestep=1000 * sigma, return_dict=False, **text)[0]
    torch.testing.assert_close(model.predict(noisy, sigma, model.condition(text, None)), direct, rtol=0, atol=0)
    objective = model.make_objective()
    assert (objective.sampling, objective.shift) == ("logit_normal", 3.0)
    assert any("clip_skip = 2 has no effect" in n for n in load_model(ModelConfig(path="tiny-sd3", clip_skip=2)).notes)


# ------------------------------------------------------------------------------ training
def test_tiny_sd3_learns_and_resumes_bit_exactly(sd3_config, tmp_path):
    learned = train(sd3_config(output={"dir": str(tmp_path / "learn"), "save_state": False},
                               train={"max_steps": 30, "lr": 3e-3}, validation={"every_n_steps": 10}), show_progress=False)
    assert learned["best_val_loss"] < 0.75 * learned["first_val_loss"], learned
    common = {"train": {"max_steps": 8, "lr": 1e-3, "train_text_encoder": ["text_encoder_2"]},
              "validation": {"every_n_steps": 4}}
    train(sd3_config(output={"dir": str(tmp_path / "whole")}, **common), show_progress=False)
    part = sd3_config(output={"dir": str(tmp_path / "part"), "save_every_n_steps": 4}, **common)
    part.train.max_steps = 4
    train(part, show_progress=False)
    part.train.max_steps = 8
    train(part, resume=tmp_path / "part", show_progress=False)
    for name in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        a, b = load_file(tmp_path / "whole/checkpoints/final" / name), load_file(tmp_path / "part/checkpoints/final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_clip_encoders_train_with_their_own_lrs_and_t5_is_refused(sd3_config):
    trainer = Trainer(sd3_config(network={"type": "lora", "rank": 2},
                                 train={"lr": 1e-3, "text_encoder_lr": 1e-4, "text_encoder_2_lr": 3e-5,
                                        "train_text_encoder": ["text_encoder", "text_encoder_2"]}), show_progress=False)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    trainer.close()
    assert groups == {"denoiser": 1e-3, "text_encoder": 1e-4, "text_encoder_2": 3e-5}
    for model, wanted in (({}, ["text_encoder_3"]), ({"use_t5": False}, ["text_encoder", "text_encoder_3"])):
        with pytest.raises(ConfigError, match="text_encoder_3 \\(T5-XXL\\)"):
            Trainer(sd3_config(model=model, network={"type": "lora"}, train={"train_text_encoder": wanted}),
                    show_progress=False)
    # `true` means both CLIPs, with T5 loaded or not
    for model in ({}, {"use_t5": False}):
        trainer = Trainer(sd3_config(model=model, network={"type": "lora", "rank": 2},
                                     train={"train_text_encoder": True}), show_progress=False)
        trainer.close()
        assert trainer.network.trained_roles() == ["denoiser", "text_encoder", "text_encoder_2"]


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr"])
def test_each_lora_type_reloads_from_its_kohya_file(sd3_config, kind):
    config = sd3_config(network={"type": kind, "rank": 4}, data={"val_split": 0.0}, output={"save_state": False},
                        train={"max_steps": 2, "lr": 1e-2, "train_text_encoder": ["text_encoder", "text_encoder_2"]})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    path = trainer.run_dir.checkpoints / "final" / "run.safetensors"
    trained = outputs(trainer.model)
    assert (trained - outputs(load_model(ModelConfig(path="tiny-sd3")))).abs().max() > 1e-4
    fresh = load_model(ModelConfig(path="tiny-sd3"))
    load_lora_file(fresh, path)
    torch.testing.assert_close(outputs(fresh), trained, rtol=1e-4, atol=1e-5)
    assert {"_".join(k.split("_")[:2]) for k in load_file(path)} == {"lora_te1", "lora_te2", "lora_transformer"}


# ------------------------------------------------------------------------ files people load
COMFY_SD3 = re.compile(
    r"^lora_(transformer_(transformer_blocks_\d+_(attn2?_(to_[qkv]|to_out_0)|attn_(add_[qkv]_proj|to_add_out)|"
    r"ff(_context)?_net_(0_proj|2)|norm1(_context)?_linear)|norm_out_linear)|"
    r"te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12]))$")
"""The layers ComfyUI maps in an SD3 LoRA (comfy/lora.py, model_lora_keys_unet: `lora_transformer_` + a
diffusers key of comfy.utils.mmdit_to_diffusers, each mapped onto its slice of SAI's fused weights;
model_lora_keys_clip: `lora_te1_` CLIP-L, `lora_te2_` CLIP-G)."""


def test_lora_file_uses_the_names_comfyui_maps_for_sd3(sd3_config):
    config = sd3_config(network={"type": "locon", "rank": 2, "preset": "full-lin"}, data={"val_split": 0.0},
                        train={"max_steps": 1, "train_text_encoder": ["text_encoder", "text_encoder_2"]})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    with safe_open(str(trainer.run_dir.checkpoints / "final" / "run.safetensors"), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        metadata = f.metadata()
    assert all(COMFY_SD3.match(m) for m in modules), sorted(m for m in modules if not COMFY_SD3.match(m))[:5]
    for example in ("lora_transformer_transformer_blocks_0_attn_to_q", "lora_transformer_transformer_blocks_0_attn_add_k_proj",
                    "lora_transformer_transformer_blocks_0_attn2_to_v", "lora_transformer_transformer_blocks_0_ff_context_net_2",
                    "lora_transformer_transformer_blocks_1_norm1_context_linear", "lora_transformer_norm_out_linear",
                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_2_mlp_fc1"):
        assert example in modules, example
    # the last block has no text-token output (context_pre_only): none of its layers exist
    assert not any(m.startswith("lora_transformer_transformer_blocks_1_attn_to_add_out") for m in modules)
    assert metadata["ss_base_model_version"] == "tiny-sd3"
    real = {v: weightless_model(ModelConfig(path=str(shipped_config_dir(v)), use_t5=False)).lora_metadata()
            for v in ("sd3", "sd3.5-medium", "sd3.5-large")}
    assert {v: m["modelspec.architecture"] for v, m in real.items()} == {
        "sd3": "stable-diffusion-3-medium/lora", "sd3.5-medium": "stable-diffusion-3-5-medium/lora",
        "sd3.5-large": "stable-diffusion-3-5-large/lora"}
    assert real["sd3.5-large"]["ss_base_model_version"] == "sd3.5_large"


def test_sd3_lora_loads_in_diffusers_and_changes_the_pipeline_as_trained(sd3_config):
    config = sd3_config(network={"type": "lora", "alpha": 8}, data={"val_split": 0.0},
                        train={"max_steps": 2, "lr": 1e-2, "train_text_encoder": ["text_encoder", "text_encoder_2"]},
                        output={"lora_format": "both", "save_state": False})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    folder = trainer.run_dir.checkpoints / "final"
    assert any(k.startswith("transformer.transformer_blocks.") for k in load_file(folder / formats.DIFFUSERS_WEIGHTS))
    fresh = load_model(ModelConfig(path="tiny-sd3"))
    fresh.pipeline("euler").load_lora_weights(str(folder / formats.DIFFUSERS_WEIGHTS))
    torch.testing.assert_close(outputs(fresh), outputs(trainer.model), rtol=1e-4, atol=1e-5)
    assert (outputs(trainer.model) - outputs(load_model(ModelConfig(path="tiny-sd3")))).abs().max() > 1e-4


def test_sd3_lora_converts_between_layouts_and_merges(sd3_config, tmp_path):
    from difftune.network.tools import convert_file, merge_into_model

    config = sd3_config(network={"type": "lora", "rank": 4, "alpha": 2}, data={"val_split": 0.0},
                        train={"max_steps": 2, "lr": 1e-2, "train_text_encoder": ["text_encoder_2"]},
                        output={"save_state": False})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    kohya = trainer.run_dir.checkpoints / "final" / "run.safetensors"
    convert_file(kohya, tmp_path / "d.safetensors", "diffusers", model_path="tiny-sd3")
    assert any(k.startswith("text_encoder_2.") for k in load_file(tmp_path / "d.safetensors"))
    convert_file(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya", model_path="tiny-sd3")
    again = load_model(ModelConfig(path="tiny-sd3"))
    load_lora_file(again, tmp_path / "k.safetensors")
    torch.testing.assert_close(outputs(again), outputs(trainer.model), rtol=1e-4, atol=1e-5)
    merge_into_model("tiny-sd3", kohya, 1.0, tmp_path / "merged")
    merged = load_model(ModelConfig(path=str(tmp_path / "merged")))
    assert merged.text_encoder_3 is not None  # the folder carries T5 and its tokenizer
    torch.testing.assert_close(outputs(merged), outputs(trainer.model), rtol=1e-4, atol=1e-5)
    assert load_model(ModelConfig(path=str(tmp_path / "merged"), use_t5=False)).text_encoder_3 is None


def test_without_t5_it_trains_and_samples_and_difftune_sample_applies_a_lora(sd3_config, tmp_path):
    from PIL import Image

    from difftune.generate import generate

    config = sd3_config(model={"use_t5": False}, network={"type": "lora", "rank": 2}, train={"max_steps": 2},
                        data={"val_split": 0.0}, sample={"prompts": CAPTIONS, "steps": 2}, output={"save_state": False})
    trainer = Trainer(config, show_progress=False)
    summary = trainer.run()
    assert trainer.model.pipeline().text_encoder_3 is None
    grid = Path(config.output.dir) / "samples" / f"step-{summary['steps']:06d}.png"
    assert grid.is_file() and Image.open(grid).width >= 2 * 16
    lora = Path(config.output.dir) / "checkpoints" / "final" / "run.safetensors"
    plain = generate("tiny-sd3", ["a handwritten 3"], tmp_path / "plain.png", steps=2, width=16, height=16)
    with_lora = generate("tiny-sd3", ["a handwritten 3"], tmp_path / "lora.png", lora=str(lora), scale=50.0, steps=2,
                         width=16, height=16)
    a = torch.tensor(list(Image.open(plain[0]).getdata()), dtype=torch.float32)
    b = torch.tensor(list(Image.open(with_lora[0]).getdata()), dtype=torch.float32)
    assert a.shape == b.shape and (a - b).abs().max() > 0  # the LoRA reaches the sampling pipeline


def test_find_lr_reads_a_curve_on_tiny_sd3(digits_dir, tmp_path):
    from difftune.tuning.lr_finder import find_lr

    data = quick_config_dict(digits_dir, tmp_path / "run", model={"path": "tiny-sd3"}, train={"max_steps": 24},
                             find_lr={"num_points": 8, "steps_per_point": 2, "start_lr": 1e-5, "end_lr": 1e-1,
                                      "bootstrap_samples": 0, "probe_items": 16})
    result = find_lr(validate_config(data, "t"), show_progress=False)
    assert result["curve"] and Path(result["files"]["plot"]).is_file()
    assert result["status"] == "ok", result["verdict"]
    assert result["lr"] is not None and 1e-5 <= result["lr"] <= 1e-1, result["verdict"]


# ------------------------------------------------------------------------------ single files
def _tiny_single_file(tmp_path) -> tuple[object, Path, Path]:
    """tiny-sd3 written as a diffusers folder (the configs of its architecture) and a StabilityAI single file."""
    model = load_model(ModelConfig(path="tiny-sd3"))
    model.save_pretrained(tmp_path / "folder")
    model.save_single_file(tmp_path / "sd3.safetensors", dtype=torch.float32)
    return model, tmp_path / "folder", tmp_path / "sd3.safetensors"


def _same_weights(a, b) -> None:
    for role, module in a.parts.items():
        mine, theirs = module.state_dict(), b.parts[role].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), role


def test_single_file_in_stabilityai_layout_reads_back_bit_exactly(tmp_path):
    from diffusers import SD3Transformer2DModel

    model, folder, single = _tiny_single_file(tmp_path)
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
    for key in ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
                "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.weight",
                "model.diffusion_model.final_layer.adaLN_modulation.1.weight", "model.diffusion_model.pos_embed",
                "first_stage_model.encoder.down.0.block.0.conv1.weight",
                "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "text_encoders.clip_g.transformer.text_projection.weight", "text_encoders.t5xxl.transformer.shared.weight"):
        assert key in keys, key
    assert not any(k.endswith("to_q.weight") for k in keys)
    back = load_model(ModelConfig(path=str(single), config_dir=str(folder)))
    assert back.family == "sd3-custom" and back.tokenizer_3 is not None
    _same_weights(model, back)
    direct = SD3Transformer2DModel.from_single_file(str(single), config=str(folder), subfolder="transformer",
                                                    local_files_only=True)
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in model.transformer.state_dict().items())
    torch.testing.assert_close(outputs(back), outputs(model), rtol=0, atol=0)


def test_text_encoders_beside_a_transformer_only_file(tmp_path):
    """StabilityAI's SD3.5 files hold the transformer and the VAE; CLIP-L, CLIP-G and T5 come as their own
    files (transformers' names, no prefix) or folders, through model.text_encoder_path / _2_path / _3_path."""
    model, folder, single = _tiny_single_file(tmp_path)
    tensors = load_file(single)
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_encoders.")}, tmp_path / "bare.safetensors")
    for role, name in (("text_encoder", "clip_l"), ("text_encoder_3", "t5xxl")):
        state = {k: v.contiguous() for k, v in model.parts[role].state_dict().items() if k != "encoder.embed_tokens.weight"}
        save_file(state, tmp_path / f"{name}.safetensors")
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer_3"))
    base = {"path": str(tmp_path / "bare.safetensors"), "config_dir": str(configs)}
    with pytest.raises(SingleFileError, match="no CLIP-L and no CLIP-G.*model.text_encoder_path and model.text_encoder_2_path"):
        load_model(ModelConfig(**base))
    given = {**base, "text_encoder_path": str(tmp_path / "clip_l.safetensors"),
             "text_encoder_2_path": str(folder / "text_encoder_2")}  # a transformers model folder
    back = load_model(ModelConfig(**given, text_encoder_3_path=str(tmp_path / "t5xxl.safetensors")))
    _same_weights(model, back)
    torch.testing.assert_close(outputs(back), outputs(model), rtol=0, atol=0)
    no_t5 = load_model(ModelConfig(**given))
    assert no_t5.text_encoder_3 is None and any("no T5-XXL" in n for n in no_t5.notes)


def test_a_real_t5_without_its_tokenizer_asks_for_model_tokenizer_path(tmp_path):
    """The T5 tokenizer (SentencePiece) cannot be built offline; tiny-sd3's character-level one is rebuilt."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    from difftune.models.sd3.encoders import t5_tokenizer_for

    with init_empty_weights():
        t5 = T5EncoderModel(T5Config.from_json_file(shipped_config_dir("sd3.5-large") / "text_encoder_3" / "config.json"))
    with pytest.raises(ModelLoadError, match="model.tokenizer_path"):
        t5_tokenizer_for(t5, tmp_path, ModelConfig(), "model.text_encoder_3_path = 't5xxl_fp16.safetensors'")


def test_real_sd3_variants_are_told_apart_by_their_weights(tmp_path):
    def keys(depth: int, dual: int = 0, qk: bool = False) -> dict[str, torch.Tensor]:
        names = [f"model.diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(depth)]
        names += [f"model.diffusion_model.joint_blocks.{i}.x_block.attn2.qkv.weight" for i in range(dual)]
        names += [f"model.diffusion_model.joint_blocks.{i}.x_block.attn.ln_q.weight" for i in range(depth if qk else 0)]
        return {n: torch.zeros(1) for n in names}

    for name, (tensors, variant) in {"m3": (keys(24), "sd3"), "m35": (keys(24, 13, True), "sd3.5-medium"),
                                     "l35": (keys(38, 0, True), "sd3.5-large")}.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        architecture = weightless_model(ModelConfig(path=str(path), use_t5=False))  # from the header alone
        assert architecture.family == variant
        assert architecture.transformer.config.num_layers == (38 if variant == "sd3.5-large" else 24)
    save_file(keys(30), tmp_path / "odd.safetensors")
    with pytest.raises(SingleFileError, match="30 joint blocks.*model.config_dir"):
        load_model(ModelConfig(path=str(tmp_path / "odd.safetensors")))


# ------------------------------------------------------------------------------ real size, weightless
def test_doctor_sizes_real_sd3_and_a_tiny_sd3_lora(tmp_path, digits_dir):
    from difftune.doctor import diagnose

    large = weightless_model(ModelConfig(path=str(shipped_config_dir("sd3.5-large"))))
    counts = {role: sum(p.numel() for p in m.parameters()) for role, m in large.parts.items()}
    assert counts == {"denoiser": 8_056_627_520, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
                      "text_encoder_3": 4_762_310_656, "vae": 83_819_683}
    medium = weightless_model(ModelConfig(path=str(shipped_config_dir("sd3.5-medium")), use_t5=False))
    assert sum(p.numel() for p in medium.transformer.parameters()) == 2_243_171_520 and "text_encoder_3" not in medium.parts
    config = validate_config(quick_config_dict(digits_dir, tmp_path / "r", model={"path": "tiny-sd3"},
                                               network={"type": "lora", "rank": 4}), "t")
    report = diagnose(config)
    tiny = load_model(ModelConfig(path="tiny-sd3"))
    # attn-mlp wraps every linear layer of the blocks' attentions (attn, attn2) and feed-forwards
    linears = [m for block in tiny.transformer.modules() if type(block).__name__ in ("Attention", "FeedForward")
               for m in block.modules() if isinstance(m, torch.nn.Linear)]
    assert report["network"]["trains"] == ["denoiser"] and report["network"]["layers"] == len(linears)
    assert report["network"]["trainable_parameters"] == sum(4 * (m.in_features + m.out_features) for m in linears)


def test_convert_without_a_model_names_real_sd35_layers():
    table = formats.reference_module_table("sd3")
    assert table["lora_transformer_transformer_blocks_37_attn_to_q"] == "transformer.transformer_blocks.37.attn.to_q"
    assert table["lora_transformer_transformer_blocks_12_attn2_to_k"] == "transformer.transformer_blocks.12.attn2.to_k"
    assert table["lora_te2_text_model_encoder_layers_31_mlp_fc1"] == "text_encoder_2.text_model.encoder.layers.31.mlp.fc1"
