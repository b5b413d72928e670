#!/usr/bin/env bash
# Issue 16's GPU run as one command on a lent machine (≤ 8 minutes on an H200, by the estimate in
# bench/results/throughput_gpu.md). Prepare here, once:
#     bash bench/gpu_wheels.sh                          # the packages the machine's image lacks -> .whl/
#     python bench/throughput.py --scripts-only         # copies diffusers' scripts into bench/work/throughput/ref
# then, through the device tool:
#     run(command="bash bench/gpu_throughput.sh", carry=[".whl", "bench/work/throughput/ref"], timeout_s=590)
# Results come back under $OUT: throughput_gpu.{md,json} and every run's log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/work/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, lycoris, datasets; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" || exit 1
timeout 500 python3 bench/throughput.py --device cuda --diffusers /nonexistent "$@" 2>&1 | tee "$OUT/throughput.log"
status=${PIPESTATUS[0]}
cp bench/results/throughput_gpu.* "$OUT/" 2>/dev/null
mkdir -p "$OUT/logs" && cp bench/work/throughput/logs/*.log "$OUT/logs/" 2>/dev/null
exit "$status"
