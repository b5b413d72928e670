"""The command line as a user runs it: doctor, train (with --set and --resume), demo, errors, --help."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import tomli_w

from conftest import quick_config_dict
from difftune.cli.main import COMMANDS, build_parser, main
from difftune.config.schema import AutoConfig, FindLRConfig, FindStepsConfig, SampleConfig
from difftune.reporting.metrics import read_metrics


def write_config(path, data):
    path.write_text(tomli_w.dumps(data))
    return path


def test_doctor_prints_the_plan_and_writes_json(digits_dir, tmp_path, capsys):
    config = write_config(tmp_path / "c.toml", quick_config_dict(digits_dir, tmp_path / "run"))
    assert main(["doctor", str(config), "--set", "train.max_steps=20", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    # 48 digits in 2_digits (x2 repeats), 25% held out: 36 train, 12 val; 72 samples / batch 4 = 18 steps.
    assert "2_digits" in out and "x2" in out
    assert "train images          36" in out and "validation images     12" in out
    assert "steps per epoch       18" in out and "total steps           20" in out
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["plan"]["total_steps"] == 20 and report["plan"]["effective_batch_size"] == 4
    assert not (tmp_path / "run").exists(), "doctor must not train or create the run"


def test_doctor_lists_bad_files_and_exits_2(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"nope")
    config = write_config(tmp_path / "c.toml", {"data": {"train_dir": str(tmp_path / "imgs")}})
    assert main(["doctor", str(config)]) == 2
    err = capsys.readouterr().err
    assert "x.png: unreadable image" in err and "x.png: missing caption file x.txt" in err


def test_config_error_exits_2_with_message(tmp_path, capsys):
    config = write_config(tmp_path / "c.toml", {"train": {"lr": -1}})
    assert main(["train", str(config)]) == 2
    assert "train.lr = -1" in capsys.readouterr().err


def test_train_then_resume_from_the_cli(digits_dir, tmp_path, capsys):
    data = quick_config_dict(digits_dir, tmp_path / "run", output={"save_every_n_steps": 2})
    config = write_config(tmp_path / "c.toml", data)
    assert main(["train", str(config), "--no-progress", "--set", "train.max_steps=2"]) == 0
    assert main(["train", str(config), "--no-progress", "--resume", str(tmp_path / "run"), "--set", "train.max_steps=4"]) == 0
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4]
    assert "validation loss: first" in capsys.readouterr().out


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--no-progress", "--set", "train.max_steps=40",
                 "--set", "validation.every_n_steps=20", "--set", "sample.every_n_steps=40", "--set", "sample.steps=2"])
    assert code == 0
    run = out / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_loss"] < 0.5 * summary["first_val_loss"]
    assert (run / "plots" / "loss.png").is_file() and (run / "samples" / "step-000040.png").is_file()
    assert (out / "data" / "1_digits" / "digit_0007.txt").read_text().strip() == "a handwritten digit seven"


# ------------------------------------------------------------------------------------------- --help
def _subparsers(parser):
    """{command: its parser} of a parser's subcommands."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def _help_of(command, monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_command_has_a_description():
    commands = _subparsers(build_parser())
    assert set(commands) == set(COMMANDS)  # a command added without help would show up here
    for name, parser in commands.items():
        assert parser.description and len(parser.description.split()) >= 15, f"{name}: no description"
        assert parser.description.split("\n")[0] in parser.format_help(), f"{name}: description not shown"


def test_every_option_has_a_help_text_with_its_default():
    parser = build_parser()
    for name, sub in [("difftune", parser), *_subparsers(parser).items()]:
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{label}: no help"
            if action.option_strings and name != "difftune":  # optional flags of a command
                text = sub._get_formatter()._expand_help(action)
                assert "default" in text or "required" in text, f"{label}: help does not state its default"


@pytest.mark.parametrize(
    ("command", "section", "schema", "result_file"),
    [("find-lr", "find_lr", FindLRConfig, "find_lr.json"),
     ("find-steps", "find_steps", FindStepsConfig, "find_steps.json"),
     ("auto", "auto", AutoConfig, "report.html")],
)
def test_tuner_help_lists_every_config_key_of_its_section(command, section, schema, result_file, monkeypatch, capsys):
    out = _help_of(command, monkeypatch, capsys)
    flat = " ".join(out.split())
    assert result_file in out
    for key, field in schema.model_fields.items():
        assert f"{section}.{key}  (default: " in out, f"{section}.{key} not listed"
        assert " ".join(field.description.split()) in flat, f"{section}.{key}: description missing"


def test_find_lr_help_says_where_results_go_and_reads_the_schema(monkeypatch, capsys):
    field = FindLRConfig.model_fields["num_points"]
    monkeypatch.setattr(field, "description", "sentinel description from the schema")
    monkeypatch.setattr(field, "default", 31)
    out = _help_of("find-lr", monkeypatch, capsys)
    assert "find_lr.num_points  (default: 31)" in out and "sentinel description from the schema" in out
    assert "<output.dir>/find-lr/" in out
    for name in ("find_lr.json", "curve.csv", "find_lr.png", "probe_losses.npz"):
        assert name in out


def test_sample_defaults_come_from_the_sample_schema():
    args = build_parser().parse_args(["sample", "tiny-sd", "--prompt", "x"])
    for flag, key in (("steps", "steps"), ("cfg_scale", "cfg_scale"), ("sampler", "sampler"), ("seed", "seed"),
                      ("negative_prompt", "negative_prompt")):
        assert getattr(args, flag) == SampleConfig.model_fields[key].default


def test_building_the_parser_loads_no_model_library():
    code = ("import sys; from difftune.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
