"""Nothing a user made is lost (issue 12): run-directory locks, interrupted saves, corrupt checkpoints,
full disks, schedule-free resume, and the smaller things seen on the same runs.

Real processes where the behaviour depends on them (a lock held by another PID, a save killed with
SIGKILL at a chosen point through the DIFFTUNE_KILL_DURING_SAVE fault hook); everything else in-process.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import quick_config_dict
from difftune.checkpoint.manifest import MANIFEST, verify_save
from difftune.checkpoint.state import FAULT_ENV
from difftune.cli.main import main
from difftune.config.loading import ConfigError, validate_config
from difftune.errors import CheckpointError, DiskFullError, RunLockedError, SingleFileError
from difftune.training.loop import Trainer, TrainingDiverged, train
from difftune.training.run_lock import LOCK_FILE, lock_run_dir

UNET = "checkpoints/final/unet/diffusion_pytorch_model.safetensors"
SAVING = {"save_every_n_steps": 2}
NO_VALIDATION = {"every_n_steps": None, "every_n_epochs": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.startswith((".tmp-", ".old-")))


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def cli(config_file: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`difftune train` in its own process (one thread, like the in-process runs)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "difftune.cli.main", "train", str(config_file), "--no-progress", *args],
                          capture_output=True, text=True, env=environment, timeout=300)


def write_config(path: Path, data: dict) -> Path:
    """A config file; None (unset, as in NO_VALIDATION) is left out, as TOML has no null."""
    path.write_text(tomli_w.dumps({s: {k: v for k, v in keys.items() if v is not None} for s, keys in data.items()}))
    return path


# ------------------------------------------------------------------------------------ 1. the lock
def test_a_second_process_is_refused_while_a_run_holds_the_folder_and_a_dead_holder_is_taken_over(quick_config):
    config = quick_config(train={"max_steps": 1}, validation=NO_VALIDATION)
    run = Path(config.output.dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from difftune.training.run_lock import lock_run_dir; "
         f"lock_run_dir({str(run)!r}, 'train'); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by another difftune process \(PID {holder.pid} "):
            train(config, show_progress=False)
        assert not (run / "metrics.jsonl").exists()  # refused before anything was written
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            train(config, resume=run, show_progress=False)
        sub = quick_config(output={"dir": str(run / "find-lr")})
        with pytest.raises(RunLockedError, match=f"inside '{run.resolve()}'.*PID {holder.pid}"):
            Trainer(sub, show_progress=False)
        config_file = write_config(run.parent / "c.toml", quick_config_dict(Path(config.data.train_dir), run))
        for command in ("find-lr", "find-steps", "auto"):
            assert main([command, str(config_file), "--no-progress"]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert (run / LOCK_FILE).is_file()  # kill -9 leaves the file, and the kernel drops the lock
    trainer = Trainer(config, show_progress=False)
    assert any("took over the lock of an earlier difftune process" in n and f"PID {holder.pid}" in n for n in trainer.notes)
    trainer.run()
    assert not (run / LOCK_FILE).exists()  # released and removed at the end of the run
    with lock_run_dir(run) as again:  # and free for the next one
        assert again.took_over is None


def test_the_lock_nests_within_one_process(tmp_path):
    with lock_run_dir(tmp_path / "auto"):
        with lock_run_dir(tmp_path / "auto" / "find-lr"), lock_run_dir(tmp_path / "auto"):
            pass
        assert (tmp_path / "auto" / LOCK_FILE).is_file()  # the inner release did not drop the outer lock
    assert not (tmp_path / "auto" / LOCK_FILE).exists()


# ------------------------------------------------------------------------- 2. interrupted saves
def test_a_save_killed_midway_leaks_nothing_and_the_resume_is_bit_exact(quick_config, tmp_path):
    common = {"train": {"max_steps": 6}, "output": SAVING}
    reference = quick_config(output={"dir": str(tmp_path / "reference"), **SAVING}, train={"max_steps": 6})
    train(reference, show_progress=False)

    run = tmp_path / "killed"
    data = quick_config_dict(Path(reference.data.train_dir), run, **common)
    config_file = write_config(tmp_path / "killed.toml", data)
    killed = cli(config_file, env={FAULT_ENV: "export:2"})  # SIGKILL inside the save of step 4
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = leftovers(run)
    assert any(name.startswith("checkpoints/.tmp-step-000004-") for name in left), left

    config = validate_config(data, "test")
    trainer = Trainer(config, resuming=True, show_progress=False)
    cleaned = [n for n in trainer.notes if n.startswith("cleaned up after an interrupted run")]
    assert cleaned and ".tmp-step-000004-" in cleaned[0] and "freed" in cleaned[0], trainer.notes
    assert trainer.state.step == 2  # step 4's save never completed
    trainer.run()
    assert leftovers(run) == []
    assert same_tensors(run / UNET, tmp_path / "reference" / UNET)
    assert [r["loss"] for r in read(run)] == [r["loss"] for r in read(tmp_path / "reference")]


def read(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_a_kill_during_the_first_save_says_how_to_start_again(quick_config, tmp_path):
    run = tmp_path / "first"
    data = quick_config_dict(Path(quick_config().data.train_dir), run, train={"max_steps": 4}, output=SAVING)
    config_file = write_config(tmp_path / "first.toml", data)
    assert cli(config_file, env={FAULT_ENV: "state:1"}).returncode == -9
    assert (run / "metrics.jsonl").is_file() and leftovers(run)
    config = validate_config(data, "test")
    with pytest.raises(ConfigError, match=r"stopped at step 2 before its first resumable save.*output\.overwrite=true"):
        train(config, show_progress=False)
    with pytest.raises(CheckpointError, match=r"(?s)no resumable save.*--set output\.overwrite=true"):
        train(config, resume=run, show_progress=False)
    config.output.overwrite = True
    summary = train(config, show_progress=False)
    assert summary["steps"] == 4 and leftovers(run) == []


# ---------------------------------------------------------------------- 3. corrupt checkpoints
@pytest.fixture(scope="module")
def saved_run(digits_dir, tmp_path_factory):
    """A 6-step run with saves at steps 2 and 4 and the final one (step 6): the original bytes."""
    root = tmp_path_factory.mktemp("saved")
    data = quick_config_dict(digits_dir, root / "run", train={"max_steps": 6}, output=SAVING)
    torch.set_num_threads(1)
    train(validate_config(data, "test"), show_progress=False)
    shutil.copy(root / "run" / UNET, root / "final-unet.safetensors")
    return data, root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


CORRUPTIONS = {
    "truncated trainable.safetensors": (lambda c: truncate(c / "final/training_state/trainable.safetensors"), "final"),
    "truncated optimizer.pt": (lambda c: truncate(c / "final/training_state/optimizer.pt"), "final"),
    "garbage trainer_state.json": (
        lambda c: (c / "final/training_state/trainer_state.json").write_text("{not json"), "final"),
    "deleted training_state/": (lambda c: shutil.rmtree(c / "final/training_state"), "final"),
    "garbage latest.json": (lambda c: (c / "latest.json").write_text("{"), None),  # final stays intact
    "garbage manifest.json": (lambda c: (c / "final" / MANIFEST).write_text("]"), "final"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_resume_falls_back_to_the_newest_intact_save(saved_run, tmp_path, corruption):
    data, root = saved_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    damage, skipped = CORRUPTIONS[corruption]
    damage(run / "checkpoints")
    config = validate_config({**data, "output": {**data["output"], "dir": str(run)}}, "test")
    trainer = Trainer(config, resuming=True, show_progress=False)
    if skipped is None:
        assert trainer.state.step == 6 and not any(n.startswith("skipped") for n in trainer.notes)
    else:
        assert trainer.state.step == 4, trainer.notes
        assert any(n.startswith(f"skipped save {skipped}: ") for n in trainer.notes), trainer.notes
        assert any("resuming from step-000004 (step 4), the newest intact save" in n for n in trainer.notes)
    trainer.run()
    assert same_tensors(run / UNET, root / "final-unet.safetensors")  # steps 5-6 redone bit for bit
    assert verify_save(run / "checkpoints" / "final") is None


def test_resume_with_no_intact_save_lists_each_and_why(saved_run, tmp_path):
    data, root = saved_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    truncate(run / "checkpoints/final/training_state/trainable.safetensors")
    shutil.rmtree(run / "checkpoints/step-000004/training_state")
    (run / "checkpoints/step-000002/training_state/rng.pt").write_bytes(b"x")
    config = validate_config({**data, "output": {**data["output"], "dir": str(run)}}, "test")
    with pytest.raises(CheckpointError) as err:
        train(config, resume=run, show_progress=False)
    message = str(err.value)
    assert "final: training_state/trainable.safetensors has" in message and "truncated" in message
    assert "step-000004: training_state/" in message and "is missing" in message
    assert "step-000002: training_state/rng.pt has 1 bytes" in message


def test_a_save_without_manifest_still_resumes(saved_run, tmp_path):
    """Saves written before manifests existed: loading them decides."""
    data, root = saved_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    for save in (run / "checkpoints").iterdir():
        if save.is_dir():
            (save / MANIFEST).unlink(missing_ok=True)
    trainer = Trainer(validate_config({**data, "output": {**data["output"], "dir": str(run)}}, "test"),
                      resuming=True, show_progress=False)
    assert trainer.state.step == 6
    trainer.close()


# --------------------------------------------------------------------------------- 4. disk full
def test_a_full_disk_is_one_clear_line_and_the_previous_save_stays(digits_dir, tmp_path, monkeypatch, capsys):
    import difftune.checkpoint.state as state

    calls = []
    real = state.save_file

    def filling_up(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) >= 2:  # from the second save (step 4) on, its first file already does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(state, "save_file", filling_up)
    run = tmp_path / "run"
    config_file = write_config(tmp_path / "c.toml", quick_config_dict(digits_dir, run, train={"max_steps": 6},
                                                                      output=SAVING, validation=NO_VALIDATION))
    assert main(["train", str(config_file), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no space left on the device of ")
    previous = run / "checkpoints" / "step-000002"
    size = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file() and f.name != MANIFEST)
    assert f"'{run / 'checkpoints'}' while saving step-000004" in err
    assert "(the size of the previous save, step-000002)" in err and "the previous save step-000002 is intact" in err
    from difftune.checkpoint.state import format_bytes

    assert f"a save needs about {format_bytes(size)}" in err
    assert verify_save(previous) is None and leftovers(run) == []
    assert not (run / "checkpoints" / "step-000004").exists()
    with pytest.raises(DiskFullError, match="it had written .* when the disk filled.*no earlier save exists"):
        train(validate_config(quick_config_dict(digits_dir, tmp_path / "again", train={"max_steps": 4},
                                                output=SAVING, validation=NO_VALIDATION), "t"), show_progress=False)


# ------------------------------------------------------------------------ 5. schedule-free resume
def test_schedule_free_validation_and_saves_leave_the_training_weights_untouched(quick_config):
    """eval()/train() of a schedule-free optimizer interpolate, which does not round-trip in floating
    point; the trainer must give the exact training weights back (resume exactness rests on it)."""
    config = quick_config(train={"batch_size": 2}, optimizer={"name": "adamw_schedulefree"})
    trainer = Trainer(config, show_progress=False)
    groups = trainer.step_groups()
    for _ in range(2):
        trainer.optimizer_step(next(groups))
        trainer.state.step += 1
    before = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}
    for _ in range(3):
        trainer.validate()
    after = trainer.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.close()


# ------------------------------------------------------------------------------------- 6. smaller
def test_resume_keeps_wall_time_and_tensorboard_shows_each_step_once(quick_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = quick_config(train={"max_steps": 4}, output={**SAVING, "tensorboard": True})
    train(config, show_progress=False)
    run = Path(config.output.dir)
    at_step_2 = json.loads((run / "checkpoints/step-000002/training_state/trainer_state.json").read_text())
    assert at_step_2["elapsed_seconds"] > 0
    shutil.rmtree(run / "checkpoints" / "final")  # as if killed after the step-2 save
    time.sleep(0.05)
    summary = train(config, resume=run, show_progress=False)
    assert summary["wall_seconds"] > at_step_2["elapsed_seconds"]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_exports_and_state_files_follow_the_umask(quick_config):
    old = os.umask(0o022)
    try:
        config = quick_config(network={"type": "lora", "rank": 2}, train={"max_steps": 1},
                              output={"lora_format": "both"}, validation=NO_VALIDATION)
        train(config, show_progress=False)
    finally:
        os.umask(old)
    files = [p for p in Path(config.output.dir).rglob("*") if p.is_file() and p.name != LOCK_FILE]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_a_diverged_run_writes_its_summary_and_plots(quick_config):
    config = quick_config(train={"max_steps": 30, "lr": 10.0}, output={"save_every_n_steps": 1},
                          validation=NO_VALIDATION)
    with pytest.raises(TrainingDiverged) as err:
        train(config, show_progress=False)
    run = Path(config.output.dir)
    summary = json.loads((run / "summary.json").read_text())
    step = err.value.step
    assert summary["status"] == "diverged" and summary["diverged"]["step"] == step > 1
    assert summary["diverged"]["last_good_checkpoint"] == str(run / "checkpoints" / f"step-{step - 1:06d}")
    assert (run / "plots" / "loss.png").is_file()


def test_a_refused_pickle_says_it_is_unsafe_and_how_to_convert(tmp_path):
    from difftune.config.schema import ModelConfig
    from difftune.models import load_model

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(SingleFileError, match=r"refused as unsafe.*could run code.*\.safetensors.*st\.save_file"):
        load_model(ModelConfig(path=str(tmp_path / "evil.ckpt")))
    assert not marker.exists()


def test_captions_longer_than_the_text_encoder_reads_are_warned_once(tmp_path, digits_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    images = sorted(digits_dir.rglob("*.png"))[:4]
    for i, image in enumerate(images):
        shutil.copy(image, folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a digit " + ("very long words " * 10 if i < 3 else ""))
    config = validate_config(quick_config_dict(folder, tmp_path / "run", data={"val_split": 0.0}), "test")
    trainer = Trainer(config, show_progress=False)
    notes = [n for n in trainer.notes if "longer than the text encoder's 77 tokens" in n]
    trainer.close()
    assert len(notes) == 1 and notes[0].startswith("3 of 4 captions")


def test_an_image_the_square_crop_mostly_cuts_away_is_warned_about(tmp_path):
    from difftune.training.plan import make_plan

    folder = tmp_path / "data"
    folder.mkdir()
    for name, size in (("wide", (90, 16)), ("ok", (32, 16)), ("edge", (64, 16))):
        Image.new("RGB", size, "gray").save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(name)
    plan = make_plan(validate_config(quick_config_dict(folder, tmp_path / "run"), "test"))
    cut = [w for w in plan.warnings if "to the square crop" in w]
    assert len(cut) == 1 and cut[0].startswith("1 image(s) lose more than 75%") and "wide.png (90x16" in cut[0]


def test_a_sub_folder_another_process_holds_is_refused_inside_a_folder_this_one_holds(tmp_path):
    """auto/find-steps on `out` while another process resumes `out/find-steps`: the sub-run must not
    overwrite the other run's files."""
    sub = tmp_path / "out" / "find-steps"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from difftune.training.run_lock import lock_run_dir; "
         f"lock_run_dir({str(sub)!r}, 'train'); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with lock_run_dir(tmp_path / "out", "auto"):
            with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
                lock_run_dir(sub, "find-steps")
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_is_recognised_however_the_writer_reports_it(tmp_path):
    from safetensors import SafetensorError

    from difftune.checkpoint.state import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert is_disk_full(SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                        'message: "No space left on device" })'), tmp_path)
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed "
                                     "writing file data/3: file write failed, No space left on device"), tmp_path)
    assert not is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/3"), tmp_path)  # space left
    assert not is_disk_full(ValueError("shape mismatch"), tmp_path)


def test_a_forked_data_worker_does_not_keep_the_run_directory_locked(tmp_path):
    """A DataLoader worker inherits the lock's descriptor; it closes its copy, so the lock goes with the
    trainer (a worker that outlives a kill -9 by a few seconds would otherwise block the resume)."""
    import multiprocessing

    from difftune.training import run_lock

    lock = lock_run_dir(tmp_path / "run")
    fd = run_lock._held[(tmp_path / "run").resolve()].fd
    context = multiprocessing.get_context("fork")
    result = context.Queue()

    def child():
        run_lock.close_inherited_locks(0)
        try:
            os.fstat(fd)
            result.put("open")
        except OSError:
            result.put("closed")

    worker = context.Process(target=child)
    worker.start()
    worker.join(30)
    assert result.get(timeout=10) == "closed"
    os.fstat(fd)  # the parent still holds its lock
    lock.release()


def test_loader_workers_train_the_same_and_release_the_lock(quick_config, tmp_path):
    losses = []
    for workers in (0, 1):
        config = quick_config(train={"max_steps": 3}, data={"num_workers": workers},
                              output={"dir": str(tmp_path / f"w{workers}")})
        losses.append(train(config, show_progress=False)["final_val_loss"])
        assert not (tmp_path / f"w{workers}" / LOCK_FILE).exists()
    assert losses[0] == losses[1]
