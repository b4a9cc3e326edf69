"""The ADVENT release's experiment files (``advent/scripts/configs/*.yml``) read as this project's config.

    python -m advent_fast.train --config advent/scripts/configs/advent.yml --source-root DATA/GTA5 ...
    python -m advent_fast.evaluate --config advent/scripts/configs/advent_pretrained.yml --root DATA/Cityscapes

A YAML file whose top-level keys are upper case (``SOURCE``, ``TRAIN``, ...) is one. The release's defaults
(its ``advent/domain_adaptation/config.py``) are the paper presets' (``SOURCE: GTA`` -> gta2cityscapes_r101,
``SYNTHIA`` -> synthia2cityscapes_r101), and each key the file sets becomes the setting of this project that
:data:`SETTINGS` names. As in the release, a key it does not know is an error, and so is a value this project
cannot honour (another ignore label or image mean, a model other than DeepLabv2, a GPU id). Keys with nothing
to do in training are accepted and left alone (:data:`NO_EFFECT`); the evaluation reads its TEST section
(:func:`evaluation_options`). Paths are taken as written: relative ones from the working directory, as the
release takes them.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Tuple

from .config import ConfigError, read_yaml
from .data.datasets import CAFFE_MEAN_BGR

__all__ = ["evaluation_options", "from_release", "is_release_config"]

PRESETS = {"GTA": "gta2cityscapes_r101", "SYNTHIA": "synthia2cityscapes_r101"}
DA_METHODS = {"AdvEnt": "advent", "MinEnt": "minent"}


# Release key -> this project's setting.
SETTINGS: Dict[str, str] = {
    "NUM_WORKERS": "data.num_workers",
    "DATA_DIRECTORY_SOURCE": "data.source_root",
    "DATA_DIRECTORY_TARGET": "data.target_root",
    "NUM_CLASSES": "data.num_classes",
    "TRAIN.BATCH_SIZE_SOURCE": "train.source_batch_size",
    "TRAIN.BATCH_SIZE_TARGET": "train.target_batch_size",
    "TRAIN.INPUT_SIZE_SOURCE": "data.source_size",
    "TRAIN.INPUT_SIZE_TARGET": "data.target_size",
    "TRAIN.MULTI_LEVEL": "model.multi_level",
    "TRAIN.RESTORE_FROM": "model.init_weights",
    "TRAIN.LEARNING_RATE": "train.lr",
    "TRAIN.MOMENTUM": "train.momentum",
    "TRAIN.WEIGHT_DECAY": "train.weight_decay",
    "TRAIN.POWER": "train.power",
    "TRAIN.LAMBDA_SEG_MAIN": "train.lambda_seg_main",
    "TRAIN.LAMBDA_SEG_AUX": "train.lambda_seg_aux",
    "TRAIN.LAMBDA_ADV_MAIN": "train.lambda_adv_main",
    "TRAIN.LAMBDA_ADV_AUX": "train.lambda_adv_aux",
    "TRAIN.LAMBDA_ENT_MAIN": "train.lambda_ent_main",
    "TRAIN.LAMBDA_ENT_AUX": "train.lambda_ent_aux",
    "TRAIN.LEARNING_RATE_D": "train.lr_d",
    "TRAIN.MAX_ITERS": "train.max_iters",
    "TRAIN.EARLY_STOP": "train.stop_iter",
    "TRAIN.SAVE_PRED_EVERY": "run.snapshot_every",
    "TRAIN.RANDOM_SEED": "train.seed",
    "TRAIN.TENSORBOARD_LOGDIR": "run.tensorboard",  # on when given; the logs go to the run folder
    "TRAIN.TENSORBOARD_VIZRATE": "run.image_every",
    "TEST.OUTPUT_SIZE_TARGET": "data.eval_label_size",  # the in-training evaluation's label size
}
def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value  # anything else: the type check names it


def _items(value: Any) -> List[Any]:
    """The release's tuples of TEST (one entry a model), also when the file gives one value alone."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


# The release's values where this project's differ in form: '' for a path not given, tuples for sizes.
CONVERSIONS: Dict[str, Callable[[Any], Any]] = {
    "DATA_DIRECTORY_SOURCE": lambda v: v or None,
    "DATA_DIRECTORY_TARGET": lambda v: v or None,
    "TRAIN.RESTORE_FROM": lambda v: v or None,
    "TRAIN.TENSORBOARD_LOGDIR": bool,
    "TRAIN.INPUT_SIZE_SOURCE": _as_list,
    "TRAIN.INPUT_SIZE_TARGET": _as_list,
    "TEST.OUTPUT_SIZE_TARGET": _as_list,
}
# Keys read together with others (below), and keys that change nothing in training: the class-info files (the
# label tables are built in), the log root (TensorBoard writes into the run folder), the evaluation's own
# settings (python -m advent_fast.evaluate --config reads them: evaluation_options).
COMBINED = {"SOURCE", "TARGET", "DATA_LIST_SOURCE", "DATA_LIST_TARGET", "EXP_NAME", "EXP_ROOT", "EXP_ROOT_SNAPSHOT",
            "GPU_ID", "TRAIN.SET_SOURCE", "TRAIN.SET_TARGET", "TRAIN.IGNORE_LABEL", "TRAIN.MODEL", "TRAIN.IMG_MEAN",
            "TRAIN.DA_METHOD", "TRAIN.SNAPSHOT_DIR", "TEST.SET_TARGET", "TEST.IMG_MEAN"}
NO_EFFECT = {"EXP_ROOT_LOGS", "TRAIN.INFO_SOURCE", "TRAIN.INFO_TARGET", "TEST.MODE", "TEST.MODEL",
             "TEST.MODEL_WEIGHT", "TEST.MULTI_LEVEL", "TEST.RESTORE_FROM", "TEST.SNAPSHOT_DIR", "TEST.SNAPSHOT_STEP",
             "TEST.SNAPSHOT_MAXITER", "TEST.BATCH_SIZE_TARGET", "TEST.INPUT_SIZE_TARGET", "TEST.INFO_TARGET",
             "TEST.WAIT_MODEL"}
KNOWN = set(SETTINGS) | COMBINED | NO_EFFECT


def is_release_config(values: Any) -> bool:
    """Whether a parsed YAML file is the release's: a mapping with upper-case top-level keys."""
    return isinstance(values, dict) and bool(values) and all(isinstance(k, str) and k.isupper() for k in values)


def _flatten(values: Dict[str, Any], path: str) -> Dict[str, Any]:
    """{"TRAIN.LEARNING_RATE": value, ...}; an unknown key is an error, as in the release."""
    flat: Dict[str, Any] = {}
    for key, value in values.items():
        if key in ("TRAIN", "TEST"):
            if not isinstance(value, dict):
                raise ConfigError(f"release config key '{key}' in {path} must be a mapping, got {value!r}")
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    unknown = sorted(k for k in flat if k not in KNOWN)
    if unknown:
        raise ConfigError(f"unknown release config key(s) {', '.join(unknown)} in {path} (not in the release's "
                          f"advent/domain_adaptation/config.py)")
    return flat


def _require(flat: Dict[str, Any], key: str, allowed: Any, path: str, why: str) -> None:
    if key in flat and flat[key] not in allowed:
        raise ConfigError(f"release config key '{key}' in {path} is {flat[key]!r}; {why}")


def _check_mean(flat: Dict[str, Any], key: str, path: str) -> None:
    mean = flat.get(key)
    if mean is not None and (not isinstance(mean, (list, tuple)) or len(mean) != 3
                             or not all(math.isclose(float(a), b, abs_tol=1e-4)
                                        for a, b in zip(mean, CAFFE_MEAN_BGR))):
        raise ConfigError(f"release config key '{key}' in {path} is {mean!r}; the datasets subtract the release's "
                          f"Caffe mean {list(CAFFE_MEAN_BGR)} (BGR)")


def _experiment(values: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The file's keys, flat, checked as far as training and evaluation read them alike."""
    flat = _flatten(values, path)
    _require(flat, "SOURCE", PRESETS, path, f"one of {', '.join(PRESETS)}")
    _require(flat, "TARGET", ("Cityscapes",), path, "the release adapts to Cityscapes only")
    _require(flat, "GPU_ID", (0,), path, "choose the GPU with CUDA_VISIBLE_DEVICES (and --device cuda)")
    for key in ("TRAIN.IMG_MEAN", "TEST.IMG_MEAN"):
        _check_mean(flat, key, path)
    return flat


def _run_folder(flat: Dict[str, Any]) -> str:
    """Where the release writes a run's snapshots: TRAIN.SNAPSHOT_DIR, else EXP_ROOT_SNAPSHOT/EXP_NAME (EXP_ROOT
    relative to the working directory). A run trained here from the file keeps its snapshots in its snapshots/."""
    if flat.get("TRAIN.SNAPSHOT_DIR"):
        return str(flat["TRAIN.SNAPSHOT_DIR"])
    root = flat.get("EXP_ROOT_SNAPSHOT") or os.path.join(flat.get("EXP_ROOT") or "experiments", "snapshots")
    name = flat.get("EXP_NAME") or (f"{flat.get('SOURCE', 'GTA')}2{flat.get('TARGET', 'Cityscapes')}_"
                                    f"{flat.get('TRAIN.MODEL', 'DeepLabv2')}_{flat.get('TRAIN.DA_METHOD', 'AdvEnt')}")
    return os.path.join(str(root), str(name))


def _last_snapshot(folder: str) -> float:
    """The iteration of the last snapshot a run of this project writes into ``folder`` (its train.stop_iter, from
    the run's config.yaml beside it), or infinity: a sweep waiting for later ones would wait forever."""
    run_config = os.path.join(os.path.dirname(os.path.normpath(folder)), "config.yaml")
    try:
        return int(read_yaml(run_config)["train"]["stop_iter"])
    except (OSError, TypeError, KeyError, ValueError):  # not (yet) a run of this project
        return math.inf


def from_release(values: Dict[str, Any], path: str) -> Tuple[str, List[Tuple[str, str, Any]]]:
    """Training: (the preset the file's defaults are, [(release key, section.key, value)])."""
    flat = _experiment(values, path)
    _require(flat, "TRAIN.IGNORE_LABEL", (255,), path, "the datasets map every other label id to 255")
    _require(flat, "TRAIN.MODEL", ("DeepLabv2",), path, "the release trains DeepLabv2 (ResNet-101) only")
    _require(flat, "TRAIN.DA_METHOD", DA_METHODS, path, f"one of {', '.join(DA_METHODS)}")
    # The release reads the Cityscapes images of leftImg8bit/SET; this project those of train (target) and val.
    _require(flat, "TRAIN.SET_TARGET", ("train",), path, "the target images are Cityscapes' train split here (a "
             "list file, DATA_LIST_TARGET, picks among them)")
    _require(flat, "TEST.SET_TARGET", ("val",), path, "the in-training evaluation reads Cityscapes' val split "
             "(python -m advent_fast.evaluate --split for another)")

    settings: List[Tuple[str, str, Any]] = []
    for key, value in flat.items():
        if key in SETTINGS:
            settings.append((key, SETTINGS[key], CONVERSIONS.get(key, lambda v: v)(value)))
    if "TRAIN.DA_METHOD" in flat:
        settings.append(("TRAIN.DA_METHOD", "train.mode", DA_METHODS[flat["TRAIN.DA_METHOD"]]))
    # List files: the release formats DATA_LIST_* with the set's name (its own lists hold every image of the
    # set, as this project's default of no list does).
    for key, set_key, default_set, name in (("DATA_LIST_SOURCE", "TRAIN.SET_SOURCE", "all", "data.source_list"),
                                            ("DATA_LIST_TARGET", "TRAIN.SET_TARGET", "train", "data.target_list"),
                                            ("DATA_LIST_TARGET", "TEST.SET_TARGET", "val", "data.val_list")):
        if flat.get(key):
            settings.append((key, name, str(flat[key]).format(flat.get(set_key, default_set))))
        elif flat.get(set_key, default_set) != default_set:
            raise ConfigError(f"release config key '{set_key}' in {path} is {flat[set_key]!r}: give its list file "
                              f"({key}, with {{}} for the set's name)")
    settings.append(("TRAIN.SNAPSHOT_DIR", "run.dir", _run_folder(flat)))  # the release's, where test.py looks
    return PRESETS[flat.get("SOURCE", "GTA")], settings


def evaluation_options(values: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``python -m advent_fast.evaluate --config FILE``: its options (argparse names) for what the release's
    test.py does with the file. ``TEST.MODE: single`` evaluates the ``TEST.RESTORE_FROM`` models, an ensemble
    weighted by ``TEST.MODEL_WEIGHT``; ``best`` (the release's default) sweeps ``TEST.SNAPSHOT_DIR`` (its snapshots/
    when it is a run folder of this project; without it, the snapshots/ of the run the file trains here) up to
    ``TEST.SNAPSHOT_MAXITER`` (or such a run's last snapshot), waiting for each snapshot with ``TEST.WAIT_MODEL``
    (every snapshot in the folder is evaluated, whatever ``TEST.SNAPSHOT_STEP``)."""
    flat = _experiment(values, path)
    _require(flat, "TEST.MODE", ("single", "best"), path, "single or best")
    models = _items(flat.get("TEST.MODEL", ["DeepLabv2"]))
    if any(model != "DeepLabv2" for model in models):
        raise ConfigError(f"release config key 'TEST.MODEL' in {path} is {models!r}; the release evaluates "
                          f"DeepLabv2 (ResNet-101) models only")
    split = flat.get("TEST.SET_TARGET", "val")
    options: Dict[str, Any] = {"dataset": "cityscapes", "split": split}
    for key, option in (("DATA_DIRECTORY_TARGET", "root"), ("NUM_CLASSES", "num_classes"), ("NUM_WORKERS", "workers"),
                        ("TEST.BATCH_SIZE_TARGET", "batch_size"), ("TEST.INPUT_SIZE_TARGET", "input_size"),
                        ("TEST.OUTPUT_SIZE_TARGET", "label_size")):
        if flat.get(key) in (None, ""):
            continue
        options[option] = _as_list(flat[key])
        size = options[option]
        if key in ("TEST.INPUT_SIZE_TARGET", "TEST.OUTPUT_SIZE_TARGET") and not (
                isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise ConfigError(f"release config key '{key}' in {path} must be [width, height], got {flat[key]!r}")
    if flat.get("DATA_LIST_TARGET"):
        options["list_path"] = str(flat["DATA_LIST_TARGET"]).format(split)
    if flat.get("TEST.MODE", "best") == "single":
        checkpoints, weights = _items(flat.get("TEST.RESTORE_FROM", [""])), _items(flat.get("TEST.MODEL_WEIGHT", [1.0]))
        if "" in checkpoints or len(checkpoints) != len(models) or len(weights) != len(models):
            raise ConfigError(f"release config keys in {path}: TEST.MODE single needs one TEST.RESTORE_FROM "
                              f"checkpoint and one TEST.MODEL_WEIGHT a TEST.MODEL ({len(models)}), got {checkpoints!r} "
                              f"and {weights!r}")
        options.update(checkpoint=checkpoints, weights=[float(w) for w in weights])
    else:
        if len(models) != 1:
            raise ConfigError(f"release config key 'TEST.MODEL' in {path}: TEST.MODE best takes one model, as in "
                              f"the release")
        folder = (_items(flat.get("TEST.SNAPSHOT_DIR", [""])) or [""])[0]
        if not folder or os.path.isdir(os.path.join(folder, "snapshots")):  # a run folder of this project
            folder = os.path.join(folder or _run_folder(flat), "snapshots")
        options.update(sweep=folder, until=min(int(flat.get("TEST.SNAPSHOT_MAXITER", 120_000)), _last_snapshot(folder)),
                       timeout=math.inf if flat.get("TEST.WAIT_MODEL", True) else 0.0)
    return options
