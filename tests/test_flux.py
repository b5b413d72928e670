"""Flux.1 on the family seams (issue 14): tiny-flux conditions as diffusers' FluxPipeline does (packing,
position ids, pooled CLIP + T5, σ timesteps, dev's guidance), trains and resumes; its LoRA files of
every type reload, use kohya's Flux layout (BFL names, fused q/k/v) that ComfyUI maps and the diffusers
layout FluxPipeline loads; BFL single files round-trip; convert, merge and sample work; doctor sizes
Flux-dev itself on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import quick_config_dict
from difftune.checkpoint import lora_formats as formats
from difftune.config.loading import validate_config
from difftune.config.schema import ModelConfig, TrainConfig
from difftune.data.batch import Batch
from difftune.errors import ConfigError, ModelLoadError, SingleFileError
from difftune.models import load_model
from difftune.models.flux.bfl_layout import KOHYA_LAYOUT, bfl_to_diffusers, diffusers_to_bfl
from difftune.network.lycoris_net import load_lora_file
from difftune.training.loop import Trainer, train

TYPES = ["lora", "locon", "loha", "lokr", "dylora", "glora", "ia3", "diag-oft", "boft", "full"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def flux_config(digits_dir, tmp_path):
    def make(path="tiny-flux", **sections):
        sections.setdefault("model", {})["path"] = path
        return validate_config(quick_config_dict(digits_dir, tmp_path / "run", **sections), "test")

    return make


def meta(n: int = 2) -> Batch:
    return Batch(pixels=None, captions=["a handwritten 3", "a handwritten 7"][:n], original_sizes=[(16, 16)] * n,
                 crop_top_lefts=[(0, 0)] * n, target_sizes=[(16, 16)] * n)


@torch.no_grad()
def outputs(model, sigmas=(0.2, 0.7)):
    """Velocity for fixed latents, σ and prompts (both text encoders included)."""
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = model.condition(model.encode_text(meta().captions), meta())
    return model.predict(latents, torch.tensor(sigmas), cond)


# ------------------------------------------------------------------------------ conditioning
def test_conditioning_is_the_pipelines():
    from diffusers import FluxPipeline

    from difftune.models.flux.adapter import latent_image_ids, pack_latents, unpack_latents

    model = load_model(ModelConfig(path="tiny-flux"))
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10)) and packed.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 12, 20, 2))
    assert torch.equal(latent_image_ids(6, 10, x.device), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    text = model.encode_text(["a handwritten 3", ""])
    assert text["encoder_hidden_states"].shape == (2, 64, 32) and text["pooled_projections"].shape == (2, 32)
    ids = model.tokenizer(["a handwritten 3"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(text["pooled_projections"][:1], model.text_encoder(ids).pooler_output)
    pipe_embeds, pipe_pooled, text_ids = model.pipeline().encode_prompt(["a handwritten 3", ""], max_sequence_length=64)
    torch.testing.assert_close(text["encoder_hidden_states"], pipe_embeds)
    torch.testing.assert_close(text["pooled_projections"], pipe_pooled)
    # dev: the distilled guidance per sample, float32 even under bf16 autocast; schnell has none
    model.make_objective(TrainConfig(guidance_scale=3.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = model.condition(text, meta())
    assert cond["guidance"].dtype == torch.float32 and cond["guidance"].tolist() == [3.5, 3.5]
    assert torch.equal(cond["txt_ids"], text_ids.float())
    # predict is the transformer called as the pipeline calls it: packed latents, timestep = σ (= t / 1000)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = model.condition(text, meta())
        mine = model.predict(latents, torch.tensor([0.25, 0.5]), cond)
        theirs = model.transformer(hidden_states=pack_latents(latents), timestep=torch.tensor([250.0, 500.0]) / 1000,
                                   guidance=cond["guidance"], pooled_projections=text["pooled_projections"],
                                   encoder_hidden_states=text["encoder_hidden_states"], txt_ids=text_ids,
                                   img_ids=latent_image_ids(8, 8, "cpu"), return_dict=False)[0]
    torch.testing.assert_close(mine, unpack_latents(theirs, 8, 8))
    assert (outputs(model) - outputs(model, (0.3, 0.7))).abs().max() > 1e-4  # σ reaches the transformer
    guided = outputs(model)
    model.make_objective(TrainConfig())  # guidance_scale 1.0, as kohya and diffusers train
    assert (outputs(model) - guided).abs().max() > 1e-5 and model.make_objective().sampling == "flux_shift"
    schnell = load_model(ModelConfig(path="tiny-flux-schnell"))
    assert "guidance" not in schnell.condition(schnell.encode_text(["x"]), meta(1))
    assert schnell.transformer.time_text_embed.__class__.__name__ == "CombinedTimestepTextProjEmbeddings"
    assert schnell.lora_metadata()["modelspec.architecture"] == "flux-1-schnell/lora"
    assert "clip_skip = 2 has no effect" in load_model(ModelConfig(path="tiny-flux", clip_skip=2)).notes[0]


# ------------------------------------------------------------------------------ training
def test_tiny_flux_learns_and_resumes_bit_exactly(flux_config, tmp_path):
    common = {"train": {"max_steps": 30, "lr": 3e-3}, "validation": {"every_n_steps": 10}}
    whole = train(flux_config(output={"dir": str(tmp_path / "whole")}, **common), show_progress=False)
    assert whole["best_val_loss"] < 0.8 * whole["first_val_loss"]
    part = flux_config(output={"dir": str(tmp_path / "part"), "save_every_n_steps": 20}, **common)
    part.train.max_steps = 20
    train(part, show_progress=False)
    part.train.max_steps = 30
    train(part, resume=tmp_path / "part", show_progress=False)
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "whole/checkpoints/final" / name), load_file(tmp_path / "part/checkpoints/final" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_find_lr_gives_a_usable_curve_on_tiny_flux(flux_config):
    from difftune.tuning.lr_finder import find_lr

    config = flux_config(train={"max_steps": 24},
                         find_lr={"num_points": 10, "steps_per_point": 2, "start_lr": 1e-5, "end_lr": 3.0,
                                  "bootstrap_samples": 0, "probe_items": 16})
    result = find_lr(config, show_progress=False)
    assert result["status"] == "ok", result["verdict"]
    assert result["curve"] and Path(result["files"]["plot"]).is_file()
    assert result["lr_edge"] is not None and 1e-5 < result["lr"] < result["lr_edge"] <= 3.0


def test_clip_l_trains_with_its_own_lr_and_t5_is_refused(flux_config):
    trainer = Trainer(flux_config(network={"type": "lora", "rank": 2},
                                  train={"lr": 1e-3, "text_encoder_lr": 1e-4, "train_text_encoder": ["text_encoder"]}),
                      show_progress=False)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    names = [m.lora_name for m in trainer.network.loras]
    trainer.close()
    assert groups == {"denoiser": 1e-3, "text_encoder": 1e-4}
    assert any(n.startswith("lora_te1_") for n in names) and not any(n.startswith(("lora_te2_", "lora_te3_")) for n in names)
    with pytest.raises(ConfigError, match=r"names text_encoder_2 \(T5-XXL\).*can train: text_encoder$"):
        Trainer(flux_config(network={"type": "lora"}, train={"train_text_encoder": ["text_encoder_2"]}),
                show_progress=False)
    trainer = Trainer(flux_config(network={"type": "lora", "rank": 2}, train={"train_text_encoder": True}),
                      show_progress=False)
    trainer.close()
    assert trainer.network.trained_roles() == ["denoiser", "text_encoder"]  # `true`: every encoder but T5


@pytest.mark.parametrize("network", [{"type": t} for t in TYPES] + [{"type": "lora", "dora": True}])
def test_every_lora_type_trains_saves_and_reloads_on_flux(flux_config, network):
    config = flux_config(network=network, train={"max_steps": 2, "lr": 1e-2, "train_text_encoder": ["text_encoder"]},
                         data={"val_split": 0.0}, output={"save_state": False})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    path = trainer.run_dir.checkpoints / "final" / "run.safetensors"
    trained, base = outputs(trainer.model), outputs(load_model(ModelConfig(path="tiny-flux")))
    assert (trained - base).abs().max() > 1e-4
    fresh = load_model(ModelConfig(path="tiny-flux"))
    load_lora_file(fresh, path)
    torch.testing.assert_close(outputs(fresh), trained, rtol=1e-4, atol=1e-5)
    modules = {k.split(".")[0] for k in load_file(path)}
    assert modules <= COMFY_FLUX_NAMES, sorted(modules - COMFY_FLUX_NAMES)
    # q/k/v are fused into BFL's qkv layer for a plain LoRA, written split (ComfyUI's diffusers names) otherwise
    plain = network["type"] in ("lora", "locon", "dylora") and not network.get("dora")
    assert ("lora_unet_double_blocks_0_img_attn_qkv" in modules) == plain
    assert ("lora_transformer_transformer_blocks_0_attn_to_k" in modules) == (not plain)
    # describe() (what doctor prints) predicts the file as the layout writes it
    assert abs(trainer.network.describe()["file_bytes"] - path.stat().st_size) < 128


# ------------------------------------------------------------------------ files people load
BLOCK_LINEARS = ["img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
                 "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
DIFFUSERS_DOUBLE = ["attn_to_q", "attn_to_k", "attn_to_v", "attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj",
                    "attn_to_out_0", "attn_to_add_out", "norm1_linear", "norm1_context_linear", "ff_net_0_proj",
                    "ff_net_2", "ff_context_net_0_proj", "ff_context_net_2"]
COMFY_FLUX_NAMES = {
    # comfy/lora.py model_lora_keys_unet: "lora_unet_" + every `diffusion_model.<BFL path>.weight` key with _ ...
    *[f"lora_unet_double_blocks_0_{n}" for n in BLOCK_LINEARS],
    "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_0_modulation_lin",
    "lora_unet_img_in", "lora_unet_txt_in", "lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer",
    "lora_unet_vector_in_in_layer", "lora_unet_vector_in_out_layer", "lora_unet_guidance_in_in_layer",
    "lora_unet_guidance_in_out_layer", "lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1",
    # ... and "lora_transformer_" + every diffusers key of comfy/utils.py flux_to_diffusers (slices of fused layers)
    *[f"lora_transformer_transformer_blocks_0_{n}" for n in DIFFUSERS_DOUBLE],
    *[f"lora_transformer_single_transformer_blocks_0_{n}" for n in
      ("attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp", "norm_linear", "proj_out")],
    "lora_transformer_x_embedder", "lora_transformer_context_embedder", "lora_transformer_proj_out",
    "lora_transformer_norm_out_linear", *[f"lora_transformer_time_text_embed_{e}_embedder_linear_{i}"
                                          for e in ("timestep", "text", "guidance") for i in (1, 2)],
    # model_lora_keys_clip: CLIP-L's layers as lora_te1_ (its 2 layers here)
    *[f"lora_te1_text_model_encoder_layers_{i}_{n}" for i in range(2)
      for n in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")],
}
"""Every LoRA layer name ComfyUI's Flux loader maps for tiny-flux (depth 1, 1 single block, guidance, 2 CLIP layers)."""


@pytest.fixture(scope="module")
def trained_lora(digits_dir, tmp_path_factory):
    """A plain LoRA (alpha != rank, every linear layer, CLIP-L too) in both layouts, and the trained model."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("flux-lora") / "run"
    config = validate_config(quick_config_dict(
        digits_dir, out, model={"path": "tiny-flux"}, data={"val_split": 0.0},
        network={"type": "lora", "rank": 4, "alpha": 2, "preset": "full-lin"},
        train={"max_steps": 2, "lr": 1e-2, "train_text_encoder": ["text_encoder"]},
        output={"lora_format": "both", "save_state": False}), "t")
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    return trainer, out / "checkpoints" / "final"


def test_kohya_file_fuses_qkv_as_kohya_and_comfyui_read_it(trained_lora):
    trainer, final = trained_lora
    with safe_open(str(final / "run.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    modules = {k.split(".")[0] for k in tensors}
    assert modules <= COMFY_FLUX_NAMES and all(not m.startswith("lora_transformer_") for m in modules)
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_img_in",
            "lora_unet_guidance_in_in_layer", "lora_unet_final_layer_linear",
            "lora_te1_text_model_encoder_layers_1_mlp_fc2"} <= modules
    # the fused layer: downs stacked (rank 3·4), ups block-diagonal, alpha 3·2 so that alpha/rank stays 1/2
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up = tensors[f"{qkv}.lora_down.weight"], tensors[f"{qkv}.lora_up.weight"]
    assert down.shape == (12, 16) and up.shape == (48, 12) and float(tensors[f"{qkv}.alpha"]) == 6.0
    assert not up[:16, 4:].any() and not up[16:32, :4].any() and not up[16:32, 8:].any()
    net = {m.lora_name: m for m in trainer.network.loras}
    q, k = net["lora_unet_transformer_blocks_0_attn_to_q"], net["lora_unet_transformer_blocks_0_attn_to_k"]
    assert torch.equal(down[:4], q.lora_down.weight) and torch.equal(up[16:32, 4:8], k.lora_up.weight)
    linear1 = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert linear1.shape == (3 * 16 + 64, 16)  # q, k, v and the 4x wider proj_mlp
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"


def test_flux_lora_loads_in_diffusers_and_changes_the_pipeline_as_trained(trained_lora):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    trainer, final = trained_lora
    trained, base = outputs(trainer.model), outputs(load_model(ModelConfig(path="tiny-flux")))
    assert (trained - base).abs().max() > 1e-4
    fresh = load_model(ModelConfig(path="tiny-flux"))
    fresh.pipeline("euler").load_lora_weights(str(final / formats.DIFFUSERS_WEIGHTS))
    torch.testing.assert_close(outputs(fresh), trained, rtol=1e-4, atol=1e-5)
    ours = load_model(ModelConfig(path="tiny-flux"))
    load_lora_file(ours, final / formats.DIFFUSERS_WEIGHTS)  # and difftune reads the diffusers layout back
    torch.testing.assert_close(outputs(ours), trained, rtol=1e-4, atol=1e-5)
    # diffusers' reader of kohya Flux files (ported from sd-scripts) splits our fused layers back to the same
    # updates (its single-block widths are Flux-dev's 3072, so the tiny linear1 is left out here)
    # (and it ignores the alpha of final_layer: "TODO: alphas" there)
    kohya = {k: v for k, v in load_file(final / "run.safetensors").items()
             if k.startswith("lora_unet_") and "single_blocks_0_linear1" not in k and "final_layer" not in k}
    theirs = _convert_kohya_flux_lora_to_diffusers(kohya)
    ours = load_file(final / formats.DIFFUSERS_WEIGHTS)
    layers = {k[: -len(".lora_A.weight")] for k in theirs if k.endswith(".lora_A.weight")}
    assert {"transformer.transformer_blocks.0.attn.to_v", "transformer.transformer_blocks.0.attn.add_q_proj",
            "x_embedder"} <= layers  # (it adds transformer. to the embedders later)
    for layer in layers:
        ours_layer = layer if layer.startswith("transformer.") else f"transformer.{layer}"
        mine = ours[f"{ours_layer}.lora_B.weight"] @ ours[f"{ours_layer}.lora_A.weight"]
        torch.testing.assert_close(theirs[f"{layer}.lora_B.weight"] @ theirs[f"{layer}.lora_A.weight"], mine)


def test_a_lora_trained_on_bfls_fused_layers_splits_exactly():
    """kohya's own Flux LoRAs train the fused layer (one down r x in, one up 3·out x r): each diffusers layer
    gets the shared down and its rows of the up; the update is unchanged. Our block-diagonal files round-trip."""
    g = torch.Generator().manual_seed(0)
    fused = {"lora_unet_single_blocks_3_linear1.lora_down.weight": torch.randn(4, 16, generator=g),
             "lora_unet_single_blocks_3_linear1.lora_up.weight": torch.randn(112, 4, generator=g),
             "lora_unet_single_blocks_3_linear1.alpha": torch.tensor(2.0)}
    split = KOHYA_LAYOUT.from_file(fused)
    delta = fused["lora_unet_single_blocks_3_linear1.lora_up.weight"] @ \
        fused["lora_unet_single_blocks_3_linear1.lora_down.weight"] * 0.5
    rows = dict(zip(("attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp"), ((0, 16), (16, 32), (32, 48), (48, 112)),
                    strict=True))
    for name, (a, b) in rows.items():
        layer = f"lora_unet_single_transformer_blocks_3_{name}"
        part = split[f"{layer}.lora_up.weight"] @ split[f"{layer}.lora_down.weight"] * float(split[f"{layer}.alpha"]) / 4
        torch.testing.assert_close(part, delta[a:b])
    again = KOHYA_LAYOUT.from_file(KOHYA_LAYOUT.to_file(split))
    assert again.keys() == split.keys() and all(torch.equal(again[k], split[k]) for k in split)


def test_flux_lora_converts_between_layouts_merges_and_samples(trained_lora, tmp_path):
    from PIL import Image

    from difftune.cli.main import main

    trainer, final = trained_lora
    kohya = final / "run.safetensors"
    # without --model: the layer names of the Flux architectures difftune ships
    assert main(["convert", str(kohya), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert load_file(tmp_path / "d.safetensors").keys() == load_file(final / formats.DIFFUSERS_WEIGHTS).keys()
    assert main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya",
                 "--model", "tiny-flux"]) == 0
    assert {k.split(".")[0] for k in load_file(tmp_path / "k.safetensors")} == {k.split(".")[0] for k in load_file(kohya)}
    again = load_model(ModelConfig(path="tiny-flux"))
    load_lora_file(again, tmp_path / "k.safetensors")
    torch.testing.assert_close(outputs(again), outputs(trainer.model), rtol=1e-4, atol=1e-5)
    assert main(["merge", "tiny-flux", str(kohya), str(tmp_path / "merged")]) == 0
    merged = load_model(ModelConfig(path=str(tmp_path / "merged")))
    torch.testing.assert_close(outputs(merged), outputs(trainer.model), rtol=1e-4, atol=1e-5)
    assert main(["merge", "tiny-flux", str(kohya), str(tmp_path / "merged.safetensors"), "--precision", "fp32"]) == 0
    merged_file = load_file(tmp_path / "merged.safetensors")  # the transformer in BFL's layout, LoRA baked in
    assert torch.equal(merged_file["double_blocks.0.img_attn.qkv.weight"][16:32],
                       merged.transformer.transformer_blocks[0].attn.to_k.weight)
    plain, lora = tmp_path / "plain.png", tmp_path / "lora.png"
    assert main(["sample", "tiny-flux", "--prompt", "a 3", "--steps", "2", "--out", str(plain)]) == 0
    assert main(["sample", "tiny-flux", "--lora", str(kohya), "--scale", "20", "--prompt", "a 3", "--steps", "2",
                 "--out", str(lora)]) == 0
    a, b = Image.open(plain), Image.open(lora)
    assert a.size == (32, 32) and a.size == b.size  # tiny-flux's native size
    assert list(a.getdata()) != list(b.getdata())  # the LoRA reaches the sampling pipeline
    assert main(["sample", "tiny-flux-schnell", "--prompt", "a 3", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0


def test_flux_samples_during_training(flux_config):
    config = flux_config(network={"type": "lora", "rank": 2}, train={"max_steps": 1}, data={"val_split": 0.0},
                         sample={"prompts": ["a handwritten 3", "a handwritten 7"], "steps": 2},
                         output={"save_state": False})
    summary = train(config, show_progress=False)
    from PIL import Image

    grid = Path(config.output.dir) / "samples" / f"step-{summary['steps']:06d}.png"
    assert grid.is_file() and Image.open(grid).width >= 2 * 16


# --------------------------------------------------------------------------------- single files
def test_bfl_names_are_diffusers_own_conversion():
    """Our BFL → diffusers map gives what diffusers' single-file converter gives (its single-block widths are
    Flux-dev's 3072, so linear1 is given 3072-wide rows here; columns do not matter to either)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    model = load_model(ModelConfig(path="tiny-flux"))
    bfl = diffusers_to_bfl(model.transformer.state_dict())
    assert len(bfl) == len(model.transformer.state_dict()) - 14  # q, k, v (x2 kinds), proj_mlp fused: 7 weights, 7 biases
    bfl["single_blocks.0.linear1.weight"] = torch.arange(7 * 3072.0)[:, None]
    bfl["single_blocks.0.linear1.bias"] = torch.arange(7 * 3072.0)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(bfl)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_bfl_transformer_file_with_separate_parts_loads_back_bit_exactly(tmp_path):
    from difftune.models.sd.ldm_export import vae_to_ldm

    model = load_model(ModelConfig(path="tiny-flux"))
    model.save_pretrained(tmp_path / "folder")
    folder = tmp_path / "folder"
    single = tmp_path / "flux1-tiny.safetensors"
    model.save_single_file(single, dtype=torch.float32)
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
            "guidance_in.in_layer.weight", "final_layer.adaLN_modulation.1.weight"} <= keys
    # the other parts as ComfyUI users have them: clip_l, t5xxl and ae as single files
    save_file({"text_model." + k: v for k, v in model.text_encoder.state_dict().items()}, tmp_path / "clip_l.safetensors")
    save_file({k: v for k, v in model.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"},
              tmp_path / "t5xxl.safetensors")
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(model.vae).items()},
              tmp_path / "ae.safetensors")
    files = {"text_encoder_path": str(tmp_path / "clip_l.safetensors"),
             "text_encoder_2_path": str(tmp_path / "t5xxl.safetensors"), "vae_path": str(tmp_path / "ae.safetensors"),
             "tokenizer_path": str(folder / "tokenizer_2"), "config_dir": str(folder)}
    folders = {"text_encoder_path": str(folder / "text_encoder"), "text_encoder_2_path": str(folder / "text_encoder_2"),
               "vae_path": str(folder / "vae"), "config_dir": str(folder)}
    prefixed = tmp_path / "comfy.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in load_file(single).items()}, prefixed)
    for path, parts in ((single, files), (prefixed, folders)):
        back = load_model(ModelConfig(path=str(path), **parts))
        # dev (it has guidance_in); T5 reads the 64 tokens its (tiny) tokenizer is made for, not dev's 512
        assert back.family == "flux-dev" and back.max_sequence_length == 64
        for role, module in model.parts.items():
            mine, theirs = module.state_dict(), back.parts[role].state_dict()
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), (path, role)
    torch.testing.assert_close(outputs(back), outputs(model))
    schnell = tmp_path / "schnell.safetensors"
    load_model(ModelConfig(path="tiny-flux-schnell")).save_single_file(schnell, dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="set model.text_encoder_path = CLIP-L.*; model.text_encoder_2_path = T5-XXL.*; model.vae_path"):
        load_model(ModelConfig(path=str(schnell)))
    from difftune.models.flux import detect_single_file

    assert detect_single_file(list(load_file(schnell)), schnell) == "flux-schnell"
    with pytest.raises(ModelLoadError, match="model.tokenizer_path"):
        load_model(ModelConfig(path=str(single), **{**files, "tokenizer_path": None}))
    for extra, what in (({}, "incomplete"), ({"distilled_guidance_layer.in_proj.weight": torch.zeros(1)}, "Chroma")):
        other = tmp_path / f"{what}.safetensors"
        save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), **extra}, other)
        with pytest.raises(SingleFileError, match=what):
            load_model(ModelConfig(path=str(other)))


# ------------------------------------------------------------------------------ real size, weightless
def test_doctor_sizes_flux_dev_and_tiny_flux_on_the_meta_device(digits_dir, tmp_path):
    from difftune.doctor import diagnose
    from difftune.models import weightless_model
    from difftune.models.single_file_io import shipped_config_dir

    dev = weightless_model(ModelConfig(path=str(shipped_config_dir("flux-dev"))))
    counts = {role: sum(p.numel() for p in m.parameters()) for role, m in dev.parts.items()}
    assert counts == {"denoiser": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_893_906_944,
                      "vae": 83_819_683}
    schnell = weightless_model(ModelConfig(path=str(shipped_config_dir("flux-schnell"))))
    assert sum(p.numel() for p in schnell.transformer.parameters()) == 11_901_408_320 - 10_229_760  # no guidance_in
    assert (dev.scheduler.config.use_dynamic_shifting, schnell.scheduler.config.shift) == (True, 1.0)
    for path, model in ((str(shipped_config_dir("flux-dev")), dev), ("tiny-flux", load_model(ModelConfig(path="tiny-flux")))):
        config = validate_config(quick_config_dict(digits_dir, tmp_path / "r", model={"path": path},
                                                   network={"type": "lora", "rank": 16}), "t")
        report = diagnose(config)
        # attn-mlp: every attention linear, the feed-forwards and the single blocks' proj_mlp / proj_out
        linears = [m for name, m in model.transformer.named_modules() if isinstance(m, torch.nn.Linear)
                   and (".attn." in name or ".ff" in name or name.endswith(("proj_mlp", "proj_out")))
                   and "blocks." in name]
        assert report["network"]["trains"] == ["denoiser"] and report["network"]["layers"] == len(linears)
        assert report["network"]["trainable_parameters"] == sum(16 * (m.in_features + m.out_features) for m in linears)
    assert len(linears) == 17  # tiny-flux: 8 attention + 4 feed-forward linears, 3 + 2 in the single block


def test_convert_without_a_model_names_real_flux_layers():
    table = formats.reference_module_table("flux")
    assert table["lora_unet_single_transformer_blocks_37_proj_mlp"] == "transformer.single_transformer_blocks.37.proj_mlp"
    assert table["lora_unet_transformer_blocks_18_attn_add_k_proj"] == "transformer.transformer_blocks.18.attn.add_k_proj"
    assert table["lora_te1_text_model_encoder_layers_11_mlp_fc1"] == "text_encoder.text_model.encoder.layers.11.mlp.fc1"
    assert table.layout is KOHYA_LAYOUT


def test_samples_default_to_each_flux_variants_own_guidance(monkeypatch):
    from difftune.config.schema import SampleConfig
    from difftune.reporting import samples

    seen = []
    for name, expected in (("tiny-flux", 3.5), ("tiny-flux-schnell", 0.0)):
        model = load_model(ModelConfig(path=name))
        monkeypatch.setattr(type(model), "pipeline", lambda self, sampler: (
            lambda prompt, **kw: seen.append(kw["guidance_scale"]) or type("R", (), {"images": [None]})()))
        samples.render_samples(model, SampleConfig(prompts=["a 3"]), 16)
        samples.render_samples(model, SampleConfig(prompts=["a 3"], cfg_scale=2.0), 16)
        assert seen[-2:] == [expected, 2.0]


def test_settings_another_family_uses_are_caught_before_loading(flux_config, tmp_path):
    """doctor (which loads no model) refuses what train refuses, and says which settings have no effect."""
    from difftune.doctor import diagnose
    from difftune.errors import ConfigError

    with pytest.raises(ConfigError, match="min_snr_gamma is for DDPM models"):
        diagnose(flux_config(train={"min_snr_gamma": 5.0}))
    with pytest.raises(ConfigError, match="timestep_sampling = 'sigmoid' is for flow-matching"):
        diagnose(flux_config(path="tiny-sd", train={"timestep_sampling": "sigmoid"}))
    with pytest.raises(ConfigError, match="names text_encoder_3, which this model does not have"):
        diagnose(flux_config(network={"type": "lora"}, train={"train_text_encoder": ["text_encoder_3"]}))
    warnings = diagnose(flux_config(path="tiny-sd", model={"use_t5": False}, train={"guidance_scale": 3.5}))["warnings"]
    assert any("use_t5 = false has no effect on sd" in w for w in warnings)
    assert any("guidance_scale = 3.5 has no effect on sd" in w for w in warnings)


def test_sample_takes_model_settings_and_names_another_familys_lora(trained_lora, tmp_path, capsys):
    from difftune.cli.main import main

    assert main(["sample", "tiny-flux", "--prompt", "a 3", "--out", str(tmp_path / "a.png"), "--steps", "2",
                 "--set", "model.vae_precision=fp32"]) == 0
    assert main(["sample", "tiny-flux", "--prompt", "a", "--out", str(tmp_path / "b.png"),
                 "--set", "model.vae_pth=x"]) == 2
    assert "did you mean model.vae_path" in capsys.readouterr().err
    lora = trained_lora[1] / "run.safetensors"
    assert metadata_of(lora)["ss_network_module"] == "networks.lora_flux"  # kohya's Flux LoRA module
    assert main(["sample", "tiny-sd", "--prompt", "a", "--out", str(tmp_path / "c.png"), "--lora", str(lora)]) == 2
    assert "looks like a flux LoRA and tiny-sd is a sd model" in capsys.readouterr().err


def metadata_of(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()
