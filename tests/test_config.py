"""Config: formats, overrides, actionable errors, resolved-config round trip."""

from __future__ import annotations

import json

import pytest
import tomli_w
import yaml

from difftune.config.loading import ConfigError, load_config, read_config_file, write_resolved_config

BASE = {"train": {"lr": 1e-4, "batch_size": 2}, "data": {"train_dir": "imgs", "resolution": 64}}


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_every_format_loads_the_same(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    dump = {".toml": tomli_w.dumps, ".yaml": yaml.safe_dump, ".json": json.dumps}[suffix]
    path.write_text(dump(BASE))
    config = load_config(path)
    assert config.train.lr == 1e-4 and config.train.batch_size == 2 and config.data.resolution == 64


def test_set_overrides_parse_values(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(BASE))
    config = load_config(
        path,
        ["train.lr=3e-5", "train.gradient_checkpointing=true", "sample.prompts=[\"a\", \"b\"]", "output.dir=runs/x"],
    )
    assert config.train.lr == 3e-5
    assert config.train.gradient_checkpointing is True
    assert config.sample.prompts == ["a", "b"]
    assert config.output.dir == "runs/x"


def test_misspelt_key_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text("[train]\nlearning_rate = 1e-4\nbatch_sise = 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "my.toml" in message
    assert "train.batch_sise" in message and "did you mean 'train.batch_size'" in message
    assert "train.learning_rate" in message  # every problem is listed, not just the first


def test_wrong_type_and_impossible_value_name_the_value(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = "fast"\nbatch_size = 0\n[data]\nval_split = 1.5\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.lr = 'fast'" in message
    assert "train.batch_size = 0" in message and "greater than or equal to 1" in message
    assert "data.val_split = 1.5" in message


def test_booleans_are_not_numbers_and_paths_read_like_a_shell(tmp_path, monkeypatch):
    """YAML reads `yes` as true; pydantic alone would then train at lr 1 or flip every image."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  flip_p: yes\ntrain:\n  max_steps: true\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.flip_p = True: expected a number, got true" in str(err.value)
    assert "train.max_steps = True: expected a number, got true" in str(err.value)
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, ['data.train_dir="~/images"', 'output.dir="~/runs/x"', 'data.caption_extension="txt"'])
    assert config.data.train_dir == str(tmp_path / "images") and config.output.dir == str(tmp_path / "runs/x")
    assert config.data.caption_extension == ".txt"
    with pytest.raises(ConfigError, match="data.caption_extension = '.': expected a file extension"):
        load_config(None, ['data.caption_extension="."'])


def test_config_files_with_a_bom_or_not_in_utf8(tmp_path):
    bom = tmp_path / "bom.toml"
    bom.write_bytes("\ufeff[train]\nlr = 0.002\n".encode())
    assert load_config(bom).train.lr == 0.002
    latin = tmp_path / "latin.toml"
    latin.write_bytes('[sample]\nprompts = ["caf\u00e9"]\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.toml: not UTF-8 text .*save the file as UTF-8"):
        load_config(latin)


def test_unknown_section_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(None, ["data.resolution=100"])
    with pytest.raises(ConfigError, match="nothing would be trained"):
        load_config(None, ["train.train_unet=false"])


def test_unknown_optimizer_and_schedule_fail_at_load():
    with pytest.raises(ConfigError, match="optimizer.name = 'adamz'"):
        load_config(None, ["optimizer.name=adamz"])
    with pytest.raises(ConfigError, match="train.lr_scheduler = 'cosinus'"):
        load_config(None, ["train.lr_scheduler=cosinus"])


def test_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="broken.toml: cannot parse"):
        read_config_file(path)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["train.lr=2e-5", "sample.prompts=[\"x\"]", "data.train_dir=d"])
    write_resolved_config(config, tmp_path / "config.resolved.toml")
    again = load_config(tmp_path / "config.resolved.toml")
    assert again == config


def test_switches_that_default_on_can_be_turned_off_and_stay_off(tmp_path):
    """TOML has no null: 'off' must be a value that a file, --set and the resolved config all carry."""
    off = ["validation.every_n_epochs=0", "find_steps.patience=0", "find_steps.gl_alpha=0", "data.train_dir=d"]
    config = load_config(None, off)
    write_resolved_config(config, tmp_path / "config.resolved.toml")
    again = load_config(tmp_path / "config.resolved.toml")
    assert (again.validation.every_n_epochs, again.find_steps.patience, again.find_steps.gl_alpha) == (0, 0, 0)


def test_required_keys_exist():
    config = load_config(None)
    for dotted in [
        "model.path", "data.train_dir", "data.val_dir", "data.val_split", "data.resolution", "train.batch_size",
        "train.grad_accum", "train.lr", "train.text_encoder_lr", "train.lr_scheduler", "train.lr_warmup_steps",
        "train.max_steps", "train.max_epochs", "train.seed", "train.mixed_precision", "train.gradient_checkpointing",
        "train.clip_grad_norm", "train.train_unet", "train.train_text_encoder", "optimizer.name",
        "optimizer.weight_decay", "validation.every_n_steps", "validation.every_n_epochs", "validation.seed",
        "validation.stabilize_train_loss", "output.dir", "output.save_every_n_steps", "output.save_every_n_epochs",
        "sample.prompts", "sample.every_n_steps",
    ]:
        section, key = dotted.split(".")
        assert key in type(getattr(config, section)).model_fields, dotted


def test_every_shipped_example_validates():
    import tomllib
    from importlib import resources

    from difftune.config.loading import validate_config

    files = [f for f in resources.files("difftune.examples").iterdir() if f.name.endswith(".toml")]
    assert files
    for f in files:
        validate_config(tomllib.loads(f.read_text()), f.name)


def test_every_toml_in_readme_and_docs_validates():
    """Users copy these; a renamed key or a bad value in an example is a bug. Fragments (a lone section)
    are checked on top of a minimal config."""
    import re
    import tomllib
    from pathlib import Path

    from difftune.config.loading import validate_config

    root = Path(__file__).resolve().parents[1]
    checked = 0
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S):
            data = tomllib.loads(block)
            if "model" not in data:
                data = {"model": {"path": "tiny-sd"}, "data": {"train_dir": "x"}, **data}
            validate_config(data, doc.name)
            checked += 1
    assert checked >= 3
