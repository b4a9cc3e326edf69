"""Timing and memory helpers shared by the benchmark scripts."""
from __future__ import annotations

import json
import statistics
import time

import torch


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


def fwd_bwd(fn, logits, upstream):
    """A leaf tensor -> fn -> backward: ones for scalar outputs, ``upstream`` for maps."""
    def run():
        x = logits.detach().requires_grad_(True)
        out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [upstream if o.dim() > 0 else None for o in outs])
        return x.grad
    return run


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


def write_results(path: str, payload: dict) -> None:
    """The benchmark's rows (and machine) as JSON, announced on the last line of the output."""
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"# results written to {path}")
