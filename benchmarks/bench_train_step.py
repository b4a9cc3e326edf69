"""The training step, end to end: the release-style eager step against this project's fast path.

    python benchmarks/bench_train_step.py                  # MinEnt and AdvEnt, every variant
    python benchmarks/bench_train_step.py --quick --track 200

Each variant builds a real :class:`advent_fast.trainer.Trainer` from a preset (on a GPU the paper's
GTA5 -> Cityscapes ResNet-101 setting: source 1280x720, target 1024x512, batch 1 + 1, two heads, two
discriminators; on a CPU the embedded preset's small model at small sizes) and times
``Trainer.step_async`` on fixed random batches already on the device (data loading is
``bench_data.py``'s subject), as the training loop calls it: the timed steps run back to back and
the clock stops when the device has finished the last one. Columns: ms per step (mean over the
timed steps), host ms (the time the host spends in each ``step_async`` call: as long as the step
where the host waits for the device, as the release path's loss reads do, or where issuing the
kernels is the bottleneck; much shorter where the device is), images per second (source + target),
speed-ups against the same mode's release_fp32 and fast (the default) rows of the run (a lever pays where
its x fast is above 1), the largest relative difference of the first step's losses from the fast row's (every
variant's first step starts from the same weights on the same batch: a lever that computes something else
than the default shows there, beyond its precision's rounding), peak memory (over the timed steps; for the
whole step as one CUDA graph from the warm-up call that captures it, whose allocations every replay reuses),
and on GPUs the GPU's busy ms per step (the union of the
kernels' and copies' time spans from the profiler over a few steps) and that as a fraction of ms per
step (timed without the profiler, which slows the host), and the kernels and copies per step (each
one issued by the host: host ms / kernels is what one costs it). On every device, ops/step: the aten
ops one step dispatches that compute (views, detaches and allocations left out), counted over one
more step: what the host issues in an eager step (a fused op counts once, whatever its launches; a
replayed CUDA graph counts 0; compiled steps are not counted). Rows are printed (and the JSON
written) as each variant finishes; below them, for a captured step, what one replay costs the host
with the device idle (launching the graph's thousands of nodes; host ms/step may also include waiting for
room in the launch queue).
``--track N`` trains the release fp32 step and the ``--track-variants`` (default: the release fp32
step again, the fast path, and the fast path in fp32) from the same initial weights for N iterations
on the same inputs and reports how far their losses stray from the first release run's: tiny rounding
differences grow as G and D train. The second release run shows how far the release step strays from
itself (on a GPU, cuDNN's algorithm choice and atomic adds differ from run to run), and fast_fp32 how
much of the bf16 fast path's difference is bf16's.

Variants (``--variants``):
  release_fp32   train.fast_path=false, fp32, naive release-style losses on upsampled logits
  release_bf16   the same with bf16 autocast and channels_last
  fast           train.fast_path=true, the default on GPUs (bf16 + channels_last, fused upsample+losses, fused
                 optimisers; on one GPU the whole step replayed as one CUDA graph, train.cuda_graph null)
  fast_eager     the fast path without the CUDA graph (train.cuda_graph=false): every kernel issued by the host
  fast_graph_split  the fast path with train.gradient_sync=after_backward: the graph holds the forwards and
                 backwards, the optimisers run eagerly after each replay, as in a multi-process run (which
                 all-reduces the gradients in between; one process here, so without those)
  fast_fp32      the fast path in fp32 (with --track: separates the effect of bf16 from that of the rest)
  fast_fp16      the fast path in fp16 with its gradient scaler on the device (train.precision auto's choice
                 on GPUs without bf16 tensor cores; here against bf16 on the same card)
  fast_compile   the fast path with torch.compile of G and D (train.compile=default; no CUDA graph)
  fast_cudagraph the fast path with torch.compile(mode="reduce-overhead") (CUDA graphs of G and D)
  fast_compile_graph the fast path with torch.compile of G and D inside the whole-step CUDA graph (CUDA only)
  fast_fused_bn  the fast path with train.fused_batchnorm=true (train-mode BatchNorm + ReLU in the fused kernels)
  fast_frozen_bn the fast path with model.freeze_bn=true (BatchNorm folded into the convolutions; a
                 deviation from the release, whose BatchNorm trains in batch-1 train mode)
  fast_frozen_fused_bn  fast_frozen_bn with train.fused_batchnorm=true (each folded BatchNorm's shift, residual
                 add and ReLU in one kernel)
  fast_fused_casts  the fast path with train.fused_weight_casts=true (each step's 16-bit weights made by one node,
                 their gradients cast back and accumulated in multi-tensor kernels)
  fast_padded_classifier the fast path with train.classifier_channels_multiple=8 (the classifier's 19 output
                 channels padded to 24 for tensor-core convolutions)
  fast_space_to_batch the fast path with train.space_to_batch=true (the backbone's dilated convolutions run
                 undilated on the input's phases: what cuDNN's dilated convolutions cost)
  fast_levers    the fast path with every lever above that keeps the release's numerics and is not yet a
                 default: fused_batchnorm, fused_weight_casts, classifier_channels_multiple=8 and
                 space_to_batch together (what they take off the step combined)
  fast_checkpointed the fast path with train.activation_checkpointing (backbone blocks recomputed in
                 the backward: what the memory saving costs in time)
  fast_deterministic the fast path with train.deterministic (deterministic cuDNN algorithms, no cuDNN
                 benchmark: what bit-identical runs cost in time)
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import re
import statistics
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Dataset

from advent_fast.config import load_config
from advent_fast.cuda_graph import WARMUP_STEPS
from advent_fast.trainer import Datasets, Trainer
from bench_common import fmt, write_results

VARIANTS = {
    "release_fp32": ["train.fast_path=false", "train.precision=fp32", "train.channels_last=false",
                     "train.target_losses=reference"],
    "release_bf16": ["train.fast_path=false", "train.precision=bf16", "train.channels_last=true",
                     "train.target_losses=reference"],
    "fast": ["train.fast_path=true"],
    "fast_eager": ["train.fast_path=true", "train.cuda_graph=false"],
    "fast_graph_split": ["train.fast_path=true", "train.gradient_sync=after_backward"],
    "fast_fp32": ["train.fast_path=true", "train.precision=fp32"],
    "fast_fp16": ["train.fast_path=true", "train.precision=fp16"],
    "fast_compile": ["train.fast_path=true", "train.compile=default"],
    "fast_cudagraph": ["train.fast_path=true", "train.compile=reduce-overhead"],
    "fast_compile_graph": ["train.fast_path=true", "train.compile=default", "train.cuda_graph=true"],
    "fast_fused_bn": ["train.fast_path=true", "train.fused_batchnorm=true"],
    "fast_frozen_bn": ["train.fast_path=true", "model.freeze_bn=true"],
    "fast_frozen_fused_bn": ["train.fast_path=true", "model.freeze_bn=true", "train.fused_batchnorm=true"],
    "fast_fused_casts": ["train.fast_path=true", "train.fused_weight_casts=true"],
    "fast_padded_classifier": ["train.fast_path=true", "train.classifier_channels_multiple=8"],
    "fast_space_to_batch": ["train.fast_path=true", "train.space_to_batch=true"],
    "fast_levers": ["train.fast_path=true", "train.fused_batchnorm=true", "train.fused_weight_casts=true",
                    "train.classifier_channels_multiple=8", "train.space_to_batch=true"],
    "fast_checkpointed": ["train.fast_path=true", "train.activation_checkpointing=true"],
    "fast_deterministic": ["train.fast_path=true", "train.deterministic=true"],
}
QUICK_VARIANTS = ["release_fp32", "release_bf16", "fast", "fast_eager", "fast_frozen_bn"]
CUDA_ONLY = {"fast_compile_graph"}


class RandomScenes(Dataset):
    """Items in the datasets' format (normalised float image, int64 train ids), never loaded:
    the Trainer needs datasets to exist, the benchmark feeds its own batches."""

    def __init__(self, size, num_classes: int, labels: bool):
        self.size, self.num_classes, self.labels = size, num_classes, labels

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        w, h = self.size
        item = {"image": 50 * torch.randn(3, h, w), "name": f"random_{index}"}
        if self.labels:
            item["label"] = torch.randint(0, self.num_classes, (h, w))
        return item


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["minent", "advent"],
                   choices=["source_only", "minent", "minent_er", "advent", "advent_minent"])
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=None,
                   help=f"default: all on GPUs; {', '.join(QUICK_VARIANTS)} with --quick; on CPUs those "
                        f"but {', '.join(sorted(CUDA_ONLY))}; none (the option alone): no timing, with --track")
    p.add_argument("--config", default=None, help="preset (default: gta2cityscapes_r101 on GPUs, embedded on CPUs)")
    p.add_argument("--source-size", nargs=2, type=int, metavar=("W", "H"), default=None)
    p.add_argument("--target-size", nargs=2, type=int, metavar=("W", "H"), default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every variant")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 GPU / 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 8 GPU / 2 CPU)")
    p.add_argument("--track", type=int, default=0, metavar="N",
                   help="also train release_fp32 and the --track-variants for N iterations and compare their losses")
    p.add_argument("--track-variants", nargs="+", default=["release_fp32", "fast", "fast_fp32"],
                   choices=list(VARIANTS))
    p.add_argument("--host-profile", type=int, default=0, metavar="K",
                   help="also profile one step of each variant on the host: its K most expensive ops")
    p.add_argument("--gpu-profile", type=int, default=0, metavar="K",
                   help="also list each variant's device time per step by kind of kernel, and its K longest "
                        "kernels (GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer steps and variants")
    p.add_argument("--json", default="bench_train_step.json", help="where to write the results")
    return p.parse_args(argv)


def defaults(args, device):
    gpu = device.type == "cuda"
    config = args.config or ("gta2cityscapes_r101" if gpu else "embedded")
    source_size = args.source_size or ([1280, 720] if gpu else [256, 144])
    target_size = args.target_size or ([1024, 512] if gpu else [256, 128])
    steps = args.steps or (10 if args.quick else 30) if gpu else args.steps or (3 if args.quick else 5)
    warmup = args.warmup or (5 if args.quick else 8) if gpu else args.warmup or 2
    if args.variants is not None:  # none at all: only --track
        variants = args.variants
    elif gpu:
        variants = QUICK_VARIANTS if args.quick else list(VARIANTS)
    else:
        variants = [v for v in QUICK_VARIANTS if v not in CUDA_ONLY]
    return config, source_size, target_size, steps, warmup, variants


# train.deterministic turns process-wide switches on (Trainer): every variant starts from the process's own
PROCESS_DETERMINISM = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)


def build_trainer(preset, mode, variant, args, source_size, target_size, device):
    torch.use_deterministic_algorithms(PROCESS_DETERMINISM[0])
    torch.backends.cudnn.deterministic = PROCESS_DETERMINISM[1]
    overrides = [f"train.mode={mode}", "data.num_workers=0", "run.progress=false", "eval.every=0",
                 f"data.source_size={list(source_size)}", f"data.target_size={list(target_size)}",
                 *args.overrides, *VARIANTS[variant]]
    if preset != "embedded":
        # Data roots are required by the preset's validation but never read: the datasets are given.
        overrides += ["data.source_root=unused", "data.target_root=unused"]
    config = load_config(preset, overrides)
    classes = config.data.num_classes
    data = Datasets(RandomScenes(source_size, classes, True), RandomScenes(target_size, classes, False),
                    RandomScenes(target_size, classes, True))
    from advent_fast.distributed import DistContext

    return Trainer(config, DistContext(device=device), datasets=data)


def fixed_batches(trainer, count, seed=0):
    """``count`` (source, target) batches on the device, in the trainer's memory format."""
    from advent_fast.trainer import to_device

    gen = torch.Generator().manual_seed(seed)
    t, d = trainer.config.train, trainer.config.data
    (sw, sh), (tw, th) = d.source_size, d.target_size
    batches = []
    for _ in range(count):
        source = {"image": 50 * torch.randn(t.source_batch_size, 3, sh, sw, generator=gen),
                  "label": torch.randint(0, d.num_classes, (t.source_batch_size, sh, sw), generator=gen)}
        source["label"][:, : sh // 8] = 255  # an ignored band, as the sky/void in real labels
        target = {"image": 50 * torch.randn(t.target_batch_size, 3, th, tw, generator=gen)}
        batches.append((to_device(source, trainer.device, trainer.settings.channels_last),
                        to_device(target, trainer.device, trainer.settings.channels_last)))
    return batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def graph_launch_ms(graph, device, calls: int = 3) -> float:
    """Host ms of one replay call with the device idle (median over ``calls``, each after a sync): what
    launching the captured step costs the host before any queueing (each call is a training step)."""
    times = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        graph.replay()
        times.append(time.perf_counter() - start)
    sync(device)
    return statistics.median(times) * 1e3


def covered_length(intervals) -> float:
    """Length of the union of (start, end) intervals: overlapping kernels (the batch copies' own
    stream, a graph's parallel branches) count once."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def gpu_activity(step, steps: int, top: int = 0) -> tuple[float, float, dict | None]:
    """(busy ms, kernels, profile) per step, from the profiler over ``steps`` steps: the time with at
    least one kernel or copy running on the GPU (divided by the unprofiled ms/step for the busy fraction:
    profiling slows the host, not the GPU), how many kernels and copies ran (the host issues each of
    them: with host ms, what one costs the host), and if ``top``, the ``top`` kernels by device time
    (:func:`kernel_totals`) and every kernel's time by kind (:func:`kernel_kinds`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == DeviceType.CUDA]
    if not spans:  # CUPTI may not report the kernels of replayed CUDA graphs: no figure beats 0%
        raise RuntimeError("the profiler saw no GPU activity")
    busy_ms = covered_length([(start, end) for _, start, end in spans]) / 1e3 / steps
    profile = {"kernels": kernel_totals(spans, steps, top), "kinds": kernel_kinds(spans, steps)} if top else None
    return busy_ms, len(spans) / steps, profile


def kernel_totals(spans, steps: int, top: int) -> list:
    """The ``top`` kernels (or copies) by device time among ``spans`` ((name, start us, end us) over
    ``steps`` steps): per step, their ms and launches, each name cut to 100 characters."""
    totals: dict = {}
    for name, start, end in spans:
        ms, calls = totals.get(name, (0.0, 0))
        totals[name] = (ms + (end - start) / 1e3, calls + 1)
    ranked = sorted(totals.items(), key=lambda item: item[1][0], reverse=True)[:top]
    return [{"kernel": name[:100], "ms": ms / steps, "calls": calls / steps} for name, (ms, calls) in ranked]


# What a kernel does, from its name: the first pattern that matches (case-insensitive) names its kind.
# cuDNN's BatchNorm kernels (fp32) are "bn_fw..."/"bn_bw...", aten's (bf16: no cuDNN) "batch_norm_...";
# Triton kernels carry their function's name (this project's "_..._kernel", torch.compile's "triton_...").
KERNEL_KINDS = (
    ("advent_fast BatchNorm kernels", r"^_batch_norm_\w+_kernel$"),  # train.fused_batchnorm
    ("optimisers", r"^_release_sgd_kernel$|multi_tensor_apply|fused_?(sgd|adam)"),
    ("advent_fast weight casts", r"^_cast_add_kernel$"),  # train.fused_weight_casts
    ("advent_fast loss kernels", r"^_\w+_kernel$"),
    ("torch.compile Triton kernels", r"^triton_"),  # fusions: BatchNorm with its ReLU, say
    ("BatchNorm", r"batch_?norm|\bbn_(fw|bw)|welford"),
    ("layout transposes (cuDNN)", r"nchwToNhwc|nhwcToNchw"),
    # cuDNN's and CUTLASS's convolution kernels name their pass (Hopper: sm90_xmma_{fprop,dgrad,wgrad}_...): the
    # weight gradient of a batch-1 convolution reduces over all its pixels, often the slow pass
    ("convolution forward", r"fprop|implicit_convolve|conv2d_grouped_direct"),
    ("convolution input gradient", r"dgrad"),
    ("convolution weight gradient", r"wgrad"),
    ("convolution, GEMM (pass not named)", r"xmma|cutlass|gemm|conv|cudnn|cask|nvjet"),
    ("ReLU and its backward", r"clamp|threshold"),
    ("interpolation", r"upsample|interp"),
    ("softmax, losses (aten)", r"softmax|nll_loss|cross_entropy|binary_cross"),
    ("pooling", r"pool"),
    ("copies, casts", r"copy|memcpy|catarray"),
    ("fills", r"fill|memset"),
    ("reductions", r"reduce"),
    ("other elementwise", r"elementwise"),
    ("other", r""),
)


def kernel_kind(name: str) -> str:
    return next(kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE))


def kernel_kinds(spans, steps: int) -> list:
    """Every kernel's device time grouped by :data:`KERNEL_KINDS`, per step: [{kind, ms, calls}] by ms."""
    totals: dict = {}
    for name, start, end in spans:
        kind = kernel_kind(name)
        ms, calls = totals.get(kind, (0.0, 0))
        totals[kind] = (ms + (end - start) / 1e3, calls + 1)
    ranked = sorted(totals.items(), key=lambda item: item[1][0], reverse=True)
    return [{"kind": kind, "ms": ms / steps, "calls": calls / steps} for kind, (ms, calls) in ranked]


# aten ops that launch no kernel on any device: views of a tensor's metadata, and allocations
NO_KERNEL_OPS = frozenset({"_reshape_alias", "_unsafe_view", "alias", "as_strided", "detach", "empty", "empty_like",
                           "empty_strided", "expand", "new_empty", "permute", "promote_types", "reshape", "select",
                           "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unsqueeze",
                           "view"})


class ComputeOpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the kernels' level (after autograd and autocast) and compute: each
    is a kernel the host issues on a GPU (a fused op's own launches not counted) and what an eager step's
    host time grows with."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler" and func.overloadpacket.__name__ not in NO_KERNEL_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def compute_ops(step) -> int:
    """The compute ops (ComputeOpCounter) one call of ``step`` dispatches: 0 for a replayed CUDA graph."""
    with ComputeOpCounter() as counter:
        step()
    return counter.count


def host_profile(step, device, top: int) -> dict:
    """Where one step's host time goes (the profiler's CPU side): the ``top`` ops by self time with their
    calls, and the self time of all ops together (host ms minus that is Python around the ops; the
    profiler adds a few us to each op)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    sync(device)
    events = prof.key_averages()
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"ops_self_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "top": [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in ranked]}


def time_variant(preset, mode, variant, args, sizes, steps, warmup, device):
    trainer = build_trainer(preset, mode, variant, args, *sizes, device)
    batches = fixed_batches(trainer, 2)
    state = {"i": 0}

    losses = []

    def step():
        source, target = batches[state["i"] % len(batches)]
        state["i"] += 1
        metrics, _ = trainer.step_async(source, target if trainer.plan.target else None)
        losses.append(metrics.clone())  # a captured step overwrites its outputs at the next replay

    # The peak memory from the call that captures the whole step (it allocates then, in the graph's pool, what
    # every replay reuses), else from the timed steps: a step's, without cuDNN's autotuning workspaces.
    peak_from = min(WARMUP_STEPS, warmup - 1) if trainer.captured is not None else warmup
    setup_start = time.perf_counter()
    for i in range(warmup):  # compilation, cudnn autotuning, CUDA-graph capture, allocator warm-up
        if device.type == "cuda" and i == peak_from:
            sync(device)
            torch.cuda.reset_peak_memory_stats()
        step()
    sync(device)
    warmup_s = time.perf_counter() - setup_start
    if device.type == "cuda" and peak_from == warmup:
        torch.cuda.reset_peak_memory_stats()
    host_s = 0.0
    start = time.perf_counter()
    for _ in range(steps):  # back to back, as in training: the host queues ahead where the step lets it
        issued = time.perf_counter()
        step()
        host_s += time.perf_counter() - issued
    sync(device)
    ms = (time.perf_counter() - start) * 1e3 / steps
    if not torch.isfinite(torch.stack(losses)).all():
        raise RuntimeError(f"{variant}/{mode}: non-finite losses")
    # every variant's first step starts from the same weights on the same batch: a lever that computes
    # something else shows here, in the run that times it
    first_losses = dict(zip(trainer.metric_names, losses[0].tolist()))
    settings = trainer.settings.describe()
    if trainer.captured is not None and trainer.captured.eager:  # train.cuda_graph null fell back
        settings += " (its capture failed: eager steps)"
    row = {"mode": mode, "variant": variant, "settings": settings, "ms_per_step": ms,
           "images_per_s": (trainer.config.train.source_batch_size
                            + (trainer.config.train.target_batch_size if trainer.plan.target else 0)) / ms * 1e3,
           "host_ms": host_s * 1e3 / steps, "warmup_s": warmup_s, "peak_mib": None, "gpu_ms": None,
           "gpu_busy": None, "kernels_per_step": None, "ops_per_step": None, "first_losses": first_losses}
    if trainer.config.train.compile == "none":  # a compiled step runs its own kernels, without aten dispatch
        row["ops_per_step"] = compute_ops(step)
    if args.host_profile:
        row["host_profile"] = host_profile(step, device, args.host_profile)
    if trainer.captured is not None and trainer.captured.graph is not None:
        row["graph_launch_ms"] = graph_launch_ms(trainer.captured.graph, device)
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if trainer.captured is not None and trainer.captured.graph is not None:
            row["graph_pool_mib"] = trainer.captured.pool_bytes / 2**20
        try:  # the profiler is a measurement aid: its failure must not cost the timings
            row["gpu_ms"], row["kernels_per_step"], profile = gpu_activity(step, min(steps, 5), args.gpu_profile)
            if profile:
                row["gpu_profile"] = profile
            row["gpu_busy"] = row["gpu_ms"] / ms
        except Exception as exc:
            print(f"{variant}/{mode}: GPU busy time not measured: {exc!r}", file=sys.stderr)
    return row


def loss_history(preset, mode, variant, args, sizes, iterations, device):
    trainer = build_trainer(preset, mode, variant, args, *sizes, device)
    batches = fixed_batches(trainer, 4, seed=1)
    history = []
    for i in range(iterations):
        source, target = batches[i % len(batches)]
        _, metrics, _ = trainer.train_step(source, target if trainer.plan.target else None)
        trainer.iteration += 1
        history.append(metrics)
    return history


def track_losses(preset, mode, variants, args, sizes, iterations, device):
    """Losses of each variant against release_fp32 over the same iterations, inputs and initial weights."""
    ref = loss_history(preset, mode, "release_fp32", args, sizes, iterations, device)
    rows = []
    for variant in variants:
        release_memory(device)
        got = loss_history(preset, mode, variant, args, sizes, iterations, device)
        for loss in ref[0]:
            errors = [abs(g[loss] - r[loss]) / max(abs(r[loss]), 1e-8) for r, g in zip(ref, got)]
            worst = max(range(len(errors)), key=lambda i: errors[i] if math.isfinite(errors[i]) else math.inf)
            rows.append({"mode": mode, "variant": variant, "loss": loss, "iterations": iterations,
                         "max_rel_diff": errors[worst], "at_iter": worst + 1,
                         "median_rel_diff": statistics.median(errors), "first": ref[0][loss],
                         "last_ref": ref[-1][loss], "last": got[-1][loss]})
    return rows


def release_memory(device):
    gc.collect()  # the last variant's trainer, before the next one allocates
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_row(row, rows) -> str:
    """A markdown row; the speed-ups against the same mode's release_fp32 and fast (the default) rows measured
    in this run, if any (a lever pays where its x fast is above 1), and how far its first step's losses are
    from the fast row's."""
    if "error" in row:
        return f"| {row['mode']} | {row['variant']} | failed: {row['error']} |||||||||||||"

    def baseline_row(name):
        return next((r for r in rows if r["mode"] == row["mode"] and r["variant"] == name and "error" not in r), None)

    def speedup(baseline):
        base = baseline_row(baseline)
        return base["ms_per_step"] / row["ms_per_step"] if base else None

    fast = baseline_row("fast")
    loss_diff = None
    if fast is not None and fast is not row:
        loss_diff = max(abs(value - fast["first_losses"][name]) / max(abs(fast["first_losses"][name]), 1e-8)
                        for name, value in row["first_losses"].items())

    busy = None if row["gpu_busy"] is None else f"{100 * row['gpu_busy']:.0f}%"
    return (f"| {row['mode']} | {row['variant']} | {row['ms_per_step']:.1f} | {row['host_ms']:.1f} | "
            f"{row['images_per_s']:.1f} | {fmt(speedup('release_fp32'), '.2f')} | {fmt(speedup('fast'), '.2f')} | "
            f"{fmt(loss_diff, '.1e')} | "
            f"{fmt(row['peak_mib'], ',.0f')} | "
            f"{fmt(row['gpu_ms'], '.1f')} | {fmt(busy, 's')} | {fmt(row['kernels_per_step'], ',.0f')} | "
            f"{fmt(row['ops_per_step'], ',')} | "
            f"{row['warmup_s']:.1f} | {row['settings']} |")


def print_gpu_profiles(rows) -> None:
    """The device time by kind of kernel, then by kernel, of the rows profiled with --gpu-profile."""
    profiled = [r for r in rows if r.get("gpu_profile")]
    if not profiled:
        return
    for title, key, label in (("kind of kernel (every kernel)", "kinds", "kind"),
                              ("kernel (the longest)", "kernels", "kernel")):
        print()
        print(f"Device time of one step by {title}; the profiler's CUDA side, share: of the GPU busy ms "
              "(kernels on parallel streams can add up to more):")
        print()
        print(f"| mode | variant | GPU ms | {label} | launches | ms | share |")
        print("|---|---|---|---|---|---|---|")
        for r in profiled:
            for i, k in enumerate(r["gpu_profile"][key]):
                lead = f"| {r['mode']} | {r['variant']} | {r['gpu_ms']:.1f} |" if i == 0 else "| | | |"
                name = k[label].replace("|", "/")
                name = name if label == "kind" else f"`{name}`"
                print(f"{lead} {name} | {k['calls']:.0f} | {k['ms']:.2f} | {k['ms'] / r['gpu_ms']:.0%} |")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    preset, source_size, target_size, steps, warmup, variants = defaults(args, device)
    if device.type == "cuda":
        # The GPU busy column profiles replays of captured CUDA graphs: the profiler must be set up
        # before the first capture, or profiling the replays can fault (pytorch/pytorch#75504, #100441).
        torch.profiler._utils._init_for_cuda_graphs()
    sizes = (source_size, target_size)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"# Training step: {name}, torch {torch.__version__}, preset {preset}, source {source_size[0]}x"
          f"{source_size[1]}, target {target_size[0]}x{target_size[1]}, {steps} timed steps after {warmup}")
    print()
    rows, tracked = [], []

    def save(final=False):  # after every row too: a run cut short keeps what it measured
        if args.json:
            write_results(args.json, {"device": name, "torch": torch.__version__, "preset": preset,
                                      "source_size": source_size, "target_size": target_size, "steps": steps,
                                      "warmup": warmup, "rows": rows, "track": tracked}, announce=final)

    if variants:
        print("| mode | variant | ms/step | host ms | images/s | x release_fp32 | x fast | step-1 losses vs fast "
              "| peak MiB | GPU ms | GPU busy | kernels/step | ops/step | warm-up s | settings |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for variant in variants:
            try:
                row = time_variant(preset, mode, variant, args, sizes, steps, warmup, device)
            except Exception as exc:  # a failing lever is a finding, not the end of the benchmark
                traceback.print_exc(file=sys.stderr)
                row = {"mode": mode, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:200]}
            rows.append(row)
            print(format_row(row, rows), flush=True)
            save()
            torch._dynamo.reset()
            release_memory(device)
    for r in rows:
        if "graph_launch_ms" in r:
            print(f"- {r['mode']}/{r['variant']}: one replay of the captured step costs the host "
                  f"{r['graph_launch_ms']:.1f} ms with the device idle (host ms/step above: {r['host_ms']:.1f}); "
                  f"the graph's memory pool reserved {r['graph_pool_mib']:,.0f} MiB at the capture")
    profiled = [r for r in rows if "host_profile" in r]
    if profiled:
        print()
        print("Host time of one step by op (the profiler's CPU side, its overhead included; the rest of host ms "
              "is Python around the ops):")
        print()
        print("| mode | variant | host ms | all ops' self ms | op | calls | self ms |")
        print("|---|---|---|---|---|---|---|")
        for r in profiled:
            prof = r["host_profile"]
            for i, op in enumerate(prof["top"]):
                lead = (f"| {r['mode']} | {r['variant']} | {r['host_ms']:.1f} | {prof['ops_self_ms']:.1f} |" if i == 0
                        else "| | | | |")
                print(f"{lead} {op['op']} | {op['calls']} | {op['self_ms']:.2f} |")
    print_gpu_profiles(rows)
    if args.track:
        print()
        print(f"Losses against release_fp32 over {args.track} iterations on the same inputs and initial "
              f"weights (relative difference; small differences grow as G and D train, so compare with fast_fp32):")
        print()
        print("| mode | variant | loss | max rel. diff | at iter | median rel. diff | release first -> last | last |")
        print("|---|---|---|---|---|---|---|---|")
        for mode in args.modes:  # each mode's rows as soon as they are measured
            mode_rows = track_losses(preset, mode, args.track_variants, args, sizes, args.track, device)
            for r in mode_rows:
                print(f"| {r['mode']} | {r['variant']} | {r['loss']} | {r['max_rel_diff']:.2e} | {r['at_iter']} | "
                      f"{r['median_rel_diff']:.2e} | {r['first']:.4g} -> {r['last_ref']:.4g} | {r['last']:.4g} |")
            tracked += mode_rows
            save()
    save(final=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
