"""The LoRA family: every algorithm trains, saves and reloads; files load where people use them."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import interrupted_then_resumed
from conftest import unet_outputs as outputs
from difftune.checkpoint import lora_formats as formats
from difftune.cli.main import main
from difftune.config.loading import ConfigError
from difftune.config.schema import ModelConfig
from difftune.models import load_model
from difftune.network.lycoris_net import LoraFamilyNetwork, load_lora_file
from difftune.training.loop import Trainer, train

TYPES = ["lora", "locon", "loha", "lokr", "dylora", "glora", "ia3", "diag-oft", "boft", "full"]
# The tensor names each algorithm writes (what ComfyUI/A1111's LyCORIS support dispatch on).
SIGNATURE = {"lora": "lora_down.weight", "locon": "lora_down.weight", "loha": "hada_w1_a", "lokr": "lokr_w1",
             "dylora": "lora_down.weight", "glora": "a1.weight", "ia3": "on_input", "diag-oft": "oft_blocks",
             "boft": "oft_blocks", "full": "diff"}


def train_network(quick_config, steps=2, train_text_encoder=True, **sections):
    """Train the tiny model with a network; returns the trainer (its model still carries the network)."""
    network = sections.pop("network")
    config = quick_config(network=network,
                          train={"max_steps": steps, "lr": 1e-2, "train_text_encoder": train_text_encoder},
                          data={"val_split": 0.0},  # no validation: these tests compare weights and outputs
                          output={"save_state": False, **sections.pop("output", {})}, **sections)
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    return trainer


def final_file(trainer, name="run.safetensors"):
    return trainer.run_dir.checkpoints / "final" / name


@pytest.mark.parametrize("network", [{"type": t} for t in TYPES] + [{"type": "lora", "dora": True}])
def test_every_type_trains_saves_and_reloads(quick_config, network):
    trainer = train_network(quick_config, network=network)
    path = final_file(trainer)
    trained, base = outputs(trainer.model), outputs(load_model(ModelConfig(path="tiny-sd")))
    assert (trained - base).abs().max() > 1e-4, "two steps at lr 1e-2 must change the UNet output"

    fresh = load_model(ModelConfig(path="tiny-sd"))
    load_lora_file(fresh, path)
    torch.testing.assert_close(outputs(fresh), trained, rtol=1e-4, atol=1e-5)

    tensors = load_file(path)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in tensors)
    assert any(k.endswith(SIGNATURE[network["type"]]) for k in tensors)
    assert any(k.endswith("dora_scale") for k in tensors) == bool(network.get("dora"))
    # describe() (what doctor prints) predicts the file size; only metadata digits may differ.
    assert abs(trainer.network.describe()["file_bytes"] - path.stat().st_size) < 128


@pytest.mark.parametrize("network", [{"type": t, "rank": 4, "alpha": 2} for t in ("lora", "locon", "loha", "lokr", "glora")]
                         + [{"type": t} for t in ("ia3", "diag-oft", "boft", "full")]
                         + [{"type": "loha", "rank": 4, "alpha": 2, "dora": True}])
def test_merged_model_matches_the_live_network(quick_config, network):
    """A merge bakes in what `sample --lora` renders, at the same scale (alpha != rank catches a scale
    applied twice), and a file without difftune's metadata (another trainer's) loads the same."""
    path = final_file(train_network(quick_config, network=network))
    live = load_model(ModelConfig(path="tiny-sd"))
    load_lora_file(live, path, multiplier=0.7)
    merged = load_model(ModelConfig(path="tiny-sd"))
    load_lora_file(merged, path, multiplier=0.7, attach=False).merge(0.7)
    torch.testing.assert_close(outputs(merged), outputs(live), rtol=1e-4, atol=1e-5)
    if network["type"] in ("lora", "locon", "loha", "lokr"):  # what LyCORIS detects from tensor names
        foreign = path.with_name("foreign.safetensors")
        save_file(load_file(path), foreign)  # no metadata, as from kohya, civitai or another trainer
        other = load_model(ModelConfig(path="tiny-sd"))
        load_lora_file(other, foreign, multiplier=0.7)
        torch.testing.assert_close(outputs(other), outputs(live), rtol=1e-4, atol=1e-5)


def test_lora_loads_in_diffusers_and_changes_the_pipeline_as_trained(quick_config):
    trainer = train_network(quick_config, network={"type": "lora", "alpha": 8}, output={"lora_format": "both"})
    ours = trainer.model.pipeline("euler")
    generated = {}
    for name in ("run.safetensors", formats.DIFFUSERS_WEIGHTS):
        fresh = load_model(ModelConfig(path="tiny-sd"))
        pipe = fresh.pipeline("euler")
        pipe.load_lora_weights(str(final_file(trainer, name)))  # diffusers' own loader (PEFT)
        torch.testing.assert_close(outputs(fresh), outputs(trainer.model), rtol=1e-4, atol=1e-5)
        generated[name] = render(pipe)
    base = render(load_model(ModelConfig(path="tiny-sd")).pipeline("euler"))
    with_network = render(ours)
    assert abs(with_network - base).max() > 1e-3
    for image in generated.values():
        assert abs(image - with_network).max() < 1e-4


def render(pipe):
    result = pipe("a handwritten 3", num_inference_steps=2, guidance_scale=2.0, height=16, width=16,
                  generator=torch.Generator().manual_seed(3), output_type="np")
    return result.images[0]


def test_diffusers_layout_converts_to_kohya_and_back_unchanged(quick_config, tmp_path):
    trainer = train_network(quick_config, network={"type": "locon", "rank": 4, "alpha": 2},
                            train_text_encoder=True, output={"lora_format": "diffusers"})
    diffusers_file = final_file(trainer, formats.DIFFUSERS_WEIGHTS)
    assert not final_file(trainer).exists(), "lora_format = diffusers writes only the diffusers layout"
    kohya, back = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    assert main(["convert", str(diffusers_file), str(kohya), "--to", "kohya"]) == 0
    assert main(["convert", str(kohya), str(back), "--to", "diffusers"]) == 0
    a, b = load_file(diffusers_file), load_file(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # diffusers keys: PEFT names with the text encoder under text_model (what ComfyUI and diffusers map).
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in a
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in a
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in a  # LoCon's 3x3 convs
    k = load_file(kohya)
    assert torch.equal(k["lora_unet_conv_in.alpha"], torch.tensor(4.0))  # alpha = rank: scale 1, as diffusers applies
    # The kohya conversion reproduces the trained network.
    fresh = load_model(ModelConfig(path="tiny-sd"))
    load_lora_file(fresh, kohya)
    torch.testing.assert_close(outputs(fresh), outputs(trainer.model), rtol=1e-4, atol=1e-5)


def test_kohya_names_match_sd15_files_and_comfyui_maps(tmp_path):
    """On the real SD 1.5 architecture the default LoRA has kohya's 192 UNet + 72 text encoder layers,
    named the way ComfyUI builds its key map (diffusers UNet paths; CLIP text_model layers)."""
    from difftune.config.loading import validate_config
    from difftune.models import weightless_model
    from difftune.models.single_file_io import shipped_config_dir
    from difftune.network.lycoris_net import NetworkSettings

    arch = weightless_model(ModelConfig(path=str(shipped_config_dir("sd1"))))
    config = validate_config({"network": {"type": "lora"}, "train": {"train_text_encoder": True}}, "test")
    network = LoraFamilyNetwork.build(arch, NetworkSettings.from_config(config.network), ["denoiser", "text_encoder"],
                                      attach=False, config=config)
    names = {m.lora_name for m in network.loras}
    clip_map = ["mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj"]
    assert {n for n in names if n.startswith("lora_te_")} == {
        f"lora_te_text_model_encoder_layers_{b}_{c}" for b in range(12) for c in clip_map}
    unet_weights = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in arch.unet.state_dict() if k.endswith(".weight")}
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    assert len(unet_names) == 192 and unet_names <= unet_weights
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_names
    assert "lora_unet_mid_block_attentions_0_proj_in" in unet_names


def test_metadata_is_what_a1111_and_kohya_read(quick_config):
    trainer = train_network(quick_config, network={"type": "lora", "rank": 8, "alpha": 4})
    path = final_file(trainer)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "run"  # A1111's alias
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_v2"] == "False" and meta["ss_steps"] == "2" and meta["ss_resolution"] == "(16, 16)"
    assert meta["ss_num_train_images"] == "96"  # 48 images x 2 repeats (kohya counts repeats)
    assert meta["modelspec.architecture"].endswith("/lora")
    assert json.loads(meta["difftune_network"])["rank"] == 8
    # sshs_model_hash is A1111's hash of a safetensors LoRA: sha256 of everything after the header.
    data = path.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    # A LyCORIS algorithm names its module for LyCORIS's kohya loader.
    trainer = train_network(quick_config, network={"type": "loha", "rank": 4}, output={"dir": str(path.parents[3] / "loha")})
    with safe_open(str(final_file(trainer, "loha.safetensors")), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "loha"


@pytest.mark.parametrize("network_type", ["lora", "dylora"])
def test_resume_with_a_network_is_bit_exact(quick_config, tmp_path, network_type):
    """Dropout masks and DyLoRA's rank draws are random while training; a resume draws the same ones."""
    network = {"type": network_type, "rank": 8, "rank_dropout": 0.3, "module_dropout": 0.2}
    if network_type == "lora":
        network["dropout"] = 0.2
    common = {"network": network, "train": {"max_steps": 4, "lr": 1e-2, "train_text_encoder": True},
              "data": {"val_split": 0.0}}
    whole = quick_config(output={"dir": str(tmp_path / "whole"), "save_every_n_steps": 2}, **common)
    train(whole, show_progress=False)
    part = quick_config(output={"dir": str(tmp_path / "part"), "save_every_n_steps": 2}, **common)
    interrupted_then_resumed(part, "step-000002", tmp_path / "part")
    a = load_file(tmp_path / "whole/checkpoints/final/whole.safetensors")
    b = load_file(tmp_path / "part/checkpoints/final/part.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_continues_from_a_file(quick_config, tmp_path):
    trainer = train_network(quick_config, network={"type": "lora", "rank": 4, "alpha": 4}, output={"lora_format": "both"})
    from difftune.network import build_network

    for source, alpha in ((final_file(trainer), 2.0), (final_file(trainer, formats.DIFFUSERS_WEIGHTS), 4.0)):
        config = quick_config(network={"type": "lora", "rank": 4, "alpha": alpha, "init_from": str(source)},
                              train={"train_text_encoder": True})
        model = load_model(config.model)
        build_network(model, config)  # a different alpha is folded into lora_up: same function
        torch.testing.assert_close(outputs(model), outputs(trainer.model), rtol=1e-4, atol=1e-5)
    config = quick_config(network={"type": "loha", "rank": 4, "init_from": str(final_file(trainer))},
                          train={"train_text_encoder": True})
    with pytest.raises(formats.LoraFormatError, match="do not belong to a LohaModule"):
        build_network(load_model(config.model), config)


def test_merge_and_sample_commands(quick_config, tmp_path, capsys):
    from difftune.models.sd.ldm_export import unet_to_ldm

    trainer = train_network(quick_config, network={"type": "locon", "rank": 4})
    lora = final_file(trainer)
    with_half = load_model(ModelConfig(path="tiny-sd"))
    load_lora_file(with_half, lora, multiplier=0.5)
    assert main(["merge", "tiny-sd", str(lora), str(tmp_path / "merged"), "--scale", "0.5"]) == 0
    merged = load_model(ModelConfig(path=str(tmp_path / "merged")))
    torch.testing.assert_close(outputs(merged), outputs(with_half), rtol=1e-4, atol=1e-5)
    # The single-file (A1111/ComfyUI checkpoint) merge holds the same UNet weights in the original layout.
    assert main(["merge", "tiny-sd", str(lora), str(tmp_path / "m.safetensors"), "--scale", "0.5", "--precision", "fp32"]) == 0
    single, expected = load_file(tmp_path / "m.safetensors"), unet_to_ldm(merged.unet)
    assert all(torch.equal(single[k], v) for k, v in expected.items())

    out = tmp_path / "s.png"
    assert main(["sample", "tiny-sd", "--lora", str(lora), "--prompt", "a 3", "--prompt", "a 4", "--steps", "2",
                 "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "s-0.png").is_file() and (tmp_path / "s-1.png").is_file()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("network", "output", "message"),
    [
        ({"type": "tlora"}, {}, "timestep-masked LoRA needs per-step masks"),
        ({"type": "ia3", "conv_rank": 4}, {}, "network.conv_rank is not used by network.type = 'ia3'"),
        ({"type": "lora", "conv_rank": 4}, {}, "use network.type = 'locon'"),
        ({"type": "boft", "dora": True}, {}, "DoRA .* not available for network.type = 'boft'"),
        ({"type": "diag-oft", "rank": 8}, {}, "network.block_size"),
        ({"rank": 8}, {}, "no effect on a full fine-tune"),
        ({"type": "dylora", "rank": 6, "block_size": 4}, {}, "multiple"),
        ({"type": "loha"}, {"lora_format": "diffusers"}, "cannot hold 'loha'"),
        ({"type": "lora", "init_from": "missing.safetensors"}, {}, "network.init_from .*file not found"),
        ({"type": "lora", "preset": "everything"}, {}, "valid: attn-only, attn-mlp, full-lin, full, ia3"),
    ],
)
def test_bad_network_configs_are_clear_errors(quick_config, network, output, message):
    with pytest.raises(ConfigError, match=message):
        quick_config(network=network, output=output)


def test_doctor_prints_trainable_parameters_and_file_size(digits_dir, tmp_path, capsys):
    import tomli_w

    from conftest import quick_config_dict

    data = quick_config_dict(digits_dir, tmp_path / "run", network={"type": "lora", "rank": 4}, train={"train_text_encoder": True})
    (tmp_path / "c.toml").write_text(tomli_w.dumps(data))
    assert main(["doctor", str(tmp_path / "c.toml"), "--json", str(tmp_path / "d.json")]) == 0
    report = json.loads((tmp_path / "d.json").read_text())["network"]
    # tiny-sd, attn-mlp: each linear (in+out)*4 ... counted by building the network for real:
    real = LoraFamilyNetwork.for_training(load_model(ModelConfig(path="tiny-sd")), _config(data)).describe()
    assert report["trainable_parameters"] == real["trainable_parameters"] == 25088
    assert f"{real['trainable_parameters']:,}" in capsys.readouterr().out


def _config(data):
    from difftune.config.loading import validate_config

    return validate_config(data, "test")


def test_boft_fits_sd15_widths_by_default_and_names_the_block_size_that_does(quick_config):
    """SD's 320-wide layers are 10 x 2^5: BOFT cannot split them into blocks of <= 8 (LyCORIS raised a bare
    ValueError); the default block_size fits, and a bad one is a config error naming one that works."""
    from difftune.models.single_file_io import shipped_config_dir
    from difftune.network.facts import network_facts

    sd15 = {"path": str(shipped_config_dir("sd1"))}  # configs only: the network is sized on meta weights
    facts = network_facts(quick_config(model=sd15, network={"type": "boft"}))
    assert (facts["layers"], facts["trainable_parameters"]) == (282, 26_988_816)  # bench/network_sizes.py
    with pytest.raises(ConfigError, match=r"network.block_size = 8: BOFT cannot split a layer with 320 output "
                                          r"channels .* network.block_size = 10 or more works"):
        network_facts(quick_config(model=sd15, network={"type": "boft", "block_size": 8}))
