"""LoRA+ and kohya's block LR weights (issue 18): the optimizer's groups carry the multiplied LRs."""

from __future__ import annotations

import math

import pytest
import torch

from difftune.config.loading import ConfigError
from difftune.network.lr_weights import block_of, block_weights
from difftune.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
NO_VALIDATION = {"every_n_steps": None, "every_n_epochs": 0}


def trainer_for(quick_config, **network):
    config = quick_config(network={"type": "lora", "rank": 4, "preset": "attn-mlp", **network},
                          train={"max_steps": 2, "lr": 1e-3}, validation=NO_VALIDATION)
    return Trainer(config, show_progress=False)


def names_by_group(trainer) -> dict[str, set[str]]:
    names = {id(p): f"{m.lora_name}.{n}" for m in trainer.network.loras for n, p in m.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in trainer.optimizer.param_groups}


def test_loraplus_trains_the_b_matrices_at_ratio_times_the_lr(quick_config):
    trainer = trainer_for(quick_config, loraplus_lr_ratio=16.0)
    try:
        groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
        assert groups == {"denoiser": pytest.approx(1e-3), "denoiser x16": pytest.approx(16e-3)}
        members = names_by_group(trainer)
        assert members["denoiser x16"] and all(".lora_up." in n for n in members["denoiser x16"])
        assert all(".lora_up." not in n for n in members["denoiser"])
        total = sum(1 for m in trainer.network.loras for _ in m.parameters())
        assert len(members["denoiser"]) + len(members["denoiser x16"]) == total
        groups_iter = trainer.step_groups()
        assert math.isfinite(trainer.train_step(next(groups_iter)))
        assert trainer.current_lrs() == {"lr": pytest.approx(1e-3), "lr/denoiser x16": pytest.approx(16e-3)}
    finally:
        trainer.close()


def test_loraplus_is_refused_where_there_are_no_b_matrices(quick_config):
    with pytest.raises(ConfigError, match="LoRA\\+ scales the B .* network.type = 'loha'"):
        quick_config(network={"type": "loha", "loraplus_lr_ratio": 4.0})
    with pytest.raises(ConfigError, match="apply to a LoRA-family network"):
        quick_config(network={"down_lr_weight": [1.0, 0.5]})


def test_block_weights_freeze_zero_blocks_and_scale_the_rest(quick_config):
    trainer = trainer_for(quick_config, down_lr_weight="zeros", mid_lr_weight=0.5)
    try:
        members = names_by_group(trainer)
        assert set(members) == {"denoiser", "denoiser x0.5"}
        assert members["denoiser x0.5"] and all("_mid_block_" in n for n in members["denoiser x0.5"])
        assert all("_down_blocks_" not in n for group in members.values() for n in group)
        down = {n: p for m in trainer.network.loras if "_down_blocks_" in m.lora_name
                for n, p in m.named_parameters(prefix=m.lora_name)}
        assert down and not any(p.requires_grad for p in down.values())
        before = {n: p.detach().clone() for n, p in down.items()}
        groups_iter = trainer.step_groups()
        trainer.train_step(next(groups_iter))
        assert all(torch.equal(before[n], p) for n, p in down.items())  # frozen at the initial (zero) update
    finally:
        trainer.close()


def test_block_presets_and_lists_are_kohyas():
    notes: list[str] = []
    sine = block_weights("sine", 12, "down", notes)
    assert sine == pytest.approx([math.sin(math.pi * (i / 11) / 2) for i in range(12)])
    assert block_weights("cosine+0.5", 12, "down", notes) == pytest.approx(
        [math.sin(math.pi * (i / 11) / 2) + 0.5 for i in reversed(range(12))])
    assert block_weights("linear", 9, "down", notes) == pytest.approx([i / 8 for i in range(9)])
    assert block_weights([0.0, 0.5], 9, "down", notes) == [0.0, 0.5] + [1.0] * 7  # padded with 1, as kohya
    assert block_weights([1.0] * 12, 9, "network.down_lr_weight", notes) == [1.0] * 9 and "the last 3" in notes[0]
    assert block_of("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == ("down", 4)  # IN04
    assert block_of("lora_unet_down_blocks_0_downsamplers_0_conv") == ("down", 3)  # IN03
    assert block_of("lora_unet_up_blocks_3_attentions_2_proj_out") == ("up", 11)  # OUT11
    assert block_of("lora_unet_up_blocks_1_upsamplers_0_conv") == ("up", 5)  # OUT05
    assert block_of("lora_unet_mid_block_attentions_0_proj_in") == ("mid", 0)
    assert block_of("lora_unet_conv_in") is None and block_of("lora_te_text_model_encoder_layers_0_mlp_fc1") is None


def test_a_misspelt_preset_lists_the_presets(quick_config):
    with pytest.raises(ConfigError, match="sine, cosine, linear, reverse_linear, zeros"):
        quick_config(network={"type": "lora", "up_lr_weight": "sinus"})


def test_train_norm_trains_the_norm_layers_and_saves_them_in_the_kohya_file(quick_config):
    from safetensors.torch import load_file

    from difftune.config.schema import ModelConfig
    from difftune.models import load_model
    from difftune.network.lycoris_net import load_lora_file

    config = quick_config(network={"type": "lora", "rank": 4, "preset": "attn-mlp", "train_norm": True},
                          train={"max_steps": 2, "lr": 1e-2}, validation=NO_VALIDATION)
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    norms = [m for m in trainer.network.loras if type(m).__name__ == "NormModule"]
    assert any("_norm1" in m.lora_name for m in norms)  # the transformer blocks' LayerNorms
    assert any(m.op is torch.nn.functional.group_norm or "group_norm" in m.op.__name__ for m in norms)  # GroupNorms
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in trained for m in norms for p in m.parameters())
    moved = [m for m in norms if m.w_norm.abs().max() > 0]  # LyCORIS starts them at zero
    assert moved
    file = next((trainer.run_dir.checkpoints / "final").glob("*.safetensors"))
    tensors = load_file(file)
    name = moved[0].lora_name
    assert f"{name}.w_norm" in tensors and f"{name}.b_norm" in tensors
    loaded = load_lora_file(load_model(ModelConfig(path="tiny-sd")), file, attach=False)  # difftune reads it back
    assert torch.equal(dict(loaded.net.named_parameters())[f"{name}.w_norm"].cpu(), moved[0].w_norm.detach().cpu())


def test_train_norm_is_refused_where_it_cannot_apply(quick_config):
    with pytest.raises(ConfigError, match="network.train_norm applies to a LoRA-family network"):
        quick_config(network={"train_norm": True})
    with pytest.raises(ConfigError, match="diffusers/PEFT layout has no place for norm weights"):
        quick_config(network={"type": "lora", "train_norm": True}, output={"lora_format": "diffusers"})
    with pytest.raises(ConfigError, match="holds no norm layer"):
        Trainer(quick_config(network={"type": "lora", "preset": "attn-only", "train_norm": True},
                             validation=NO_VALIDATION), show_progress=False)


def test_layer_lr_weights_set_per_role_lrs_on_a_transformer_family(digits_dir, tmp_path):
    from conftest import quick_config_dict
    from difftune.config.loading import validate_config

    network = {"type": "lora", "rank": 4, "layer_lr_weights": {"lora_unet_single_transformer_blocks_*": 0.5,
                                                                 "*_attn_add_*": 2.0, "*_no_such_layer_*": 3.0}}
    config = validate_config(quick_config_dict(digits_dir, tmp_path / "run", model={"path": "tiny-flux"},
                                               network=network, train={"max_steps": 1}, validation=NO_VALIDATION), "t")
    trainer = Trainer(config, show_progress=False)
    try:
        members = names_by_group(trainer)
        assert set(members) == {"denoiser", "denoiser x0.5", "denoiser x2"}
        assert members["denoiser x0.5"] and all(n.startswith("lora_unet_single_transformer_blocks_")
                                              for n in members["denoiser x0.5"])
        assert members["denoiser x2"] and all("_attn_add_" in n for n in members["denoiser x2"])  # the text stream
        assert all(not n.startswith("lora_unet_single_") and "_attn_add_" not in n for n in members["denoiser"])
        lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
        assert lrs["denoiser x0.5"] == pytest.approx(0.5 * lrs["denoiser"])
        assert lrs["denoiser x2"] == pytest.approx(2 * lrs["denoiser"])
        assert any("'*_no_such_layer_*' matches no layer" in note for note in trainer.notes)
    finally:
        trainer.close()


def test_layer_lr_weights_need_a_network_and_non_negative_values(quick_config):
    with pytest.raises(ConfigError, match="apply to a LoRA-family network"):
        quick_config(network={"layer_lr_weights": {"*": 0.5}})
    with pytest.raises(ConfigError, match=r"layer_lr_weights\['\*attn\*'\] = -1.0: a multiplier must be >= 0"):
        quick_config(network={"type": "lora", "layer_lr_weights": {"*attn*": -1.0}})
