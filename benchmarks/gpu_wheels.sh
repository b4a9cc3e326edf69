#!/usr/bin/env bash
# Wheels of the project's runtime and test dependencies for the GPU machines (Python 3.12, x86-64, no
# network), for run_gpu.sh to install from when the image lacks one: the project itself installs there
# with --no-deps. Run this where there is network, then carry the folder along:
#     bash benchmarks/gpu_wheels.sh
#     run(command="bash benchmarks/run_gpu.sh", carry=[".gpu-wheels"])
# OpenCV's wheel (about 56 MB) is left out: carried paths may hold 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.gpu-wheels}
mkdir -p "$DEST"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" "numpy<2.3" pyyaml tqdm pillow pytest pytest-xdist
du -sh "$DEST"
