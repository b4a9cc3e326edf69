#!/usr/bin/env bash
# One script for a GPU machine without network: install, check the kernels and the trainer on the GPU,
# run every benchmark (quick settings), all within $BUDGET seconds (default 560: under the 10 minutes
# of one device call). The most important stages come first and each gets at most the time left, so a
# short budget still leaves those; ONLY="stage names" runs just those stages (e.g. the ones a previous
# call had no time for). Dependencies the machine lacks are installed from .gpu-wheels
# (benchmarks/gpu_wheels.sh) when it was carried along.
#
# Results: each stage's table (NAME.md), errors (NAME.err) and JSON go to $LOGS (default: a new folder
# under /tmp), packed into $OUT/results.tgz after every stage, so a call cut short keeps what ran. $OUT
# (default ./gpu_out) holds only results.tgz, stages.txt and summary.md: the device tool brings back at
# most 8 files. The last thing printed is the summary: test results, then every table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-560}
LOGS=${LOGS:-$(mktemp -d /tmp/advent_fast_gpu.XXXXXX)}
mkdir -p "$OUT" "$LOGS"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1  # tables survive a stage cut short by its limit
export ADVENT_FAST_DATA=${ADVENT_FAST_DATA:-/tmp/advent_fast_data}  # generated data stays out of $OUT
PY=${PYTHON:-python3}  # the device image's python3 holds PyTorch
START=$SECONDS

pack() {  # atomically: a kill mid-way leaves the previous archive
    tar -czf "$OUT/results.tgz.part" -C "$LOGS" . && mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"
    cp "$LOGS/stages.txt" "$OUT/stages.txt" 2>/dev/null
}

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND with stdout in $LOGS/NAME.md and stderr in
# $LOGS/NAME.err, for at most MAX_SECONDS (then SIGTERM, SIGKILL 10 s later) and never past the budget.
stage() {
    local name=$1 limit=$2
    shift 2
    [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]] && return
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        echo "== $name: skipped, budget spent" | tee -a "$LOGS/stages.txt"
        pack
        return
    fi
    local begin=$SECONDS
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.md" 2>"$LOGS/$name.err"
    echo "== $name: exit $? after $((SECONDS - begin)) s (limit $limit s)" | tee -a "$LOGS/stages.txt"
    pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$LOGS/gpu.txt"
# The project installs with --no-deps: what it imports and the image lacks comes from the wheels that
# benchmarks/gpu_wheels.sh prepares (carried as .gpu-wheels), one distribution at a time.
missing=$("$PY" -c "import importlib.util as u
wanted = {'numpy': 'numpy', 'yaml': 'pyyaml', 'tqdm': 'tqdm', 'PIL': 'pillow', 'cv2': 'opencv-python-headless',
          'pytest': 'pytest', 'xdist': 'pytest-xdist'}
print(' '.join(dist for module, dist in wanted.items() if u.find_spec(module) is None))")
for dist in $missing; do
    if "$PY" -m pip install --no-index --find-links .gpu-wheels "$dist" >>"$LOGS/install.log" 2>&1; then
        echo "installed $dist from .gpu-wheels" | tee -a "$LOGS/stages.txt"
    else
        echo "MISSING $dist (not in the image, nor in .gpu-wheels)" | tee -a "$LOGS/stages.txt"
    fi
done
# No GPU stage uses the C++ ops (CPU tensors only; CI tests them): skip their build, which needs a
# compiler and a minute.
if ! ADVENT_FAST_BUILD_CPU_OPS=0 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
    >>"$LOGS/install.log" 2>&1 || ! "$PY" -c "import advent_fast.kernels" >>"$LOGS/install.log" 2>&1; then
    # e.g. no setuptools, one older than 64 (no editable install that maps kernels/), or a read-only
    # site-packages: import from the checkout
    echo "install failed (install.log): importing from the checkout" | tee -a "$LOGS/stages.txt"
    ln -sfn ../kernels advent_fast/kernels  # what setup.py's package_dir maps at install time
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "== install: $((SECONDS - START)) s" | tee -a "$LOGS/stages.txt"
pack

# First what the open issues need, most important first; the stages measured by a previous run (see
# docs/measurements.md) follow. A failing test's report goes to NAME.err at once (tests/conftest.py):
# a stage stopped by its limit never prints pytest's summary.
export ADVENT_FAST_REPORT_FAILURES=1
# The kernel tests compile hundreds of Triton variants: with pytest-xdist (from .gpu-wheels) 8 processes
# compile them at once (one process got through 30% of them in 100 s on an H200).
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
# The kernels on CUDA tensors against float64 (the class-loop ones among them: their ranking was wrong on the
# first GPU that ran them), the fused BatchNorm's (before it can be the default: 1.12x the AdvEnt step),
# ReleaseSGD's and the weight casts'; then the public losses: values against float64, no host
# synchronisation, CUDA-graph capture.
stage pytest_kernels_cuda 150 "$PY" -m pytest -q "${XDIST[@]}" tests/test_kernels_triton.py \
    tests/test_batch_norm.py tests/test_models.py tests/test_weight_casts.py tests/test_losses_cuda.py \
    -k "(not test_models and not test_weight_casts) or release_sgd_kernel or cast_add_kernel"
# The whole step as one CUDA graph (the fast path's default on one GPU), in its own processes (a failed
# capture can leave the CUDA context unusable): the captured step against the eager one (frozen BN and
# activation checkpointing too), the default's eager fallbacks (a failed capture, a batch of another
# shape), a training run with it, two processes on the one GPU (gloo) replaying the graph with the gradients
# all-reduced after it, two train.deterministic runs bit for bit, the other CUDA-only trainer and metric tests.
stage pytest_train_cuda 150 "$PY" -m pytest -q tests/test_train.py tests/test_metrics.py tests/test_distributed.py \
    -k cuda
# Issue 5's numerics: 100 iterations of the fast path (bf16, and fp32), of the levers that keep the release's
# numerics (fused train-mode BatchNorm, weights cast by one node) and of the release step again (its own
# run-to-run spread) against the release fp32 step from the same weights on the same inputs.
stage track_losses 200 "$PY" benchmarks/bench_train_step.py --quick --modes advent --variants --track 100 \
    --track-variants release_fp32 fast fast_fp32 fast_fused_bn fast_fused_casts --json "$LOGS/track_losses.json"
# Issue 2's figures: the fused losses against the eager reference at every shape and dtype, with the
# device time of each (graph ms: the call replayed as a CUDA graph, no host work); the ranking's passes
# after the class-loop kernel's fix.
stage bench_entropy 75 "$PY" benchmarks/bench_entropy.py --no-compile --json "$LOGS/bench_entropy.json"
# Issue 5: BatchNorm is the step's largest cost (13.5 of 44.0 GPU ms in the third run; the fused kernels' two
# reductions at 3x their floor at copy bandwidth, the elementwise ones at 1.1x: docs/measurements.md): the fused
# kernels' tile sizes, then the fused train-mode BatchNorm (+ ReLU) and folded BN shift against ATen's and
# torch.compile's, ResNet-101's layers, bf16.
stage tune_batchnorm 90 "$PY" benchmarks/tune_kernels.py --quick --families batchnorm --dtypes bf16 \
    --json "$LOGS/tune_batchnorm.json"
stage bench_batchnorm 90 "$PY" benchmarks/bench_batchnorm.py --quick --json "$LOGS/bench_batchnorm.json"
# Tile sizes and warp counts of the general kernels and of the upsampling-fused ones (the cell family: their
# source cross-entropy took 1.3 of the AdvEnt step's 2.1 ms of loss kernels in the third run; untuned guesses).
stage tune_kernels 120 "$PY" benchmarks/tune_kernels.py --quick --families pixel cell --json "$LOGS/tune_kernels.json"
# Issue 5: fp16 with its gradient scaler inside the graph (what auto takes on GPUs without bf16 tensor cores)
# and what train.deterministic costs, against the default graph step in the same process.
stage bench_train_step_variants 120 "$PY" benchmarks/bench_train_step.py --quick --modes advent \
    --variants fast fast_fp16 fast_deterministic --json "$LOGS/bench_train_step_variants.json"
# Issue 5: torch.compile of G and D inside the whole-step graph, against the default graph step in the same
# process: what Inductor's fusions (BatchNorm with its ReLU, the residual adds) take off the GPU's time. Cut
# by the budget in the last two runs: give it a call of its own (ONLY=bench_train_step_compile_graph).
stage bench_train_step_compile_graph 300 "$PY" benchmarks/bench_train_step.py --quick --modes advent \
    --variants fast fast_compile_graph --gpu-profile 12 --json "$LOGS/bench_train_step_compile_graph.json"
# The trainer end to end on the embedded data: loaders, fast path (CUDA graph), checkpoint, evaluation.
RUN_DIR=/tmp/advent_fast_run.$$  # a new run each call (an existing run folder is refused)
stage train_embedded 60 "$PY" -m advent_fast.train --mode advent --run-dir "$RUN_DIR" \
    --set train.stop_iter=100 --set eval.every=0 --set run.snapshot_every=100 --set run.progress=false
cp "$RUN_DIR/metrics.jsonl" "$LOGS/train_embedded_metrics.jsonl" 2>/dev/null
# torch.compile of G and D without the whole-step graph (compiling ResNet-101 takes a while).
stage bench_train_step_compile 240 "$PY" benchmarks/bench_train_step.py --modes advent \
    --variants fast_compile fast_cudagraph --steps 10 --warmup 5 \
    --json "$LOGS/bench_train_step_compile.json"
# Measured on an H200 on 2026-11-28 (docs/measurements.md, third run): again, for figures from the same card
# in one run. The whole-step graph and its levers (AdvEnt, then MinEnt), where the GPU's time goes (by kind
# of kernel), each captured step's peak memory; the dilated convolutions, the padded class channels and the
# class-loop kernels against the general ones (MAX_LOOP_CLASSES=0), device time.
stage bench_train_step_graph 250 "$PY" benchmarks/bench_train_step.py --quick --modes advent \
    --variants release_fp32 fast fast_fused_bn fast_frozen_bn fast_frozen_fused_bn fast_fused_casts \
    fast_padded_classifier fast_checkpointed --gpu-profile 12 \
    --json "$LOGS/bench_train_step_graph.json"
stage bench_train_step_levers 120 "$PY" benchmarks/bench_train_step.py --quick --modes advent \
    --variants fast fast_space_to_batch fast_levers --json "$LOGS/bench_train_step_levers.json"
stage bench_train_step_graph_minent 100 "$PY" benchmarks/bench_train_step.py --quick --modes minent \
    --variants release_fp32 fast fast_fused_bn fast_frozen_bn --json "$LOGS/bench_train_step_graph_minent.json"
# ResNet-101's dilated 3x3 convolutions (layer3, layer4) as they are, as space to batch (train.space_to_batch)
# and undilated (same FLOPs): whether cuDNN's dilated kernels cost more than their FLOPs, bf16.
stage bench_dilated_convs 45 "$PY" benchmarks/bench_dilated_convs.py --quick \
    --json "$LOGS/bench_dilated_convs.json"
# The 19-class convolutions with their class channels padded to multiples of 8, 16, 32 against as they are:
# ResNet-101's classifier heads (train.classifier_channels_multiple) and a discriminator's first convolution, bf16.
stage bench_class_channels 50 "$PY" benchmarks/bench_class_channels.py --quick \
    --json "$LOGS/bench_class_channels.json"
stage tune_loop 120 "$PY" benchmarks/tune_kernels.py --quick --families loop --json "$LOGS/tune_loop.json"
# Measured on an H200 on 2026-11-27 (docs/measurements.md): again, for figures from the same card in one run.
stage pytest_upsampled_cuda 170 "$PY" -m pytest -q "${XDIST[@]}" tests/test_upsampled.py
stage profile_step 60 "$PY" benchmarks/bench_train_step.py --modes advent --variants release_fp32 fast_eager \
    --steps 3 --warmup 3 --host-profile 15 --json "$LOGS/profile_step.json"
stage bench_train_step 180 "$PY" benchmarks/bench_train_step.py --quick --modes advent minent \
    --variants release_fp32 release_bf16 fast_eager fast_fp32 --json "$LOGS/bench_train_step.json"
stage bench_entropy_compile 120 "$PY" benchmarks/bench_entropy.py --quick --json "$LOGS/bench_entropy_compile.json"
stage bench_upsampled 40 "$PY" benchmarks/bench_upsampled.py --quick --dtypes bf16 fp32 \
    --json "$LOGS/bench_upsampled.json"
stage bench_eval 45 "$PY" benchmarks/bench_eval.py --quick --json "$LOGS/bench_eval.json"
stage bench_data 40 "$PY" benchmarks/bench_data.py --quick --counts 100 100 10 --json "$LOGS/bench_data.json"
stage bench_activations 30 "$PY" benchmarks/bench_activations.py --json "$LOGS/bench_activations.json"

{
    echo
    for name in pytest_kernels_cuda pytest_train_cuda pytest_upsampled_cuda; do
        echo "-- $name"; tail -1 "$LOGS/$name.md" 2>/dev/null
        grep -A40 '^FAILED' "$LOGS/$name.err" 2>/dev/null | head -80  # reported as they failed
    done
    echo "-- training run"; tail -2 "$LOGS/train_embedded.md" 2>/dev/null
    for name in tune_loop bench_class_channels bench_dilated_convs bench_batchnorm tune_batchnorm tune_kernels bench_eval bench_upsampled bench_data bench_activations bench_train_step_compile \
        bench_train_step_graph bench_train_step_levers bench_train_step_graph_minent bench_train_step_variants bench_train_step_compile_graph profile_step track_losses bench_entropy_compile bench_train_step bench_entropy; do
        echo "-- $name"; grep -E '^(\||- |# host us)' "$LOGS/$name.md" 2>/dev/null | tail -300
    done
    echo "-- stages ($((SECONDS - START)) s; every table, log and JSON: $OUT/results.tgz)"; cat "$LOGS/stages.txt"
} | tee "$LOGS/summary.md"
cp "$LOGS/summary.md" "$OUT/summary.md"
pack
