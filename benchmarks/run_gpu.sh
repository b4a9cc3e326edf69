#!/usr/bin/env bash
# One script for a GPU machine without network: install, check the kernels on the GPU, run every
# benchmark (quick settings), in under 10 minutes. Logs, tables (.md) and JSON go to $OUT (default
# ./gpu_out); the most important steps come first, so a cut-off run still leaves them. The last
# thing printed is the summary: test results and the training-step table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export TRITON_INTERPRET=0
export ADVENT_FAST_DATA=${ADVENT_FAST_DATA:-/tmp/advent_fast_data}  # generated data stays out of $OUT
START=$SECONDS
step() { echo "== $1 ($((SECONDS - START)) s)" | tee -a "$OUT/steps.txt"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

step "install"
pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }

step "kernel correctness on the GPU"
timeout 150 python -m pytest -q tests/test_losses_cuda.py tests/test_upsampled.py >"$OUT/pytest_cuda.log" 2>&1
tail -3 "$OUT/pytest_cuda.log"

step "training step (release fp32 / bf16 vs fast path) and 200-iteration loss tracking"
timeout 300 python benchmarks/bench_train_step.py --quick --track 200 --json "$OUT/bench_train_step.json" \
    >"$OUT/bench_train_step.md" 2>"$OUT/bench_train_step.err"

step "fused losses"
timeout 120 python benchmarks/bench_entropy.py ${BENCH_ARGS:---quick} --json "$OUT/bench_entropy.json" \
    >"$OUT/bench_entropy.md" 2>&1

step "evaluation at the release protocol"
timeout 60 python benchmarks/bench_eval.py --quick --json "$OUT/bench_eval.json" >"$OUT/bench_eval.md" 2>&1

step "fused upsample + losses"
timeout 60 python benchmarks/bench_upsampled.py --quick --json "$OUT/bench_upsampled.json" \
    >"$OUT/bench_upsampled.md" 2>&1

step "data pipeline"
timeout 60 python benchmarks/bench_data.py --quick --counts 100 100 10 --json "$OUT/bench_data.json" \
    >"$OUT/bench_data.md" 2>&1

step "training step with torch.compile / CUDA graphs (slow to compile: last)"
timeout 150 python benchmarks/bench_train_step.py --modes advent --variants fast_compile fast_cudagraph \
    --steps 10 --warmup 5 --json "$OUT/bench_train_step_compile.json" \
    >"$OUT/bench_train_step_compile.md" 2>"$OUT/bench_train_step_compile.err"

step "done"
echo
for f in bench_entropy bench_eval bench_upsampled bench_data bench_train_step_compile; do
    echo "-- $f"; grep '^|' "$OUT/$f.md" | tail -6
done
echo "-- tests"; tail -1 "$OUT/pytest_cuda.log"
echo "-- training step"; cat "$OUT/bench_train_step.md"
