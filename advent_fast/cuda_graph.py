"""The whole training step replayed as one CUDA graph (``train.cuda_graph``).

An eager step launches thousands of small kernels (two ResNet-101 passes forward and backward, the
discriminators, the losses, the optimisers), and launching them costs the host about as much time
as the GPU needs to run them. A graph replay launches them all at once. Capture needs a step that
never waits for the device (``StepSettings.sync_free``: the fused optimisers skip a non-finite step
themselves and read their learning rates from device tensors) and fixed shapes: each batch is
copied into the tensors the graph was captured with.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

WARMUP_STEPS = 3  # eager steps before capture: cuDNN / cuBLAS choose their algorithms, Triton compiles
INPUT_KEYS = ("image", "label")  # what the step reads from a batch


class CapturedStep:
    """Calls ``step(source, target)`` eagerly for the first :data:`WARMUP_STEPS` calls, captures it at
    the next call, and replays the graph from then on. Warm-up and capture run on one side stream, as
    capture requires: libraries that keep per-stream state (cuBLAS workspaces) set it up during warm-up.
    Every call is a real training step. ``step`` returns tensors only (nested in tuples, or None);
    the graph returns the same tensor objects at every replay, overwritten in place."""

    def __init__(self, step: Callable, device: torch.device):
        self.step = step
        self.device = device
        self.warmup_left = WARMUP_STEPS
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.stream: Optional[torch.cuda.Stream] = None
        self.inputs: tuple = ()
        self.outputs: Any = None

    def __call__(self, source: Dict[str, Any], target: Optional[Dict[str, Any]]):
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            return self._eager_on_side_stream(source, target)
        if self.graph is None:
            self._capture(source, target)
        for static, batch, stream in zip(self.inputs, (source, target), ("source", "target")):
            _copy_batch(static, batch, stream)
        self.graph.replay()
        return self.outputs

    def _eager_on_side_stream(self, source, target):
        main = torch.cuda.current_stream(self.device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            outputs = self.step(source, target)
        main.wait_stream(self.stream)
        for tensor in _tensors(outputs):  # allocated on the side stream, used on the main one
            tensor.record_stream(main)
        return outputs

    def _capture(self, source, target) -> None:
        self.inputs = (_static_copy(source), _static_copy(target))
        self.graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the data loader's pin-memory thread may call CUDA while this thread captures.
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                self.outputs = self.step(*self.inputs)
        except Exception as exc:
            raise RuntimeError(f"train.cuda_graph: capturing the training step failed ({type(exc).__name__}: "
                               f"{exc}); train without it (--no-cuda-graph)") from exc


def _static_copy(batch: Optional[Dict[str, Any]]) -> Optional[Dict[str, torch.Tensor]]:
    if batch is None:
        return None
    return {k: batch[k].clone() for k in INPUT_KEYS if k in batch}


def _copy_batch(static: Optional[Dict[str, torch.Tensor]], batch: Optional[Dict[str, Any]], stream: str) -> None:
    if (static is None) != (batch is None):
        raise ValueError(f"train.cuda_graph: the step was captured {'without' if static is None else 'with'} "
                         f"a {stream} batch")
    for key, tensor in (static or {}).items():
        if batch[key].shape != tensor.shape:
            raise ValueError(f"train.cuda_graph replays fixed shapes: the {stream} {key} has shape "
                             f"{tuple(batch[key].shape)}, the captured one {tuple(tensor.shape)}")
        tensor.copy_(batch[key], non_blocking=True)


def _tensors(outputs):
    if isinstance(outputs, torch.Tensor):
        yield outputs
    elif isinstance(outputs, (tuple, list)):
        for item in outputs:
            yield from _tensors(item)
