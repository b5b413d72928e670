"""Run a training script or module in this process, recording when each optimizer step ends and the
process's peak memory, the same way for every tool bench/throughput.py compares.

    python bench/step_clock.py RECORD.json SCRIPT.py ARGS...
    python bench/step_clock.py RECORD.json -m MODULE ARGS...

A global optimizer step post-hook (torch.optim.optimizer.register_optimizer_step_post_hook) stamps
time.perf_counter() after every step of every torch optimizer, so neither tool's own progress output
is parsed; the stamps of the optimizer that stepped most are the training loop's. Both tools read a loss back to the host each step, so on a GPU the host cannot run more
than about a step ahead and the stamps follow the device. At exit RECORD.json gets the stamps, the
CUDA allocator's peak (allocated and reserved, the figures `nvidia-smi` approaches) when CUDA was
used, and the peak resident set size.
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set. /proc's VmHWM starts afresh at exec; getrusage's ru_maxrss
    does not (Linux keeps the larger of the parent's), so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    record, target, rest = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: dict[int, list[float]] = {}  # per optimizer: a tool may step a throwaway one (difftune's
    # memory estimate steps AdamW on a dummy tensor once after training); the training one steps most
    register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: stamps.setdefault(id(optimizer), []).append(time.perf_counter()))
    started = time.perf_counter()
    try:
        if target == "-m":
            sys.argv = [rest[0], *rest[1:]]
            runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *rest]
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
    finally:
        facts = {"started": started, "step_ends": max(stamps.values(), key=len, default=[]),
                 "max_rss_mb": peak_rss_mb()}
        if torch.cuda.is_initialized():
            facts["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            facts["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        record.write_text(json.dumps(facts))


if __name__ == "__main__":
    main()
