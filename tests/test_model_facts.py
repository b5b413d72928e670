"""Doctor's model facts (network size, GPU memory budget) are remembered per configuration and model
identity (model_facts.py): a second doctor answers from the file with the same numbers, and a changed
config or model file is counted again."""

from __future__ import annotations

import json

from difftune import model_facts
from difftune.model_facts import facts_key
from difftune.model_facts import model_facts as facts_of


def test_facts_are_counted_once_and_follow_the_config_and_the_model(quick_config, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_CACHE_DIR", str(tmp_path / "cache"))
    config = quick_config(network={"type": "lora", "rank": 4})
    counted = []
    real = model_facts.compute_facts
    monkeypatch.setattr(model_facts, "compute_facts", lambda c: counted.append(1) or real(c))
    first = facts_of(config)
    assert first["network"]["trainable_parameters"] > 0 and first["memory_budget"]["total_bytes"] > 0
    assert facts_of(config) == json.loads(json.dumps(first)) and counted == [1]  # the second from the file
    assert facts_of(quick_config(network={"type": "lora", "rank": 8}))["network"]["trainable_parameters"] \
        == 2 * first["network"]["trainable_parameters"] and counted == [1, 1]
    other_output = quick_config(network={"type": "lora", "rank": 4}, output={"dir": str(tmp_path / "elsewhere")})
    assert facts_key(other_output) == facts_key(config)  # where a run writes does not change the model


def test_a_changed_model_folder_has_another_key(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "config.json").write_text('{"block_out_channels": [32, 64]}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 10)
    before = model_facts.model_identity(str(folder))
    (folder / "unet" / "config.json").write_text('{"block_out_channels": [32, 128]}')
    edited_config = model_facts.model_identity(str(folder))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 11)
    assert len({json.dumps(before), json.dumps(edited_config), json.dumps(model_facts.model_identity(str(folder)))}) == 3
    assert model_facts.model_identity("tiny-sd") == ["tiny-sd"]


def test_doctor_reports_the_same_from_the_cache(quick_config, tmp_path, monkeypatch):
    from difftune.doctor import diagnose, format_report

    monkeypatch.setenv("DIFFTUNE_CACHE_DIR", str(tmp_path / "cache"))
    config = quick_config(network={"type": "loha", "rank": 4})
    cold = format_report(diagnose(config))
    assert list((tmp_path / "cache" / "model_facts").glob("*.json"))
    assert format_report(diagnose(config)) == cold and "GPU memory (GiB)" in cold and "network" in cold


def test_train_leaves_the_facts_doctor_needs(digits_dir, tmp_path, monkeypatch):
    import tomli_w

    from conftest import quick_config_dict
    from difftune.cli.main import main
    from difftune.config.loading import load_config

    monkeypatch.setenv("DIFFTUNE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(quick_config_dict(digits_dir, tmp_path / "run", train={"max_steps": 1},
                                                    network={"type": "lora", "rank": 4})))
    assert main(["train", str(path), "--no-progress"]) == 0
    key = facts_key(load_config(path))
    assert (tmp_path / "cache" / "model_facts" / f"{key}.json").is_file()  # doctor on it counts nothing
