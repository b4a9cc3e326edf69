"""Predictions as PNG files, for a Cityscapes split (the test split has no labels) or any images.

    python -m advent_fast.predict --checkpoint model.pt --root DATA/Cityscapes --split test --out-dir preds
    python -m advent_fast.predict --checkpoint a.pt --checkpoint b.pt --weights 0.5 0.5 \\
        --images photos/ --format color entropy --out-dir preds

Protocol as in evaluation: each image resized to the input size (1024x512, bicubic), the main head's logits
upsampled (bilinear, align_corners=True) to the image's native size, an ensemble summing its weighted
upsampled logits, argmax. One PNG per image and format, at ``OUT/FORMAT/NAME.png`` (NAME: the image's path
in its split or folder, e.g. ``labelids/berlin/berlin_000000_000019_leftImg8bit.png``):

- ``labelids``: Cityscapes label ids, 8-bit grey: what the Cityscapes benchmark server and cityscapesScripts'
  evaluation read (set ``CITYSCAPES_RESULTS`` to ``OUT/labelids``);
- ``trainids``: the model's class indices (0..18, or 0..15 for SYNTHIA models), 8-bit grey;
- ``color``: the Cityscapes colours, RGB;
- ``entropy``: the normalised entropy of the (ensemble's) prediction, 16-bit grey, value / 65535 in [0, 1].

``--entropy-ranking`` also writes ``OUT/entropy_ranking.json``: the images from the most to the least confident,
by the mean normalised entropy of their prediction over their native-size pixels (the ranking that
entropy-based curriculum and intra-domain methods split target images by); with ``--easy-fraction F``,
``OUT/easy_split.txt`` (the first floor(F * N) names) and ``OUT/hard_split.txt`` (the others), list files in the
format of ``--list`` and ``data.target_list``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import advent_fast
from advent_fast.data import CityscapesDataset, ImageFolderDataset, SegmentationDataset, ensure_embedded_data
from advent_fast.data.classes import train_id_to_label_id
from advent_fast.evaluate import (add_running_arguments, argument_errors, inference_device, load_models,
                                  predict_logits)
from advent_fast.visualize import colorize

__all__ = ["FORMATS", "Predictions", "main", "predict_dataset", "write_entropy_ranking"]

FORMATS = ("labelids", "trainids", "color", "entropy")
INPUT_SIZE = (1024, 512)  # (width, height): the release's Cityscapes input


class _WithNativeSize(Dataset):
    """The dataset's items with the image's native (height, width), read from the file's header."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]  # decodes the whole file first: a broken one fails there, named
        with Image.open(self.dataset.items[index][0]) as image:
            item["native_hw"] = torch.tensor([image.height, image.width])
        return item


class Predictions(NamedTuple):
    files: List[str]  # the PNG files written, in dataset order
    mean_entropy: Dict[str, float]  # each image's mean normalised entropy, by name, in dataset order


def _encode(fmt: str, pred: np.ndarray, entropy: Optional[np.ndarray], num_classes: int,
            label_ids: np.ndarray) -> np.ndarray:
    """One image's PNG pixels in OpenCV's channel order (``label_ids``: train id -> Cityscapes label id)."""
    if fmt == "labelids":
        return label_ids[pred]
    if fmt == "trainids":
        return pred
    if fmt == "color":
        return np.ascontiguousarray(colorize(pred, num_classes)[:, :, ::-1])
    return np.round(np.clip(entropy, 0.0, 1.0) * 65535.0).astype(np.uint16)


def _write_png(path: str, pixels: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, pixels):
        raise OSError(f"could not write {path}")


@torch.no_grad()
def predict_dataset(
    models: Sequence[torch.nn.Module],
    weights: Sequence[float],
    dataset: SegmentationDataset,
    num_classes: int,
    out_dir: str,
    formats: Sequence[str] = ("labelids",),
    device="cpu",
    batch_size: int = 1,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> Predictions:
    """Write the predictions of the weighted ensemble ``models`` on every image of ``dataset`` (see the module
    docstring for the protocol, formats and file names)."""
    if len(models) != len(weights) or not models:
        raise ValueError(f"{len(models)} models but {len(weights)} weights")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be among {', '.join(FORMATS)}, got {list(formats)}")
    if dataset.num_classes != num_classes:
        raise ValueError(f"the dataset maps labels to {dataset.num_classes} classes, the models have {num_classes}")
    device = torch.device(device)
    was_training = [m.training for m in models]
    loader = DataLoader(_WithNativeSize(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    label_ids = train_id_to_label_id(num_classes)
    written: List[str] = []
    mean_entropy: Dict[str, float] = {}
    pending: List[Future] = []
    # PNG encoding releases the GIL: a few threads write while the device computes the next batch
    with ThreadPoolExecutor(max_workers=4) as writers:
        try:
            for m in models:
                m.eval()
            for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
                images = batch["image"].to(device, non_blocking=True)
                sizes = [tuple(hw.tolist()) for hw in batch["native_hw"]]
                # one upsampling for the batch when its images share a native size (a Cityscapes split)
                groups = [(slice(0, len(sizes)), sizes[0])] if len(set(sizes)) == 1 else [
                    (slice(i, i + 1), hw) for i, hw in enumerate(sizes)]
                for rows, hw in groups:
                    logits = predict_logits(models, weights, images[rows], hw, precision)
                    if not torch.isfinite(logits).all():  # never written as if it were a prediction
                        raise ValueError(f"non-finite logits for {', '.join(batch['name'][rows])}: the "
                                         f"checkpoint's weights (or the images) are not usable")
                    preds = logits.argmax(1).to(torch.uint8).cpu().numpy()
                    entropy_maps = advent_fast.entropy_map(logits)
                    means = entropy_maps.mean((1, 2), dtype=torch.float64).tolist()
                    entropies = entropy_maps.cpu().numpy() if "entropy" in formats else [None] * len(preds)
                    for name, pred, entropy, mean in zip(batch["name"][rows], preds, entropies, means):
                        mean_entropy[name] = mean
                        stem = os.path.splitext(name)[0]
                        for fmt in formats:
                            path = os.path.join(out_dir, fmt, stem + ".png")
                            pixels = _encode(fmt, pred, entropy, num_classes, label_ids)
                            pending.append(writers.submit(_write_png, path, pixels))
                            written.append(path)
                # bounded: at most a few batches' images wait in memory for their writer
                while len(pending) > 8 * len(formats) * batch_size:
                    pending.pop(0).result()
            for future in pending:
                future.result()
        finally:
            for m, mode in zip(models, was_training):
                m.train(mode)
    return Predictions(written, mean_entropy)


def write_entropy_ranking(mean_entropy: Dict[str, float], out_dir: str,
                          easy_fraction: Optional[float] = None) -> List[str]:
    """``OUT/entropy_ranking.json`` (names by increasing mean entropy, ties by name) and, with ``easy_fraction``,
    the easy and hard split list files (module docstring); returns the files written."""
    if easy_fraction is not None and not 0.0 < easy_fraction < 1.0:
        raise ValueError(f"easy_fraction must be in (0, 1), got {easy_fraction}")
    ranked = sorted(mean_entropy.items(), key=lambda item: (item[1], item[0]))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "entropy_ranking.json")
    with open(path, "w") as f:
        json.dump([{"name": name, "mean_entropy": value} for name, value in ranked], f, indent=1)
    written = [path]
    if easy_fraction is not None:
        easy = math.floor(easy_fraction * len(ranked))
        for split, part in (("easy", ranked[:easy]), ("hard", ranked[easy:])):
            written.append(os.path.join(out_dir, f"{split}_split.txt"))
            with open(written[-1], "w") as f:
                f.writelines(f"{name}\n" for name, _ in part)
    return written


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m advent_fast.predict", description=__doc__.split("\n")[0])
    what = parser.add_argument_group("models")
    what.add_argument("--checkpoint", action="append", required=True, help="a checkpoint; repeat for an ensemble")
    what.add_argument("--weights", type=float, nargs="+", help="ensemble weights, one per --checkpoint")
    what.add_argument("--arch", help="arch of release plain state dicts (checked against project checkpoints)")
    what.add_argument("--num-classes", type=int, choices=(19, 16))
    data = parser.add_argument_group("images (default: the embedded target val split)")
    data.add_argument("--root", help="a Cityscapes root (leftImg8bit/SPLIT/CITY/*_leftImg8bit.png)")
    data.add_argument("--split", default="test")
    data.add_argument("--list", dest="list_path", help="optional list file of CITY/NAME_leftImg8bit.png entries")
    data.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    data.add_argument("--input-size", type=int, nargs=2, metavar=("W", "H"),
                      help=f"the size images are resized to for the model (default {INPUT_SIZE[0]} {INPUT_SIZE[1]})")
    out = parser.add_argument_group("output")
    out.add_argument("--out-dir", required=True)
    out.add_argument("--format", nargs="+", choices=FORMATS, default=["labelids"], dest="formats")
    out.add_argument("--entropy-ranking", action="store_true",
                     help="also write OUT/entropy_ranking.json: the images by increasing mean entropy")
    out.add_argument("--easy-fraction", type=float, metavar="F",
                     help="with --entropy-ranking: OUT/easy_split.txt (the first F of the ranking) and "
                          "OUT/hard_split.txt, as list files")
    add_running_arguments(parser)
    args = parser.parse_args(argv)
    if args.root and args.images:
        parser.error("give --root (a Cityscapes split) or --images, not both")
    if args.list_path and not args.root:
        parser.error("--list needs --root")
    if args.weights is not None and len(args.weights) != len(args.checkpoint):
        parser.error(f"{len(args.weights)} --weights for {len(args.checkpoint)} --checkpoint")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.easy_fraction is not None and not args.entropy_ranking:
        parser.error("--easy-fraction needs --entropy-ranking")
    if args.easy_fraction is not None and not 0.0 < args.easy_fraction < 1.0:
        parser.error(f"--easy-fraction must be in (0, 1), got {args.easy_fraction}")
    return parser, args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser, args = _parse_args(argv)
    size = tuple(args.input_size) if args.input_size else None
    with argument_errors(parser):
        device = inference_device(args.device)
        models, num_classes = load_models(args.checkpoint, device, args.arch, args.num_classes)
        if args.images:
            dataset = ImageFolderDataset(args.images, size or INPUT_SIZE, num_classes)
        elif args.root:
            dataset = CityscapesDataset(args.root, args.split, size or INPUT_SIZE, None, num_classes, labels=False,
                                        list_path=args.list_path)
        else:
            embedded = ensure_embedded_data()
            dataset = CityscapesDataset(embedded.target_root, "val", size or embedded.target_size, None,
                                        num_classes, labels=False)
    weights = args.weights or [1.0 / len(models)] * len(models)
    predictions = predict_dataset(models, weights, dataset, num_classes, args.out_dir, args.formats, device,
                                  args.batch_size, args.workers, args.precision, progress=not args.quiet)
    for fmt in args.formats:
        print(f"{fmt}: {len(dataset)} PNG files under {os.path.join(args.out_dir, fmt)}")
    ranking = []
    if args.entropy_ranking:
        ranking = write_entropy_ranking(predictions.mean_entropy, args.out_dir, args.easy_fraction)
        print(f"entropy ranking: {', '.join(ranking)}")
    return {"images": len(dataset), "files": predictions.files, "mean_entropy": predictions.mean_entropy,
            "ranking_files": ranking}


if __name__ == "__main__":
    main()
