"""Speed and memory of the fused losses against the naive reference and torch.compile.

    python benchmarks/bench_entropy.py [--quick] [--json bench_entropy.json] [--dtypes fp32 bf16]

For each case (MinEnt, MinEnt+ER 0.3, self-information, class prior, the fused target call)
and shape, times forward+backward (a leaf tensor -> loss -> backward, upstream gradient of ones
for scalars and random for maps: what a user pays, Python and autograd included) and forward
alone, for: the release-style eager reference, torch.compile of it, and advent_fast's fused op.
Columns: median ms; on GPUs the host's time for forward+backward (host ms: calls issued back to back:
Python, autograd and kernel launches) and the device's (graph ms: the call replayed as a CUDA graph, so
the host issues nothing), fwd+bwd ms being about the larger of the two; effective GB/s of the bytes the
op must move, % of the copy bandwidth measured in this run, the Triton kernels' floor (the bytes they
move, at that copy bandwidth: they read the logits in the forward and again in the backward), peak
extra memory (CUDA only) in MiB and as a multiple of the logits' size (issue 2's bound: 1.05, the
gradient itself), speed-up vs eager and vs compile. The header gives the host's cost of one kernel
launch on the machine (a torch op, Triton kernels with few and many arguments).
On a machine without a GPU it runs the CPU (C++) backend on a smaller default shape.
"""
from __future__ import annotations

import argparse
import sys

import torch

import advent_fast as af
from advent_fast import reference as ref
from bench_common import (DTYPES, Timer, device_name, fmt, fwd_bwd, graph_replay_ms, host_ms, launch_costs_us,
                          peak_extra_mib, print_table_header, write_results)

GPU_SHAPES = [(1, 19, 512, 1024), (4, 19, 512, 1024), (1, 16, 760, 1280)]
CPU_SHAPES = [(2, 19, 256, 512)]
ER_RATIO = 0.3


def make_prior(c: int, device) -> torch.Tensor:
    p = torch.linspace(1.0, 2.0, c) ** 4
    return (p / p.sum()).to(device)


def cases(prior):
    """name -> (function of logits, returns a map (needs a random upstream grad)?, fused fn)."""
    def fused_target(x):
        r = af.target_losses(x, self_information=True, entropy=True, prior=prior)
        return r.self_information, r.entropy_loss + r.class_prior_loss

    def ref_target(x):
        return ref.self_information(x), ref.entropy_loss(x) + ref.class_prior_loss(x, prior)

    return {
        "minent": (ref.entropy_loss, af.entropy_loss),
        "minent_er": (lambda x: ref.entropy_loss(x, ER_RATIO), lambda x: af.entropy_loss(x, ER_RATIO)),
        "self_info": (ref.self_information, af.self_information),
        "class_prior": (lambda x: ref.class_prior_loss(x, prior), lambda x: af.class_prior_loss(x, prior)),
        "target_fused": (ref_target, fused_target),
    }


def min_bytes(case: str, numel: int, elt: int) -> tuple[int, int]:
    """Bytes a perfect implementation moves: (forward only, forward + backward)."""
    logits = numel * elt
    if case in ("self_info", "target_fused"):
        # fwd: read logits, write the map; bwd: read logits + map gradient, write the gradient.
        return 2 * logits, 2 * logits + 3 * logits
    return logits, 2 * logits  # read once, write the gradient once


def triton_bytes(case: str, numel: int, elt: int, pixels: int) -> int:
    """Bytes the Triton kernels move for forward + backward: the logits read by each and the gradient
    written; the self-information map written and its gradient read; ranking's float32 entropy map
    (4 bytes a pixel) written, read by the 4 radix passes and the kept-sum pass, and its 1-byte keep
    mask written and read."""
    logits = numel * elt
    maps = 2 * logits if case in ("self_info", "target_fused") else 0
    ranking = (4 + 5 * 4 + 1 + 1) * pixels if case == "minent_er" else 0
    return 3 * logits + maps + ranking



def copy_bandwidth(device, timer: Timer, reps: int) -> float:
    """Measured device copy bandwidth (bytes read + written) in GB/s. 1 GiB on a GPU: each copy takes
    long enough (about 0.7 ms on an H100) for the launch gap the timer includes not to count."""
    n = (1024 if device.type == "cuda" else 64) * 2**20 // 4
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src), reps, 3)
    return 2 * src.numel() * 4 / ms / 1e6



def fwd_only(fn, logits):
    def run():
        with torch.no_grad():
            return fn(logits)
    return run



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape ((4, 19, 512, 1024) on GPUs), few repetitions")
    parser.add_argument("--json", default="bench_entropy.json", help="where to write the results")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--cases", nargs="+", default=None, help="subset of the cases")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="NxCxHxW",
                        help="logits shapes instead of the defaults (e.g. 1x19x4x4: the per-call host cost)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    timer = Timer(device)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.shapes:
        shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes]
    elif args.quick:  # the shape of the targets: (4, 19, 512, 1024) on GPUs
        shapes = [shapes[1] if len(shapes) > 1 else shapes[0]]
    reps, warmup = (10, 3) if args.quick else (30, 5)
    copy_gbs = copy_bandwidth(device, timer, reps)
    info = {
        "device": device_name(device),
        "backend": af.get_backend(device), "torch": torch.__version__,
        "copy_GBps": copy_gbs,
        "launch_us": launch_costs_us(device),
    }
    print(f"# {info['device']} | fused backend: {info['backend']} | torch {torch.__version__} | "
          f"measured copy bandwidth {copy_gbs:.0f} GB/s")
    if info["launch_us"]:
        costs = ", ".join(f"{name} {us:.1f}" for name, us in info["launch_us"].items())
        print(f"# host us per launch, back to back: {costs}")
    rows = []
    header = ("case", "shape", "dtype", "impl", "fwd+bwd ms", "fwd ms", "host ms", "graph ms", "GB/s", "% copy",
              "floor ms", "peak MiB", "peak / logits", "x eager", "x compile")
    print_table_header(header)
    for shape in shapes:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            logits = torch.randn(shape, device=device).mul_(3).to(dtype)
            upstream = torch.randn(shape, device=device, dtype=dtype)
            prior = make_prior(shape[1], device)
            for case, (naive, fused) in cases(prior).items():
                if args.cases and case not in args.cases:
                    continue
                impls = {"eager": naive, "fused": fused}
                if not args.no_compile:
                    # Fresh caches, static shapes: as a user with one shape gets (a recompilation for a new
                    # shape would be a dynamic-shape graph, and past 8 recompilations Dynamo runs eagerly)
                    torch._dynamo.reset()
                    impls["compile"] = torch.compile(naive, dynamic=False)
                results = {}
                for impl, fn in impls.items():
                    run = fwd_bwd(fn, logits, upstream)
                    results[impl] = {
                        "fwd_bwd_ms": timer.median_ms(run, reps, warmup),
                        "fwd_ms": timer.median_ms(fwd_only(fn, logits), reps, warmup),
                        "host_ms": host_ms(run, timer),
                        # compiled code is left out: a failed capture can leave the CUDA context unusable
                        "graph_ms": None if impl == "compile" else graph_replay_ms(run, timer, reps),
                        "peak_MiB": peak_extra_mib(run, device),
                    }
                _, total_bytes = min_bytes(case, logits.numel(), logits.element_size())
                pixels = logits.numel() // shape[1]
                floor_ms = (triton_bytes(case, logits.numel(), logits.element_size(), pixels) / copy_gbs / 1e6
                            if info["backend"] == "triton" else None)
                logits_mib = logits.numel() * logits.element_size() / 2**20
                for impl, r in results.items():
                    gbs = total_bytes / r["fwd_bwd_ms"] / 1e6
                    row = dict(case=case, shape=list(shape), dtype=dname, impl=impl, GBps=gbs,
                               pct_copy=100 * gbs / copy_gbs, floor_ms=floor_ms if impl == "fused" else None,
                               peak_x_logits=None if r["peak_MiB"] is None else r["peak_MiB"] / logits_mib,
                               x_eager=results["eager"]["fwd_bwd_ms"] / r["fwd_bwd_ms"],
                               x_compile=(results["compile"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                                          if "compile" in results else None), **r)
                    rows.append(row)
                    peak = "- | -" if r["peak_MiB"] is None else f"{r['peak_MiB']:.0f} | {row['peak_x_logits']:.3f}"
                    print(f"| {case} | {'x'.join(map(str, shape))} | {dname} | {impl} | "
                          f"{r['fwd_bwd_ms']:.3f} | {r['fwd_ms']:.3f} | {fmt(r['host_ms'], '.3f')} | "
                          f"{fmt(r['graph_ms'], '.3f')} | {gbs:.0f} | {row['pct_copy']:.0f} | "
                          f"{fmt(row['floor_ms'], '.3f')} | {peak} | {row['x_eager']:.2f} | "
                          f"{fmt(row['x_compile'], '.2f')} |")
                    sys.stdout.flush()
                write_results(args.json, {"machine": info, "results": rows}, announce=False)
    write_results(args.json, {"machine": info, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
