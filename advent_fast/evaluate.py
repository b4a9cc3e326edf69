"""Evaluation with the release protocol: one checkpoint, a weighted ensemble, or a sweep of snapshots.

    python -m advent_fast.evaluate --checkpoint model.pth --root DATA/Cityscapes
    python -m advent_fast.evaluate --checkpoint advent.pth --checkpoint minent_er.pth --weights 0.5 0.5
    python -m advent_fast.evaluate --sweep runs/exp/snapshots --timeout 600
    python -m advent_fast.evaluate --config advent_pretrained.yml --root DATA/Cityscapes  # a release experiment file

Protocol (release defaults): the image resized to 1024x512 (bicubic, in the dataset), the main head,
its logits upsampled bilinearly (align_corners=True) to the label size (2048x1024), ensembles summing
the weighted upsampled logits, argmax on the device, one confusion matrix over the split. Without
``--root`` the embedded target val split is evaluated, at the embedded sizes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from advent_fast import reference, release_config
from advent_fast.backend import auto_precision
from advent_fast.config import CHOICES, read_yaml
from advent_fast.data import (
    CityscapesDataset,
    DatasetError,
    GTA5Dataset,
    SegmentationDataset,
    SynthiaDataset,
    class_names,
    default_subsets,
    ensure_embedded_data,
)
from advent_fast.metrics import ConfusionMatrix
from advent_fast.models import model_from_checkpoint
from advent_fast.preemption import ignore_stop_signals
from advent_fast.visualize import make_panel, panel_file_name, save_png

__all__ = [
    "SnapshotNotReady",
    "add_running_arguments",
    "argument_errors",
    "build_dataset",
    "evaluate_ensemble",
    "evaluate_model",
    "format_table",
    "inference_device",
    "list_snapshots",
    "load_models",
    "main",
    "predict_logits",
    "sweep_snapshots",
]

Size = Tuple[int, int]  # (width, height)
PRECISIONS = CHOICES["eval.precision"]


def _autocast(device: torch.device, precision: str):
    """The autocast of ``precision``; auto: on GPUs :func:`advent_fast.backend.auto_precision` (bf16, or fp16
    on those without bf16 tensor cores: V100, T4; fp32 on older ones), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = auto_precision(device) if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # A DDP wrapper's forward may run collectives; evaluation shards the data and runs the module.
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def predict_logits(
    models: Sequence[torch.nn.Module],
    weights: Sequence[float],
    images: torch.Tensor,
    out_hw: Tuple[int, int],
    precision: str = "fp32",
) -> torch.Tensor:
    """Sum of ``weight * upsample(main logits)``: (N, C, *out_hw) float32, on the images' device."""
    total = None
    for model, weight in zip(models, weights):
        with _autocast(images.device, precision):
            main = model(images)[1]
        up = F.interpolate(main.float(), size=out_hw, mode="bilinear", align_corners=True)
        total = up.mul_(weight) if total is None else total.add_(up, alpha=weight)
    return total


def _summary(cm: ConfusionMatrix, names: Sequence[str], subsets: Dict[str, Sequence[int]]) -> dict:
    iou = cm.iou()
    result = {"num_classes": cm.num_classes, "class_names": list(names), "iou": iou.tolist(), "miou": cm.miou()}
    for key, classes in subsets.items():
        result[key] = cm.miou(classes)
    return result


def evaluate_ensemble(
    models: Sequence[torch.nn.Module],
    weights: Sequence[float],
    dataset: SegmentationDataset,
    num_classes: int,
    device,
    input_size: Optional[Size] = None,
    label_size: Optional[Size] = None,
    batch_size: int = 1,
    num_workers: int = 0,
    classes_subsets: Optional[Dict[str, Sequence[int]]] = None,
    precision: str = "fp32",
    progress: bool = False,
    save_vis: int = 0,
    vis_dir: Optional[str] = None,
) -> dict:
    """Evaluate the weighted sum of the models' upsampled main logits on ``dataset``.

    ``input_size`` resizes the batch on the device (bicubic) when the dataset has not already;
    ``label_size`` is the resolution logits are upsampled to (default: the labels'; labels of
    another size are resized with nearest neighbour). The models are put in eval mode and back in
    their previous mode afterwards. Under torch.distributed each rank evaluates every
    world_size-th image and the confusion matrices are summed. ``save_vis`` writes panels of the
    first images to ``vis_dir`` (rank 0). Returns ``{"iou", "miou", "class_names", "num_classes",
    "num_images", ...subset means}``; IoUs in [0, 1], means x 100, NaN for absent classes.
    """
    if len(models) != len(weights) or not models:
        raise ValueError(f"{len(models)} models but {len(weights)} weights")
    if save_vis and not vis_dir:
        raise ValueError("save_vis needs vis_dir")
    if not getattr(dataset, "labels", True):
        raise ValueError("evaluation needs labels: the dataset was built with labels=False")
    device = torch.device(device)
    modules = [_unwrap(m) for m in models]
    was_training = [m.training for m in modules]
    subsets = default_subsets(num_classes) if classes_subsets is None else classes_subsets
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    shard = dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))
    # A training run's evaluation outlives a stop signal to its job: its loader's workers too (preemption.py)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    cm = ConfusionMatrix(num_classes, device)
    saved = 0
    try:
        for m in modules:
            m.eval()
        for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress or rank != 0):
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            if input_size is not None and (images.shape[-1], images.shape[-2]) != tuple(input_size):
                size = (input_size[1], input_size[0])
                images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
            out_hw = tuple(labels.shape[-2:]) if label_size is None else (label_size[1], label_size[0])
            # nearest-exact samples pixel centres like Pillow's NEAREST (the dataset's resize); where a centre
            # falls exactly on a source pixel boundary (some ratios other than 2^k) Pillow takes the pixel before
            if tuple(labels.shape[-2:]) != out_hw:
                labels = F.interpolate(labels[:, None].float(), size=out_hw, mode="nearest-exact")[:, 0].long()
            logits = predict_logits(modules, weights, images, out_hw, precision)
            pred = logits.argmax(1)
            cm.update(pred, labels)
            if rank == 0 and saved < save_vis:
                saved += _save_panels(dataset, batch, labels, pred, logits, num_classes, vis_dir, save_vis - saved)
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    cm.all_reduce()
    result = _summary(cm, class_names(num_classes), subsets)
    result["num_images"] = len(dataset)
    return result


def evaluate_model(model: torch.nn.Module, dataset: SegmentationDataset, num_classes: int, device,
                   **options) -> dict:
    """:func:`evaluate_ensemble` of one model (``options``: its keyword arguments)."""
    return evaluate_ensemble([model], [1.0], dataset, num_classes, device, **options)


def _save_panels(dataset, batch, labels, pred, logits, num_classes, vis_dir, limit) -> int:
    os.makedirs(vis_dir, exist_ok=True)
    count = min(limit, pred.shape[0])
    entropy = reference.entropy_map(logits[:count])
    for i in range(count):
        panel = make_panel(
            dataset.to_rgb(batch["image"][i]),
            labels[i].cpu().numpy(),
            [pred[i].cpu().numpy()],
            [entropy[i].float().cpu().numpy()],
            ["prediction"],
            num_classes,
        )
        save_png(os.path.join(vis_dir, panel_file_name(batch["name"][i])), panel)
    return count


def format_table(result: dict) -> str:
    """Per-class IoU table and the means, as text."""
    width = max(len(n) for n in result["class_names"])
    lines = [f"{name:<{width}}  {100 * iou:6.2f}" for name, iou in zip(result["class_names"], result["iou"])]
    lines.append(f"{'mIoU':<{width}}  {result['miou']:6.2f}")
    lines += [f"{key:<{width}}  {result[key]:6.2f}" for key in ("miou16", "miou13") if key in result]
    return "\n".join(lines)


def _json_safe(value):
    """NaN (a class that never occurs) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Data sets and models for the command line (shared with advent_fast.visualize)

_DEFAULT_SIZES = {  # (input size, label size) of the real data sets
    "cityscapes": ((1024, 512), (2048, 1024)),
    "gta5": ((1280, 720), None),
    "synthia": ((1280, 760), None),
}


def build_dataset(
    name: str,
    root: Optional[str],
    num_classes: int,
    split: str = "val",
    input_size: Optional[Size] = None,
    label_size: Optional[Size] = None,
    list_path: Optional[str] = None,
) -> SegmentationDataset:
    """An evaluation set; with no ``root`` the embedded one (target val for cityscapes, source for gta5)."""
    if root is None:
        if name == "synthia":
            raise ValueError("the embedded data has no SYNTHIA set: give --root")
        embedded = ensure_embedded_data()
        if name == "cityscapes":
            root, sizes = embedded.target_root, (embedded.target_size, embedded.label_size)
        else:
            root, sizes = embedded.source_root, (embedded.source_size, embedded.source_size)
    else:
        sizes = _DEFAULT_SIZES[name]
    size, labels_at = input_size or sizes[0], label_size or sizes[1]
    if name == "cityscapes":
        return CityscapesDataset(root, split, size, labels_at, num_classes, list_path=list_path)
    if name == "gta5":
        return GTA5Dataset(root, size, labels_at, list_path, num_classes)
    if num_classes != 16:
        raise ValueError(f"SYNTHIA has 16 classes, the model has {num_classes}")
    return SynthiaDataset(root, size, labels_at, list_path)


def load_models(
    paths: Sequence[str], device, arch: Optional[str] = None, num_classes: Optional[int] = None
) -> Tuple[List[torch.nn.Module], int]:
    """Models from project checkpoints or release state dicts, in eval mode on ``device``; and their class count."""
    device = torch.device(device)
    models, counts = [], set()
    for path in paths:
        model, meta = model_from_checkpoint(path, arch=arch, num_classes=num_classes)
        model = model.to(device).eval()
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        models.append(model)
        counts.add(meta["num_classes"])
    if len(counts) > 1:
        raise ValueError(f"the checkpoints disagree on the number of classes: {sorted(counts)}")
    return models, counts.pop()


# ---------------------------------------------------------------------------------------------
# Sweeping a snapshot folder (the release's "best" mode, with a timeout instead of waiting forever)

class SnapshotNotReady(Exception):
    """Raised by a sweep's ``evaluate_path`` for a snapshot that cannot be loaded (yet)."""


# The whole number before the extension; not hidden files, not discriminators (the release's
# model_2000_D_main.pth ends in a word, AdaptSegNet's GTA5_2000_D1.pth in "_D" and a level number).
_SNAPSHOT = re.compile(r"^(?!\.)(?:.*\D)?(\d+)\.(pth|pt)$")
_DISCRIMINATOR = re.compile(r"_D\d*\.(pth|pt)$")


def list_snapshots(folder: str) -> List[Tuple[int, str]]:
    """(iteration, path) of the snapshots in ``folder``: ``*.pth``/``*.pt`` files whose name ends in a
    number (``model_2000.pth``, ``2000.pth``), discriminators' snapshots left out."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"snapshot folder not found: {folder}")
    found = []
    for name in os.listdir(folder):
        match = _SNAPSHOT.match(name)
        if match and not _DISCRIMINATOR.search(name):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def sweep_snapshots(
    folder: str,
    evaluate_path: Callable[[str], dict],
    timeout: float = 0.0,
    poll: float = 5.0,
    until: Optional[int] = None,
    cache: Optional[dict] = None,
    on_result: Optional[Callable[[str, dict], None]] = None,
) -> dict:
    """Evaluate every snapshot in ``folder``, waiting up to ``timeout`` seconds for each new one.

    Stops when ``timeout`` seconds pass without a new snapshot (0: evaluate what is there), or once
    a snapshot numbered ``until`` or later is done. A file that cannot be loaded yet (still being
    written: ``evaluate_path`` raises :class:`SnapshotNotReady`) is retried until then. ``cache``
    maps a file name to ``{"stat": [size, mtime_ns], "result": ...}``; matching entries are reused
    and new ones added. Returns ``{"snapshots": [...], "best": ..., "errors": {path: message}}``.
    """
    cache = {} if cache is None else cache
    done: Dict[str, dict] = {}
    errors: Dict[str, str] = {}
    last_new = time.monotonic()
    while True:
        for iteration, path in list_snapshots(folder):
            if path in done:
                continue
            try:
                stat = os.stat(path)
            except FileNotFoundError:  # removed since the listing (a trainer keeping the last k)
                continue
            key, signature = os.path.basename(path), [stat.st_size, stat.st_mtime_ns]
            entry = cache.get(key)
            if entry is not None and entry.get("stat") == signature:
                result = entry["result"]
            else:
                try:
                    result = evaluate_path(path)
                except SnapshotNotReady as err:
                    errors[path] = str(err.__cause__ or err)
                    continue
                cache[key] = {"stat": signature, "result": result}
            done[path] = {"checkpoint": path, "iteration": iteration, **result}
            errors.pop(path, None)
            last_new = time.monotonic()
            if on_result is not None:
                on_result(path, done[path])
        finished = until is not None and any(s["iteration"] >= until for s in done.values())
        if finished or time.monotonic() - last_new >= timeout:
            break
        time.sleep(min(poll, max(0.0, timeout - (time.monotonic() - last_new))))
    snapshots = sorted(done.values(), key=lambda s: (s["iteration"], s["checkpoint"]))
    ranked = [s for s in snapshots if not math.isnan(s["miou"])]
    best = max(ranked, key=lambda s: s["miou"]) if ranked else None
    return {"snapshots": snapshots, "best": best, "errors": errors}


# ---------------------------------------------------------------------------------------------
# Command line


def add_running_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "running" options of the inference commands (evaluate, predict): device, precision, batch size,
    loader workers, progress bar."""
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    # fp32 by default: the release's numerics, and faster than bf16 autocast on an H200 (README, Measured
    # results: 0.017 against 0.024 s an image), whose casts add kernels to a host-bound forward
    run.add_argument("--precision", choices=PRECISIONS, default="fp32",
                     help="fp32 (release, default), bf16, fp16 (autocast), or auto (bf16 on GPUs; fp16 on those "
                          "without bf16 tensor cores, fp32 on those without tensor cores)")
    run.add_argument("--batch-size", type=int, default=2)
    run.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return run


@contextlib.contextmanager
def argument_errors(parser: argparse.ArgumentParser):
    """What the command line names and cannot be used (a missing checkpoint, dataset folder or image, a
    checkpoint of another model, an unreadable file) ends the command as argparse's own errors do: the
    message after the usage, exit status 2, no traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError, DatasetError) as err:
        parser.error(str(err))


def inference_device(name: str) -> torch.device:
    """``--device``: auto is the GPU if there is one; cuDNN picks its fastest algorithms for the fixed sizes."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    if device.type == "cuda":
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s)")
        torch.backends.cudnn.benchmark = True
    return device


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m advent_fast.evaluate", description=__doc__.split("\n")[0])
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--config", metavar="FILE",
                      help="the release's experiment file (advent/scripts/configs/*.yml): what its test.py evaluates "
                           "(TEST.MODE single: the TEST.RESTORE_FROM ensemble; best: the snapshot sweep); options "
                           "given here win")
    what.add_argument("--checkpoint", action="append", default=[], help="a checkpoint; repeat for an ensemble")
    what.add_argument("--weights", type=float, nargs="+", help="ensemble weights, one per --checkpoint")
    what.add_argument("--sweep", metavar="DIR", help="evaluate every snapshot in DIR and report the best")
    what.add_argument("--timeout", type=float, default=0.0, help="sweep: seconds to wait for a new snapshot")
    what.add_argument("--poll", type=float, default=5.0, help="sweep: seconds between folder scans")
    what.add_argument("--until", type=int, help="sweep: stop after the snapshot of this iteration")
    what.add_argument("--cache", help="sweep: results cache (default DIR/sweep_eval.json; 'none' to disable)")
    what.add_argument("--arch", help="arch of release plain state dicts (checked against project checkpoints)")
    what.add_argument("--num-classes", type=int, choices=(19, 16))
    data = parser.add_argument_group("data (default: the embedded target val split)")
    data.add_argument("--dataset", choices=("cityscapes", "gta5", "synthia"), default="cityscapes")
    data.add_argument("--root", help="dataset root")
    data.add_argument("--split", default="val")
    data.add_argument("--list", dest="list_path", help="optional list file of images")
    data.add_argument("--input-size", type=int, nargs=2, metavar=("W", "H"))
    data.add_argument("--label-size", type=int, nargs=2, metavar=("W", "H"))
    run = add_running_arguments(parser)
    run.add_argument("--json", help="write the results to this JSON file")
    run.add_argument("--save-vis", type=int, default=0, metavar="N", help="save panels of the first N images")
    run.add_argument("--vis-dir", help="folder for --save-vis panels (default: beside --json, or ./vis)")
    args = parser.parse_args(argv)
    if args.config:  # the file's options become the defaults, and the command line is read again: it wins
        checkpoints = _release_defaults(parser, args.config)
        args = parser.parse_args(argv)
        args.checkpoint = args.checkpoint or checkpoints  # appended to, a default list would merge the two
        if args.root is None:  # the release's default is its own checkout's data/Cityscapes
            parser.error(f"--root: {args.config} has no DATA_DIRECTORY_TARGET")
    if bool(args.sweep) == bool(args.checkpoint):
        parser.error("give --checkpoint (once, or repeated for an ensemble) or --sweep DIR")
    if args.weights is not None and len(args.weights) != len(args.checkpoint):
        parser.error(f"{len(args.weights)} --weights for {len(args.checkpoint)} --checkpoint")
    if args.sweep and args.save_vis:
        parser.error("--save-vis is for --checkpoint runs")
    if args.timeout < 0:
        parser.error("--timeout must be >= 0")
    return parser, args


def _release_defaults(parser: argparse.ArgumentParser, path: str) -> List[str]:
    """--config: the release experiment file's options as the parser's defaults; returns its checkpoints."""
    with argument_errors(parser):
        values = read_yaml(path)
        if not release_config.is_release_config(values):
            raise ValueError(f"{path} is not the release's experiment file (upper-case keys: SOURCE, TEST, ...); "
                             f"this project's training configs are not evaluation settings")
        options = release_config.evaluation_options(values, path)
    checkpoints = options.pop("checkpoint", [])
    parser.set_defaults(**options)
    return checkpoints


def _write_json(path: str, payload: dict, nan_as_null: bool = True) -> None:
    """Written atomically (a temporary file, then renamed): an interrupted write leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_json_safe(payload) if nan_as_null else payload, f, indent=1)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser, args = _parse_args(argv)
    with argument_errors(parser):
        device = inference_device(args.device)
    datasets: Dict[int, SegmentationDataset] = {}

    def dataset_for(num_classes: int) -> SegmentationDataset:
        if num_classes not in datasets:
            with argument_errors(parser):
                datasets[num_classes] = build_dataset(args.dataset, args.root, num_classes, args.split,
                                                      args.input_size, args.label_size, args.list_path)
        return datasets[num_classes]

    def run(models, weights, num_classes, **vis) -> dict:
        dataset = dataset_for(num_classes)
        return evaluate_ensemble(models, weights, dataset, num_classes, device, batch_size=args.batch_size,
                                 num_workers=args.workers, precision=args.precision,
                                 progress=not args.quiet, **vis)

    protocol = {"dataset": args.dataset, "root": os.path.abspath(args.root) if args.root else "embedded",
                "split": args.split, "input_size": args.input_size, "label_size": args.label_size,
                "list": args.list_path, "precision": args.precision}
    if args.sweep:
        payload = _run_sweep(args, device, run, protocol)
    else:
        with argument_errors(parser):
            models, num_classes = load_models(args.checkpoint, device, args.arch, args.num_classes)
        weights = args.weights or [1.0 / len(models)] * len(models)
        vis_dir = args.vis_dir or os.path.join(os.path.dirname(os.path.abspath(args.json)) if args.json else ".", "vis")
        result = run(models, weights, num_classes, save_vis=args.save_vis, vis_dir=vis_dir if args.save_vis else None)
        print(format_table(result))
        payload = {"protocol": protocol, "checkpoints": args.checkpoint, "weights": weights, **result}
    if args.json:
        _write_json(args.json, payload)
    return payload


def _run_sweep(args, device, run, protocol) -> dict:
    cache_path = None if args.cache == "none" else (args.cache or os.path.join(args.sweep, "sweep_eval.json"))
    cache: dict = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                stored = json.load(f)
        except (OSError, ValueError) as err:
            print(f"ignoring the unreadable sweep cache {cache_path}: {err}", file=sys.stderr)
            stored = {}
        if isinstance(stored, dict) and stored.get("protocol") == protocol:
            cache = stored.get("results", {})

    def evaluate_path(path: str) -> dict:
        try:
            models, num_classes = load_models([path], device, args.arch, args.num_classes)
        except (OSError, RuntimeError, ValueError, EOFError) as err:
            raise SnapshotNotReady(path) from err
        return run(models, [1.0], num_classes)

    def report(path: str, snapshot: dict) -> None:
        print(f"{os.path.basename(path)}: mIoU {snapshot['miou']:.2f}", flush=True)
        if cache_path:  # Python's JSON keeps NaN, which the cache needs back as NaN
            _write_json(cache_path, {"protocol": protocol, "results": cache}, nan_as_null=False)

    result = sweep_snapshots(args.sweep, evaluate_path, args.timeout, args.poll, args.until, cache, report)
    for path, message in result["errors"].items():
        print(f"could not evaluate {path}: {message}", file=sys.stderr)
    if result["best"] is None:
        raise SystemExit(f"no snapshot evaluated in {args.sweep}")
    best = result["best"]
    print(format_table(best))
    print(f"best: {os.path.basename(best['checkpoint'])} (iteration {best['iteration']}), mIoU {best['miou']:.2f}")
    return {"protocol": protocol, **result}


if __name__ == "__main__":
    main()
