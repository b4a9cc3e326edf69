"""What every Triton kernel variant needs on an H100 / H200 (sm_90) or another NVIDIA GPU, read without one.

    python benchmarks/kernel_resources.py [--arch 90] [--set NUM_WARPS=16 ...] [--json kernel_resources.json]

Compiles, without launching, every kernel variant the launchers produce at the paper's shapes (and
odd ones: C = 2, 16, 21, sizes of 1, fp32/fp16/bf16, channels_last) with the installed Triton and its
bundled ptxas, then reads each cubin's resource usage with Triton's bundled cuobjdump. Columns:
registers per thread, shared memory, the stack frame per thread (Triton kernels call no functions and
keep no local arrays, so a stack frame holds spilled registers: device-memory traffic the kernel was
not meant to have), and the share of an SM's warp slots (64 on an H100) that those registers and that
shared memory allow (occupancy: low occupancy leaves too few loads in flight to cover memory latency, the
usual reason a memory-bound kernel stays under the copy bandwidth).
The interpreter runs kernels as Python and misses what only the compiler checks (loop-carried types,
layouts, constexpr specialisation of arguments equal to 1); tests/test_kernels_triton.py runs this
script, so CI compiles every variant for sm_90 and sm_80 with both supported Tritons and fails on large
spills.
`--arch 80` (A100), 86 / 89 (RTX 30x0 / 40x0), 70 (V100), 75 (T4) read the same for those GPUs;
`--set NAME=VALUE` compiles with another value of a launch parameter (tune_kernels.py's constants), so a
tile that would spill is seen before any GPU time is spent on timing it.
Exit code 77: this Triton cannot compile for NVIDIA GPUs here (no NVIDIA backend).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU: must be set before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

from bench_common import apply_config, write_results  # noqa: E402

try:
    from advent_fast import kernels  # noqa: E402
except ImportError:  # not installed: the top-level folder itself (PYTHONPATH=repo root)
    import kernels  # noqa: E402

CANNOT_COMPILE_HERE = 77
# Per SM, by compute capability (CUDA occupancy calculator): resident warps, resident blocks, shared
# memory bytes, shared memory reserved per block. All: 64K 32-bit registers, allocated per warp in units
# of 256.
SM_LIMITS = {
    70: (64, 32, 96 * 1024, 0),  # V100
    75: (32, 16, 64 * 1024, 0),  # T4, RTX 20x0
    80: (64, 32, 164 * 1024, 1024),  # A100
    86: (48, 16, 100 * 1024, 1024),  # RTX 30x0, A40
    89: (48, 24, 100 * 1024, 1024),  # RTX 40x0, L40, L4
    90: (64, 32, 228 * 1024, 1024),  # H100, H200
}
REGISTERS, REGISTER_UNIT = 65536, 256


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> float:
    """Share of the SM's resident warps that blocks of num_warps warps with these resources fill."""
    max_warps, max_blocks, shared_bytes, shared_reserved = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = min(max_blocks, max_warps // num_warps,
                 REGISTERS // (per_warp * num_warps) if per_warp else max_blocks,
                 shared_bytes // (shared + shared_reserved) if shared + shared_reserved else max_blocks)
    return blocks * num_warps / max_warps


def compile_only(case: dict, arch: int):
    """Make launches compile and return the kernel instead of running it -> list of compiled kernels,
    appended to as launchers are called, each with its constexprs, its arguments' types (which select
    the variant too) and case["label"] at the time of the launch."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if "nvidia" not in triton.backends.backends:
        raise RuntimeError(f"triton {triton.__version__} has no NVIDIA backend")

    class CompileOnlyDriver:  # what JITFunction.run asks the driver for
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    driver.set_active(CompileOnlyDriver())
    compiled = []
    launch = JITFunction.run

    def warmup_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
        types = tuple(a.dtype if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
        compiled.append((self.fn.__name__, constexprs, types, case["label"], kernel))
        return kernel

    JITFunction.run = warmup_only
    if not isinstance(kernels.target_forward.__globals__["_target_fwd_kernel"], JITFunction):
        raise RuntimeError("the kernels are not Triton JIT functions here")
    return compiled


def launch_every_variant(case: dict):
    """Call every launcher in every mode at the shapes that select their variants (CPU tensors: only
    their dtypes, shapes and strides matter when nothing runs), naming each shape in case["label"]."""
    target_forward, target_backward = kernels.target_forward, kernels.target_backward
    for n, c, s, dtype, layout in [
        (2, 19, 512, torch.float32, "contiguous"),
        (2, 19, 512, torch.bfloat16, "channels_last"),
        (1, 21, 300, torch.float16, "channels_last"),
        (1, 2, 1, torch.float32, "contiguous"),
    ]:
        case["label"] = f"({n}, {c}, {s}) {str(dtype)[6:]} {layout}"
        x = torch.randn(n, c, s, dtype=dtype)
        if layout == "channels_last":
            x = x.reshape(n, c, s, 1).contiguous(memory_format=torch.channels_last).reshape(n, c, s)
        prior, emap, per_image, cmean = torch.rand(c), torch.rand(n, s), torch.rand(n), torch.rand(n, c)
        scalar, grad_info = torch.ones(()), torch.randn_like(x)
        keep = torch.ones(n, s, dtype=torch.uint8)
        target_forward(x, prior, 0, 0.5, True, True, True, True)
        target_forward(x, None, 0, 0.5, False, False, True, False)
        target_forward(x, prior, 1, 0.5, False, True, True, True)
        target_backward(x, grad_info, emap, scalar, scalar, None, None, cmean, prior, 0.5)
        target_backward(x, None, None, scalar, None, keep, per_image, None, None, 0.5)
        target_backward(x, None, None, scalar, None, None, None, None, None, 0.5)  # MinEnt alone

    # The class-loop kernels (pixel-contiguous logits, C <= MAX_LOOP_CLASSES: kernels/class_loop.py), whose
    # registers grow with C: bf16 at C = 19, and the modes with the most live values (every output, ranked;
    # every gradient source, ranked) at the most classes they take, at either pixels a thread (HEAVY_LOOP_CLASSES).
    class_loop = importlib.import_module(f"{kernels.__name__}.class_loop")
    for c in (class_loop.HEAVY_LOOP_CLASSES, 19, class_loop.MAX_LOOP_CLASSES):
        case["label"] = f"(2, {c}, 600) bfloat16 contiguous"
        x, prior, cmean = torch.randn(2, c, 600, dtype=torch.bfloat16), torch.rand(c), torch.rand(2, c)
        scalar, emap, keep = torch.ones(()), torch.rand(2, 600), torch.ones(2, 600, dtype=torch.uint8)
        target_forward(x, prior, 0, 0.5, True, True, True, True)
        target_forward(x, prior, 1, 0.5, True, True, True, True)
        target_forward(x, None, 0, 0.5, False, False, True, False)
        target_backward(x, torch.randn_like(x), emap, scalar, scalar, keep, torch.rand(2), cmean, prior, 0.5)
        target_backward(x, None, None, scalar, None, None, None, None, None, 0.5)

    # The fused upsample + loss kernels at the paper's training shapes (target 1024x512 and source
    # 1280x720 from their 1/8-resolution logits) and odd ones.
    ce = importlib.import_module(f"{kernels.__name__}.upsampled_cross_entropy")
    up = importlib.import_module(f"{kernels.__name__}.upsampled_target")
    for n, c, (h, w), (H, W), dtype, layout in [
        (1, 19, (65, 129), (512, 1024), torch.bfloat16, "channels_last"),
        (1, 19, (91, 161), (720, 1280), torch.float32, "contiguous"),
        (2, 16, (9, 17), (33, 67), torch.float16, "contiguous"),
        (1, 2, (1, 1), (3, 4), torch.float32, "contiguous"),  # sizes of 1 arrive as constexprs
    ]:
        case["label"] = f"({n}, {c}, {h}, {w}) to {H}x{W} {str(dtype)[6:]} {layout}"
        x = torch.randn(n, c, h, w, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        labels, scalar = torch.zeros(n, H, W, dtype=torch.int64), torch.ones(())
        loss, count, parts = ce.upsampled_cross_entropy_forward(x, labels, 255, True)
        ce.upsampled_cross_entropy_forward(x, labels.to(torch.uint8), 255, False)
        ce.upsampled_cross_entropy_backward(x, parts, count, scalar)
        prior, grad_info, emap = torch.rand(c), torch.randn(n, c, H, W, dtype=dtype), torch.rand(n, H, W)
        per_image, cmean, keep = torch.rand(n), torch.rand(n, c), torch.ones(n, H, W, dtype=torch.uint8)
        up.upsampled_target_forward(x, H, W, prior, 0, 0.5, True, True, True, True)
        up.upsampled_target_forward(x, H, W, None, 7, 0.5, False, False, True, False)
        up.upsampled_target_backward(x, H, W, grad_info, None, scalar, scalar, None, None, cmean, prior, 0.5)
        up.upsampled_target_backward(x, H, W, None, emap, scalar, None, keep, per_image, None, None, 0.5)


    # Train-mode BatchNorm (+ ReLU) and a folded BatchNorm's shift on channels_last activations: ResNet-101's
    # layer3 at 1280x720 (bf16), odd sizes.
    bn = importlib.import_module(f"{kernels.__name__}.batch_norm")
    for n, c, h, w, dtype in [(1, 256, 90, 160, torch.bfloat16), (2, 19, 7, 11, torch.float32),
                              (1, 3, 5, 1, torch.float16)]:
        case["label"] = f"({n}, {c}, {h}, {w}) {str(dtype)[6:]} channels_last"
        x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight, bias, running_mean, running_var = (torch.rand(c) for _ in range(4))
        for relu, residual in ((False, None), (True, None), (True, torch.randn_like(x)), (False, torch.randn_like(x))):
            y, mean, invstd, scale = bn.batch_norm_forward(x, weight, bias, running_mean, running_var, 0.1, 1e-5,
                                                           relu, residual)
            bn.batch_norm_backward(torch.randn_like(x), x, bias, mean, invstd, scale, relu,
                                   y if relu and residual is not None else None,
                                   want_residual_grad=residual is not None)
            bn.shift_forward(x, bias, relu, residual)  # a folded frozen BatchNorm's shift

    # ReleaseSGD's update (all k passes of a tensor in registers): with and without momentum, a device lr.
    sgd = importlib.import_module(f"{kernels.__name__}.release_sgd")
    for dtype in (torch.float32, torch.bfloat16):
        case["label"] = f"ReleaseSGD {str(dtype)[6:]}, 2 tensors"
        params = [torch.randn(n, dtype=dtype) for n in (5, 3000)]
        grads = [torch.randn_like(t) for t in params]
        sgd.release_sgd_update(params, grads, [torch.zeros_like(t) for t in params], [4, 4], torch.tensor(0.1), 0.9,
                               5e-4, torch.tensor(0.0))
        sgd.release_sgd_update(params, grads, None, [1, 1], 0.1, 0.0, 0.0)

    # A step's weight casts (float32 -> 16-bit) and its weight-gradient casts with accumulation.
    cast = importlib.import_module(f"{kernels.__name__}.weight_cast")
    for dtype in (torch.bfloat16, torch.float16):
        case["label"] = f"weight casts {str(dtype)[6:]}, 2 tensors"
        weights = [torch.randn(n) for n in (5, 3000)]
        cast.cast_add(weights, [None, None], [torch.empty_like(w, dtype=dtype) for w in weights])
        grads = [torch.randn(n).to(dtype) for n in (5, 3000)]
        cast.cast_add(grads, [torch.randn(n) for n in (5, 3000)], [torch.empty(n) for n in (5, 3000)])


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, ... of the one function in a cubin, as cuobjdump -res-usage reports."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in report.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                        help="compute capability x 10 to compile for (default 90: H100 / H200)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a kernel launch parameter (e.g. TILE_ELEMENTS=2048), repeatable")
    parser.add_argument("--json", help="also write the rows here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    case = {"label": None}
    try:
        compiled = compile_only(case, args.arch)
    except Exception as exc:  # noqa: BLE001 - any failure here is the environment's, not the kernels'
        print(f"cannot compile for NVIDIA GPUs here: {exc!r}")
        return CANNOT_COMPILE_HERE
    config = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise SystemExit(f"--set wants NAME=INTEGER, got {item!r}")
        config[name] = int(value)
    try:
        apply_config(config, kernels.__name__)
    except KeyError as exc:
        raise SystemExit(f"--set: {exc.args[0]}") from None
    launch_every_variant(case)
    rows, seen = [], set()
    for name, constexprs, types, label, kernel in compiled:
        key = (name, tuple(sorted(constexprs.items())), types)
        if key in seen:
            continue
        seen.add(key)
        usage = resource_usage(kernel.asm["cubin"])
        # Triton's shared memory is all dynamic (in its metadata); the cubin's SHARED is the 1 KiB that
        # sm_80+ reserve per block, counted by occupancy() whether or not the kernel uses shared memory
        shared = kernel.metadata.shared
        num_warps = kernel.metadata.num_warps
        rows.append({"kernel": name, "first_case": label, "constexprs": constexprs,
                     "num_warps": num_warps, "registers": usage["REG"], "shared_bytes": shared,
                     "stack_bytes": usage["STACK"], "fp_fusion": kernel.metadata.enable_fp_fusion,
                     "occupancy": occupancy(args.arch, usage["REG"], shared, num_warps)})
    settings = "".join(f", {k}={v}" for k, v in config.items())
    print(f"# Kernel resources for sm_{args.arch}{settings}: triton {triton.__version__}, {len(rows)} variants "
          f"({len(compiled)} launches compiled)")
    print()
    print("| kernel | first compiled for | constexprs | warps | registers | shared B | stack (spills) B "
          "| occupancy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["constexprs"].items())
        print(f"| {r['kernel']} | {r['first_case']} | {flags} | {r['num_warps']} | {r['registers']} | "
              f"{r['shared_bytes']:,} | {r['stack_bytes']} | {100 * r['occupancy']:.0f}% |")
    if args.json:
        write_results(args.json, {"triton": triton.__version__, "arch": args.arch, "config": config, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
