"""Convolutions with the 19 classes as channels, as they are or padded with zero channels to a multiple of
8, 16 or 32: forward + backward. 19 is no multiple of 8, which 16-bit tensor-core convolutions want.

    python benchmarks/bench_class_channels.py [--quick] [--dtypes bf16 fp32] [--multiples 1 8 16 32]

Kinds of case, batch 1, channels_last, fp32 weights and autocast to the dtype, as the fast path runs them:
- ``classifier``: the release ResNet-101's classifier head (ASPP: four dilated 3x3 convolutions to the
  classes, summed) on the main head's input (2048 channels) and the aux head's (1024) at the source's
  feature map (1280x720 at output stride 8: 91x161) and the main one at the target's (65x129). Padded: the
  output channels, with zero filters sliced off the logits (``train.classifier_channels_multiple``).
  Forward, input and weight gradients.
- ``discriminator``: a discriminator's first convolution (4x4, stride 2, to 64 channels) on the source's
  19-class self-information map at full resolution (1280x720) and the target's (1024x512). Padded: the
  input channels, a map with zero channels (what the fused kernels would have to write) and zero weights:
  not an option of the trainer, a measurement of whether one would pay. Forward, input (the adversarial
  loss's path to G) and weight gradients.

Columns: median fwd+bwd ms, on GPUs the device's time alone (graph ms: the call replayed as a CUDA graph),
TFLOP/s of the unpadded convolutions' work (3 passes of 2 x C_in x C_out x kernel area x output pixels),
peak memory above the inputs, speed-up against the unpadded case in the same run. Without a GPU: the CPU
at small sizes.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from advent_fast.models import ASPPHead
from bench_common import (DTYPES, Timer, autocast_fwd_bwd, autocast_to, convolution_machine, fmt, graph_replay_ms,
                          peak_extra_mib, print_table_header, write_results)

CLASSES = 19
D_WIDTH = 64  # the discriminators' first width (model.discriminator_width)


class Case(NamedTuple):
    kind: str  # classifier | discriminator
    name: str
    channels: int  # the classifier's input channels; the discriminator's are the classes
    size: tuple  # input H x W


GPU_CASES = [
    Case("classifier", "main, source", 2048, (91, 161)),
    Case("classifier", "main, target", 2048, (65, 129)),
    Case("classifier", "aux, source", 1024, (91, 161)),
    Case("discriminator", "conv1, source", CLASSES, (720, 1280)),
    Case("discriminator", "conv1, target", CLASSES, (512, 1024)),
]
CPU_CASES = [
    Case("classifier", "main, small", 256, (12, 20)),
    Case("discriminator", "conv1, small", CLASSES, (48, 80)),
]


def classifier_case(case: Case, device, gen) -> tuple[Callable, int]:
    """(make: multiple, dtype -> the call, its input, the upstream gradient, leaf weights to add; the
    unpadded forward's flops). The same for :func:`discriminator_case`."""
    head = ASPPHead(case.channels, CLASSES).to(device, memory_format=torch.channels_last)

    def make(multiple: int, dtype: torch.dtype):
        head.channels_multiple = multiple
        x = torch.randn(1, case.channels, *case.size, generator=gen, device=device).to(dtype)
        upstream = torch.randn(1, CLASSES, *case.size, generator=gen, device=device).to(dtype)
        return head, x, upstream

    return make, 4 * 2 * case.channels * CLASSES * 9 * case.size[0] * case.size[1]


def discriminator_case(case: Case, device, gen) -> tuple[Callable, int]:
    weight = torch.randn(D_WIDTH, CLASSES, 4, 4, generator=gen, device=device) * 0.02
    out_size = (case.size[0] // 2, case.size[1] // 2)

    def make(multiple: int, dtype: torch.dtype):
        extra = -CLASSES % multiple
        padded = F.pad(weight, (0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last)

        def conv(x):
            return F.conv2d(x, padded, stride=2, padding=1)

        x = F.pad(torch.rand(1, CLASSES, *case.size, generator=gen, device=device), (0, 0, 0, 0, 0, extra)).to(dtype)
        upstream = torch.randn(1, D_WIDTH, *out_size, generator=gen, device=device).to(dtype)
        return conv, x, upstream, padded

    return make, 2 * CLASSES * D_WIDTH * 16 * out_size[0] * out_size[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, first dtype only")
    parser.add_argument("--json", default="bench_class_channels.json", help="where to write the results")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--multiples", nargs="+", type=int, default=[1, 8, 16, 32],
                        help="channels padded to a multiple of each (1: as they are, the baseline)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.multiples[0] != 1 or min(args.multiples) < 1:
        parser.error("--multiples: positive, the first 1 (the unpadded baseline)")

    device = torch.device(args.device)
    timer = Timer(device)
    reps, warmup = (10, 3) if args.quick else (30, 5)
    dtypes = args.dtypes[:1] if args.quick else args.dtypes
    machine = convolution_machine(device)
    header = ("kind", "case", "input", "dtype", "channels", "fwd+bwd ms", "graph ms", "TFLOP/s", "peak MiB",
              "x unpadded")
    print_table_header(header)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for case, dname in ((c, d) for c in (GPU_CASES if device.type == "cuda" else CPU_CASES) for d in dtypes):
        dtype = DTYPES[dname]
        autocast = autocast_to(device, dtype)
        make, flops = (classifier_case if case.kind == "classifier" else discriminator_case)(case, device, gen)
        baseline = None
        for multiple in args.multiples:
            fn, x, upstream, *weights = make(multiple, dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            upstream = upstream.contiguous(memory_format=torch.channels_last)
            for w in weights:
                w.requires_grad_()

            run = autocast_fwd_bwd(fn, x, upstream, autocast)
            ms = timer.median_ms(run, reps, warmup)
            graph = graph_replay_ms(run, timer, reps)
            best = graph or ms
            baseline = baseline or best
            channels = CLASSES + (-CLASSES % multiple)
            row = dict(kind=case.kind, case=case.name, input=[1, case.channels, *case.size], dtype=dname,
                       multiple=multiple, channels=channels, fwd_bwd_ms=ms, graph_ms=graph,
                       TFLOPs=3 * flops / best / 1e9, peak_MiB=peak_extra_mib(run, device), x_unpadded=baseline / best)
            rows.append(row)
            print(f"| {case.kind} | {case.name} | {case.channels}x{case.size[0]}x{case.size[1]} | {dname} | "
                  f"{channels} | {ms:.3f} | {fmt(graph, '.3f')} | {row['TFLOPs']:.2f} | "
                  f"{fmt(row['peak_MiB'], '.0f')} | {row['x_unpadded']:.2f} |")
            sys.stdout.flush()
        write_results(args.json, {"machine": machine, "results": rows}, announce=False)
    write_results(args.json, {"machine": machine, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
