#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image has torch, transformers, accelerate, peft, safetensors,
# torchvision, pyarrow, xxhash, fsspec, ... : ../.library/device/KINDS.md), downloaded here for its
# Python 3.12 into .whl/ (gitignored), for bench/gpu_throughput.sh to install there from `carry`.
# bitsandbytes (~70 MB) stays behind: the GPU benchmarks use torch's AdamW.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl \
    diffusers==0.42.1 lycoris-lora==4.1.3 pytorch-optimizer==4.1.0 prodigyopt==1.1.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    tomli-w==1.2.0 importlib-metadata==10.2.0 zipp==4.1.2 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .whl
