"""Source class prior for the class-ratio prior (CP) loss: the l1-normalised histogram of source label pixels.

    python -m advent_fast.data.prior --dataset gta5 --root DATA/GTA5 --out prior.json

Labels are counted at their native resolution, ignore label excluded; the files are read in
parallel worker processes. With no ``--root`` the embedded source set is used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

from advent_fast.data.datasets import SegmentationDataset
from advent_fast.data.scan import add_dataset_arguments, dataset_from_arguments, map_items

__all__ = ["class_histogram", "compute_prior", "load_prior", "main"]


def _count(dataset: SegmentationDataset, index: int) -> np.ndarray:
    ids = dataset.load_label(index, resize=False)
    return np.bincount(ids.ravel(), minlength=256)[: dataset.num_classes]


def class_histogram(dataset: SegmentationDataset, workers: int = 0, progress: bool = True) -> np.ndarray:
    """Pixel count per train id over every label of ``dataset`` (int64, ignore excluded).

    ``workers > 1`` reads the labels in worker processes (forkserver): from a script, call it
    under ``if __name__ == "__main__":``, as multiprocessing requires.
    """
    total = np.zeros(dataset.num_classes, np.int64)
    for counts in map_items(dataset, _count, workers, "class histogram", "label", progress):
        total += counts
    return total


def compute_prior(dataset: SegmentationDataset, workers: int = 0, progress: bool = True) -> np.ndarray:
    """The class prior: :func:`class_histogram` divided by its sum (float64)."""
    counts = class_histogram(dataset, workers, progress)
    if counts.sum() == 0:
        raise ValueError(f"no labelled pixels in {len(dataset)} source labels")
    return counts / counts.sum()


def load_prior(path: str, num_classes: int) -> torch.Tensor:
    """Read a prior written by this module (or a plain JSON list, or a NumPy ``.npy`` vector) as a float32
    tensor, validated."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class prior file not found: {path}")
    if path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"class prior file {path} is not a NumPy .npy array: {err}") from err
        if array.ndim != 1 or array.dtype.kind not in "fiu":
            raise ValueError(f"class prior file {path}: expected a vector of numbers, got {array.dtype} "
                             f"of shape {array.shape}")
        values = array.astype(np.float64).tolist()
    else:
        with open(path, "rb") as f:
            try:
                data = json.loads(f.read().decode("utf-8"))
            except ValueError as err:  # not UTF-8 or not JSON
                raise ValueError(f"class prior file {path} is not JSON (nor a .npy file): {err}") from err
        values = data.get("prior") if isinstance(data, dict) else data
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"class prior file {path}: expected a list of numbers (or {{'prior': [...]}})")
    if len(values) != num_classes:
        raise ValueError(f"class prior file {path} has {len(values)} classes, expected {num_classes}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"class prior file {path} has non-finite values")
    if any(v < 0 for v in values):
        raise ValueError(f"class prior file {path} has negative values")
    if abs(sum(values) - 1.0) > 1e-3:
        raise ValueError(f"class prior file {path} sums to {sum(values):.6f}, expected 1 (l1-normalised)")
    return torch.tensor(values, dtype=torch.float32)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m advent_fast.data.prior", description=__doc__.split("\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    dataset = dataset_from_arguments(parser, args)
    counts = class_histogram(dataset, args.workers)
    if counts.sum() == 0:
        raise SystemExit(f"no labelled pixels in {dataset.root}")
    result = {
        "dataset": args.dataset,
        "root": os.path.abspath(dataset.root),
        "num_images": len(dataset),
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "pixels": counts.tolist(),
        "prior": (counts / counts.sum()).tolist(),
    }
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote the {dataset.num_classes}-class prior of {len(dataset)} labels to {args.out}")
    return result


if __name__ == "__main__":
    main()
