"""A function over every item of a dataset, in parallel worker processes: the labels' class histogram
(``prior.py``) and the decoding check of every file (``verify.py``) read whole datasets this way."""
from __future__ import annotations

import argparse
import multiprocessing
import os
from typing import Callable, Iterator, Optional, TypeVar

from tqdm import tqdm

from advent_fast.data.datasets import CityscapesDataset, GTA5Dataset, SegmentationDataset, SynthiaDataset

__all__ = ["DATASETS", "add_dataset_arguments", "dataset_from_arguments", "map_items", "open_dataset"]

DATASETS = ("gta5", "synthia", "cityscapes")

Result = TypeVar("Result")


def open_dataset(name: str, root: str, list_path: Optional[str], num_classes: int, split: str = "train",
                 labels: bool = True) -> SegmentationDataset:
    """Dataset ``name`` (one of DATASETS) reading every file at its native size."""
    if name == "gta5":
        return GTA5Dataset(root, size=None, list_path=list_path, num_classes=num_classes, labels=labels)
    if name == "synthia":
        return SynthiaDataset(root, size=None, list_path=list_path, labels=labels)
    return CityscapesDataset(root, split, size=None, label_size=None, num_classes=num_classes, list_path=list_path,
                             labels=labels)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of a scan: which dataset, and how many worker processes read it."""
    parser.add_argument("--dataset", choices=DATASETS, default="gta5")
    parser.add_argument("--root", help="dataset root (default: the embedded source set, for gta5)")
    parser.add_argument("--list", dest="list_path", help="optional list file of images")
    parser.add_argument("--num-classes", type=int, choices=(19, 16), help="default: 16 for synthia, else 19")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))


def dataset_from_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, split: str = "train",
                           labels: bool = True) -> SegmentationDataset:
    """The dataset that :func:`add_dataset_arguments`' options name; bad combinations are parser errors."""
    num_classes = args.num_classes or (16 if args.dataset == "synthia" else 19)
    if args.dataset == "synthia" and num_classes != 16:
        parser.error("SYNTHIA has 16 classes")
    root = args.root
    if root is None:
        if args.dataset != "gta5":
            parser.error(f"--root is required for {args.dataset}")
        from advent_fast.data.embedded import ensure_embedded_data

        root = ensure_embedded_data().source_root
    try:
        return open_dataset(args.dataset, root, args.list_path, num_classes, split, labels)
    except (FileNotFoundError, ValueError) as err:  # a missing folder, list file or label, an empty folder
        parser.error(str(err))


_dataset: Optional[SegmentationDataset] = None  # the dataset of one worker process


def _init_worker(dataset: SegmentationDataset) -> None:
    global _dataset
    _dataset = dataset


def _call(task):
    function, index = task
    return function(_dataset, index)


def map_items(dataset: SegmentationDataset, function: Callable[[SegmentationDataset, int], Result],
              workers: int = 0, desc: str = "", unit: str = "item", progress: bool = True) -> Iterator[Result]:
    """``function(dataset, index)`` for every index, in any order. ``function`` must be a module-level function
    (it is pickled by name). ``workers > 1`` runs it in worker processes (forkserver, else spawn): from a
    script, iterate under ``if __name__ == "__main__":``, as multiprocessing requires."""
    with tqdm(total=len(dataset), desc=desc, unit=unit, disable=not progress) as bar:
        if workers <= 1:
            for index in range(len(dataset)):
                yield function(dataset, index)
                bar.update()
            return
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        with ctx.Pool(workers, _init_worker, (dataset,)) as pool:
            tasks = ((function, index) for index in range(len(dataset)))
            for result in pool.imap_unordered(_call, tasks, chunksize=16):
                yield result
                bar.update()
