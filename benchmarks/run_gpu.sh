#!/usr/bin/env bash
# One script for a GPU machine without network: install, check the kernels on the GPU, benchmark.
# Logs and JSON go to $OUT (or ./gpu_out); the last thing printed is the benchmark table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
TRITON_INTERPRET=0 timeout 300 python -m pytest -q tests/test_losses_cuda.py tests/test_upsampled.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5
TRITON_INTERPRET=0 timeout 400 python benchmarks/bench_entropy.py ${BENCH_ARGS:-} --json "$OUT/bench_entropy.json" 2>&1 | tee "$OUT/bench_entropy.md"
TRITON_INTERPRET=0 timeout 200 python benchmarks/bench_upsampled.py --quick --json "$OUT/bench_upsampled.json" 2>&1 | tee "$OUT/bench_upsampled.md"
