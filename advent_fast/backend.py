"""Which implementation runs the fused losses.

CUDA tensors -> Triton kernels (on GPUs of compute capability 7.0 and newer, which Triton compiles for),
CPU tensors -> the C++ ops of ``advent_fast._C``, anything else (or a CPU build without the extension, or
an older GPU) -> the naive reference, with a one-time warning.
``ADVENT_FAST_BACKEND=triton|cpp|reference`` or :func:`set_backend` force one; forcing ``triton``
on CPU tensors needs ``TRITON_INTERPRET=1`` (how CI runs the kernels).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("triton", "cpp", "reference")
ENV_VAR = "ADVENT_FAST_BACKEND"
# Triton compiles for Volta (7.0) and newer: on older GPUs (P100, GTX 10xx) the fused losses run the
# reference, and the kernels of the trainer's fast path their torch equivalents.
TRITON_MIN_CAPABILITY = (7, 0)

_forced: Optional[str] = None
_warned: set = set()


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every later call (``None`` restores the automatic choice)."""
    global _forced
    _forced = None if name is None else _check_name(name, "backend")


def _import_cpp() -> bool:
    try:
        importlib.import_module("advent_fast._C")
    except ImportError:
        return False
    return True


# Tried once, at import: a loss call then costs no import attempt, and torch.compile, which cannot
# trace an import, reads a constant.
_CPP_AVAILABLE = _import_cpp()


def cpp_available() -> bool:
    return _CPP_AVAILABLE


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_capabilities: Dict[torch.device, Tuple[int, int]] = {}


def compute_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """A CUDA device's compute capability (asked once a device); None for other devices, or without CUDA."""
    capability = _capabilities.get(device)
    if capability is None and device.type == "cuda" and torch.cuda.is_available():
        capability = _capabilities[device] = torch.cuda.get_device_capability(device)
    return capability


def _older_than_triton(device: torch.device) -> bool:
    # Not asked while torch.compile traces: it compiles with Triton too, and refuses such GPUs itself.
    if torch.compiler.is_compiling():
        return False
    capability = compute_capability(device)
    return capability is not None and capability < TRITON_MIN_CAPABILITY


def get_backend(device: torch.device) -> str:
    """The backend that runs tensors on ``device`` now."""
    forced = _forced or os.environ.get(ENV_VAR) or None
    if forced is not None:
        name = _check_name(forced, ENV_VAR if _forced is None else "backend")
        if name == "cpp" and device.type != "cpu":
            raise ValueError(f"the cpp backend runs CPU tensors only, got a tensor on {device}")
        if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton backend runs CPU tensors only under TRITON_INTERPRET=1 "
                             "(set it before triton is imported)")
        if name == "triton" and device.type == "cuda" and _older_than_triton(device):
            major, minor = compute_capability(device)
            raise ValueError(f"the triton backend needs a GPU of compute capability 7.0 or newer; {device} "
                             f"has {major}.{minor}")
        return name
    if device.type == "cuda":
        if _older_than_triton(device):
            major, minor = compute_capability(device)
            _warn_once(f"{device}-capability", f"{device} has compute capability {major}.{minor}, older than "
                                               f"Triton compiles for (7.0): the fused losses run the naive "
                                               f"reference on it")
            return "reference"
        return "triton"
    if device.type == "cpu":
        if cpp_available():
            return "cpp"
        _warn_once("cpp", "advent_fast._C is not built: CPU losses fall back to the naive reference "
                          "(install with `pip install --no-build-isolation -e .`)")
        return "reference"
    _warn_once(device.type, f"no fused advent_fast kernels for {device.type} tensors: "
                            "using the naive reference")
    return "reference"


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device for the block: Triton launches on the current device and
    its stream, not on its tensors' device (a tensor on cuda:1 while cuda:0 is current would fault)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def auto_precision(device: torch.device) -> str:
    """What ``precision: auto`` takes on a CUDA device: bf16 with bf16 tensor cores (compute capability 8.0
    on: A100, H100, RTX 30xx and newer); fp16 with fp16 tensor cores only (7.x: V100, T4, RTX 20xx, which
    emulate bf16 slowly); fp32 on older GPUs (P100, GTX 10xx: no tensor cores, and slow or no faster fp16
    arithmetic). bf16 where the device cannot be asked (no CUDA)."""
    capability = compute_capability(device)
    if capability is None or capability >= (8, 0):
        return "bf16"
    return "fp16" if capability >= (7, 0) else "fp32"
