"""The command line as a user runs it: doctor, train (with --set and --resume), demo, errors."""

from __future__ import annotations

import json

import tomli_w

from conftest import quick_config_dict
from difftune.cli.main import main
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
