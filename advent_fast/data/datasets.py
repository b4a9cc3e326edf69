"""Readers for GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes in their release layouts.

Items are dicts ``{"image": float32 (3, H, W), "label": int64 (H, W), "name": str}``; the image is
preprocessed as the ADVENT release does it: Pillow RGB, bicubic resize, RGB -> BGR, minus the Caffe
mean, values 0..255. Labels are read as ids, mapped to train ids (255 = ignore) and resized with
nearest neighbour. Sizes are (width, height), as Pillow takes them. The datasets hold only paths,
so they pickle cheaply into DataLoader workers.

A pair whose image and label differ in native size (GTA5 has a few) is resized to the training sizes
like any other, as the release does, with one warning per dataset and process; with the label kept at
its native size its pixels cannot be matched to the image's, and that is an error naming both files.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from advent_fast.data.classes import (
    SYNTHIA_ID_TO_TRAIN_ID_16,
    class_names,
    cityscapes_id_to_train_id,
    lookup_table,
)

__all__ = [
    "CAFFE_MEAN_BGR",
    "CityscapesDataset",
    "DatasetError",
    "GTA5Dataset",
    "ImageFolderDataset",
    "SegmentationDataset",
    "SynthiaDataset",
]

Size = Tuple[int, int]  # (width, height)
IMAGE_READERS = ("pillow", "opencv")  # pillow: the release's decode and bicubic resize

CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


class DatasetError(RuntimeError):
    """A data file is unreadable, truncated or inconsistent with its pair; the message names it."""


def _open_image(path: str) -> Image.Image:
    """Open and fully decode, so that a truncated file fails here and names itself."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read image file {path}: {err}") from err


def read_rgb(path: str) -> Image.Image:
    return _open_image(path).convert("RGB")


def _decode_opencv(path: str, flags: int, what: str) -> np.ndarray:
    """OpenCV's decode of the file's bytes (a missing file raises FileNotFoundError, a bad one DatasetError)."""
    with open(path, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8)
    decoded = cv2.imdecode(raw, flags) if raw.size else None
    if decoded is None:
        raise DatasetError(f"cannot read {what} {path}: not a decodable image (truncated?)")
    return decoded


def read_bgr_opencv(path: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR decoded by OpenCV: for an 8-bit PNG the same pixels as :func:`read_rgb`."""
    return _decode_opencv(path, cv2.IMREAD_COLOR, "image file")


def read_label_ids(path: str) -> np.ndarray:
    """Label ids of an 8-bit paletted (GTA5) or grayscale (Cityscapes labelIds) PNG.

    A paletted PNG is read as its indices: OpenCV would expand the palette to colours, and
    several label ids share a colour.
    """
    img = _open_image(path)
    if img.mode not in ("P", "L"):
        raise DatasetError(f"label file {path} has mode {img.mode!r}; expected 8-bit paletted or grayscale ids")
    return np.asarray(img, dtype=np.uint8)


def read_synthia_label_ids(path: str) -> np.ndarray:
    """SYNTHIA class ids: the red channel of a 16-bit PNG (the last one in OpenCV's BGR order)."""
    decoded = _decode_opencv(path, cv2.IMREAD_UNCHANGED, "SYNTHIA label file")
    if decoded.ndim != 3:
        raise DatasetError(f"SYNTHIA label file {path} has shape {decoded.shape}; expected a multi-channel PNG")
    return decoded[:, :, -1]


def _read_list(list_path: str) -> List[str]:
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file not found: {list_path}")
    with open(list_path) as f:
        return [line.strip() for line in f if line.strip()]


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")


class SegmentationDataset(Dataset):
    """Image/label pairs given as paths; the format-specific parts live in the subclasses."""

    def __init__(
        self,
        items: Sequence[Tuple[str, Optional[str], str]],
        size: Optional[Size],
        label_size: Optional[Size],
        num_classes: int,
        labels: bool = True,
        mean: Sequence[float] = CAFFE_MEAN_BGR,
        bgr: bool = True,
        image_reader: str = "pillow",
    ):
        if image_reader not in IMAGE_READERS:
            raise ValueError(f"image_reader must be one of {', '.join(IMAGE_READERS)}, got {image_reader!r}")
        if not items:
            raise ValueError("the dataset has no images")
        if labels:
            for image_path, label_path, _ in items:
                if label_path is None or not os.path.isfile(label_path):
                    raise FileNotFoundError(f"no label for image {image_path}: expected {label_path}")
        self.items = list(items)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.label_size = None if label_size is None else (int(label_size[0]), int(label_size[1]))
        self.num_classes = num_classes
        self.class_names = class_names(num_classes)
        self.labels = labels
        self.mean = np.asarray(mean, dtype=np.float32)
        self.bgr = bgr
        self.image_reader = image_reader
        self._size_mismatch_reported = False

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path, name = self.items[index]
        rgb, native = self._read_image(image_path)
        item = {"image": torch.from_numpy(self._preprocess(rgb)), "name": name}
        if self.labels:
            ids = self._read_label_ids(label_path)
            if (ids.shape[1], ids.shape[0]) != native:
                self._size_mismatch(image_path, native, label_path, (ids.shape[1], ids.shape[0]))
            item["label"] = torch.from_numpy(self._train_ids(ids, resize=True).astype(np.int64))
        return item

    def _size_mismatch(self, image_path: str, native: Size, label_path: str, label_native: Size) -> None:
        message = (f"size mismatch: image {image_path} is {native[0]}x{native[1]} but label {label_path} "
                   f"is {label_native[0]}x{label_native[1]}")
        if self.size is None or self.label_size is None:
            raise DatasetError(f"{message}; the {'image' if self.size is None else 'label'} is kept at its "
                               f"native size, so the two cannot be aligned")
        if not self._size_mismatch_reported:
            self._size_mismatch_reported = True
            warnings.warn(f"{message}; both are resized to the training sizes (image "
                          f"{self.size[0]}x{self.size[1]}, label {self.label_size[0]}x{self.label_size[1]}) as "
                          f"the release does. Further mismatched pairs of this dataset are not reported.",
                          stacklevel=2)

    def load_image(self, index: int) -> Tuple[np.ndarray, Size]:
        """(H, W, 3) uint8 RGB of one item at ``size`` (native when None) and its native (width, height)."""
        return self._read_image(self.items[index][0])

    def load_label(self, index: int, resize: bool = True) -> np.ndarray:
        """Train ids (uint8, 255 = ignore) of one item, at ``label_size`` or the native size."""
        label_path = self.items[index][1]
        if label_path is None:
            raise ValueError(f"item {index} ({self.items[index][0]}) has no label")
        return self._train_ids(self._read_label_ids(label_path), resize)

    def to_rgb(self, image) -> np.ndarray:
        """Undo the preprocessing: (3, H, W) float -> (H, W, 3) uint8 RGB."""
        arr = np.asarray(image.detach().cpu() if torch.is_tensor(image) else image, dtype=np.float32)
        arr = arr + self.mean[:, None, None]
        if self.bgr:
            arr = arr[::-1]
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()

    def _read_image(self, path: str) -> Tuple[np.ndarray, Size]:
        """(H, W, 3) uint8 RGB at ``size`` and the native (width, height). Pillow's bicubic resize is
        the release's; ``image_reader="opencv"`` decodes the same pixels and resizes with OpenCV
        (area when shrinking, bicubic when enlarging): faster, slightly different values."""
        if self.image_reader == "opencv":
            bgr = read_bgr_opencv(path)
            native = (bgr.shape[1], bgr.shape[0])
            if self.size is not None and self.size != native:
                shrink = self.size[0] * self.size[1] < native[0] * native[1]
                bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
            return bgr[:, :, ::-1], native
        image = read_rgb(path)
        native = image.size
        if self.size is not None:
            image = image.resize(self.size, Image.BICUBIC)
        return np.asarray(image), native

    def _preprocess(self, rgb: np.ndarray) -> np.ndarray:
        # (3, H, W) float32 = channel - mean, channel by channel: one strided read of the uint8 image and
        # one contiguous write each, the same float32 values as converting, subtracting and transposing.
        out = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
        for c, source in enumerate((2, 1, 0) if self.bgr else (0, 1, 2)):
            np.subtract(rgb[:, :, source], self.mean[c], out=out[c], dtype=np.float32)
        return out

    def _train_ids(self, ids: np.ndarray, resize: bool) -> np.ndarray:
        train_ids = self._lookup_table(ids.dtype)[ids]
        if resize and self.label_size is not None and (ids.shape[1], ids.shape[0]) != self.label_size:
            train_ids = np.asarray(Image.fromarray(train_ids).resize(self.label_size, Image.NEAREST))
        return train_ids

    def _read_label_ids(self, path: str) -> np.ndarray:
        return read_label_ids(path)

    def _lookup_table(self, dtype: np.dtype) -> np.ndarray:
        return lookup_table(cityscapes_id_to_train_id(self.num_classes), 256)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _scan_flat(image_dir: str, list_path: Optional[str]) -> List[str]:
    if list_path is not None:
        return _read_list(list_path)
    return sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))


class GTA5Dataset(SegmentationDataset):
    """GTA5: ``images/NNNNN.png`` with paletted ``labels/NNNNN.png`` (indices = Cityscapes label ids).

    ``label_size`` defaults to ``size`` (a training pair); ``list_path`` lists file names in ``images/``.
    """

    def __init__(
        self,
        root: str,
        size: Optional[Size] = (1280, 720),
        label_size: Optional[Size] = None,
        list_path: Optional[str] = None,
        num_classes: int = 19,
        labels: bool = True,
        mean: Sequence[float] = CAFFE_MEAN_BGR,
        bgr: bool = True,
        image_reader: str = "pillow",
    ):
        _require_dir(root, "GTA5 root")
        image_dir, label_dir = os.path.join(root, "images"), os.path.join(root, "labels")
        _require_dir(image_dir, "GTA5 image folder")
        names = _scan_flat(image_dir, list_path)
        if not names:
            raise ValueError(f"no images found in {image_dir}")
        items = [(os.path.join(image_dir, n), os.path.join(label_dir, n), n) for n in names]
        super().__init__(items, size, label_size or size, num_classes, labels, mean, bgr, image_reader)
        self.root = root


class SynthiaDataset(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/*.png`` with 16-bit ``GT/LABELS/*.png`` (class id in red); 16 classes.

    ``label_size`` defaults to ``size``; ``list_path`` lists file names in ``RGB/``.
    """

    def __init__(
        self,
        root: str,
        size: Optional[Size] = (1280, 760),
        label_size: Optional[Size] = None,
        list_path: Optional[str] = None,
        labels: bool = True,
        mean: Sequence[float] = CAFFE_MEAN_BGR,
        bgr: bool = True,
        image_reader: str = "pillow",
    ):
        _require_dir(root, "SYNTHIA root")
        image_dir, label_dir = os.path.join(root, "RGB"), os.path.join(root, "GT", "LABELS")
        _require_dir(image_dir, "SYNTHIA image folder")
        names = _scan_flat(image_dir, list_path)
        if not names:
            raise ValueError(f"no images found in {image_dir}")
        items = [(os.path.join(image_dir, n), os.path.join(label_dir, n), n) for n in names]
        super().__init__(items, size, label_size or size, 16, labels, mean, bgr, image_reader)
        self.root = root

    def _read_label_ids(self, path: str) -> np.ndarray:
        return read_synthia_label_ids(path)

    def _lookup_table(self, dtype: np.dtype) -> np.ndarray:
        return lookup_table(SYNTHIA_ID_TO_TRAIN_ID_16, np.iinfo(dtype).max + 1)


class CityscapesDataset(SegmentationDataset):
    """Cityscapes: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and
    ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png``.

    ``num_classes=16`` maps label ids to SYNTHIA's 16 train ids (terrain, truck, train -> 255).
    ``labels=False`` (target training) needs no gtFine folder. ``label_size=None`` keeps labels at
    their native size. ``list_path`` lists ``<city>/<name>_leftImg8bit.png`` entries, as the release's.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        size: Optional[Size] = (1024, 512),
        label_size: Optional[Size] = (2048, 1024),
        num_classes: int = 19,
        labels: bool = True,
        list_path: Optional[str] = None,
        mean: Sequence[float] = CAFFE_MEAN_BGR,
        bgr: bool = True,
        image_reader: str = "pillow",
    ):
        _require_dir(root, "Cityscapes root")
        image_dir = os.path.join(root, "leftImg8bit", split)
        _require_dir(image_dir, f"Cityscapes {split!r} image folder")
        if list_path is not None:
            names = _read_list(list_path)
        else:
            names = sorted(
                f"{city}/{f}"
                for city in os.listdir(image_dir)
                if os.path.isdir(os.path.join(image_dir, city))
                for f in os.listdir(os.path.join(image_dir, city))
                if f.endswith("_leftImg8bit.png")
            )
        if not names:
            raise ValueError(f"no *_leftImg8bit.png images found under {image_dir}")
        label_dir = os.path.join(root, "gtFine", split)
        items = [
            (
                os.path.join(image_dir, n),
                os.path.join(label_dir, n.replace("_leftImg8bit.png", "_gtFine_labelIds.png")),
                n,
            )
            for n in names
        ]
        super().__init__(items, size, label_size, num_classes, labels, mean, bgr, image_reader)
        self.root = root
        self.split = split


class ImageFolderDataset(SegmentationDataset):
    """Unlabelled images: every PNG or JPEG file under the given folders (recursively, sorted) and the given
    files, preprocessed like the other sets (resized to ``size``; None keeps each image's own size). An item's
    name is its path relative to its folder (a file given directly: its base name); two items with one name
    are an error (whatever is written per name would collide).
    """

    def __init__(
        self,
        paths: Sequence[str],
        size: Optional[Size] = (1024, 512),
        num_classes: int = 19,
        mean: Sequence[float] = CAFFE_MEAN_BGR,
        bgr: bool = True,
        image_reader: str = "pillow",
    ):
        if isinstance(paths, str):
            paths = [paths]
        items, seen = [], {}
        for path in paths:
            if os.path.isdir(path):
                found = sorted(
                    os.path.relpath(os.path.join(folder, f), path)
                    for folder, _, files in os.walk(path)
                    for f in files
                    if f.lower().endswith(IMAGE_EXTENSIONS)
                )
                if not found:
                    raise ValueError(f"no PNG or JPEG images found under {path}")
                named = [(os.path.join(path, name), name) for name in found]
            elif os.path.isfile(path):
                named = [(path, os.path.basename(path))]
            else:
                raise FileNotFoundError(f"image file or folder not found: {path}")
            for image_path, name in named:
                if name in seen:
                    raise ValueError(f"two images are named {name!r}: {seen[name]} and {image_path}")
                seen[name] = image_path
                items.append((image_path, None, name))
        super().__init__(items, size, None, num_classes, False, mean, bgr, image_reader)
