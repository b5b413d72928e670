"""Fault injection: kill a training run with SIGKILL at random moments, resume it, and check nothing is lost.

One uninterrupted `difftune train` of the built-in tiny model is the reference (its final weights,
metrics.jsonl and wall time). Then a second run of the same config, in a fresh output dir, is killed
with SIGKILL at a random moment, resumed with `difftune train CONFIG --resume RUN_DIR`, killed again,
and so on until `--kills` kills have happened; the last resume runs to completion. Every random choice
comes from one seeded RNG (`--seed`). Each kill is one of:

- start-up (a share `--startup-kill-share`): after a delay drawn uniformly over the reference's
  start-up time (process start to its first printed line: imports, model load, and for a resume,
  restoring the saved state);
- save (a share `--save-kill-share`): the script polls `checkpoints/` every 5 ms for a new `.tmp-*`
  folder (a save being written), picks one of the saves the attempt will write in its window (below),
  and kills a random time after that folder appears (uniform over the reference's median save
  duration), so the kill lands inside a save on purpose;
- training (the rest): once the attempt has printed its first line (the end of its start-up), after
  a delay drawn uniformly over the window's training time (reference seconds per step after its
  start-up, x window steps).

The window paces the kills over the whole run: with R steps left and k kills to go it is
max(2 x save_every, ceil(2 R / k)) steps (at most R), so the run advances about R / k steps per kill
instead of finishing after a few kills and taking the rest of them on an already finished run. Where
a kill actually landed is measured, not assumed: "save" if a `.tmp-*`/`.old-*` entry that this
attempt made exists at the kill, else "start-up" if the run had not yet printed its first line
(printed once the model is loaded and a resume has restored its state), else "training".

A kill before the first save leaves no resumable checkpoint: the run is then started fresh with
`--set output.overwrite=true` (no `--resume`), counted as a restart. A resume that exits non-zero by
itself (refused) is recorded with its exit code and stderr, and the run is then started fresh the
same way (counted separately), so the series can go on; nothing is retried silently.

At the end the final run dir is compared with the reference:
- every tensor of every `.safetensors` under `checkpoints/final/` (the diffusers export or the LoRA
  file, and training_state/trainable.safetensors) with torch.equal, the number that differ and the
  max abs difference;
- metrics.jsonl: the same step numbers once each, the same loss (and every other field) per step;
- leftover bytes: every `.tmp-*` / `.old-*` file or folder anywhere under the run dir, plus the
  `step-N` checkpoints beyond `output.save_last_n`.

    python bench/fault_injection.py [--kills 20] [--seed 0] [--steps 100] [--network none|lora]
                                    [--repeats 1] [--save-kill-share 0.35] [--startup-kill-share 0.2]
                                    [--out NAME]

Writes bench/results/fault_injection.json and .md (or NAME.json/.md); run dirs and per-attempt logs
stay under bench/work/fault_injection/ (gitignored). Every training process runs with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "work" / "fault_injection"
POLL_S = 0.005
"""How often a running attempt's checkpoints/ folder is looked at (and how fine save durations are measured)."""
RESUMED_AT = re.compile(r"resuming at step (\d+)")
ANNOUNCE = re.compile(r"^difftune \S+: ", re.M)
"""The line a run prints once its model is loaded and a resume has restored its state: the end of start-up."""


# ------------------------------------------------------------------------------------------ setup
def difftune_command() -> list[str]:
    script = Path(sys.executable).with_name("difftune")
    if script.is_file():
        return [str(script)]
    found = shutil.which("difftune")
    if not found:
        sys.exit("the `difftune` command was not found next to this python or on PATH (pip install -e .)")
    return [found]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    return env


def make_dataset(work: Path) -> Path:
    from difftune.demo import export_digits

    data = work / "data"
    folder = data / "2_digits"
    if not folder.is_dir() or not any(folder.glob("*.png")):
        shutil.rmtree(data, ignore_errors=True)
        export_digits(folder, size=16, limit=48)
    return data


def config_text(data: Path, run_dir: Path, args) -> str:
    """The quick tiny-model config of tests/conftest.py, longer and with frequent, pruned saves."""
    network = '\n[network]\ntype = "lora"\nrank = 4\nalpha = 4\n' if args.network == "lora" else ""
    return f"""# written by bench/fault_injection.py
[model]
path = "tiny-sd"

[data]
train_dir = {json.dumps(str(data))}
resolution = 16
val_split = 0.25
{network}
[train]
batch_size = 4
lr = 1e-3
max_steps = {args.steps}
seed = 7

[validation]
every_n_steps = {args.validate_every}
seed = 11
batch_size = 16

[output]
dir = {json.dumps(str(run_dir))}
tensorboard = false
save_every_n_steps = {args.save_every}
save_last_n = {args.save_last_n}
"""


# ------------------------------------------------------------------------------------- inspection
def tree_size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_size
        except FileNotFoundError:
            return 0
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += (Path(dirpath) / f).lstat().st_size
            except FileNotFoundError:
                pass
    return total


def scratch_entries(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.startswith((".tmp-", ".old-")))


def listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def intact_saves(checkpoints: Path) -> dict[str, int]:
    """Visible checkpoint folders holding a readable trainer_state.json → their step (what could be resumed)."""
    saves = {}
    for name in listdir(checkpoints):
        state = checkpoints / name / "training_state" / "trainer_state.json"
        if name.startswith(".") or not state.is_file():
            continue
        try:
            saves[name] = int(json.loads(state.read_text())["step"])
        except (ValueError, KeyError, OSError):
            continue
    return saves


def read_metrics_lines(path: Path) -> tuple[list[dict], list[str]]:
    """(records, lines that are not valid JSON objects)."""
    records, bad = [], []
    if not path.is_file():
        return records, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(line)
    return records, bad


def leftovers(run_dir: Path, save_last_n: int) -> dict[str, Any]:
    scratch = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        for name in sorted(dirnames + filenames):
            if name.startswith((".tmp-", ".old-")):
                path = Path(dirpath) / name
                scratch.append({"path": str(path.relative_to(run_dir)), "bytes": tree_size(path)})
        dirnames[:] = [d for d in dirnames if not d.startswith((".tmp-", ".old-"))]
    checkpoints = run_dir / "checkpoints"
    steps = sorted(
        (int(m.group(1)), name) for name in listdir(checkpoints)
        if (m := re.fullmatch(r"step-(\d+)", name)) and (checkpoints / name).is_dir()
    )
    excess = [{"path": f"checkpoints/{name}", "bytes": tree_size(checkpoints / name)}
              for _, name in (steps[:-save_last_n] if save_last_n > 0 else steps)]
    scratch_bytes = sum(e["bytes"] for e in scratch)
    excess_bytes = sum(e["bytes"] for e in excess)
    return {
        "scratch_entries": scratch, "scratch_bytes": scratch_bytes,
        "excess_checkpoints": excess, "excess_checkpoint_bytes": excess_bytes,
        "leftover_bytes": scratch_bytes + excess_bytes,
        "checkpoints_listing": sorted(listdir(checkpoints)),
    }


def compare_weights(reference: Path, candidate: Path) -> dict[str, Any]:
    """Every tensor of every .safetensors under the two final/ folders, with torch.equal."""
    import torch
    from safetensors.torch import load_file

    ref_files = sorted(p.relative_to(reference) for p in reference.rglob("*.safetensors"))
    cand_files = sorted(p.relative_to(candidate) for p in candidate.rglob("*.safetensors")) if candidate.is_dir() else []
    out: dict[str, Any] = {
        "files_compared": [], "missing_files": [str(p) for p in ref_files if p not in cand_files],
        "extra_files": [str(p) for p in cand_files if p not in ref_files],
        "tensors_compared": 0, "tensors_differing": 0, "missing_tensors": 0, "extra_tensors": 0,
        "max_abs_diff": 0.0, "differing_examples": [],
    }
    for rel in ref_files:
        if rel not in cand_files:
            continue
        a, b = load_file(reference / rel), load_file(candidate / rel)
        out["files_compared"].append(str(rel))
        out["missing_tensors"] += len(a.keys() - b.keys())
        out["extra_tensors"] += len(b.keys() - a.keys())
        for key in sorted(a.keys() & b.keys()):
            x, y = a[key], b[key]
            out["tensors_compared"] += 1
            if torch.equal(x, y):
                continue
            out["tensors_differing"] += 1
            if x.shape != y.shape:
                diff = None
            else:
                diff = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
                out["max_abs_diff"] = max(out["max_abs_diff"], diff)
            if len(out["differing_examples"]) < 10:
                out["differing_examples"].append({"file": str(rel), "tensor": key, "max_abs_diff": diff,
                                                  "shapes": [list(x.shape), list(y.shape)]})
    out["bit_identical"] = bool(
        ref_files and not out["missing_files"] and not out["extra_files"] and not out["missing_tensors"]
        and not out["extra_tensors"] and out["tensors_differing"] == 0
    )
    return out


def compare_metrics(reference: Path, candidate: Path) -> dict[str, Any]:
    ref, ref_bad = read_metrics_lines(reference)
    got, bad = read_metrics_lines(candidate)
    ref_steps = [r.get("step") for r in ref]
    got_steps = [r.get("step") for r in got]
    by_step: dict[Any, list[dict]] = {}
    for r in got:
        by_step.setdefault(r.get("step"), []).append(r)
    missing = [s for s in ref_steps if s not in by_step]
    extra = sorted({s for s in got_steps if s not in set(ref_steps)}, key=str)
    duplicated = sorted({s for s, rs in by_step.items() if len(rs) > 1}, key=str)
    loss_mismatch, field_mismatch = [], []
    for r in ref:
        for g in by_step.get(r.get("step"), []):
            if g.get("loss") != r.get("loss") or g.get("val_loss") != r.get("val_loss"):
                loss_mismatch.append({"step": r.get("step"), "reference": {k: r.get(k) for k in ("loss", "val_loss")},
                                      "run": {k: g.get(k) for k in ("loss", "val_loss")}})
            elif g != r:
                field_mismatch.append({"step": r.get("step"), "reference": r, "run": g})
    return {
        "reference_records": len(ref), "run_records": len(got), "corrupt_lines": len(bad) + len(ref_bad),
        "corrupt_examples": (bad + ref_bad)[:5],
        "same_step_sequence": ref_steps == got_steps,
        "missing_steps": missing, "extra_steps": extra, "duplicated_steps": duplicated,
        "loss_mismatches": len(loss_mismatch), "loss_mismatch_examples": loss_mismatch[:10],
        "other_field_mismatches": len(field_mismatch), "other_field_mismatch_examples": field_mismatch[:5],
        "equal": ref == got and not bad,
    }


# ------------------------------------------------------------------------------------------ runs
class Attempt:
    """One `difftune train` process, watched every POLL_S and optionally killed by a plan."""

    def __init__(self, cmd: list[str], run_dir: Path, log_stem: Path):
        self.cmd, self.run_dir, self.log_stem = cmd, run_dir, log_stem

    def run(self, plan: dict | None, timeout_s: float, watch_saves: bool = False) -> dict[str, Any]:
        checkpoints = self.run_dir / "checkpoints"
        stdout_path, stderr_path = self.log_stem.with_suffix(".out"), self.log_stem.with_suffix(".err")
        seen: set[str] = set()
        save_starts, save_spans, open_saves = 0, [], {}
        first_metrics_s = announced_s = None
        metrics = self.run_dir / "metrics.jsonl"
        scratch0 = set(self._scratch())  # left by an earlier attempt: not a sign that this one is saving
        seen.update(n for n in listdir(checkpoints) if n.startswith(".tmp-"))  # an earlier attempt's, not a new save
        kill_at = plan["delay_s"] if plan and plan["mode"] == "start-up" else None
        killed, hung, at_kill = False, False, None
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, env=child_env(), start_new_session=True)
            while proc.poll() is None:
                now = time.perf_counter() - started
                names = listdir(checkpoints)
                if watch_saves or (plan and plan["mode"] == "save" and kill_at is None):
                    for name in names:
                        if name.startswith(".tmp-") and name not in seen and (checkpoints / name).is_dir():
                            seen.add(name)
                            save_starts += 1
                            open_saves[name] = now
                            if plan and plan["mode"] == "save" and kill_at is None and save_starts >= plan["save_index"]:
                                kill_at = now + plan["delay_s"]
                    for name in [n for n in open_saves if n not in names]:
                        save_spans.append(now - open_saves.pop(name))
                if watch_saves and first_metrics_s is None and metrics.is_file() and metrics.stat().st_size > 0:
                    first_metrics_s = now
                if announced_s is None and (watch_saves or (plan and plan["mode"] == "training")):
                    if ANNOUNCE.search(stdout_path.read_text(errors="replace")):
                        announced_s = now
                        if plan and plan["mode"] == "training":
                            kill_at = now + plan["delay_s"]  # counted from this attempt's own end of start-up
                if kill_at is not None and now >= kill_at:
                    at_kill = self._snapshot(now, stdout_path, scratch0)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed = proc.returncode == -signal.SIGKILL
                    break
                if now > timeout_s:
                    at_kill = self._snapshot(now, stdout_path, scratch0)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    hung = True
                    break
                time.sleep(POLL_S)
            wall = time.perf_counter() - started
        stdout = stdout_path.read_text(errors="replace")
        resumed = RESUMED_AT.search(stdout)
        result = {
            "command": shlex.join(self.cmd), "exit_code": proc.returncode, "wall_s": wall,
            "killed": killed, "hung": hung, "plan": plan, "at_kill": at_kill,
            "resumed_at_step": int(resumed.group(1)) if resumed else None,
            "warnings": [line for line in stdout.splitlines() if line.startswith("warning:")],
            "log": str(stdout_path.relative_to(ROOT.parent)) if stdout_path.is_relative_to(ROOT.parent) else str(stdout_path),
        }
        if not killed and not hung and proc.returncode != 0:
            result["stderr"] = stderr_path.read_text(errors="replace")[-4000:]
        if watch_saves:
            result["first_metrics_line_s"] = first_metrics_s
            result["announced_s"] = announced_s
            result["save_spans_s"] = save_spans
            result["saves_seen"] = save_starts
        return result

    def _scratch(self) -> list[str]:
        """.tmp-*/.old-* entries anywhere in the run dir, as paths relative to it."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.run_dir):
            rel = Path(dirpath).relative_to(self.run_dir)
            found += [str(rel / n) for n in scratch_entries(dirnames + filenames)]
            dirnames[:] = [d for d in dirnames if not d.startswith((".tmp-", ".old-"))]
        return sorted(found)

    def _snapshot(self, now: float, stdout_path: Path, scratch0: set[str]) -> dict[str, Any]:
        """Where the kill lands: a save (a scratch entry this attempt made is present), start-up (before
        the run's first printed line) or training."""
        scratch = self._scratch()
        new = [n for n in scratch if n not in scratch0]
        announced = ANNOUNCE.search(stdout_path.read_text(errors="replace")) is not None
        saving = [n for n in new if n.startswith("checkpoints/")]
        phase = "save" if saving else ("training" if announced else "start-up")
        return {"t_s": now, "phase": phase, "new_scratch_entries": new, "older_scratch_entries": sorted(scratch0 & set(scratch))}


def plan_kill(rng: random.Random, args, ref: dict, resume_from: int, kills_left: int) -> dict:
    """Where the next kill should land (see the module docstring); `resume_from` is the newest intact save."""
    remaining = max(args.steps - resume_from, 0)
    window = min(remaining, max(2 * args.save_every, math.ceil(2 * remaining / kills_left)))
    plan: dict[str, Any] = {"resume_from": resume_from, "window_steps": window}
    u = rng.random()
    if u < args.save_kill_share:
        saves = [s for s in range(resume_from + 1, resume_from + window + 1) if s % args.save_every == 0 and s < args.steps]
        if resume_from + window >= args.steps:
            saves.append(args.steps)  # the final save (re-saved by the resume of a finished run)
        plan |= {"mode": "save", "save_index": rng.randint(1, max(len(saves), 1)),
                 "delay_s": rng.uniform(0.0, ref["save_s"])}
        plan["target_save_step"] = saves[plan["save_index"] - 1] if saves else None
    elif u < args.save_kill_share + args.startup_kill_share:
        plan |= {"mode": "start-up", "delay_s": rng.uniform(0.0, ref["startup_s"])}
    else:
        plan |= {"mode": "training", "delay_s": rng.uniform(0.0, window * ref["step_s"])}
    return plan


def run_reference(cli: list[str], config: Path, run_dir: Path, logs: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    attempt = Attempt([*cli, "train", str(config), "--no-progress"], run_dir, logs / "reference")
    result = attempt.run(None, timeout_s=3600, watch_saves=True)
    if result["exit_code"] != 0:
        sys.exit(f"the uninterrupted reference run failed (exit {result['exit_code']}):\n{result.get('stderr', '')}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return result | {"summary_wall_seconds": summary["wall_seconds"], "steps": summary["steps"]}


def fault_series(cli: list[str], config: Path, run_dir: Path, logs: Path, args, ref: dict, rng: random.Random,
                 reference_dir: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    fresh = [*cli, "train", str(config), "--no-progress"]
    restart = [*fresh, "--set", "output.overwrite=true"]
    resume = [*cli, "train", str(config), "--resume", str(run_dir), "--no-progress"]
    timeout = 20 * ref["wall_s"] + 60
    attempts: list[dict] = []
    kills = 0
    next_kind, cmd = "fresh", fresh
    aborted = None
    while True:
        final = kills >= args.kills
        if len(attempts) > 4 * args.kills + 20:
            aborted = "too many attempts without reaching the kill count"
            break
        saves_before = intact_saves(run_dir / "checkpoints")
        resume_from = max(saves_before.values()) if next_kind == "resume" and saves_before else 0
        plan = None if final else plan_kill(rng, args, ref, resume_from, args.kills - kills)
        result = Attempt(cmd, run_dir, logs / f"attempt-{len(attempts):03d}").run(plan, timeout)
        result |= {"index": len(attempts), "kind": next_kind, "final_attempt": final,
                   "intact_saves_before": saves_before}
        attempts.append(result)
        refused = not result["killed"] and not result["hung"] and result["exit_code"] != 0
        if result["killed"]:
            outcome = f"KILLED at {result['at_kill']['t_s']:.2f}s in {result['at_kill']['phase']}"
        else:
            outcome = "HUNG" if result["hung"] else f"exit {result['exit_code']} after {result['wall_s']:.2f}s"
        print(f"  attempt {result['index']:3d} {next_kind:7s} " + (f"{plan['mode']:8s} kill " if plan else "final         ")
              + outcome + (f" (resumed at step {result['resumed_at_step']})" if result["resumed_at_step"] is not None else ""),
              flush=True)
        if result["hung"]:
            aborted = f"attempt {result['index']} ran past {timeout:.0f}s and was killed"
            break
        if result["killed"]:
            kills += 1
        elif refused and next_kind != "resume":
            aborted = f"a fresh start (attempt {result['index']}) exited {result['exit_code']} by itself"
            break
        elif not refused and final:
            break
        # what comes next: resume if any intact save is on disk, else start over
        if refused:
            next_kind, cmd = "restart-after-refusal", restart
        elif intact_saves(run_dir / "checkpoints"):
            next_kind, cmd = "resume", resume
        else:
            next_kind, cmd = "restart", restart
    return summarise_series(attempts, kills, aborted, run_dir, reference_dir, args)


def summarise_series(attempts: list[dict], kills: int, aborted: str | None, run_dir: Path, reference_dir: Path,
                     args) -> dict[str, Any]:
    follow_ups = attempts[1:]  # every attempt after the first follows a kill or a refusal
    resumes = [a for a in follow_ups if a["kind"] == "resume"]
    refused = [a for a in resumes if not a["killed"] and not a["hung"] and a["exit_code"] != 0]
    killed = [a for a in attempts if a["killed"]]
    phases = {p: sum(a["at_kill"]["phase"] == p for a in killed) for p in ("start-up", "training", "save")}
    last = attempts[-1] if attempts else {}
    finished = bool(last) and last["exit_code"] == 0 and not last["killed"]
    return {
        "kills": kills,
        "kills_by_aim": {m: sum(a["plan"]["mode"] == m for a in killed) for m in ("start-up", "training", "save")},
        "kills_by_phase": phases,
        "kills_inside_a_save": [{"attempt": a["index"], "entries": a["at_kill"]["new_scratch_entries"]}
                                for a in killed if a["at_kill"]["phase"] == "save"],
        "kills_inside_another_atomic_write": [{"attempt": a["index"], "entries": a["at_kill"]["new_scratch_entries"]}
                                              for a in killed if a["at_kill"]["phase"] != "save"
                                              and a["at_kill"]["new_scratch_entries"]],
        "resumes_attempted": len(resumes),
        "resumes_accepted": len(resumes) - len(refused),
        "resumes_that_loaded_state": sum(a["resumed_at_step"] is not None for a in resumes),
        "restarts": sum(a["kind"] == "restart" for a in follow_ups),
        "restarts_after_refusal": sum(a["kind"] == "restart-after-refusal" for a in follow_ups),
        "refused_resumes": [{"attempt": a["index"], "exit_code": a["exit_code"], "stderr": a.get("stderr", ""),
                             "intact_saves_before": a["intact_saves_before"]} for a in refused],
        "warnings_cleaned_up": sum("cleaned up" in w for a in attempts for w in a["warnings"]),
        "warnings_lock_taken_over": sum("took over the lock" in w for a in attempts for w in a["warnings"]),
        "completed_before_planned_kill": sum(a["plan"] is not None and a["exit_code"] == 0 and not a["killed"]
                                             for a in attempts),
        "attempts": len(attempts),
        "aborted": aborted,
        "finished": finished,
        "final_attempt_kind": last.get("kind"),
        "last_attempt_resumed_at_step": last.get("resumed_at_step"),
        "total_wall_s": sum(a["wall_s"] for a in attempts),
        "weights": compare_weights(reference_dir / "checkpoints" / "final", run_dir / "checkpoints" / "final"),
        "metrics": compare_metrics(reference_dir / "metrics.jsonl", run_dir / "metrics.jsonl"),
        "leftover": leftovers(run_dir, args.save_last_n),
        "attempt_log": attempts,
    }


def code_provenance() -> dict[str, Any]:
    """Which code was killed: the commit, the files of src/ that differ from it, and a hash of src/ as run."""
    import hashlib

    repo = ROOT.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    digest = hashlib.sha256()
    for path in sorted((repo / "src").rglob("*.py")):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"git_head": git("rev-parse", "HEAD"), "src_changes_vs_head": git("status", "--porcelain", "--", "src").splitlines(),
            "src_sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    ref = report["reference"]
    s = report["settings"]
    lines = [
        "# Fault injection: SIGKILL at random moments, then resume (bench/fault_injection.py)", "",
        f"Command: `{report['command']}`", "",
        f"tiny-sd, network {s['network']}, {s['steps']} steps, batch 4, 16 px, validation every "
        f"{s['validate_every']} steps, a save every {s['save_every']} steps, save_last_n {s['save_last_n']}; "
        f"{s['kills']} kills per series, aimed with shares {s['save_kill_share']} at saves, {s['startup_kill_share']} "
        f"at start-up, the rest at training; seed {s['seed']}; "
        f"OMP_NUM_THREADS=1, {report['environment']['cpu_count']} CPUs. Code: commit "
        f"{report['environment']['code']['git_head'][:12]}, {len(report['environment']['code']['src_changes_vs_head'])} "
        f"files of src/ changed vs that commit, src sha256 {report['environment']['code']['src_sha256'][:16]}.",
        f"Reference (uninterrupted) run: {ref['wall_s']:.2f} s wall, start-up {ref['startup_s']:.2f} s (to its first "
        f"printed line; first metrics record at {ref['first_metrics_line_s']:.2f} s), "
        f"{ref['saves_seen']} saves seen, median save "
        f"{ref['save_s'] * 1000:.1f} ms (polled every {POLL_S * 1000:.0f} ms); leftover bytes "
        f"{ref['leftover']['leftover_bytes']}.", "",
        "| series | kills | landed in start-up / training / save (aimed) | resumes accepted / attempted (of them got past start-up) | restarts "
        "| refused resumes | last attempt resumed at step | final weights bit-identical | tensors differing / compared "
        "| max abs diff | metrics equal | metrics mismatches | leftover bytes (scratch + excess ckpt) | attempts | wall s |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | --- | --- | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for i, r in enumerate(report["series"]):
        w, m, lo, ph, aim = r["weights"], r["metrics"], r["leftover"], r["kills_by_phase"], r["kills_by_aim"]
        mism = (f"missing {len(m['missing_steps'])}, extra {len(m['extra_steps'])}, duplicated "
                f"{len(m['duplicated_steps'])}, loss {m['loss_mismatches']}, other {m['other_field_mismatches']}, "
                f"corrupt lines {m['corrupt_lines']}")
        lines.append(
            f"| {i} | {r['kills']} | {ph['start-up']} / {ph['training']} / {ph['save']} "
            f"({aim['start-up']} / {aim['training']} / {aim['save']}) | "
            f"{r['resumes_accepted']} / {r['resumes_attempted']} ({r['resumes_that_loaded_state']}) | {r['restarts']} | "
            f"{len(r['refused_resumes'])} | {r['last_attempt_resumed_at_step'] if r['last_attempt_resumed_at_step'] is not None else '-'} | "
            f"{'yes' if w['bit_identical'] else 'NO'} | {w['tensors_differing']} / {w['tensors_compared']} | "
            f"{w['max_abs_diff']:g} | {'yes' if m['equal'] else 'NO'} | {mism} | "
            f"{lo['leftover_bytes']} ({lo['scratch_bytes']} + {lo['excess_checkpoint_bytes']}) | {r['attempts']} | "
            f"{r['total_wall_s']:.1f} |"
        )
    t = report["totals"]
    lines += ["", f"Totals: {t['kills']} kills, {t['resumes_accepted']}/{t['resumes_attempted']} resumes accepted, "
              f"{t['restarts']} restarts, {t['refused_resumes']} refused resumes, {t['restarts_after_refusal']} restarts "
              f"after a refusal, {t['bit_identical_series']}/{t['series']} series bit-identical, "
              f"{t['metrics_equal_series']}/{t['series']} with equal metrics, {t['leftover_bytes']} leftover bytes."]
    for i, r in enumerate(report["series"]):
        lines += ["", f"Series {i}: {len(r['kills_inside_a_save'])} kills with this attempt's checkpoint `.tmp-*` folder "
                  f"on disk, {len(r['kills_inside_another_atomic_write'])} during another atomic write (plots, metrics, "
                  f"summary); {r['completed_before_planned_kill']} attempts finished before their planned kill; the "
                  f"runs printed {r['warnings_cleaned_up']} 'cleaned up after an interrupted run' and "
                  f"{r['warnings_lock_taken_over']} 'took over the lock' warnings."]
        if r["aborted"]:
            lines += ["", f"Series {i} aborted: {r['aborted']}"]
        for refusal in r["refused_resumes"]:
            lines += ["", f"Series {i}, attempt {refusal['attempt']}: resume refused, exit {refusal['exit_code']}:", "",
                      "```", refusal["stderr"].rstrip(), "```"]
        for entry in r["leftover"]["scratch_entries"] + r["leftover"]["excess_checkpoints"]:
            lines.append(f"- series {i} leftover: `{entry['path']}` {entry['bytes']} bytes")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per series before the last resume runs to the end")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--steps", type=int, default=100, help="train.max_steps")
    parser.add_argument("--network", choices=["none", "lora"], default="none", help="full fine-tune or LoRA")
    parser.add_argument("--repeats", type=int, default=1, help="independent kill series against one reference")
    parser.add_argument("--save-kill-share", type=float, default=0.35, help="share of kills aimed at a save in progress")
    parser.add_argument("--startup-kill-share", type=float, default=0.2, help="share of kills aimed at start-up")
    parser.add_argument("--save-every", type=int, default=5, help="output.save_every_n_steps")
    parser.add_argument("--save-last-n", type=int, default=2, help="output.save_last_n")
    parser.add_argument("--validate-every", type=int, default=10, help="validation.every_n_steps")
    parser.add_argument("--out", default="fault_injection", help="result name under bench/results/")
    args = parser.parse_args()
    provenance = code_provenance()  # before the runs: the code they ran

    import torch

    import difftune

    cli = difftune_command()
    work = WORK / args.network
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    data = make_dataset(WORK)
    # Both run dirs are named `run`: a LoRA export is named after its output.dir (`run.safetensors`).
    reference_dir, reference_cfg = work / "reference" / "run", work / "reference.toml"
    reference_cfg.write_text(config_text(data, reference_dir, args))

    print(f"reference run ({args.steps} steps, network {args.network}) ...", flush=True)
    ref = run_reference(cli, reference_cfg, reference_dir, logs)
    spans = ref["save_spans_s"]
    ref["save_s"] = statistics.median(spans) if spans else 0.0
    ref["startup_s"] = ref["announced_s"] or ref["first_metrics_line_s"] or 0.0
    ref["step_s"] = max(ref["wall_s"] - ref["startup_s"], 0.0) / args.steps
    ref["leftover"] = leftovers(reference_dir, args.save_last_n)
    print(f"  {ref['wall_s']:.2f}s wall, start-up {ref['startup_s']:.2f}s, {ref['saves_seen']} saves seen, "
          f"median save {ref['save_s'] * 1000:.1f} ms", flush=True)

    series = []
    for repeat in range(args.repeats):
        run_dir, cfg = work / f"faulty-{repeat}" / "run", work / f"faulty-{repeat}.toml"
        cfg.write_text(config_text(data, run_dir, args))
        rng = random.Random(f"fault-injection/{args.seed}/{repeat}")
        print(f"series {repeat}: {args.kills} kills into {run_dir} ...", flush=True)
        series.append(fault_series(cli, cfg, run_dir, logs / f"series-{repeat}", args, ref, rng, reference_dir))
        r = series[-1]
        print(f"  kills {r['kills']}, resumes accepted {r['resumes_accepted']}/{r['resumes_attempted']}, restarts "
              f"{r['restarts']}, refused {len(r['refused_resumes'])}, bit-identical {r['weights']['bit_identical']}, "
              f"metrics equal {r['metrics']['equal']}, leftover bytes {r['leftover']['leftover_bytes']}", flush=True)

    totals = {
        "series": len(series),
        "kills": sum(r["kills"] for r in series),
        "resumes_attempted": sum(r["resumes_attempted"] for r in series),
        "resumes_accepted": sum(r["resumes_accepted"] for r in series),
        "restarts": sum(r["restarts"] for r in series),
        "restarts_after_refusal": sum(r["restarts_after_refusal"] for r in series),
        "refused_resumes": sum(len(r["refused_resumes"]) for r in series),
        "bit_identical_series": sum(r["weights"]["bit_identical"] for r in series),
        "metrics_equal_series": sum(r["metrics"]["equal"] for r in series),
        "leftover_bytes": sum(r["leftover"]["leftover_bytes"] for r in series),
        "aborted_series": sum(r["aborted"] is not None for r in series),
    }
    report = {
        "what": __doc__.split("\n\n")[0],
        "command": shlex.join(["python", "bench/fault_injection.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in ("kills", "seed", "steps", "network", "repeats", "save_kill_share", "startup_kill_share",
                                                    "save_every", "save_last_n", "validate_every")},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "difftune": difftune.__version__, "platform": platform.platform(),
                        "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": "1", "poll_interval_s": POLL_S,
                        "code": provenance},
        "reference": ref,
        "totals": totals,
        "series": series,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
