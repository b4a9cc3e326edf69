"""Speed and memory of the losses on upsampled logits: upsample-then-loss against the fused kernels.

    python benchmarks/bench_upsampled.py [--quick] [--json bench_upsampled.json] [--dtypes fp32 bf16]

The release upsamples the 1/8-resolution logits with F.interpolate(bilinear, align_corners=True) and
computes the losses at full resolution. Cases (release shapes):
  source_ce: cross-entropy (ignore 255), logits (1, 19, 91, 161) -> 720x1280 labels;
  advent:    self-information map (the discriminator input), backward with a random upstream gradient,
             logits (1, 19, 65, 129) -> 512x1024;
  minent:    MinEnt loss, same shapes.
Implementations:
  release:       F.interpolate + the naive loss (F.cross_entropy; advent_fast.reference for the target);
  interp+fused:  F.interpolate + advent_fast's fused target loss (source: torch.compile of the release);
  fused:         advent_fast.upsampled_cross_entropy / upsampled_target_losses (no full-resolution logits).
Columns: median fwd+bwd ms (a leaf tensor -> loss -> backward: Python and autograd included), on GPUs
the host's time for it (host ms: calls issued back to back) and the device's (graph ms: replayed as a
CUDA graph, no host work; not for compiled code), peak memory
above the inputs (CUDA only), speed-up vs release. On a machine without a GPU it runs a smaller default
on the CPU backend, where the fused functions fall back to interpolate + loss.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import advent_fast as af
from advent_fast import reference as ref
from bench_common import (DTYPES, Timer, device_name, fmt, fwd_bwd, graph_replay_ms, host_ms, peak_extra_mib,
                          print_table_header, write_results)
from advent_fast.upsampled import upsampled_cross_entropy, upsampled_target_losses

# (case, logits shape, full-resolution size)
GPU_CASES = [
    ("source_ce", (1, 19, 91, 161), (720, 1280)),
    ("advent", (1, 19, 65, 129), (512, 1024)),
    ("minent", (1, 19, 65, 129), (512, 1024)),
]
CPU_CASES = [
    ("source_ce", (1, 19, 46, 81), (361, 641)),
    ("advent", (1, 19, 33, 65), (257, 513)),
    ("minent", (1, 19, 33, 65), (257, 513)),
]
IGNORE = 255


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def implementations(case, size, labels, compile_baseline):
    """impl name -> function of the logits returning the loss (scalar) or the map."""
    if case == "source_ce":
        def release(x):  # autocast's order: interpolate in the logits' dtype, cross-entropy in float32
            return F.cross_entropy(upsample(x, size).float(), labels, ignore_index=IGNORE)

        impls = {"release": release}
        if compile_baseline:
            torch._dynamo.reset()  # fresh caches, static shapes: as a user with one shape gets
            impls["compile"] = torch.compile(release, dynamic=False)
        impls["fused"] = lambda x: upsampled_cross_entropy(x, labels, IGNORE)
        return impls
    if case == "advent":
        return {
            "release": lambda x: ref.self_information(upsample(x, size)),
            "interp+fused": lambda x: af.self_information(upsample(x, size)),
            "fused": lambda x: upsampled_target_losses(x, size).self_information,
        }
    return {
        "release": lambda x: ref.entropy_loss(upsample(x, size)),
        "interp+fused": lambda x: af.entropy_loss(upsample(x, size)),
        "fused": lambda x: upsampled_target_losses(x, size, self_information=False, entropy=True).entropy_loss,
    }





def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, first dtype only")
    parser.add_argument("--json", default="bench_upsampled.json", help="where to write the results")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--cases", nargs="+", default=None, choices=[c for c, _, _ in GPU_CASES])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    timer = Timer(device)
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    dtypes = args.dtypes[:1] if args.quick else args.dtypes
    reps, warmup = (10, 3) if args.quick else (30, 5)
    machine = {
        "device": device_name(device),
        "backend": af.get_backend(device), "torch": torch.__version__,
    }
    print(f"# {machine['device']} | fused backend: {machine['backend']} | torch {torch.__version__}")
    header = ("case", "logits", "size", "dtype", "impl", "fwd+bwd ms", "host ms", "graph ms", "peak MiB", "x release")
    print_table_header(header)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for case, shape, size in cases:
        if args.cases and case not in args.cases:
            continue
        labels = torch.randint(0, shape[1], (shape[0],) + size, generator=gen, device=device)
        labels[torch.rand(labels.shape, generator=gen, device=device) < 0.1] = IGNORE
        for dname in dtypes:
            dtype = DTYPES[dname]
            logits = (torch.randn(shape, generator=gen, device=device) * 3).to(dtype)
            upstream = torch.randn(shape[:2] + size, generator=gen, device=device).to(dtype)
            results = {}
            for impl, fn in implementations(case, size, labels, not args.no_compile).items():
                run = fwd_bwd(fn, logits, upstream)
                results[impl] = dict(fwd_bwd_ms=timer.median_ms(run, reps, warmup),
                                     host_ms=host_ms(run, timer),
                                     # not compiled code: a failed capture can leave the CUDA context unusable
                                     graph_ms=None if impl == "compile" else graph_replay_ms(run, timer, reps),
                                     peak_MiB=peak_extra_mib(run, device))
            for impl, r in results.items():
                speedup = results["release"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                rows.append(dict(case=case, logits=list(shape), size=list(size), dtype=dname, impl=impl,
                                 x_release=speedup, **r))
                print(f"| {case} | {'x'.join(map(str, shape))} | {size[0]}x{size[1]} | {dname} | {impl} | "
                      f"{r['fwd_bwd_ms']:.3f} | {fmt(r['host_ms'], '.3f')} | {fmt(r['graph_ms'], '.3f')} | "
                      f"{fmt(r['peak_MiB'], '.0f')} | {speedup:.2f} |")
                sys.stdout.flush()
    write_results(args.json, {"machine": machine, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
