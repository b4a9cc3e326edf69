"""ResNet-101's dilated 3x3 convolutions as the model runs them, as space to batch, and undilated: forward and
forward + backward.

    python benchmarks/bench_dilated_convs.py [--quick] [--dtypes bf16 fp32]

The 3x3 convolutions of layer3 (23, dilation 2, 256 channels) and layer4 (3, dilation 4, 512 channels) are 46%
of the generator's forward FLOPs (605 of 1,326 GFLOP at 1280x720); they run at the source's feature map
(1280x720 at output stride 8: 91x161) and the target's (1024x512: 65x129). Per case, batch 1, channels_last,
fp32 weights and autocast to the dtype, as the fast path runs them:
- ``dilated``: the convolution as it is (cuDNN's dilated kernels);
- ``space to batch``: ``train.space_to_batch``, undilated on the input's d x d phases, rearrangements
  included (``advent_fast.models.space_to_batch``);
- ``undilated``: the same convolution with dilation 1 at the same size: the same FLOPs, not the same
  function; what a convolution of this size costs without the dilation.

Columns: median ms forward alone and forward + backward (input and weight gradients), on GPUs the device's
time alone (graph ms: the fwd+bwd call replayed as a CUDA graph), TFLOP/s (3 passes of 2 x C x C x 9 x
pixels), peak memory above the inputs, speed-up against dilated in the same run. Below the table, per
training step (the source and target forwards with their backwards, each case times its count): what
the dilated convolutions take each way. Without a GPU: the CPU at small sizes.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import NamedTuple

import torch
from torch import nn

from advent_fast.models import use_space_to_batch
from bench_common import (DTYPES, Timer, autocast_fwd_bwd, autocast_to, convolution_machine, fmt, graph_replay_ms,
                          peak_extra_mib, print_table_header, write_results)

IMPLS = ("dilated", "space to batch", "undilated")


class Case(NamedTuple):
    name: str
    channels: int
    dilation: int
    size: tuple  # input H x W
    count: int  # convolutions of this case per forward


GPU_CASES = [
    Case("layer3, source", 256, 2, (91, 161), 23),
    Case("layer3, target", 256, 2, (65, 129), 23),
    Case("layer4, source", 512, 4, (91, 161), 3),
    Case("layer4, target", 512, 4, (65, 129), 3),
]
CPU_CASES = [
    Case("layer3, small", 32, 2, (11, 21), 23),
    Case("layer4, small", 64, 4, (11, 21), 3),
]


def convolutions(case: Case, device) -> dict:
    """The three implementations of ``case``, one weight."""
    dilated = nn.Conv2d(case.channels, case.channels, 3, padding=case.dilation, dilation=case.dilation,
                        bias=False).to(device, memory_format=torch.channels_last)
    phased = copy.deepcopy(dilated)
    use_space_to_batch(phased)
    undilated = copy.deepcopy(dilated)
    undilated.dilation, undilated.padding = (1, 1), (1, 1)
    return dict(zip(IMPLS, (dilated, phased, undilated)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, first dtype only")
    parser.add_argument("--json", default="bench_dilated_convs.json", help="where to write the results")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    timer = Timer(device)
    reps, warmup = (10, 3) if args.quick else (30, 5)
    dtypes = args.dtypes[:1] if args.quick else args.dtypes
    machine = convolution_machine(device)
    header = ("case", "input", "dilation", "dtype", "impl", "fwd ms", "fwd+bwd ms", "graph ms", "TFLOP/s",
              "peak MiB", "x dilated")
    print_table_header(header)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for case, dname in ((c, d) for c in (GPU_CASES if device.type == "cuda" else CPU_CASES) for d in dtypes):
        dtype = DTYPES[dname]
        autocast = autocast_to(device, dtype)
        x = torch.randn(1, case.channels, *case.size, generator=gen, device=device).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        upstream = torch.randn_like(x)
        flops = 2 * case.channels * case.channels * 9 * case.size[0] * case.size[1]
        baseline = None
        for impl, conv in convolutions(case, device).items():
            def forward(conv=conv):
                with torch.no_grad(), autocast:
                    return conv(x)

            run = autocast_fwd_bwd(conv, x, upstream, autocast)
            fwd_ms = timer.median_ms(forward, reps, warmup)
            ms = timer.median_ms(run, reps, warmup)
            graph = graph_replay_ms(run, timer, reps)
            best = graph or ms
            baseline = baseline or best
            row = dict(case=case.name, input=[1, case.channels, *case.size], dilation=case.dilation, dtype=dname,
                       impl=impl, count=case.count, fwd_ms=fwd_ms, fwd_bwd_ms=ms, graph_ms=graph,
                       TFLOPs=3 * flops / best / 1e9, peak_MiB=peak_extra_mib(run, device),
                       x_dilated=baseline / best)
            rows.append(row)
            print(f"| {case.name} | {case.channels}x{case.size[0]}x{case.size[1]} | {case.dilation} | {dname} | "
                  f"{impl} | {fwd_ms:.3f} | {ms:.3f} | {fmt(graph, '.3f')} | {row['TFLOPs']:.2f} | "
                  f"{fmt(row['peak_MiB'], '.0f')} | {row['x_dilated']:.2f} |")
            sys.stdout.flush()
        write_results(args.json, {"machine": machine, "results": rows}, announce=False)
    print()
    for dname in dtypes:  # each case's best time (graph where measured) times its count per forward
        per_step = {impl: sum(r["count"] * (r["graph_ms"] or r["fwd_bwd_ms"]) for r in rows
                              if r["impl"] == impl and r["dtype"] == dname) for impl in IMPLS}
        print(f"# {dname}, per training step (each case x its count, fwd+bwd): "
              + ", ".join(f"{impl} {ms:.2f} ms" for impl, ms in per_step.items()))
    write_results(args.json, {"machine": machine, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
