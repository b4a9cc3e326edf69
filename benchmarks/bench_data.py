"""Throughput of the training data pipeline on the embedded data, per number of loader workers.

    python benchmarks/bench_data.py [--quick] [--json bench_data.json] [--workers 0 2 4 8]
                                    [--batches 200] [--batch-size 1] [--size W H | --release-sizes]
                                    [--image-readers pillow opencv]

Builds the two training streams as the trainer does: the source set in the GTA5 layout (images and
labels) and the target train split in the Cityscapes layout (images only), at the embedded sizes,
or resized to ``--size W H`` (both streams) or ``--release-sizes`` (source 1280x720, target
1024x512) to measure the resize cost. Each stream goes through the trainer's own loader
(``advent_fast.trainer.training_batches``: InfiniteSampler, DataLoader, pin_memory on CUDA) and its ``to_device`` copy
(non_blocking); a few batches warm the workers up, then ``--batches`` batches are timed, with a
final synchronize on CUDA, for each ``data.image_reader`` (pillow: the release's decode and resize;
opencv: OpenCV's). Columns: stream, image reader, workers, pin_memory, images/s, ms/image and MB/s
of the decoded tensors (image float32 + label int64). A first table gives the single-process cost
per image of each step of an item: decode (Pillow), bicubic resize (Pillow), and the whole
``__getitem__`` (image + label) with each reader.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from advent_fast import distributed as dist_utils  # noqa: E402
from advent_fast.data import CityscapesDataset, GTA5Dataset, ensure_embedded_data  # noqa: E402
from advent_fast.data.datasets import IMAGE_READERS  # noqa: E402
from advent_fast.data.datasets import read_rgb  # noqa: E402
from advent_fast.data.embedded import NUM_SOURCE, NUM_TARGET_TRAIN, NUM_TARGET_VAL  # noqa: E402
from advent_fast.trainer import to_device, training_batches  # noqa: E402
from bench_common import print_table_header, write_results  # noqa: E402

RELEASE_SIZES = {"source": (1280, 720), "target": (1024, 512)}
DEFAULT_WORKERS = (0, 2, 4, 8)
SEED = 0


def build_streams(data, sizes, num_classes: int = 19, image_reader: str = "pillow"):
    """The trainer's two training sets (see ``advent_fast.trainer.build_datasets``)."""
    return {
        "source": GTA5Dataset(data.source_root, size=sizes["source"], num_classes=num_classes,
                              image_reader=image_reader),
        "target": CityscapesDataset(data.target_root, "train", size=sizes["target"], label_size=None,
                                    num_classes=num_classes, labels=False, image_reader=image_reader),
    }


def trainer_loader(dataset, stream: str, batch_size: int, workers: int, device: torch.device):
    """The trainer's batches of one stream (``advent_fast.trainer.training_batches``)."""
    return training_batches(dataset, stream, batch_size, dist_utils.DistContext(device=device), SEED,
                            workers=workers)


def batch_bytes(batch) -> int:
    return sum(batch[k].numel() * batch[k].element_size() for k in ("image", "label") if k in batch)


def time_loader(dataset, stream, batch_size, workers, device, batches, warmup):
    """(seconds for ``batches`` batches after ``warmup``, decoded bytes per batch)."""
    batches_iter = trainer_loader(dataset, stream, batch_size, workers, device)
    try:
        out = None
        for _ in range(warmup):
            out = to_device(next(batches_iter), device, channels_last=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        nbytes = 0
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(batches_iter)
            nbytes += batch_bytes(batch)
            out = to_device(batch, device, channels_last=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        del out
    finally:
        del batches_iter  # shuts the worker processes down
    return seconds, nbytes


def _mean_ms(fn, args_list) -> float:
    for a in args_list[: max(1, len(args_list) // 5)]:  # warm-up
        fn(a)
    start = time.perf_counter()
    for a in args_list:
        fn(a)
    return (time.perf_counter() - start) * 1e3 / len(args_list)


def decode_costs(name: str, dataset, opencv_dataset, count: int) -> dict:
    """Mean single-process ms per image of each step of an item, on the first ``count`` images, and of
    the whole item with each image reader."""
    indices = list(range(min(count, len(dataset))))
    paths = [dataset.items[i][0] for i in indices]
    with Image.open(paths[0]) as img:
        native = img.size
    size = dataset.size or native
    decoded = [read_rgb(p) for p in paths]
    row = {
        "stream": name, "native_size": list(native), "size": list(size), "images": len(indices),
        "decode_ms": _mean_ms(read_rgb, paths),
        "resize_ms": (_mean_ms(lambda im: im.resize(size, Image.BICUBIC), decoded)
                      if dataset.size is not None and tuple(size) != tuple(native) else None),  # None: no resize
        "item_ms": _mean_ms(dataset.__getitem__, indices),
        "item_opencv_ms": _mean_ms(opencv_dataset.__getitem__, indices),
    }
    return row


def worker_counts(requested) -> list:
    cpus = os.cpu_count() or 1
    counts = [w for w in dict.fromkeys(requested) if w <= cpus]
    return counts or [0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (50) and decode samples (10)")
    parser.add_argument("--json", default="bench_data.json", help="where to write the results")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help=f"loader worker counts (default {' '.join(map(str, DEFAULT_WORKERS))}, "
                             "capped at the CPU count)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default 200, --quick 50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 2 + 2 x workers)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per batch (release: 1)")
    parser.add_argument("--streams", nargs="+", default=["source", "target"], choices=["source", "target"])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), help="resize both streams to W x H")
    sizes.add_argument("--release-sizes", action="store_true",
                       help="resize to the release sizes: source 1280x720, target 1024x512")
    parser.add_argument("--root", default=None, help="embedded data cache root (default: $ADVENT_FAST_DATA "
                                                      "or ~/.cache/advent_fast/embedded-v1)")
    parser.add_argument("--counts", type=int, nargs=3, default=(NUM_SOURCE, NUM_TARGET_TRAIN, NUM_TARGET_VAL),
                        metavar=("SOURCE", "TARGET_TRAIN", "TARGET_VAL"),
                        help="embedded set sizes (default: the trainer's; smaller ones generate faster)")
    parser.add_argument("--decode-images", type=int, default=None,
                        help="images for the single-process decode table (default 50, --quick 10; 0: skip)")
    parser.add_argument("--image-readers", nargs="+", default=list(IMAGE_READERS), choices=IMAGE_READERS,
                        help="data.image_reader values to time the loader with")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    device = torch.device(args.device)
    batches = args.batches or (50 if args.quick else 200)
    decode_images = args.decode_images if args.decode_images is not None else (10 if args.quick else 50)
    data = ensure_embedded_data(args.root, num_source=args.counts[0], num_target_train=args.counts[1],
                                num_target_val=args.counts[2])
    if args.release_sizes:
        sizes = dict(RELEASE_SIZES)
    elif args.size:
        sizes = {"source": tuple(args.size), "target": tuple(args.size)}
    else:
        sizes = {"source": tuple(data.source_size), "target": tuple(data.target_size)}
    readers = {r: {k: v for k, v in build_streams(data, sizes, data.num_classes, r).items() if k in args.streams}
               for r in IMAGE_READERS}
    streams = readers["pillow"]
    workers_list = worker_counts(args.workers if args.workers else DEFAULT_WORKERS)
    pin = device.type == "cuda"

    info = {
        "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "opencv": cv2.__version__, "cv2_threads": cv2.getNumThreads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "data": data.root, "sizes": {k: list(v) for k, v in sizes.items()}, "batch_size": args.batch_size,
        "batches": batches,
    }
    print(f"# {info['cpu_count']} CPUs ({info['cpu']}) | torch {torch.__version__} | device {info['device']} | "
          f"OpenCV {cv2.__version__} ({info['cv2_threads']} threads)")
    print(f"# embedded data {data.root}: " + ", ".join(
        f"{k} {len(v)} images -> {sizes[k][0]}x{sizes[k][1]}" for k, v in streams.items()))

    decode_rows = []
    if decode_images > 0:
        print("\nSingle-process cost per image (mean ms; __getitem__ = the whole item: image, and label where "
              "the stream has one):\n")
        header = ("stream", "native", "size", "decode (Pillow)", "resize (Pillow bicubic)", "__getitem__",
                  "__getitem__ (opencv reader)")
        print_table_header(header)
        for name, dataset in streams.items():
            r = decode_costs(name, dataset, readers["opencv"][name], decode_images)
            decode_rows.append(r)
            resize = "-" if r["resize_ms"] is None else f"{r['resize_ms']:.2f}"
            print(f"| {name} | {r['native_size'][0]}x{r['native_size'][1]} | {r['size'][0]}x{r['size'][1]} | "
                  f"{r['decode_ms']:.2f} | {resize} | {r['item_ms']:.2f} | {r['item_opencv_ms']:.2f} |")
            sys.stdout.flush()

    print(f"\nLoader throughput (the trainer's loader + to_device; batch {args.batch_size}, "
          f"{batches} timed batches):\n")
    header = ("stream", "image reader", "workers", "pin_memory", "images/s", "ms/image", "MB/s")
    print_table_header(header)
    rows = []
    for name in streams:
        for reader in args.image_readers:
            for workers in workers_list:
                warmup = args.warmup if args.warmup is not None else 2 + 2 * workers
                seconds, nbytes = time_loader(readers[reader][name], name, args.batch_size, workers, device,
                                              batches, warmup)
                images = batches * args.batch_size
                row = dict(stream=name, image_reader=reader, workers=workers, pin_memory=pin, images=images,
                           seconds=seconds, images_per_s=images / seconds, ms_per_image=1e3 * seconds / images,
                           MB_per_s=nbytes / seconds / 1e6, size=list(sizes[name]))
                rows.append(row)
                print(f"| {name} | {reader} | {workers} | {pin} | {row['images_per_s']:.1f} | "
                      f"{row['ms_per_image']:.2f} | {row['MB_per_s']:.0f} |")
                sys.stdout.flush()

    write_results(args.json, {"machine": info, "decode": decode_rows, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
