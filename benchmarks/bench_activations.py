"""Activation memory of one generator forward: what the backward keeps, per BatchNorm mode and input size.

    python benchmarks/bench_activations.py                    # ResNet-101, 1280x720 and 1024x512
    python benchmarks/bench_activations.py --precisions bf16 --bn train folded --checkpointing on

The training step's peak memory is the weights and optimiser states plus what autograd saves for the
backward of one generator forward (the source pass's activations are freed by its backward before
the target pass). This counts the latter exactly, on any device: every tensor autograd saves goes
through ``saved_tensors_hooks`` and the unique storages are summed, the parameters themselves
left out (they are counted once, in the parameters column; bf16 or folded copies of them are
activations' memory and counted). On CUDA the memory the forward leaves allocated besides its
outputs is measured too (allocated MiB: the same quantity, as the allocator sees it). BatchNorm modes: ``train`` (the
release: train-mode statistics, each BatchNorm keeps its input besides the convolution's) and
``folded`` (``model.freeze_bn: true`` on the fast path: folded into the convolutions); activation
checkpointing (``train.activation_checkpointing``) off or on (each backbone block keeps only its
input; the checkpoint keeps it through a saved tensor, so it is counted); ``--space-to-batch on``
(``train.space_to_batch``: each dilated convolution keeps the phases of its input). Autocast's
per-op precisions may differ between devices: compare rows of one device. Columns: saved MiB,
storages, allocated MiB, parameters MiB (float32; gradients and SGD momentum add the same twice),
forward seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from advent_fast.models import ARCHS, build_model, fold_frozen_batchnorm, use_space_to_batch
from bench_common import write_results

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deeplabv2_r101", choices=ARCHS)
    p.add_argument("--width", type=int, default=None, help="deeplabv2_small's width")
    p.add_argument("--sizes", nargs="+", default=["1280x720", "1024x512"], metavar="WxH")
    p.add_argument("--bn", nargs="+", default=["train", "folded"], choices=["train", "folded"])
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="train.activation_checkpointing")
    p.add_argument("--space-to-batch", nargs="+", default=["off"], choices=["off", "on"],
                   help="train.space_to_batch")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="bench_activations.json", help="where to write the results")
    return p.parse_args(argv)


def saved_bytes(model: torch.nn.Module, image: torch.Tensor, dtype) -> tuple:
    """(bytes, storages, bytes measured) autograd keeps for the backward of ``model(image)``,
    the parameters themselves not counted (bf16 copies of them are). On CUDA also the memory the
    forward leaves allocated besides its outputs (the same thing, measured; None elsewhere)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in parameters:
            return tensor
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        # Detached: a packed output that kept its grad_fn would form a cycle with its node that
        # nothing frees when the graph is dropped without a backward (each row's memory would leak).
        return tensor.detach()

    cuda = image.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(image.device)
        before = torch.cuda.memory_allocated(image.device)
    autocast = torch.autocast(image.device.type, dtype=dtype, enabled=dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        outputs = model(image)
    measured = None
    if cuda:
        torch.cuda.synchronize(image.device)
        outputs_bytes = sum(o.untyped_storage().nbytes() for o in outputs if o is not None)
        measured = torch.cuda.memory_allocated(image.device) - before - outputs_bytes
    del outputs
    return sum(storages.values()), len(storages), measured


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"# Activation memory of one {args.model} forward (both heads): {name}, torch {torch.__version__}")
    print()
    print("| BatchNorm | checkpointing | space to batch | precision | input | saved MiB | storages | allocated MiB "
          "| parameters MiB | forward s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    options = {} if args.width is None else {"width": args.width}
    for bn, phases in [(bn, phases) for bn in args.bn for phases in args.space_to_batch]:
        model = build_model(args.model, 19, multi_level=True, freeze_bn=bn == "folded", **options)
        if bn == "folded":
            fold_frozen_batchnorm(model)
        if phases == "on":
            use_space_to_batch(model)
        model = model.to(device, memory_format=torch.channels_last)
        param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        for checkpointing in args.checkpointing:
            model.activation_checkpointing = checkpointing == "on"
            for precision in args.precisions:
                for size in args.sizes:
                    w, h = (int(v) for v in size.split("x"))
                    image = torch.randn(1, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
                    start = time.perf_counter()
                    nbytes, count, measured = saved_bytes(model, image, PRECISIONS[precision])
                    seconds = time.perf_counter() - start
                    row = {"bn": bn, "checkpointing": checkpointing, "space_to_batch": phases,
                           "precision": precision, "input": size, "saved_MiB": nbytes / 2**20, "storages": count,
                           "allocated_MiB": None if measured is None else measured / 2**20,
                           "parameters_MiB": param_mib, "forward_s": seconds}
                    rows.append(row)
                    allocated = "-" if measured is None else f"{row['allocated_MiB']:,.0f}"
                    print(f"| {bn} | {checkpointing} | {phases} | {precision} | {size} | {row['saved_MiB']:,.0f} | "
                          f"{count} | {allocated} | {param_mib:,.0f} | {seconds:.1f} |")
                    sys.stdout.flush()
    write_results(args.json, {"device": name, "torch": torch.__version__, "model": args.model, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
