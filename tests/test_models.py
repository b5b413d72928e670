"""Model adapter: built-in tiny models, diffusers folders, prediction types, load errors."""

from __future__ import annotations

import json

import pytest
import torch

from difftune.config.schema import ModelConfig
from difftune.models import load_model
from difftune.models.loading import ModelLoadError


def test_tiny_model_is_identical_on_every_build():
    a, b = load_model(ModelConfig()), load_model(ModelConfig())
    for (name, pa), (_, pb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.family == "tiny-sd" and a.prediction_type == "epsilon"


def test_v_prediction_target_is_velocity():
    model = load_model(ModelConfig(path="tiny-sd-v"))
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    alpha = model.noise_scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - model.noise_scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    objective = model.make_objective()
    assert torch.allclose(objective.target(latents, noise, t), alpha * noise - sigma * latents, atol=1e-6)
    eps_model = load_model(ModelConfig())
    assert torch.equal(eps_model.make_objective().target(latents, noise, t), noise)


def test_prediction_type_override():
    model = load_model(ModelConfig(prediction_type="v_prediction"))
    assert model.prediction_type == "v_prediction"


def test_diffusers_folder_round_trip(tmp_path):
    model = load_model(ModelConfig())
    with torch.no_grad():
        model.unet.conv_out.bias.add_(0.5)  # make it differ from a fresh tiny model
    model.save_pretrained(tmp_path / "m")
    again = load_model(ModelConfig(path=str(tmp_path / "m")))
    for module, other in ((model.unet, again.unet), (model.vae, again.vae), (model.text_encoder, again.text_encoder)):
        for (name, p), (_, q) in zip(module.state_dict().items(), other.state_dict().items(), strict=True):
            assert torch.equal(p, q), name
    cond = model.encode_text(["a digit"])
    again_cond = again.encode_text(["a digit"])
    assert torch.equal(cond["encoder_hidden_states"], again_cond["encoder_hidden_states"])


def test_folder_with_only_fp16_variant_weights_loads(tmp_path):
    """Hub downloads often keep only `*.fp16.safetensors`; they must load without naming the variant."""
    model = load_model(ModelConfig())
    model.save_pretrained(tmp_path / "m")
    for weights in (tmp_path / "m").glob("*/*.safetensors"):
        weights.rename(weights.with_name(f"{weights.stem}.fp16.safetensors"))
    again = load_model(ModelConfig(path=str(tmp_path / "m")))
    assert torch.equal(again.unet.conv_in.weight, model.unet.conv_in.weight)


def test_clip_skip_uses_an_earlier_layer():
    one, two = load_model(ModelConfig()), load_model(ModelConfig(clip_skip=2))
    with torch.no_grad():
        a = one.encode_text(["a cat"])["encoder_hidden_states"]
        b = two.encode_text(["a cat"])["encoder_hidden_states"]
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_bad_paths_give_actionable_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="built-in name"):
        load_model(ModelConfig(path=str(tmp_path / "missing")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(ModelConfig(path=str(tmp_path / "folder")))
    (tmp_path / "folder" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(ModelLoadError, match="PixArt is not supported yet"):
        load_model(ModelConfig(path=str(tmp_path / "folder")))


def test_real_clip_tokenizer_is_built_offline():
    from difftune.models.clip_tokenizers import find_clip_bpe_file, openai_clip_tokenizer

    if find_clip_bpe_file() is None:
        pytest.skip("open_clip_torch (which ships the CLIP BPE file) is not installed")
    tokenizer = openai_clip_tokenizer()
    assert len(tokenizer) == 49408
    # Reference ids of OpenAI CLIP's tokenizer for this sentence.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
