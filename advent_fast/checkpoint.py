"""Checkpoints: the project format, trainer state, atomic writes.

A checkpoint is a dict ``{"format": "advent_fast/1", "meta": {"arch", "num_classes",
"multi_level"}, "model": state_dict, ...}``; :func:`advent_fast.models.model_from_checkpoint`
reads any of them. Trainer checkpoints add everything needed to continue a run (see
:func:`trainer_state_keys`). Files are written to a temporary name in the same folder and renamed
over the target, so an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import glob
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

FORMAT = "advent_fast/1"
TRAINER_KEYS = ("discriminators", "optimizers", "scaler", "iteration", "schedule", "rng",
                "data_position", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for what was asked."""


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to ``path`` via a temporary file and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    # Only one process writes a given checkpoint: other temporaries were left by a killed save.
    for stale in glob.glob(os.path.join(folder, f".{glob.escape(os.path.basename(path))}.tmp*")):
        os.remove(stale)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # Make the rename itself durable (not supported on every platform).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a project checkpoint (tensors and plain Python values only: weights_only)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} checkpoint")
    return ckpt


def check_meta(ckpt: Dict[str, Any], expected: Dict[str, Any], path: str = "checkpoint") -> None:
    """Refuse a checkpoint of another model, class count or head layout (``expected``: model.meta())."""
    meta = ckpt.get("meta", {})
    wrong = [f"{k}={meta.get(k)!r} (this run: {v!r})" for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        raise CheckpointError(f"{path} does not fit this run: {', '.join(wrong)}")


def check_resumable(ckpt: Dict[str, Any], path: str = "checkpoint") -> None:
    missing = [k for k in TRAINER_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is a model snapshot, not a trainer checkpoint "
                              f"(missing {', '.join(missing)}); resume from checkpoint.pt")


def rng_state() -> Dict[str, Any]:
    """Every generator a run may draw from, in weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def model_snapshot(meta: Dict[str, Any], model_state: Dict[str, torch.Tensor], iteration: int,
                   config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The generator alone, in the project format (what evaluation and fine-tuning read)."""
    return {"format": FORMAT, "meta": dict(meta), "model": model_state, "iteration": iteration,
            "config": config}
