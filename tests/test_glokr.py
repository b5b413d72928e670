"""GLoKr (network/glokr.py): GLoRA's W + W·A + B with A and B Kronecker products, trained, saved, reloaded
and merged like LyCORIS's own algorithms; every setting it takes changes what it computes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from lycoris.functional import factorization
from safetensors.torch import load_file, save_file

from conftest import unet_outputs as outputs
from difftune.checkpoint import lora_formats as formats
from difftune.cli.main import main
from difftune.config.loading import ConfigError, validate_config
from difftune.config.schema import ModelConfig
from difftune.models import load_model
from difftune.network import glokr
from difftune.network.glokr import GLoKrModule
from difftune.network.lycoris_net import LoraFamilyNetwork, NetworkSettings, load_lora_file, to_lycoris_names
from difftune.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# alpha != rank and conv settings != linear ones: a scale applied twice, or the wrong one, shows.
NETWORK = {"type": "glokr", "rank": 2, "alpha": 1, "conv_rank": 4, "conv_alpha": 8}


def tiny():
    return load_model(ModelConfig(path="tiny-sd"))


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
    """Six steps of GLoKr on the tiny SD model (UNet with its 3x3 convs, and the text encoder), validated
    at steps 0, 3 and 6; the trainer's model still carries the network."""
    from conftest import quick_config_dict

    config = validate_config(quick_config_dict(digits_dir, tmp_path_factory.mktemp("glokr") / "run", network=NETWORK,
                                               train={"max_steps": 6, "lr": 1e-2, "train_text_encoder": True},
                                               output={"save_state": False}), "test")
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    return trainer


def final_file(trainer):
    return trainer.run_dir.checkpoints / "final" / "run.safetensors"


def random_module(layer: nn.Module, rank=2, alpha=2.0, seed=0, **kwargs) -> GLoKrModule:
    """A GLoKr module on `layer` with every factor random (a trained state), attached to it."""
    module = GLoKrModule("test", layer, 1.0, rank, alpha, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    module.apply_to()
    return module


def hand_formula(tensors: dict[str, torch.Tensor], name: str, weight: torch.Tensor, rank: int) -> torch.Tensor:
    """alpha/rank · (W·kron(a_w1, a_w2) + kron(b_w1, b_w2)), w2 = w2_a @ w2_b when stored low-rank, from a
    file's tensors: what the docs say the keys mean."""
    def w2(half):
        if f"{name}.glokr_{half}_w2" in tensors:
            return tensors[f"{name}.glokr_{half}_w2"]
        a, b = tensors[f"{name}.glokr_{half}_w2_a"], tensors[f"{name}.glokr_{half}_w2_b"]
        assert a.shape[1] == rank and b.shape[0] == rank
        return (a @ b.reshape(rank, -1)).reshape(a.shape[0], *b.shape[1:])

    a = torch.kron(tensors[f"{name}.glokr_a_w1"], w2("a"))  # in x in
    b1, b2 = tensors[f"{name}.glokr_b_w1"], w2("b")
    b = torch.kron(b1.reshape(*b1.shape, *[1] * (b2.dim() - 2)), b2)  # the layer's weight shape
    w_a = torch.einsum("oi...,ij->oj...", weight, a)
    return float(tensors[f"{name}.alpha"]) / rank * (w_a + b)


# ------------------------------------------------------------------------------------- (a) init
def test_update_is_exactly_zero_at_init(quick_config):
    config = quick_config(network={**NETWORK, "factor": 2}, train={"train_text_encoder": True})
    model = tiny()
    before = outputs(model)
    network = LoraFamilyNetwork.for_training(model, config)
    assert {m.module_type for m in network.loras} == {"linear", "conv2d"}
    assert any(m.kernel == (3, 3) for m in network.loras)
    for module in network.loras:
        assert type(module) is GLoKrModule
        assert torch.count_nonzero(module.get_diff_weight()[0]) == 0
        assert torch.count_nonzero(module.glokr_a_w1) > 0 and torch.count_nonzero(module.glokr_b_w1) > 0
    assert torch.equal(outputs(model), before)


# ---------------------------------------------------------------------- (b) the formula, trained
def test_trained_update_is_the_documented_formula(trained):
    """After six optimizer steps each layer's diff weight (what its forward and a merge add) is
    alpha/rank · (W·kron(a_w1, a_w2) + kron(b_w1, b_w2)), computed from the saved factors."""
    tensors = to_lycoris_names(trained.model, load_file(final_file(trained)))
    checked = set()
    for module in trained.network.loras:
        name, conv3 = module.lora_name, module.kernel == (3, 3)
        rank, alpha = (4, 8.0) if conv3 else (2, 1.0)
        assert float(tensors[f"{name}.alpha"]) == alpha and module.lora_dim == rank
        weight = module.org_module[0].weight.detach()
        expected = hand_formula(tensors, name, weight, rank)
        diff = module.get_diff_weight()[0].detach()
        torch.testing.assert_close(diff, expected, rtol=1e-5, atol=1e-7)
        # both halves trained: W·A alone and B alone are each nonzero
        a_only = hand_formula({**tensors, **{k: torch.zeros_like(v) for k, v in tensors.items()
                                             if k.startswith(f"{name}.glokr_b_w1")}}, name, weight, rank)
        assert a_only.abs().max() > 0 and (expected - a_only).abs().max() > 0
        checked.add(("conv3" if conv3 else module.module_type, module.a_low_rank, module.b_low_rank))
    # linear, 1x1 and 3x3 layers; low-rank and full factors (conv_in: 4 -> 32 channels, conv_rank 4)
    assert {"linear", "conv2d", "conv3"} <= {kind for kind, _, _ in checked}
    assert {(True, True), (False, False)} <= {(a, b) for _, a, b in checked}


# ------------------------------------------------------------------------------- (c) it trains
def test_training_lowers_the_validation_loss_and_changes_the_output(trained):
    records = [json.loads(line) for line in trained.run_dir.metrics.read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(val) == [0, 3, 6]
    assert val[6] < 0.8 * val[0], val
    assert (outputs(trained.model) - outputs(tiny())).abs().max() > 1e-3


def test_fitting_a_weight_change_lowers_the_loss():
    """Gradient descent on the factors alone reaches a target W' = W + W·A* + B* closely."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 24, bias=False)
    module = GLoKrModule("fit", layer, 1.0, 2, 2.0)
    module.apply_to()
    target = random_module(nn.Linear(16, 24, bias=False), rank=2, seed=1)
    target.org_module[0].weight.data.copy_(layer.weight.data)
    x = torch.randn(64, 16)
    with torch.no_grad():
        goal = target.org_module[0](x)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-2)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(layer(x), goal)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


# ------------------------------------------------------------------------- (d) save and reload
def test_saved_file_reloads_to_the_same_outputs(trained):
    path = final_file(trained)
    tensors = load_file(path)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in tensors)
    suffixes = {formats.split_key(k)[1] for k in tensors}
    assert suffixes == {"alpha", "glokr_a_w1", "glokr_a_w2", "glokr_a_w2_a", "glokr_a_w2_b", "glokr_b_w1",
                        "glokr_b_w2", "glokr_b_w2_a", "glokr_b_w2_b"}
    # a 3x3 conv's window is in b_w2 only: rank x in_n x 3 x 3 (in = 128 = 8 x 16, conv_rank 4)
    assert tensors["lora_unet_up_blocks_0_resnets_0_conv1.glokr_b_w2_b"].shape == (4, 16, 3, 3)
    assert tensors["lora_unet_up_blocks_0_resnets_0_conv1.glokr_a_w2_a"].shape == (16, 4)
    fresh = tiny()
    network = load_lora_file(fresh, path)
    assert network.settings.type == "glokr" and network.settings.rank == 2 and network.settings.conv_alpha == 8
    assert torch.equal(outputs(fresh), outputs(trained.model))  # the same fp32 factors, the same computation
    assert abs(trained.network.describe()["file_bytes"] - path.stat().st_size) < 128


def test_file_without_difftune_metadata_is_a_clear_error(trained, tmp_path):
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(final_file(trained)), stripped)  # no metadata, as a re-saving tool would leave it
    with pytest.raises(formats.LoraFormatError, match="GLoKr file .* without difftune's metadata"):
        load_lora_file(tiny(), stripped)


# ------------------------------------------------------------------------------------ (e) merge
def test_merged_model_matches_the_live_network(trained):
    live = tiny()
    load_lora_file(live, final_file(trained), multiplier=0.7)
    merged = tiny()
    load_lora_file(merged, final_file(trained), multiplier=0.7, attach=False).merge(0.7)
    expected = outputs(live)
    assert (expected - outputs(tiny())).abs().max() > 1e-3
    torch.testing.assert_close(outputs(merged), expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- (f) CLI train and merge
def test_cli_trains_glokr_and_difftune_merge_bakes_it_in(digits_dir, tmp_path):
    import tomli_w

    from conftest import quick_config_dict

    data = quick_config_dict(digits_dir, tmp_path / "run", network={"type": "glokr", "rank": 4},
                             train={"max_steps": 2, "lr": 1e-2}, data={"val_split": 0.0},
                             output={"save_state": False})
    (tmp_path / "c.toml").write_text(tomli_w.dumps(data))
    assert main(["train", str(tmp_path / "c.toml"), "--no-progress"]) == 0
    lora = tmp_path / "run" / "checkpoints" / "final" / "run.safetensors"
    assert any(k.endswith(".glokr_b_w1") for k in load_file(lora))
    assert main(["merge", "tiny-sd", str(lora), str(tmp_path / "merged"), "--scale", "0.5"]) == 0
    live = tiny()
    load_lora_file(live, lora, multiplier=0.5)
    assert (outputs(live) - outputs(tiny())).abs().max() > 1e-4
    torch.testing.assert_close(outputs(load_model(ModelConfig(path=str(tmp_path / "merged")))), outputs(live),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ each setting does its part
def test_settings_reach_every_module(quick_config):
    """rank/alpha on linear and 1x1 layers, conv_rank/conv_alpha on 3x3 ones, factor in the split, dropouts."""
    network = {**NETWORK, "factor": 2, "dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.3}
    config = quick_config(network=network, train={"train_text_encoder": True})
    settings = NetworkSettings.from_config(config.network)
    built = LoraFamilyNetwork.build(tiny(), settings, ["denoiser", "text_encoder"], attach=False).loras
    default = LoraFamilyNetwork.build(tiny(), settings.replace(factor=-1), ["denoiser", "text_encoder"], attach=False)
    default_split = {m.lora_name: m.in_split for m in default.loras}
    changed = 0
    for module in built:
        out_dim, in_dim = module.shape[:2]
        rank, scale = (4, 2.0) if module.kernel == (3, 3) else (2, 0.5)
        assert module.lora_dim == rank and module.scale == scale
        assert module.in_split == factorization(in_dim, 2) and module.out_split == factorization(out_dim, 2)
        in_m, in_n = module.in_split
        assert module.glokr_a_w1.shape == (in_m, in_m) and module.glokr_b_w1.shape == (module.out_split[0], in_m)
        if module.a_low_rank:
            assert module.glokr_a_w2_a.shape == (in_n, rank)
        changed += module.in_split != default_split[module.lora_name]
        assert module.drop.p == 0.1 and module.rank_dropout == 0.2 and module.module_dropout == 0.3
    assert changed > 0  # 32 -> (2, 16) with factor 2, (4, 8) balanced


def test_rank_decides_low_rank_or_full_factors():
    """w2 is w2_a @ w2_b with inner size rank when rank < half its larger side (LoKr's rule), else full."""
    small, large = GLoKrModule("s", nn.Linear(32, 64), 1.0, 2, 2), GLoKrModule("l", nn.Linear(32, 64), 1.0, 16, 16)
    assert set(small.state_dict()) == {"glokr_a_w1", "glokr_a_w2_a", "glokr_a_w2_b", "glokr_b_w1", "glokr_b_w2_a",
                                       "glokr_b_w2_b", "alpha"}
    assert small.glokr_a_w2_a.shape == (8, 2) and small.glokr_b_w2_b.shape == (2, 8)
    assert set(large.state_dict()) == {"glokr_a_w1", "glokr_a_w2", "glokr_b_w1", "glokr_b_w2", "alpha"}
    assert large.glokr_a_w2.shape == (8, 8) and large.glokr_b_w2.shape == (8, 8)


def test_alpha_scales_the_update():
    layer = nn.Linear(32, 64)
    one, two = random_module(layer, rank=2, alpha=1.0), random_module(nn.Linear(32, 64), rank=2, alpha=2.0)
    two.org_module[0].weight.data.copy_(layer.weight.data)
    torch.testing.assert_close(two.get_diff_weight()[0], 2 * one.get_diff_weight()[0])
    assert float(one.alpha) == 1.0 and float(two.alpha) == 2.0


@pytest.mark.parametrize("layer", [nn.Linear(32, 48), nn.Conv2d(32, 48, 3, padding=1), nn.Conv2d(32, 48, 1)],
                         ids=["linear", "conv3x3", "conv1x1"])
def test_forward_adds_the_diff_weight_and_bypass_agrees(layer):
    """The layer's output is W x + bias + ΔW x (ΔW from get_diff_weight, times the multiplier); the bypass
    path (used for quantized base layers) computes the same without building ΔW."""
    module = random_module(layer, rank=2, alpha=3.0)
    module.multiplier = 0.6
    x = torch.randn(3, 32) if isinstance(layer, nn.Linear) else torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        base = module.org_forward(x)
        diff = module.get_diff_weight(0.6)[0]
        expected = base + (torch.nn.functional.linear(x, diff) if isinstance(layer, nn.Linear)
                           else torch.nn.functional.conv2d(x, diff, padding=layer.padding))
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        module.bypass_mode = True
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    module.restore()
    assert torch.equal(layer(x), base)


def _training_delta(module, layer, x):
    module.train()
    with torch.no_grad():
        return layer(x) - module.org_forward(x)


def test_dropout_drops_elements_of_the_update_while_training():
    layer = nn.Linear(32, 64)
    module = random_module(layer, dropout=0.5)
    x = torch.randn(16, 32)
    module.eval()
    with torch.no_grad():
        full = layer(x) - module.org_forward(x)
    torch.manual_seed(0)
    dropped = _training_delta(module, layer, x)
    zero, kept = dropped.abs() < 1e-4, (dropped - 2 * full).abs() < 1e-4  # inverted dropout: kept x 1/(1-p)
    assert (zero | kept).all() and 0.3 < zero.float().mean() < 0.7


def test_rank_dropout_drops_whole_output_channels_while_training():
    layer = nn.Linear(32, 64)
    module = random_module(layer, rank_dropout=0.5)
    x = torch.randn(16, 32)
    module.eval()
    with torch.no_grad():
        full = layer(x) - module.org_forward(x)
    torch.manual_seed(0)
    dropped = _training_delta(module, layer, x)
    zero = (dropped.abs() < 1e-4).all(dim=0)
    kept = ((dropped - full).abs() < 1e-4).all(dim=0)
    assert (zero | kept).all() and 10 < int(zero.sum()) < 54


def test_module_dropout_skips_the_whole_update_while_training():
    layer = nn.Linear(32, 64)
    module = random_module(layer, module_dropout=0.5)
    x = torch.randn(4, 32)
    torch.manual_seed(0)
    skipped = [bool(_training_delta(module, layer, x).abs().max() == 0) for _ in range(40)]
    assert 5 < sum(skipped) < 35
    module.eval()
    with torch.no_grad():
        assert (layer(x) - module.org_forward(x)).abs().max() > 0  # never skipped out of training


# ------------------------------------------------------------------------------- (g) config errors
@pytest.mark.parametrize(
    ("network", "output", "message"),
    [
        ({"type": "glokr", "block_size": 4}, {}, "network.block_size is not used by network.type = 'glokr'"),
        ({"type": "glokr", "constraint": 0.1}, {}, "network.constraint is not used by network.type = 'glokr'"),
        ({"type": "glokr", "dora": True}, {}, "DoRA .* not available for network.type = 'glokr'"),
        ({"type": "glokr", "preset": "attn-mlp", "conv_rank": 4}, {}, "only trained with network.preset = 'full'"),
        ({"type": "glokr"}, {"lora_format": "diffusers"}, "cannot hold 'glokr'"),
        # GLoRA's own forward (LyCORIS 4.1.3) never applies these two: refused rather than silently ignored
        ({"type": "glora", "dropout": 0.1}, {}, "network.dropout is not used by network.type = 'glora'"),
        ({"type": "glora", "rank_dropout": 0.1}, {}, "network.rank_dropout is not used by network.type = 'glora'"),
    ],
)
def test_settings_glokr_does_not_use_are_refused(quick_config, network, output, message):
    with pytest.raises(ConfigError, match=message):
        quick_config(network=network, output=output)


def test_unsupported_layers_are_refused():
    with pytest.raises(ValueError, match="grouped convolutions"):
        GLoKrModule("g", nn.Conv2d(8, 8, 3, groups=2), 1.0, 2, 2)
    with pytest.raises(ValueError, match="Linear and Conv2d"):
        GLoKrModule("c", nn.Conv1d(8, 8, 3), 1.0, 2, 2)


# --------------------------------------------------------------------------- LyCORIS registration
def test_registered_where_lycoris_kohya_looks_modules_up():
    from lycoris import kohya, wrapper

    assert glokr.REGISTRATION_PROBLEM is None
    assert kohya.network_module_dict is wrapper.network_module_dict
    assert wrapper.network_module_dict["glokr"] is GLoKrModule


def test_a_lycoris_without_the_table_is_a_clear_error(monkeypatch, quick_config):
    from lycoris import wrapper

    monkeypatch.setattr(wrapper, "network_module_dict", dict(wrapper.network_module_dict))  # not kohya's any more
    with pytest.raises(glokr.LycorisHookMissing, match=r"lycoris-lora \S+ has no lycoris.wrapper.network_module_dict"):
        glokr.register()
    monkeypatch.undo()
    from lycoris.modules.base import LycorisBaseModule

    monkeypatch.delattr(LycorisBaseModule, "_current_weight")  # a base class without what GLoKr calls
    with pytest.raises(glokr.LycorisHookMissing, match="LycorisBaseModule lacks _current_weight"):
        glokr.register()
    monkeypatch.undo()
    glokr.register()  # the real one: registers again, no error
    monkeypatch.setattr(glokr, "REGISTRATION_PROBLEM", "lycoris-lora 9.9 has no module table")
    config = quick_config(network={"type": "glokr"})
    with pytest.raises(ConfigError, match="lycoris-lora 9.9 has no module table"):
        LoraFamilyNetwork.for_training(tiny(), config)
