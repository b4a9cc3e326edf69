"""Initial weights (ImageNet backbones) and checkpoints: reading, checking, writing.

Nothing here downloads: missing files raise FileNotFoundError saying where to get them.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Optional, Union

import torch

from .deeplabv2 import SegmentationModel, build_model

CHECKPOINT_FORMAT = "advent_fast/1"

_RELEASE_PAGE = "https://github.com/valeoai/ADVENT/releases"
_INIT_SOURCES = {
    "deeplabv2_r101": (
        "DeepLab_resnet_pretrained_imagenet.pth, the Caffe-converted DeepLab ResNet-101 the ADVENT "
        f"README ('Pre-trained models') links: {_RELEASE_PAGE} (AdaptSegNet's training script uses "
        "the same key layout, DeepLab_resnet_pretrained_init-f81d91e8.pth); or torchvision's "
        "ImageNet ResNet-101 from its model zoo: https://download.pytorch.org/models/resnet101-63fe2227.pth"
    ),
    "deeplabv2_vgg16": (
        "torchvision's ImageNet VGG-16 from its model zoo: "
        "https://download.pytorch.org/models/vgg16-397923af.pth"
    ),
}
# Which init-file layouts fit which model, and the entries no init file covers (they keep
# their random init: the heads; for VGG also fc6/fc7, as in AdaptSegNet).
_INIT_LAYOUTS = {
    "deeplabv2_r101": ("caffe_deeplab_resnet101", "torchvision_resnet101"),
    "deeplabv2_vgg16": ("torchvision_vgg16",),
}
_INIT_KEEPS_RANDOM = {
    "deeplabv2_r101": ("layer5.", "layer6."),
    "deeplabv2_vgg16": ("features.29.", "features.31.", "classifier."),
}
# Plain state dicts (no project meta): a key only that arch has, its main-head weight (whose
# first dimension is the class count), and the aux-head prefix (present iff multi-level).
_PLAIN_LAYOUTS = {
    "deeplabv2_r101": ("layer4.2.conv3.weight", "layer6.conv2d_list.0.weight", "layer5."),
    "deeplabv2_vgg16": ("features.31.weight", "classifier.conv2d_list.0.weight", None),
    "deeplabv2_small": ("stage4.1.0.weight", "layer6.conv2d_list.0.weight", "layer5."),
}
# Torchvision VGG-16 `features` index -> ours: pool4 (23) is removed, conv5 moves up by one.
_TORCHVISION_VGG_INDEX = {i: i for i in range(23)} | {i: i - 1 for i in range(24, 30)}
# Files written before BatchNorm counted batches lack these; BatchNorm fills them in on load.
_OPTIONAL_SUFFIX = ".num_batches_tracked"


def load_training_init(model: SegmentationModel, path: Union[str, os.PathLike]) -> None:
    """``model.init_weights``: the whole model from this project's checkpoint or snapshot, or from a plain state
    dict of it (the release's snapshots and released models), heads included: a warm start, as the release's
    ``RESTORE_FROM`` of a full model; anything else is an ImageNet backbone (:func:`load_init_weights`)."""
    raw = _read_init_file(model, path)
    if "format" in raw or _plain_arch(raw) is not None:
        meta, state = _split_checkpoint(raw)
        wrong = [f"{k}={meta[k]!r} (this run: {v!r})" for k, v in model.meta().items() if meta.get(k, v) != v]
        if wrong:
            raise ValueError(f"init weights {path} do not fit this run: {', '.join(wrong)}")
        load_model_state(model, state)
    else:
        _require_imagenet_init(model)
        _load_backbone(model, raw, path)


def load_init_weights(model: SegmentationModel, path: Union[str, os.PathLike]) -> list[str]:
    """Load an ImageNet backbone into ``model``; the heads (and VGG's fc6/fc7) stay random.

    Accepts the Caffe-converted DeepLab file (keys prefixed ``Scale.``, its own classifier under
    ``layer5`` skipped), a torchvision ResNet-101 state dict (``fc`` skipped; torchvision strides
    on the 3x3 conv but the shapes are the same) or a torchvision VGG-16 state dict (its
    ``classifier`` skipped). Note torchvision weights expect RGB inputs in [0, 1] normalised by
    the ImageNet mean/std, the Caffe file BGR 0..255 minus the Caffe mean. Returns the names of
    the model entries that were set.
    """
    _require_imagenet_init(model)
    return _load_backbone(model, _read_init_file(model, path), path)


def _require_imagenet_init(model: SegmentationModel) -> None:
    if model.arch not in _INIT_SOURCES:
        raise ValueError(f"{model.arch} has no ImageNet initialisation; it trains from its random init")


def _read_init_file(model: SegmentationModel, path: Union[str, os.PathLike]) -> Mapping:
    """An init-weights file's contents; a missing one is an error saying where to get one."""
    if not os.path.isfile(path):
        hint = f"For {model.arch} get {_INIT_SOURCES[model.arch]} " if model.arch in _INIT_SOURCES else ""
        raise FileNotFoundError(f"init weights not found: {path}. {hint}(advent_fast never downloads).")
    return read_weights(path, "init weights")


def _load_backbone(model: SegmentationModel, raw: Mapping, path: Union[str, os.PathLike]) -> list[str]:
    """:func:`load_init_weights` of the file's contents ``raw``."""
    layout, backbone = _backbone_from_init_file(raw)
    if layout not in _INIT_LAYOUTS[model.arch]:
        raise ValueError(f"{path} is a {layout} file; {model.arch} takes {' or '.join(_INIT_LAYOUTS[model.arch])}")
    keeps_random = _INIT_KEEPS_RANDOM[model.arch]
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(keeps_random)}
    _check_fit(backbone, expected, f"init file {path} ({layout})", model.arch)
    model.load_state_dict(backbone, strict=False)
    return list(backbone)


def _backbone_from_init_file(raw: Mapping) -> tuple[str, dict]:
    """(layout name, state dict renamed to this project's names, classifier dropped)."""
    keys = list(raw)
    if keys and all(k.startswith("Scale.") for k in keys):
        stripped = {k[len("Scale."):]: v for k, v in raw.items()}
        return "caffe_deeplab_resnet101", {k: v for k, v in stripped.items() if k.split(".")[0] != "layer5"}
    if "fc.weight" in raw and "layer1.0.conv1.weight" in raw:
        return "torchvision_resnet101", {k: v for k, v in raw.items() if not k.startswith("fc.")}
    if "features.0.weight" in raw and "classifier.0.weight" in raw:
        return "torchvision_vgg16", {_renumber_vgg_key(k): v for k, v in raw.items() if k.startswith("features.")}
    raise ValueError(f"unrecognised init-weights layout (first keys: {keys[:5]}); expected a Caffe DeepLab "
                     "ResNet-101 file (Scale.*) or a torchvision ResNet-101 / VGG-16 state dict")


def _renumber_vgg_key(key: str) -> str:
    _, index, rest = key.split(".", 2)
    # An index outside the map keeps its name and is reported as unexpected.
    return f"features.{_TORCHVISION_VGG_INDEX.get(int(index), index)}.{rest}"


def load_model_state(model: torch.nn.Module, state_dict: Mapping) -> None:
    """Strict ``load_state_dict`` that first lists missing, unexpected and mis-shaped entries."""
    _check_fit(state_dict, model.state_dict(), "state dict", getattr(model, "arch", type(model).__name__))
    model.load_state_dict(state_dict, strict=True)


def _check_fit(given: Mapping, expected: Mapping, what: str, target: str, shown: int = 5) -> None:
    missing = [k for k in expected if k not in given and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in given if k not in expected]
    misshaped = [f"{k}: {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
                 for k in given if k in expected and given[k].shape != expected[k].shape]
    problems = [f"{len(items)} {label} (e.g. {', '.join(items[:shown])})"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("with the wrong shape, file vs model", misshaped)) if items]
    if problems:
        raise ValueError(f"{what} does not fit {target}: " + "; ".join(problems))


def checkpoint_dict(model: SegmentationModel, /, **extra) -> dict:
    """This project's checkpoint: format tag, model meta, state dict, plus trainer entries."""
    reserved = {"format", "meta", "model"} & set(extra)
    if reserved:
        raise ValueError(f"checkpoint keys {sorted(reserved)} are reserved")
    return {"format": CHECKPOINT_FORMAT, "meta": model.meta(), "model": model.state_dict(), **extra}


def save_checkpoint(path: Union[str, os.PathLike], model: SegmentationModel, /, **extra) -> None:
    """Write :func:`checkpoint_dict` atomically (temp file + rename: never half a checkpoint)."""
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(checkpoint_dict(model, **extra), tmp)
    os.replace(tmp, path)


def model_from_checkpoint(
    path_or_dict: Union[str, os.PathLike, Mapping],
    arch: Optional[str] = None,
    num_classes: Optional[int] = None,
    multi_level: Optional[bool] = None,
    map_location="cpu",
) -> tuple[SegmentationModel, dict]:
    """Rebuild a model from this project's checkpoint or a release plain state dict.

    For a plain state dict the arch is recognised from its keys (the release's are
    deeplabv2_r101), the class count read from the main head, multi-level from the presence of
    the aux head. Requested values that disagree with the checkpoint raise ValueError. The
    model comes back in train mode (the release default); call ``.eval()`` to evaluate.
    """
    ckpt = _read(path_or_dict, map_location)
    meta, state = _split_checkpoint(ckpt)
    requested = {"arch": arch, "num_classes": num_classes, "multi_level": multi_level}
    clashes = {k: v for k, v in requested.items() if v is not None and v != meta[k]}
    if clashes:
        found = ", ".join(f"{k}={meta[k]!r}" for k in clashes)
        wanted = ", ".join(f"{k}={v!r}" for k, v in clashes.items())
        raise ValueError(f"checkpoint holds {found} but {wanted} was requested")
    model = build_model(**meta)
    load_model_state(model, state)
    return model, meta


def read_weights(path: Union[str, os.PathLike], what: str, map_location="cpu") -> Mapping:
    """torch.load of a mapping (a state dict or checkpoint) of tensors and plain values only (weights_only); a file
    that is not one (truncated, another format, pickled objects, a lone tensor) is a ValueError naming the file."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; torch < 1.6 (the release's checkpoints) a pickle, protocol 2 and up
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise ValueError(f"cannot read {what} {path}: not a file written by torch.save")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message advises weights_only=False: not for this
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise ValueError(f"cannot read {what} {path}: not a file of tensors and plain values ({detail})") from exc
    except Exception as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a checkpoint or state dict")
    return loaded


def _read(path_or_dict: Union[str, os.PathLike, Mapping], map_location) -> Mapping:
    if isinstance(path_or_dict, Mapping):
        return path_or_dict
    if not os.path.isfile(path_or_dict):
        raise FileNotFoundError(
            f"checkpoint not found: {path_or_dict}. Released adapted models "
            f"(gta2cityscapes_advent.pth, ...) are at {_RELEASE_PAGE}."
        )
    return read_weights(path_or_dict, "checkpoint", map_location)


def _plain_arch(state: Mapping) -> Optional[str]:
    """The arch of a plain state dict of a whole model (its signature key and main head present), else None: a
    torchvision ResNet-101 shares the signature key, not the head."""
    return next((a for a, (signature, head, _) in _PLAIN_LAYOUTS.items() if signature in state and head in state),
                None)


def _split_checkpoint(ckpt: Mapping) -> tuple[dict, Mapping]:
    """(meta, state dict) of a project checkpoint or of a plain state dict."""
    if "format" in ckpt:
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {ckpt['format']!r} is not {CHECKPOINT_FORMAT!r}")
        return dict(ckpt["meta"]), ckpt["model"]
    arch = next((a for a, (signature, _, _) in _PLAIN_LAYOUTS.items() if signature in ckpt), None)
    if arch is None:
        raise ValueError(f"not an advent_fast checkpoint nor a known plain state dict (first keys: {list(ckpt)[:5]})")
    _, main_weight, aux_prefix = _PLAIN_LAYOUTS[arch]
    if main_weight not in ckpt:
        raise ValueError(f"plain {arch} state dict without its main head {main_weight}")
    multi_level = aux_prefix is not None and any(k.startswith(aux_prefix) for k in ckpt)
    meta = {"arch": arch, "num_classes": int(ckpt[main_weight].shape[0]), "multi_level": multi_level}
    return meta, ckpt
