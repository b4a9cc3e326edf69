"""Train-mode BatchNorm (+ ReLU) of the release ResNet-101, and a folded frozen one's shift: ATen against the
fused kernels.

    python benchmarks/bench_batchnorm.py [--quick] [--no-compile] [--dtypes bf16 fp32] [--kinds train folded]

Cases: the BatchNorm layers of the release DeepLab-V2 ResNet-101 on a 1280x720 source image (batch 1,
channels_last): the stem (BN + ReLU, 64 channels at 1/2 resolution), layer1's bn2 (BN + ReLU) and bn3 (BN,
residual add, ReLU: 256 channels at 1/4), layer3's bn2 (BN + ReLU, 256 channels at 1/8) and bn3 (+ residual
+ ReLU, 1024 channels: 23 of each in ResNet-101), layer4's bn3 (2048 channels) and a shortcut's BN (alone).
Frozen affine parameters, running statistics updated, as in training; the residual gets its gradient.
Implementations, one run: aten (F.batch_norm, then an in-place F.relu: the release's), compile
(torch.compile of the same; --no-compile skips it) and fused (advent_fast.batch_norm.train_batch_norm).
Columns: median fwd+bwd ms (a leaf tensor -> output -> backward with a random upstream gradient), on GPUs
the device's time alone (graph ms: the call replayed as a CUDA graph; not for compiled code), GB/s and %
of the copy bandwidth measured in the same run, both for the fused design's bytes (it reads the
activations twice and writes the output in the forward, reads x and the upstream gradient twice and
writes the gradient in the backward: 8 passes of the activations' size; 12 with a residual: read in the
forward, the output read twice for the ReLU mask and the residual's gradient written), peak memory above
the inputs, speed-up vs aten. Kind ``folded`` (model.freeze_bn with train.fused_batchnorm): what remains of
a frozen BatchNorm folded into its convolution, the shift (aten: the convolution's bias add, then the residual
add and ReLU; fused: advent_fast.batch_norm.shift_relu), forward and ReLU backward: 5 passes, 6 with a
residual (the output written, x and the residual read; y and the upstream gradient read and the gradient
written by the backward). Without a GPU: the CPU at small sizes (the fused path then falls back to ATen unless
ADVENT_FAST_BACKEND=triton under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

import advent_fast as af
from advent_fast.batch_norm import shift_relu, train_batch_norm
from bench_common import (DTYPES, Timer, device_name, fmt, graph_replay_ms, peak_extra_mib, print_table_header,
                          write_results)
from bench_entropy import copy_bandwidth

# (case, (N, C, H, W), relu, residual add): ResNet-101's BatchNorm layers on a 1280x720 image
GPU_CASES = [
    ("stem", (1, 64, 360, 640), True, False),
    ("layer1 bn2", (1, 64, 180, 320), True, False),
    ("layer1 bn3", (1, 256, 180, 320), True, True),
    ("layer3 bn2", (1, 256, 90, 160), True, False),
    ("layer3 bn3", (1, 1024, 90, 160), True, True),
    ("layer4 bn3", (1, 2048, 90, 160), True, True),
    ("layer4 shortcut", (1, 2048, 90, 160), False, False),
]
CPU_CASES = [
    ("layer3 bn2", (1, 256, 23, 40), True, False),
    ("layer3 bn3", (1, 1024, 23, 40), True, True),
]


def aten(x, weight, bias, mean, var, relu, residual):
    y = F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5)
    y = y if residual is None else y + residual
    return F.relu(y, inplace=True) if relu else y


def fused(x, weight, bias, mean, var, relu, residual):
    return train_batch_norm(x, weight, bias, mean, var, 0.1, 1e-5, relu, residual)


def aten_shift(x, weight, bias, mean, var, relu, residual):
    """A folded BatchNorm's shift as the convolution's bias add (cast to x's dtype, as it is), then as aten."""
    y = x + bias.to(x.dtype).reshape(1, -1, 1, 1)
    y = y if residual is None else y + residual
    return F.relu(y, inplace=True) if relu else y


def fused_shift(x, weight, bias, mean, var, relu, residual):
    return shift_relu(x, bias, relu, residual)


class Kind(NamedTuple):
    aten: Callable
    fused: Callable
    passes: int  # activation-sized reads and writes of the fused forward + backward (module docstring)
    residual_passes: int  # the same with a residual add


KINDS = {"train": Kind(aten, fused, 8, 12), "folded": Kind(aten_shift, fused_shift, 5, 6)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, first dtype only")
    parser.add_argument("--json", default="bench_batchnorm.json", help="where to write the results")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS),
                        help="train: train-mode BatchNorm; folded: a folded frozen BatchNorm's shift")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    timer = Timer(device)
    reps, warmup = (10, 3) if args.quick else (30, 5)
    dtypes = args.dtypes[:1] if args.quick else args.dtypes
    copy_gbs = copy_bandwidth(device, timer, reps)
    machine = {
        "device": device_name(device),
        "backend": af.get_backend(device), "torch": torch.__version__, "copy_GBps": copy_gbs,
    }
    print(f"# {machine['device']} | advent_fast backend: {machine['backend']} | torch {torch.__version__} | "
          f"measured copy bandwidth {copy_gbs:.0f} GB/s")
    if machine["backend"] != "triton":
        print("# the fused rows fall back to ATen's ops here: their kernels run on the triton backend")
    header = ("case", "shape", "kind", "ops", "dtype", "impl", "fwd+bwd ms", "graph ms", "GB/s", "% copy", "peak MiB",
              "x aten")
    print_table_header(header)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    for kind, (case, shape, relu, add) in ((k, c) for k in args.kinds for c in cases):
        ops = ("BN" if kind == "train" else "shift") + (" + residual" if add else "") + (" + ReLU" if relu else "")
        channels = shape[1]
        spec = KINDS[kind]
        for dname in dtypes:
            dtype = DTYPES[dname]
            x = (torch.randn(shape, generator=gen, device=device) * 2 + 1).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            upstream = torch.randn(shape, generator=gen, device=device).to(dtype)
            upstream = upstream.contiguous(memory_format=torch.channels_last)
            residual = torch.randn(shape, generator=gen, device=device).to(dtype) if add else None
            residual = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
            weight = torch.rand(channels, generator=gen, device=device) + 0.5
            bias = torch.randn(channels, generator=gen, device=device)
            stats = (torch.zeros(channels, device=device), torch.ones(channels, device=device))
            impls = {"aten": spec.aten, "fused": spec.fused}
            if not args.no_compile:
                torch._dynamo.reset()
                impls["compile"] = torch.compile(spec.aten, dynamic=False)
            results = {}
            for impl, fn in impls.items():
                def run(fn=fn):
                    leaf = x.detach().requires_grad_()
                    shortcut = None if residual is None else residual.detach().requires_grad_()
                    fn(leaf, weight, bias, *stats, relu, shortcut).backward(upstream)
                    return leaf.grad

                ms = timer.median_ms(run, reps, warmup)
                graph = None if impl == "compile" else graph_replay_ms(run, timer, reps)
                results[impl] = dict(fwd_bwd_ms=ms, graph_ms=graph, peak_MiB=peak_extra_mib(run, device))
            moved = (spec.residual_passes if add else spec.passes) * x.numel() * x.element_size()
            for impl, r in results.items():
                best = r["graph_ms"] or r["fwd_bwd_ms"]
                gbs = moved / best / 1e6
                speedup = results["aten"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                rows.append(dict(case=case, shape=list(shape), kind=kind, relu=relu, residual=add, dtype=dname,
                                 impl=impl, GBps=gbs, copy_fraction=gbs / copy_gbs, x_aten=speedup, **r))
                print(f"| {case} | {'x'.join(map(str, shape))} | {kind} | {ops} | {dname} | {impl} | "
                      f"{r['fwd_bwd_ms']:.3f} | {fmt(r['graph_ms'], '.3f')} | {gbs:.0f} | "
                      f"{100 * gbs / copy_gbs:.0f}% | {fmt(r['peak_MiB'], '.0f')} | {speedup:.2f} |")
                sys.stdout.flush()
            write_results(args.json, {"machine": machine, "results": rows}, announce=False)
    write_results(args.json, {"machine": machine, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
