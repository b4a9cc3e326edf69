"""Evaluation speed at the release protocol, fp32 vs bf16, with the release's host-side argmax as baseline.

    python benchmarks/bench_eval.py [--quick] [--json bench_eval.json] [--precisions fp32 bf16]
                                    [--model deeplabv2_r101] [--images N] [--release-images N]

Runs ``advent_fast.evaluate.evaluate_model`` as training and the command line do: an image at the
input size (release 1024x512) into the model, the main head's logits upsampled bilinearly
(align_corners=True) to the label size (release 2048x1024), argmax on the device, one confusion
matrix. The data set is held in memory (a few random images and labels in the datasets' item
format, float32 (3, H, W) image, int64 (H, W) train ids), so the time is the device work plus the
loader's host->device copies, not file decoding (``bench_data.py`` measures that). The model has
random weights (speed does not depend on them). Columns: model, path (advent_fast or the release
baseline), precision, images, s/image, projected seconds for 500 images (the Cityscapes val split)
and peak GPU memory. The baseline (on CUDA; on a CPU only with ``--release-images N``;
``--no-release-baseline`` skips it) does what the
release's ``eval_UDA.py`` does per image: fp32 forward, upsample on the device, the upsampled
logits copied to the host, numpy argmax and a numpy histogram (``fast_hist``).
On a machine without a GPU the defaults are a small model at small sizes.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from advent_fast.data import IGNORE_LABEL, class_names  # noqa: E402
from advent_fast.evaluate import evaluate_model  # noqa: E402
from advent_fast.models import ARCHS, build_model  # noqa: E402
from bench_common import print_table_header, write_results  # noqa: E402

PRECISIONS = ("fp32", "bf16")  # what evaluate_model's ``precision`` takes, besides "auto"
GPU_DEFAULTS = dict(model="deeplabv2_r101", image_size=(1024, 512), label_size=(2048, 1024), images=50,
                    release_images=10)
CPU_DEFAULTS = dict(model="deeplabv2_small", image_size=(256, 128), label_size=(512, 256), images=40,
                    release_images=0)
PROJECTED_IMAGES = 500


class InMemoryEvalSet(Dataset):
    """``len`` items cycling over ``pool`` random (image, label) pairs in the datasets' item format."""

    def __init__(self, length: int, image_size, label_size, num_classes: int, pool: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        (w, h), (lw, lh) = image_size, label_size
        self.images = [torch.randn(3, h, w, generator=g).mul_(60.0) for _ in range(min(pool, length))]
        self.label_maps = []
        for _ in range(min(pool, length)):
            label = torch.randint(0, num_classes, (lh, lw), generator=g)
            label[torch.rand(lh, lw, generator=g) < 0.1] = IGNORE_LABEL
            self.label_maps.append(label)
        self.length = length
        self.labels = True
        self.num_classes = num_classes
        self.class_names = class_names(num_classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        k = index % len(self.images)
        return {"image": self.images[k], "label": self.label_maps[k], "name": f"synthetic_{index:04d}.png"}


def fast_hist(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """The release's confusion histogram (advent/utils/func.py)."""
    k = (a >= 0) & (a < n)
    return np.bincount(n * a[k].astype(int) + b[k], minlength=n ** 2).reshape(n, n)


@torch.no_grad()
def release_eval(model, dataset, num_classes: int, device) -> np.ndarray:
    """The release's per-image loop: fp32, upsample on the device, logits to the host, numpy argmax."""
    model.eval()
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0, pin_memory=device.type == "cuda")
    hist = np.zeros((num_classes, num_classes))
    for batch in loader:
        label = batch["label"]
        interp_size = tuple(label.shape[-2:])
        pred_main = model(batch["image"].to(device))[1]
        output = F.interpolate(pred_main, size=interp_size, mode="bilinear", align_corners=True)
        output = output.cpu().data[0].numpy().transpose(1, 2, 0)
        output = np.argmax(output, axis=2)
        hist += fast_hist(label.numpy()[0].flatten(), output.flatten(), num_classes)
    return hist


def timed(fn, device):
    """(seconds, peak GPU MiB or None) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images")
    parser.add_argument("--json", default="bench_eval.json", help="where to write the results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=ARCHS, default=None,
                        help=f"default {GPU_DEFAULTS['model']} on CUDA, {CPU_DEFAULTS['model']} on CPU")
    parser.add_argument("--width", type=int, default=None, help="deeplabv2_small channel width")
    parser.add_argument("--num-classes", type=int, default=19, choices=(19, 16))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"),
                        help="model input (default 1024 512 on CUDA, 256 128 on CPU)")
    parser.add_argument("--label-size", type=int, nargs=2, metavar=("W", "H"),
                        help="label / upsampling size (default 2048 1024 on CUDA, 512 256 on CPU)")
    parser.add_argument("--images", type=int, default=None, help="timed images per precision "
                        f"(default {GPU_DEFAULTS['images']} on CUDA, {CPU_DEFAULTS['images']} on CPU; --quick: fewer)")
    parser.add_argument("--batch-size", type=int, default=1, help="evaluation batch size (release: 1)")
    parser.add_argument("--release-images", type=int, default=None,
                        help=f"images for the release baseline (default {GPU_DEFAULTS['release_images']} on "
                             "CUDA, --quick 3; on CPU it runs only when this is given)")
    parser.add_argument("--no-release-baseline", action="store_true", help="skip the release-style baseline")
    parser.add_argument("--warmup", type=int, default=2, help="untimed images first (cudnn autotuning)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    arch = args.model or defaults["model"]
    image_size = tuple(args.image_size or defaults["image_size"])
    label_size = tuple(args.label_size or defaults["label_size"])
    images = args.images or (max(2, defaults["images"] // 5) if args.quick else defaults["images"])
    release_images = args.release_images if args.release_images is not None else (
        max(2, defaults["release_images"] // 3) if args.quick else defaults["release_images"])
    run_release = not args.no_release_baseline and release_images > 0  # CPU: only if asked for
    if cuda:
        torch.backends.cudnn.benchmark = True  # as python -m advent_fast.evaluate

    options = {"width": args.width} if args.width is not None else {}
    model = build_model(arch, args.num_classes, multi_level=arch != "deeplabv2_vgg16", **options).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)  # as advent_fast.evaluate.load_models
    model.eval()

    info = {
        "device": torch.cuda.get_device_name(device) if cuda
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "model": arch, "num_classes": args.num_classes,
        "image_size": list(image_size), "label_size": list(label_size), "batch_size": args.batch_size,
    }
    print(f"# {info['device']} | {os.cpu_count()} CPUs | torch {torch.__version__} | model {arch} "
          f"({args.num_classes} classes, random weights) | image {image_size[0]}x{image_size[1]} -> "
          f"labels {label_size[0]}x{label_size[1]} | batch {args.batch_size}")
    print("# data: synthetic tensors held in memory (no file decoding: see bench_data.py); "
          "time = loader copies + forward + upsample + argmax + confusion matrix")
    header = ("model", "path", "precision", "images", "s/image", f"s per {PROJECTED_IMAGES}", "peak GPU MiB")
    print_table_header(header)

    rows = []

    def report(path, precision, n, seconds, peak):
        row = dict(model=arch, path=path, precision=precision, images=n, seconds=seconds,
                   s_per_image=seconds / n, projected_s_500=seconds / n * PROJECTED_IMAGES, peak_MiB=peak,
                   images_per_s=n / seconds)
        rows.append(row)
        print(f"| {arch} | {path} | {precision} | {n} | {row['s_per_image']:.4f} | "
              f"{row['projected_s_500']:.1f} | {'-' if peak is None else f'{peak:.0f}'} |")
        sys.stdout.flush()

    warm = InMemoryEvalSet(args.warmup, image_size, label_size, args.num_classes) if args.warmup > 0 else None
    dataset = InMemoryEvalSet(images, image_size, label_size, args.num_classes)
    for precision in args.precisions:
        def run(ds):
            return evaluate_model(model, ds, args.num_classes, device, batch_size=args.batch_size,
                                  precision=precision)
        if warm is not None:
            run(warm)
        seconds, peak = timed(lambda: run(dataset), device)
        report("advent_fast", precision, images, seconds, peak)

    if run_release:
        release_set = InMemoryEvalSet(release_images, image_size, label_size, args.num_classes)
        model = model.to(memory_format=torch.contiguous_format)  # the release has no channels_last
        if warm is not None:
            release_eval(model, warm, args.num_classes, device)
        seconds, peak = timed(lambda: release_eval(model, release_set, args.num_classes, device), device)
        report("release (host argmax)", "fp32", release_images, seconds, peak)

    write_results(args.json, {"machine": info, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
