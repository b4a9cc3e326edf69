"""PNG panels like the paper's Figures 1 and 3: input, ground truth, prediction and entropy map.

    python -m advent_fast.visualize --checkpoint source_only.pth --checkpoint advent.pth --num-images 4

One panel per image: the top row is the input then each model's prediction (Cityscapes palette),
the bottom row the ground truth then each model's entropy map (viridis: dark = confident).
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

import cv2
import numpy as np

from advent_fast import reference
from advent_fast.data.classes import IGNORE_LABEL, palette

__all__ = ["colorize", "entropy_to_rgb", "main", "make_panel", "panel_file_name", "save_png"]

_HEADER = 18  # title strip height in pixels, at a 512-pixel tile width


def colorize(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Train ids (H, W) -> RGB (H, W, 3) uint8 in the Cityscapes palette; ignore (255) is black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:num_classes] = palette(num_classes)
    lut[IGNORE_LABEL] = 0
    return lut[np.clip(label, 0, 255).astype(np.uint8)]


def entropy_to_rgb(entropy: np.ndarray) -> np.ndarray:
    """Normalised entropy in [0, 1] (H, W) -> RGB uint8 in the perceptually uniform viridis map."""
    grey = np.clip(np.nan_to_num(entropy, nan=1.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(grey, cv2.COLORMAP_VIRIDIS)[:, :, ::-1].copy()


def _tile(rgb: np.ndarray, width: int, height: int, title: str, header: int, smooth: bool) -> np.ndarray:
    # class colours are never averaged: a blend of two classes' colours would read as a third class
    interpolation = cv2.INTER_AREA if smooth and rgb.shape[1] > width else cv2.INTER_NEAREST
    body = cv2.resize(rgb, (width, height), interpolation=interpolation)
    strip = np.full((header, width, 3), 255, np.uint8)
    scale = header / 30.0
    cv2.putText(strip, title, (4, header - max(3, header // 4)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                max(1, round(scale * 1.5)), cv2.LINE_AA)
    return np.concatenate([strip, body], axis=0)


def make_panel(
    image: np.ndarray,
    label: Optional[np.ndarray],
    predictions: Sequence[np.ndarray],
    entropies: Sequence[np.ndarray],
    titles: Sequence[str],
    num_classes: int,
    tile_width: Optional[int] = None,
) -> np.ndarray:
    """RGB uint8 panel: [input | prediction_k ...] over [ground truth | entropy_k ...].

    Tiles have the label's aspect (the image's without a label), ``tile_width`` pixels wide
    (default: the label width, at most 512), under a title strip.
    """
    if not (len(predictions) == len(entropies) == len(titles)) or not predictions:
        raise ValueError("make_panel needs one prediction, entropy map and title per model")
    ref = label if label is not None else predictions[0]
    width = tile_width or min(512, ref.shape[1])
    height = max(1, round(width * ref.shape[0] / ref.shape[1]))
    header = max(10, round(_HEADER * width / 512))
    truth = colorize(label, num_classes) if label is not None else np.full((height, width, 3), 128, np.uint8)
    top = [_tile(image, width, height, "input", header, smooth=True)]
    bottom = [_tile(truth, width, height, "ground truth" if label is not None else "no label", header, smooth=False)]
    for pred, ent, title in zip(predictions, entropies, titles):
        top.append(_tile(colorize(pred, num_classes), width, height, title, header, smooth=False))
        bottom.append(_tile(entropy_to_rgb(ent), width, height, f"{title}: entropy", header, smooth=True))
    return np.concatenate([np.concatenate(top, axis=1), np.concatenate(bottom, axis=1)], axis=0)


def save_png(path: str, rgb: np.ndarray) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(rgb[:, :, ::-1])):
        raise OSError(f"could not write {path}")


def panel_file_name(item_name: str) -> str:
    """A file name for an item's panel: ``city/name_leftImg8bit.png`` -> ``city_name_leftImg8bit.png``."""
    return os.path.splitext(item_name)[0].replace("/", "_").replace(os.sep, "_") + ".png"


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    # Imported here: advent_fast.evaluate imports this module for its --save-vis panels.
    from advent_fast.evaluate import argument_errors, build_dataset, inference_device, load_models, predict_logits

    parser = argparse.ArgumentParser(prog="python -m advent_fast.visualize", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="repeat to compare models side by side")
    parser.add_argument("--name", action="append", help="a title per --checkpoint (default: file names)")
    parser.add_argument("--arch", help="arch of release plain state dicts")
    parser.add_argument("--num-classes", type=int, choices=(19, 16))
    parser.add_argument("--dataset", choices=("cityscapes", "gta5", "synthia"), default="cityscapes")
    parser.add_argument("--root", help="dataset root (default: the embedded target val split)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("W", "H"))
    parser.add_argument("--label-size", type=int, nargs=2, metavar=("W", "H"))
    parser.add_argument("--num-images", type=int, default=4, help="the first N images")
    parser.add_argument("--indices", type=int, nargs="+", help="these images instead of the first N")
    parser.add_argument("--out-dir", default="vis")
    parser.add_argument("--tile-width", type=int, help="pixels per tile (default: label width, at most 512)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="fp32",
                        help="fp32 (release, default), bf16, or auto (bf16 on GPUs)")
    args = parser.parse_args(argv)
    names = args.name or [os.path.splitext(os.path.basename(p))[0] for p in args.checkpoint]
    if len(names) != len(args.checkpoint):
        parser.error(f"{len(names)} --name for {len(args.checkpoint)} --checkpoint")
    with argument_errors(parser):
        device = inference_device(args.device)
        models, num_classes = load_models(args.checkpoint, device, args.arch, args.num_classes)
        dataset = build_dataset(args.dataset, args.root, num_classes, args.split, args.input_size, args.label_size)
    indices = args.indices if args.indices is not None else range(min(args.num_images, len(dataset)))
    written = []
    for index in indices:
        if not 0 <= index < len(dataset):
            parser.error(f"image index {index} is outside the dataset (0..{len(dataset) - 1})")
        item = dataset[index]
        image = item["image"][None].to(device)
        label = item["label"]
        preds, ents = [], []
        for model in models:
            logits = predict_logits([model], [1.0], image, tuple(label.shape), args.precision)
            preds.append(logits.argmax(1)[0].cpu().numpy())
            ents.append(reference.entropy_map(logits)[0].cpu().numpy())
        panel = make_panel(dataset.to_rgb(item["image"]), label.numpy(), preds, ents, names, num_classes,
                           args.tile_width)
        path = os.path.join(args.out_dir, panel_file_name(item["name"]))
        save_png(path, panel)
        written.append(path)
        print(path)
    return written


if __name__ == "__main__":
    main()
