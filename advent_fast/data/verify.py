"""Decode every image and label of a dataset once, before a long run meets a broken file:

    python -m advent_fast.data.verify --dataset gta5 --root DATA/GTA5
    python -m advent_fast.data.verify --dataset cityscapes --root DATA/Cityscapes --split val

Reads each file as training does (the release's readers, native sizes), in parallel worker processes,
and reports: unreadable, truncated or missing files (errors: exit status 1), image/label pairs of different
sizes (GTA5 has a few; training resizes both, as the release does) and labels without a pixel of any class.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

from advent_fast.data.classes import IGNORE_LABEL
from advent_fast.data.datasets import DatasetError, SegmentationDataset
from advent_fast.data.scan import add_dataset_arguments, dataset_from_arguments, map_items

__all__ = ["check_item", "main"]

ERROR = "unreadable"
WARNINGS = ("size mismatch", "no labelled pixel")
Problem = Tuple[str, str, str]  # (item name, kind, message)


def check_item(dataset: SegmentationDataset, index: int) -> List[Problem]:
    """The problems of one item: its image, and its label if the dataset has labels, fully decoded."""
    _, label_path, name = dataset.items[index]
    problems: List[Problem] = []
    native = None
    try:
        _, native = dataset.load_image(index)
    except (FileNotFoundError, DatasetError) as err:
        problems.append((name, ERROR, str(err)))
    if not dataset.labels:
        return problems
    try:
        train_ids = dataset.load_label(index, resize=False)
    except (FileNotFoundError, DatasetError) as err:
        return problems + [(name, ERROR, str(err))]
    label_native = (train_ids.shape[1], train_ids.shape[0])
    if native is not None and label_native != native:
        problems.append((name, "size mismatch", f"image {native[0]}x{native[1]}, label {label_path} "
                                                f"{label_native[0]}x{label_native[1]}"))
    if (train_ids == IGNORE_LABEL).all():
        problems.append((name, "no labelled pixel", f"every pixel of {label_path} is ignored"))
    return problems


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m advent_fast.data.verify", description=__doc__.split("\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--split", default="train", help="Cityscapes split (default train)")
    parser.add_argument("--no-labels", dest="labels", action="store_false",
                        help="images only (e.g. Cityscapes train for adaptation, or its test split)")
    parser.add_argument("--json", help="write the report to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    dataset = dataset_from_arguments(parser, args, args.split, args.labels)
    problems = sorted(p for found in map_items(dataset, check_item, args.workers, "verify", "pair" if args.labels
                                               else "image", progress=not args.quiet) for p in found)
    counts = {kind: sum(p[1] == kind for p in problems) for kind in (ERROR, *WARNINGS)}
    for name, kind, message in problems[:50]:
        print(f"{kind}: {name}: {message}")
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more (--json writes them all)")
    what = "image/label pairs" if args.labels else "images"
    print(f"{args.dataset} {dataset.root}: {len(dataset)} {what} decoded; "
          + ", ".join(f"{kind}: {count}" for kind, count in counts.items()))
    report = {"dataset": args.dataset, "root": os.path.abspath(dataset.root), "items": len(dataset), "counts": counts,
              "problems": [{"name": n, "kind": k, "message": m} for n, k, m in problems],
              "ok": counts[ERROR] == 0}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
