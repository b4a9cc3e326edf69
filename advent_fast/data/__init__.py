"""Datasets in the release formats, class tables, the source class prior and the embedded default data."""
from advent_fast.data.classes import (
    CLASS_NAMES_16,
    CLASS_NAMES_19,
    CLASSES_13_OF_16,
    CLASSES_13_OF_19,
    CLASSES_16_OF_19,
    IGNORE_LABEL,
    PALETTE_16,
    PALETTE_19,
    class_names,
    default_subsets,
    palette,
)
from advent_fast.data.datasets import (
    CAFFE_MEAN_BGR,
    CityscapesDataset,
    DatasetError,
    GTA5Dataset,
    ImageFolderDataset,
    SegmentationDataset,
    SynthiaDataset,
)

# The embedded generator and the prior are also command-line modules (python -m ...): imported on
# first use, so that running them does not import them twice.
_LAZY = {
    "EmbeddedData": "advent_fast.data.embedded",
    "ensure_embedded_data": "advent_fast.data.embedded",
    "compute_prior": "advent_fast.data.prior",
    "load_prior": "advent_fast.data.prior",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'advent_fast.data' has no attribute {name!r}")

__all__ = [
    "CAFFE_MEAN_BGR",
    "CLASSES_13_OF_16",
    "CLASSES_13_OF_19",
    "CLASSES_16_OF_19",
    "CLASS_NAMES_16",
    "CLASS_NAMES_19",
    "CityscapesDataset",
    "DatasetError",
    "EmbeddedData",
    "GTA5Dataset",
    "IGNORE_LABEL",
    "ImageFolderDataset",
    "PALETTE_16",
    "PALETTE_19",
    "SegmentationDataset",
    "SynthiaDataset",
    "class_names",
    "compute_prior",
    "default_subsets",
    "ensure_embedded_data",
    "load_prior",
    "palette",
]
