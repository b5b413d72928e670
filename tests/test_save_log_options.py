"""Time-based and epoch-gated saves and sparse metrics records (issue 18, EveryDream2's names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difftune.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
NO_VALIDATION = {"every_n_steps": None, "every_n_epochs": 0}


def saved_steps(trainer) -> list[str]:
    folder = trainer.run_dir.root / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))


def test_save_every_n_minutes_with_a_fake_clock(quick_config):
    trainer = Trainer(quick_config(train={"max_steps": 8}, validation=NO_VALIDATION,
                                   output={"save_every_n_minutes": 1.0}), show_progress=False)
    trainer.clock = lambda: trainer.state.step * 25.0  # 25 s per step: a save every third step (75 s >= 60 s)
    trainer.run()
    assert saved_steps(trainer) == ["step-000003", "step-000006"]
    assert (trainer.run_dir.root / "checkpoints" / "final").is_dir()  # the end of the run saves as always


def test_save_from_epoch_holds_periodic_saves_back(quick_config):
    trainer = Trainer(quick_config(train={"max_steps": 10, "batch_size": 12}, validation=NO_VALIDATION,
                                   output={"save_every_n_steps": 1, "save_from_epoch": 1}), show_progress=False)
    per_epoch = trainer.plan.batches_per_epoch
    assert per_epoch < 9  # the gate lifts inside the run
    trainer.run()
    expected = [f"step-{s:06d}" for s in range(per_epoch, 10)]  # step 10 is the final save
    assert saved_steps(trainer) == expected


def test_log_every_n_steps_writes_the_window_mean(quick_config, tmp_path):
    def records(**output):
        config = quick_config(train={"max_steps": 7}, validation={"every_n_epochs": 0}, output=output)
        trainer = Trainer(config, show_progress=False)
        trainer.run()
        lines = (trainer.run_dir.root / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if "loss" in json.loads(line)]

    every = records()
    sparse = records(log_every_n_steps=3, overwrite=True)
    losses = {r["step"]: r["loss"] for r in every}
    assert [r["step"] for r in sparse] == [3, 6, 7]  # 7: the final step always writes one
    assert sparse[0]["loss"] == pytest.approx(sum(losses[s] for s in (1, 2, 3)) / 3, rel=1e-12)
    assert sparse[1]["loss"] == pytest.approx(sum(losses[s] for s in (4, 5, 6)) / 3, rel=1e-12)
    assert sparse[2]["loss"] == pytest.approx(losses[7], rel=1e-12)


def test_wandb_offline_gets_every_record_and_resumes_the_same_run(quick_config, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the test extra installs wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, inits, real_init = [], [], wandb.init

    def spying_init(**kwargs):  # the real offline run, with its log calls recorded on the way in
        run = real_init(**kwargs)
        inits.append(kwargs)
        real_log = run.log
        monkeypatch.setattr(run, "log", lambda values, step: (logged.append((step, values)), real_log(values, step=step)))
        return run

    monkeypatch.setattr(wandb, "init", spying_init)
    config = quick_config(train={"max_steps": 3}, validation=NO_VALIDATION,
                          output={"wandb": True, "wandb_project": "difftune-test", "save_every_n_steps": 2})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    root = trainer.run_dir.root
    run_id = (root / "wandb_run_id.txt").read_text().strip()
    assert [p.name.endswith(run_id) for p in (root / "wandb").glob("offline-run-*")] == [True]
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert {step: values["loss"] for step, values in logged if "loss" in values} == losses
    assert inits[0]["project"] == "difftune-test" and inits[0]["id"] == run_id and inits[0]["resume"] == "allow"

    logged.clear()
    config.train.max_steps = 5
    from difftune.training.loop import train

    train(config, resume=root, show_progress=False)
    assert inits[1]["id"] == run_id  # the same W&B run continues
    assert sorted({step for step, values in logged if "loss" in values}) == [4, 5]  # steps 3.. were redone; W&B had 3


def test_wandb_missing_is_a_config_error_with_the_install_line(quick_config, monkeypatch):
    import difftune.reporting.wandb_sink as sink
    from difftune.config.loading import ConfigError

    monkeypatch.setattr(sink, "wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"output.wandb = true needs the wandb package.*difftune\[wandb\]"):
        quick_config(output={"wandb": True})


def test_an_overwritten_run_is_a_new_wandb_run(quick_config, monkeypatch):
    pytest.importorskip("wandb", reason="the test extra installs wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = quick_config(train={"max_steps": 1}, validation=NO_VALIDATION, output={"wandb": True})
    Trainer(config, show_progress=False).run()
    root = Path(config.output.dir)
    first = (root / "wandb_run_id.txt").read_text().strip()
    config.output.overwrite = True
    Trainer(config, show_progress=False).run()
    assert (root / "wandb_run_id.txt").read_text().strip() != first
