"""The host's Python cost of the fused losses, measured without a GPU.

    python benchmarks/bench_host.py

Each fused call (forward + backward, as bench_entropy.py and bench_upsampled.py time them) runs on the
Triton backend, under the interpreter, with every Triton launch replaced by a no-op: the time left is
what the host spends around the launches (validation, backend dispatch, allocations, autograd). On a GPU
the launches themselves come on top (bench_entropy.py's launch costs and host ms), and the sum bounds a
call's time from below wherever its kernels are shorter. Baseline in the same run: a bare
torch.autograd.Function that allocates its output and its gradient (the floor of any autograd call). The
outputs are garbage (the kernels never run): times only. Columns: median microseconds per call over
--reps calls, the number of Triton launches per call, and the call's time over the baseline's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

# Before triton is imported: the interpreter's kernels run on CPU tensors (their launches are stubbed below).
os.environ["TRITON_INTERPRET"] = "1"
os.environ["ADVENT_FAST_BACKEND"] = "triton"

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import advent_fast as af  # noqa: E402
from advent_fast.upsampled import upsampled_cross_entropy, upsampled_target_losses  # noqa: E402
from bench_common import fwd_bwd, write_results  # noqa: E402

LOW_RES, FULL_RES = (9, 17), (65, 129)


class CountedLaunches:
    """Replaces every Triton launch by a no-op that counts itself (the call is everything around it)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self._run = InterpretedFunction.run

        def run(kernel, *args, grid, warmup, **kwargs):
            self.count += 1

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        InterpretedFunction.run = self._run


class _Bare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.new_empty((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.empty_like(x)


def cases(c: int):
    prior = torch.full((c,), 1.0 / c)
    labels = torch.randint(0, c, (1, *FULL_RES))

    def target_fused(x):
        r = af.target_losses(x, self_information=True, entropy=True, prior=prior)
        return r.self_information, r.entropy_loss + r.class_prior_loss

    return {
        "bare autograd.Function (baseline)": ((1, c, 64, 64), _Bare.apply),
        "MinEnt": ((1, c, 64, 64), af.entropy_loss),
        "MinEnt+ER (0.3)": ((1, c, 64, 64), lambda x: af.entropy_loss(x, 0.3)),
        "self-information": ((1, c, 64, 64), af.self_information),
        "class prior": ((1, c, 64, 64), lambda x: af.class_prior_loss(x, prior)),
        "fused target call": ((1, c, 64, 64), target_fused),
        "upsampled source cross-entropy": ((1, c, *LOW_RES), lambda x: upsampled_cross_entropy(x, labels)),
        "upsampled AdvEnt target (self-information)":
            ((1, c, *LOW_RES), lambda x: upsampled_target_losses(x, FULL_RES).self_information),
        "upsampled MinEnt target": ((1, c, *LOW_RES), lambda x: upsampled_target_losses(
            x, FULL_RES, self_information=False, entropy=True).entropy_loss),
    }


def call_us(fn, shape, reps: int, warmup: int) -> tuple[float, float]:
    """(median microseconds per forward + backward, Triton launches per call)."""
    logits = torch.randn(shape)
    with CountedLaunches() as launches:
        outs = fn(logits)
        maps = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.dim()]
        run = fwd_bwd(fn, logits, torch.ones_like(maps[0]) if maps else None)
        for _ in range(warmup):
            run()
        launches.count = 0
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, launches.count / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--json", default="bench_host.json", help="where to write the results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one host thread issues the launches on a GPU
    print(f"# Host cost per fused call, Triton launches stubbed: torch {torch.__version__}, CPU x{os.cpu_count()}, "
          f"{args.reps} calls each")
    print()
    print("| call (forward + backward) | host us | launches | x baseline |")
    print("|---|---|---|---|")
    rows = []
    for name, (shape, fn) in cases(args.classes).items():
        us, launches = call_us(fn, shape, args.reps, args.warmup)
        rows.append({"call": name, "shape": list(shape), "host_us": us, "launches": launches,
                     "x_baseline": us / rows[0]["host_us"] if rows else 1.0})
        print(f"| {name} | {us:.1f} | {launches:.0f} | {rows[-1]['x_baseline']:.2f} |", flush=True)
    if args.json:
        write_results(args.json, {"torch": torch.__version__, "cpus": os.cpu_count(), "reps": args.reps,
                                  "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
