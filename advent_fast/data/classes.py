"""Class tables: Cityscapes label ids, the 19 train classes, the SYNTHIA 16 and the 13-class subset.

GTA5 labels use the Cityscapes label ids, so one table serves both. Every id that has no train id
maps to the ignore label 255.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

IGNORE_LABEL = 255

# (label id, name, RGB) for the 34 Cityscapes label ids (cityscapesScripts labels.py).
CITYSCAPES_LABEL_IDS: Tuple[Tuple[int, str, Tuple[int, int, int]], ...] = (
    (0, "unlabeled", (0, 0, 0)),
    (1, "ego vehicle", (0, 0, 0)),
    (2, "rectification border", (0, 0, 0)),
    (3, "out of roi", (0, 0, 0)),
    (4, "static", (0, 0, 0)),
    (5, "dynamic", (111, 74, 0)),
    (6, "ground", (81, 0, 81)),
    (7, "road", (128, 64, 128)),
    (8, "sidewalk", (244, 35, 232)),
    (9, "parking", (250, 170, 160)),
    (10, "rail track", (230, 150, 140)),
    (11, "building", (70, 70, 70)),
    (12, "wall", (102, 102, 156)),
    (13, "fence", (190, 153, 153)),
    (14, "guard rail", (180, 165, 180)),
    (15, "bridge", (150, 100, 100)),
    (16, "tunnel", (150, 120, 90)),
    (17, "pole", (153, 153, 153)),
    (18, "polegroup", (153, 153, 153)),
    (19, "traffic light", (250, 170, 30)),
    (20, "traffic sign", (220, 220, 0)),
    (21, "vegetation", (107, 142, 35)),
    (22, "terrain", (152, 251, 152)),
    (23, "sky", (70, 130, 180)),
    (24, "person", (220, 20, 60)),
    (25, "rider", (255, 0, 0)),
    (26, "car", (0, 0, 142)),
    (27, "truck", (0, 0, 70)),
    (28, "bus", (0, 60, 100)),
    (29, "caravan", (0, 0, 90)),
    (30, "trailer", (0, 0, 110)),
    (31, "train", (0, 80, 100)),
    (32, "motorcycle", (0, 0, 230)),
    (33, "bicycle", (119, 11, 32)),
)
NAME_TO_LABEL_ID: Dict[str, int] = {name: lid for lid, name, _ in CITYSCAPES_LABEL_IDS}

# The 19 evaluation classes in train-id order, named as in CITYSCAPES_LABEL_IDS.
CLASS_NAMES_19: Tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
PALETTE_19 = np.array(
    [dict((n, c) for _, n, c in CITYSCAPES_LABEL_IDS)[name] for name in CLASS_NAMES_19], dtype=np.uint8
)
# Cityscapes / GTA5 label id -> 19-class train id.
LABEL_ID_TO_TRAIN_ID_19: Dict[int, int] = {NAME_TO_LABEL_ID[n]: i for i, n in enumerate(CLASS_NAMES_19)}

# SYNTHIA's 16 classes: the 19 without terrain, truck and train (indices into the 19).
CLASSES_16_OF_19: Tuple[int, ...] = tuple(
    i for i, n in enumerate(CLASS_NAMES_19) if n not in ("terrain", "truck", "train")
)
CLASS_NAMES_16: Tuple[str, ...] = tuple(CLASS_NAMES_19[i] for i in CLASSES_16_OF_19)
PALETTE_16 = PALETTE_19[list(CLASSES_16_OF_19)]
LABEL_ID_TO_TRAIN_ID_16: Dict[int, int] = {NAME_TO_LABEL_ID[n]: i for i, n in enumerate(CLASS_NAMES_16)}
# SYNTHIA-RAND-CITYSCAPES class id (red channel of GT/LABELS) -> 16-class train id.
SYNTHIA_ID_TO_TRAIN_ID_16: Dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12, 19: 13,
    12: 14, 11: 15,
}

# mIoU* (13 classes) = the 16 without wall, fence and pole.
_NOT_IN_13 = ("wall", "fence", "pole")
CLASSES_13_OF_16: Tuple[int, ...] = tuple(i for i, n in enumerate(CLASS_NAMES_16) if n not in _NOT_IN_13)
CLASSES_13_OF_19: Tuple[int, ...] = tuple(CLASSES_16_OF_19[i] for i in CLASSES_13_OF_16)


def _check_num_classes(num_classes: int) -> None:
    if num_classes not in (16, 19):
        raise ValueError(f"num_classes must be 19 (Cityscapes/GTA5) or 16 (SYNTHIA), got {num_classes}")


def class_names(num_classes: int) -> Tuple[str, ...]:
    _check_num_classes(num_classes)
    return CLASS_NAMES_19 if num_classes == 19 else CLASS_NAMES_16


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours of the train ids."""
    _check_num_classes(num_classes)
    return PALETTE_19 if num_classes == 19 else PALETTE_16


def cityscapes_id_to_train_id(num_classes: int) -> Dict[int, int]:
    """Cityscapes/GTA5 label id -> train id, for 19-class models or SYNTHIA-trained 16-class ones."""
    _check_num_classes(num_classes)
    return LABEL_ID_TO_TRAIN_ID_19 if num_classes == 19 else LABEL_ID_TO_TRAIN_ID_16


def lookup_table(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """uint8 array of ``size`` entries: ``table[id]`` is the train id, 255 for unmapped ids."""
    table = np.full(size, IGNORE_LABEL, dtype=np.uint8)
    for label_id, train_id in mapping.items():
        table[label_id] = train_id
    return table


def train_id_to_label_id(num_classes: int) -> np.ndarray:
    """uint8 array of 256 entries: ``table[train_id]`` is the Cityscapes label id (what the Cityscapes
    benchmark reads), 0 (unlabeled) for the ignore label and unused entries."""
    table = np.zeros(256, dtype=np.uint8)
    for label_id, train_id in cityscapes_id_to_train_id(num_classes).items():
        table[train_id] = label_id
    return table


def label_id_palette() -> List[int]:
    """Flat 768-entry RGB palette for an 8-bit paletted label PNG whose indices are label ids."""
    flat = [0] * (256 * 3)
    for label_id, _, rgb in CITYSCAPES_LABEL_IDS:
        flat[3 * label_id: 3 * label_id + 3] = rgb
    return flat


def default_subsets(num_classes: int) -> Dict[str, Sequence[int]]:
    """Extra means reported beside the mIoU: mIoU-16 and mIoU-13 for SYNTHIA-trained models."""
    _check_num_classes(num_classes)
    return {} if num_classes == 19 else {"miou16": tuple(range(16)), "miou13": CLASSES_13_OF_16}
