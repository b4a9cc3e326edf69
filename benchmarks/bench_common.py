"""Timing and memory helpers shared by the benchmark scripts."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import triton
import triton.language as tl


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def median_ms(self, fn, reps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def convolution_machine(device: torch.device) -> dict:
    """For the convolution benchmarks: cuDNN's benchmark mode on, as the trainer sets it
    (train.cudnn_benchmark), and the machine (device, torch, cuDNN) printed and returned."""
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    machine = {"device": device_name(device), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version() if cuda else None}
    print(f"# {machine['device']} | torch {torch.__version__} | cuDNN {machine['cudnn']}")
    return machine


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the scripts' --dtypes names


def print_table_header(columns) -> None:
    """A markdown table's header row and rule."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def autocast_to(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device``, as the fast path runs (nothing for float32)."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def fwd_bwd(fn, logits, upstream):
    """A leaf tensor -> fn -> backward: ones for scalar outputs, ``upstream`` for maps."""
    def run():
        x = logits.detach().requires_grad_(True)
        out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [upstream if o.dim() > 0 else None for o in outs])
        return x.grad
    return run


def autocast_fwd_bwd(fn, x, upstream, autocast):
    """:func:`fwd_bwd` with ``fn`` under ``autocast`` (a layer timed as the fast path runs it)."""
    def under_autocast(leaf):
        with autocast:
            return fn(leaf)
    return fwd_bwd(under_autocast, x, upstream)


def fmt(value, spec: str) -> str:
    """A table cell: ``value`` formatted, or "-" for a figure not measured (None)."""
    return "-" if value is None else format(value, spec)


def _issue_ms(call, calls: int) -> float:
    """The host's ms per call of ``call`` (CUDA), calls issued back to back without waiting for the device."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def host_ms(run, timer: Timer, calls: int = 5) -> float | None:
    """The host's time per call of ``run``, calls issued back to back (few enough, with up to a few dozen
    launches a call, that the launch queue never fills and blocks the host). CUDA only: on a CPU the
    host's time is all the time."""
    return _issue_ms(run, calls) if timer.cuda else None


@triton.jit
def _one_argument_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


@triton.jit
def _many_arguments_kernel(x_ptr, a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, f_ptr, g_ptr, n0, n1, n2, n3, n4, n5, n6, n7,
                           s0, s1, s2, s3, f0, f1, f2, f3, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
                           D: tl.constexpr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def launch_calls(x: torch.Tensor) -> dict:
    """One launch each, adding 1 to ``x[0]``: a torch op and Triton kernels with one argument and with
    28 (the loss kernels take 20-35), among them pointers, integers (two equal to 1, which Triton
    specialises), floats and constexprs."""
    ptrs = [torch.zeros(16, device=x.device) for _ in range(7)]
    return {
        "torch_op": lambda: x.add_(1),
        "triton_1_arg": lambda: _one_argument_kernel[(1,)](x),
        "triton_28_args": lambda: _many_arguments_kernel[(1,)](x, *ptrs, *range(3, 11), 5100, 1, 1, 19,
                                                                 0.5, 1.0, 2.0, 3.0, A=1, B=2, C=3, D=4),
    }


def launch_costs_us(device: torch.device, launches: int = 500) -> dict | None:
    """Host microseconds per launch of each of :func:`launch_calls`, issued back to back: what each
    launch a fused call makes costs on this machine before any kernel runs. CUDA only."""
    if device.type != "cuda":
        return None
    return {name: _issue_ms(call, launches) * 1e3 for name, call in launch_calls(torch.zeros(1, device=device)).items()}


def graph_replay_ms(run, timer: Timer, reps: int) -> float | None:
    """The device's time for ``run``: median ms of replays of it captured as one CUDA graph, in which the
    host issues nothing (``run``'s own time minus this is what issuing its kernels adds). CUDA only;
    None, with the error on stderr, if the capture fails."""
    if not timer.cuda:
        return None
    side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            run()
    except Exception:  # a finding for the table ("-"), not the end of the benchmark
        traceback.print_exc(file=sys.stderr)
        torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture stream current
        return None
    ms = timer.median_ms(graph.replay, reps, 3)
    del graph  # its memory pool with it
    return ms


def peak_extra_mib(run, device: torch.device) -> float | None:
    """Peak memory allocated by ``run`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_results(path: str, payload: dict, announce: bool = True) -> None:
    """The benchmark's rows (and machine) as JSON, replaced atomically (benchmarks save as they go, so
    that a run cut short keeps what it measured); the final write is announced on the last line."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    if announce:
        print(f"# results written to {path}")


# The kernels' launch parameters are module constants that their launchers read at call time.
KERNEL_MODULES = ("softmax_entropy", "entropy_ranking", "bilinear", "class_loop", "target_forward",
                  "target_backward", "upsampled_cross_entropy", "upsampled_target", "batch_norm")


def kernel_modules(package: str = "advent_fast.kernels"):
    return [importlib.import_module(f"{package}.{name}") for name in KERNEL_MODULES]


def current_config(names, package: str = "advent_fast.kernels") -> dict:
    """The current values of these launch-parameter constants."""
    modules = kernel_modules(package)
    return {name: next(getattr(m, name) for m in modules if hasattr(m, name)) for name in names}


def apply_config(config: dict, package: str = "advent_fast.kernels") -> None:
    """Set each constant in every kernel module that holds it (a name no module holds is an error)."""
    modules = kernel_modules(package)
    for name, value in config.items():
        holders = [m for m in modules if hasattr(m, name)]
        if not holders:
            raise KeyError(f"no kernel module has a launch parameter {name!r}")
        for module in holders:
            setattr(module, name, value)
