"""One process per run directory: an exclusive lock held for the life of a run.

Two trainers writing one `output.dir` would interleave their metrics and prune each other's saves.
The lock is an `flock` on `<dir>/.difftune.lock`; the kernel releases it when its process ends in any
way (exit, crash, kill -9), so a lock file whose lock can be taken belongs to a dead process: it is
taken over, and the caller is told whose it was. The file holds the holder's PID, host, command and
start time, so a refusal can name them.

Within one process locks nest: `auto` holds its `output.dir` while its find-lr / find-steps runs
lock their sub-folders too (another process may be resuming a run there), and a run inside a folder
another process holds is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from difftune.errors import RunLockedError

LOCK_FILE = ".difftune.lock"

_held: dict[Path, _Hold] = {}
"""Run directories this process holds (resolved path → open lock), for nesting."""


@dataclass
class _Hold:
    fd: int
    count: int = 1


@dataclass
class RunLock:
    """A held lock on `root`; `release()` (or leaving the `with` block) gives it back."""

    root: Path
    took_over: str | None = None
    """Who held the lock before when that process had died (a message for the user), else None."""
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        hold = _held.get(self.root)
        if hold is None:
            return
        hold.count -= 1
        if hold.count == 0:
            del _held[self.root]
            try:
                os.ftruncate(hold.fd, 0)  # still holding it: nobody reads a half-cleared file
                (self.root / LOCK_FILE).unlink(missing_ok=True)
            except OSError:
                pass
            os.close(hold.fd)  # releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(root: str | Path, command: str = "train") -> RunLock:
    """Take the exclusive lock on run directory `root` (created if missing) or raise RunLockedError.

    Nested calls in one process on the same folder, or on a folder inside one it holds, succeed.
    """
    root = Path(root).expanduser().resolve()
    if root in _held:
        _held[root].count += 1
        return RunLock(root)
    # Inside a folder this process holds (auto's find-lr/), the sub-folder's own lock is still taken:
    # another process may be resuming a run there.
    _refuse_if_parent_locked(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise RunLockedError(
                f"output.dir = '{root}' is in use by another difftune process ({holder}); two runs in one folder "
                "would mix their metrics and checkpoints. Wait for it to finish, stop it, or choose another output.dir"
            ) from None
        # The previous holder may have removed the file between our open and our lock: then we hold a
        # lock on a file nobody else can see. Retry on the current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_holder(fd)
    took_over = None
    if previous and previous.get("pid") != os.getpid():
        took_over = (f"took over the lock of an earlier difftune process on '{root}' that ended without releasing "
                     f"it (killed or crashed: {_describe(previous)})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder(command)).encode(), 0)
    _held[root] = _Hold(fd)
    return RunLock(root, took_over=took_over)


def _refuse_if_parent_locked(root: Path) -> None:
    """A folder inside another process's run directory belongs to that run (e.g. auto's find-lr/)."""
    for parent in root.parents:
        path = parent / LOCK_FILE
        if parent in _held or not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            raise RunLockedError(
                f"output.dir = '{root}' is inside '{parent}', which another difftune process is using ({holder}); "
                "choose an output.dir outside it"
            ) from None
        finally:
            os.close(fd)


def _holder(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "argv": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "PID unknown"
    return (f"PID {holder.get('pid')} on {holder.get('host')}, `difftune {holder.get('command')}` "
            f"started {holder.get('started')}")


def close_inherited_locks(_worker_id: int | None = None) -> None:
    """In a forked child (a DataLoader worker), drop its copies of the lock descriptors: a lock is only
    released when every copy is closed, so a worker that outlives a killed trainer for a few seconds
    would otherwise keep the run directory locked. The parent's lock stays held."""
    for hold in _held.values():
        try:
            os.close(hold.fd)
        except OSError:
            pass
    _held.clear()
