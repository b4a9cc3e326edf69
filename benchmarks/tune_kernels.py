"""Launch-parameter sweep of the Triton kernels: which tile size and warp count are fastest on this GPU.

    python benchmarks/tune_kernels.py [--quick] [--json tune_kernels.json]

The kernels take their launch parameters from module constants: kernels/softmax_entropy.py
(TILE_ELEMENTS, NUM_WARPS: the per-pixel forward and backward), kernels/entropy_ranking.py (BLOCK_R:
the radix-select passes), kernels/bilinear.py (CELL_TILE_ELEMENTS, CELL_NUM_WARPS: the
upsampling-fused kernels; COMBINE_TILE_ELEMENTS: their gradients' gather, whose tile does not change
the bits) and kernels/class_loop.py (MAX_LOOP_CLASSES: up to which C the target forward and backward
on pixel-contiguous logits take the class-loop kernels, 0: never; LOOP_VEC, LOOP_NUM_WARPS: their pixels a
thread and warps; HEAVY_LOOP_CLASSES: above it, the variants with the info map, class sums or grad_info take
half the pixels a thread). For each candidate this sets the constants in every kernel module that holds them, checks
the results against the defaults' (a candidate that changes them beyond float rounding is reported,
not timed) and times the public ops forward+backward at the training shapes:
  loop family:  bench_entropy.py's five cases (MinEnt, MinEnt+ER, self-information, class prior, the
                fused target call) on (4, 19, 512, 1024) logits: the class-loop kernels against the
                general ones (MAX_LOOP_CLASSES=0, the second candidate) in the same run;
  pixel family: MinEnt, MinEnt+ER (0.3) and self-information on channels_last (4, 19, 512, 1024) logits
                (the general tile kernels' layout: pixel-contiguous logits take the class loop);
  cell family:  the discriminator's input (self-information map) and MinEnt of (1, 19, 65, 129) logits
                upsampled to 512x1024, the source cross-entropy of (1, 19, 91, 161) logits at 720x1280;
  batchnorm family: the fused train-mode BatchNorm (kernels/batch_norm.py: BN_BLOCK_ROWS, BN_BLOCK_CHANNELS,
                BN_NUM_WARPS, BN_REDUCE_PROGRAMS) on ResNet-101's layers at 1280x720 (bench_batchnorm.py's
                stem, layer3 bn2 + ReLU, layer3 bn3 + residual + ReLU), channels_last.
Columns: median ms (on a GPU the device's time: the call replayed as a CUDA graph, as the host's time
is the same for every candidate), % of the copy bandwidth measured in the same run (pixel, loop and
batchnorm families), x the default.
The defaults change by editing those constants once a table from the target GPUs says so: launch
parameters set the order of the partial sums, hence the bits of a loss, so they are fixed, not autotuned.
Without a GPU it runs under TRITON_INTERPRET=1 on small shapes (a smoke run: interpreter times say
nothing about a GPU).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

import torch

import advent_fast as af
from advent_fast.batch_norm import train_batch_norm
from bench_batchnorm import KINDS as BATCHNORM_KINDS
from bench_common import Timer, apply_config, current_config, fwd_bwd, graph_replay_ms, write_results
from bench_entropy import cases as entropy_cases
from bench_entropy import copy_bandwidth, make_prior, min_bytes

PIXEL_SWEEP = {"TILE_ELEMENTS": (2048, 4096, 8192), "NUM_WARPS": (4, 8, 16)}
CELL_SWEEP = {"CELL_TILE_ELEMENTS": (512, 1024, 2048), "CELL_NUM_WARPS": (4, 8),
              "COMBINE_TILE_ELEMENTS": (1024, 4096)}
# The quick sweeps leave out what compiles to large spills for sm_90 (benchmarks/kernel_resources.py --set,
# 2026-11-27): 4 warps with 8K-element pixel tiles (784 bytes a thread) and with any cell tile
# (combine_taps: 360 bytes); and 2K-element cell tiles (235-250 registers, a warp slot in eight).
QUICK_PIXEL_SWEEP = {"TILE_ELEMENTS": (2048, 4096, 8192), "NUM_WARPS": (8, 16)}
QUICK_CELL_SWEEP = {"CELL_TILE_ELEMENTS": (512, 1024), "CELL_NUM_WARPS": (8,), "COMBINE_TILE_ELEMENTS": (1024, 4096)}
BLOCK_R_SWEEP = (1024, 4096)  # besides the default, with the pixel family's default tile
# 0 first: the general kernels are the second candidate (the same-run baseline, also with --limit 2)
LOOP_SWEEP = {"MAX_LOOP_CLASSES": (0, 24), "LOOP_VEC": (2, 4, 8), "LOOP_NUM_WARPS": (2, 4, 8)}
QUICK_LOOP_SWEEP = {"MAX_LOOP_CLASSES": (0, 24), "LOOP_VEC": (4,), "LOOP_NUM_WARPS": (4, 8)}
BATCHNORM_SWEEP = {"BN_BLOCK_ROWS": (32, 64, 128), "BN_BLOCK_CHANNELS": (32, 64, 128), "BN_NUM_WARPS": (4, 8),
                   "BN_REDUCE_PROGRAMS": (512, 2048)}
# Without 128 x 128 tiles: on 4 warps the ReLU backward's statistics spill (sm_90, 2026-11-27)
QUICK_BATCHNORM_SWEEP = {"BN_BLOCK_ROWS": (32, 64, 128), "BN_BLOCK_CHANNELS": (64,), "BN_NUM_WARPS": (4, 8),
                         "BN_REDUCE_PROGRAMS": (512, 2048)}
GPU_SHAPES = {"pixel": (4, 19, 512, 1024), "cell_target": ((1, 19, 65, 129), (512, 1024)),
              "cell_source": ((1, 19, 91, 161), (720, 1280)), "loop": (4, 19, 512, 1024),
              "batchnorm": [("stem", (1, 64, 360, 640), True, False), ("layer3 bn2", (1, 256, 90, 160), True, False),
                            ("layer3 bn3", (1, 1024, 90, 160), True, True)]}
SMOKE_SHAPES = {"pixel": (1, 19, 16, 40), "cell_target": ((1, 19, 3, 5), (17, 33)),
                "cell_source": ((1, 19, 3, 6), (17, 41)), "loop": (1, 19, 16, 40),
                "batchnorm": [("layer3 bn2", (1, 70, 6, 11), True, False), ("layer3 bn3", (1, 70, 6, 11), True, True)]}
ER_RATIO = 0.3


def candidates(sweep, defaults):
    """The default first, then every other combination of the sweep's values (the class-loop kernels'
    parameters only where they are used)."""
    combos = [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]
    combos = [c for c in combos if c.get("MAX_LOOP_CLASSES") != 0
              or all(v == defaults[k] for k, v in c.items() if k != "MAX_LOOP_CLASSES")]
    return [defaults] + [c for c in combos if c != defaults]


def cases(family, shapes, device, dtypes):
    """[(name, logits, fn, upstream, bytes moved by a perfect fwd+bwd or None)] for one family."""
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    if family == "pixel":
        shape = shapes["pixel"]
        for dname, dtype in dtypes.items():
            logits = (torch.randn(shape, generator=g) * 3).to(device, dtype, memory_format=torch.channels_last)
            upstream = torch.randn(shape, generator=g).to(device, dtype)
            numel, elt = logits.numel(), logits.element_size()
            out += [
                (f"minent {dname}", logits, af.entropy_loss, None, min_bytes("minent", numel, elt)[1]),
                (f"minent_er {dname}", logits, lambda x: af.entropy_loss(x, ER_RATIO), None,
                 min_bytes("minent_er", numel, elt)[1]),
                (f"self_info {dname}", logits, af.self_information, upstream, min_bytes("self_info", numel, elt)[1]),
            ]
        return out
    if family == "loop":
        shape = shapes["loop"]
        fused = {name: fns[1] for name, fns in entropy_cases(make_prior(shape[1], device)).items()}
        for dname, dtype in dtypes.items():
            logits = (torch.randn(shape, generator=g) * 3).to(device, dtype)
            upstream = torch.randn(shape, generator=g).to(device, dtype)
            numel, elt = logits.numel(), logits.element_size()
            out += [(f"{name} {dname}", logits, fn, upstream, min_bytes(name, numel, elt)[1])
                    for name, fn in fused.items()]
        return out
    if family == "batchnorm":
        for case, shape, relu, add in shapes["batchnorm"]:
            channels = shape[1]
            weight = (torch.rand(channels, generator=g) + 0.5).to(device)
            bias = torch.randn(channels, generator=g).to(device)
            stats = torch.zeros(channels, device=device), torch.ones(channels, device=device)
            for dname, dtype in dtypes.items():
                x, upstream, shortcut = (torch.randn(shape, generator=g).to(device, dtype,
                                                                            memory_format=torch.channels_last)
                                         for _ in range(3))
                passes = BATCHNORM_KINDS["train"].residual_passes if add else BATCHNORM_KINDS["train"].passes

                def fn(x, w=weight, b=bias, s=stats, r=relu, res=shortcut if add else None):
                    # a fresh leaf each call: the residual's gradient is computed, not accumulated
                    return train_batch_norm(x, w, b, *s, 0.1, 1e-5, r, None if res is None else
                                            res.detach().requires_grad_())

                out.append((f"{case} {dname}", x, fn, upstream, passes * x.numel() * x.element_size()))
        return out
    (low, size), (src_low, src_size) = shapes["cell_target"], shapes["cell_source"]
    for dname, dtype in dtypes.items():
        logits = (torch.randn(low, generator=g) * 3).to(device, dtype)
        upstream = torch.randn((low[0], low[1]) + size, generator=g).to(device, dtype)
        src_logits = (torch.randn(src_low, generator=g) * 3).to(device, dtype)
        labels = torch.randint(0, src_low[1], (src_low[0],) + src_size, generator=g)
        labels[torch.rand(labels.shape, generator=g) < 0.1] = 255
        labels = labels.to(device)
        out += [
            (f"up_self_info {dname}", logits,
             lambda x: af.upsampled_target_losses(x, size).self_information, upstream, None),
            (f"up_minent {dname}", logits,
             lambda x: af.upsampled_target_losses(x, size, self_information=False, entropy=True).entropy_loss,
             None, None),
            (f"source_ce {dname}", src_logits, lambda x, labels=labels: af.upsampled_cross_entropy(x, labels),
             None, None),
        ]
    return out


def close(a, b, dtype):
    """Same values up to the rounding of a different summation order (NaN where NaN)."""
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=rtol * float(b.double().abs().max()) + 1e-30,
                          equal_nan=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer candidates and repetitions")
    p.add_argument("--families", nargs="+", default=["loop", "pixel", "cell", "batchnorm"],
                   choices=["loop", "pixel", "cell", "batchnorm"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--limit", type=int, default=None, help="at most this many candidates per family (default first)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 30, 10 with --quick)")
    p.add_argument("--json", default="tune_kernels.json", help="where to write the results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        device, shapes = torch.device("cuda"), GPU_SHAPES
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, shapes = torch.device("cpu"), SMOKE_SHAPES
        af.set_backend("triton")
    else:
        print("tune_kernels.py needs a GPU (or TRITON_INTERPRET=1 for a smoke run on the CPU)", file=sys.stderr)
        return 2
    dtypes = {d: {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[d] for d in args.dtypes}
    timer = Timer(device)
    reps, warmup = (10, 3) if args.quick else (30, 5)
    if args.reps:  # the correctness run before the timing warms up
        reps, warmup = args.reps, 0
    copy_gbs = copy_bandwidth(device, timer, reps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"# {name} | torch {torch.__version__} | measured copy bandwidth {copy_gbs:.0f} GB/s")
    print("| family | config | case | ms | % copy | x default |")
    print("|---|---|---|---|---|---|")

    sweeps = {"pixel": QUICK_PIXEL_SWEEP if args.quick else PIXEL_SWEEP,
              "cell": QUICK_CELL_SWEEP if args.quick else CELL_SWEEP,
              "loop": QUICK_LOOP_SWEEP if args.quick else LOOP_SWEEP,
              "batchnorm": QUICK_BATCHNORM_SWEEP if args.quick else BATCHNORM_SWEEP}
    rows = []
    for family in args.families:
        defaults = current_config(sweeps[family])
        configs = candidates(sweeps[family], defaults)
        if family == "pixel":
            block_r = current_config(["BLOCK_R"])
            configs = [{**c, **block_r} for c in configs]
            configs += [{**defaults, "BLOCK_R": b} for b in BLOCK_R_SWEEP if b != block_r["BLOCK_R"]]
        configs = configs[: args.limit]
        family_cases = cases(family, shapes, device, dtypes)
        expected, default_ms = {}, {}
        for config in configs:
            apply_config(config)
            label = " ".join(f"{k}={v}" for k, v in config.items())
            for case, logits, fn, upstream, nbytes in family_cases:
                run = fwd_bwd(fn, logits, upstream)
                grad = run()
                row = {"family": family, "config": config, "case": case}
                if case not in expected:
                    expected[case] = grad
                elif not close(grad, expected[case], logits.dtype):
                    row["error"] = "gradient differs from the default config's"
                    rows.append(row)
                    print(f"| {family} | {label} | {case} | {row['error']} |||")
                    continue
                ms = graph_replay_ms(run, timer, reps) if device.type == "cuda" else None
                if ms is None:  # no GPU, or the capture failed (its error on stderr): the call's own time
                    ms = timer.median_ms(run, reps, warmup)
                default_ms.setdefault(case, ms)
                row.update(ms=ms, x_default=default_ms[case] / ms,
                           pct_copy=None if nbytes is None else 100 * nbytes / ms / 1e6 / copy_gbs)
                rows.append(row)
                pct = "-" if row["pct_copy"] is None else f"{row['pct_copy']:.0f}"
                print(f"| {family} | {label} | {case} | {ms:.3f} | {pct} | {row['x_default']:.2f} |")
                sys.stdout.flush()
        apply_config(configs[0])  # back to the defaults

    print()
    print("Best candidate per family (geometric mean of x default over its cases):")
    for family in args.families:
        by_config = {}
        for r in rows:
            if r["family"] == family and "ms" in r:
                by_config.setdefault(tuple(r["config"].items()), []).append(r["x_default"])
        if not by_config:
            print(f"- {family}: nothing timed")
            continue
        # only candidates timed on every case of the family (a mismatching case drops the candidate)
        complete = {k: v for k, v in by_config.items() if len(v) == max(map(len, by_config.values()))}
        best = max(complete, key=lambda k: math.prod(complete[k]) ** (1 / len(complete[k])))
        gain = math.prod(complete[best]) ** (1 / len(complete[best]))
        print(f"- {family}: {' '.join(f'{k}={v}' for k, v in best)} ({gain:.2f}x the default)")
    write_results(args.json, {"device": name, "torch": torch.__version__, "copy_GBps": copy_gbs, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
