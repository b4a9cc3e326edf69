"""The whole training step replayed as one CUDA graph (``train.cuda_graph``).

An eager step launches thousands of small kernels (two ResNet-101 passes forward and backward, the
discriminators, the losses, the optimisers), and launching them costs the host about as much time
as the GPU needs to run them. A graph replay launches them all at once. Capture needs a step that
never waits for the device (``StepSettings.sync_free``: the fused optimisers skip a non-finite step
themselves and read their learning rates from device tensors) and fixed shapes: each batch is
copied into the tensors the graph was captured with.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional

import torch

WARMUP_STEPS = 3  # eager steps before capture: cuDNN / cuBLAS choose their algorithms, Triton compiles
INPUT_KEYS = ("image", "label")  # what the step reads from a batch


class CapturedStep:
    """Calls ``step(source, target)`` eagerly for the first :data:`WARMUP_STEPS` calls, captures it at
    the next call, and replays the graph from then on. Warm-up and capture run on one side stream, as
    capture requires: libraries that keep per-stream state (cuBLAS workspaces) set it up during warm-up.
    Every call is a real training step. ``step`` returns tensors only (nested in tuples, or None);
    the graph returns the same tensor objects at every replay, overwritten in place.

    ``fallback``: a failed capture warns and every later call is an eager step; a batch of another
    shape than the captured one warns and is an eager step. Otherwise both raise."""

    def __init__(self, step: Callable, device: torch.device, fallback: bool = False):
        self.step = step
        self.device = device
        self.fallback = fallback
        self.warmup_left = WARMUP_STEPS
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.failed_graph: Optional[torch.cuda.CUDAGraph] = None  # kept: see _capture
        self.stream: Optional[torch.cuda.Stream] = None
        self.inputs: tuple = ()
        self.outputs: Any = None
        # device memory reserved during the capture: what the graph's private pool added (0 for the tiny
        # steps of the tests on torch 2.11, H200; 586 MiB for the benchmark's AdvEnt step)
        self.pool_bytes = 0
        self.warned_shapes = False

    @property
    def eager(self) -> bool:
        """Every call is an eager step (the capture failed)."""
        return self.failed_graph is not None

    def __call__(self, source: Dict[str, Any], target: Optional[Dict[str, Any]]):
        if self.eager or (self.graph is None and self.warmup_left > 0):
            self.warmup_left = max(self.warmup_left - 1, 0)
            return self._eager_on_side_stream(source, target)
        if self.graph is None and not self._capture(source, target):
            return self._eager_on_side_stream(source, target)
        mismatch = _shape_mismatch(self.inputs, (source, target))
        if mismatch is not None:
            if not self.fallback:
                raise ValueError(f"train.cuda_graph replays fixed shapes: {mismatch}")
            if not self.warned_shapes:
                warnings.warn(f"train.cuda_graph: {mismatch}; such steps run eagerly", stacklevel=3)
                self.warned_shapes = True
            return self._eager_on_side_stream(source, target)
        for static, batch in zip(self.inputs, (source, target)):
            for key, tensor in (static or {}).items():
                tensor.copy_(batch[key], non_blocking=True)
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

    def _capture(self, source, target) -> bool:
        """Captures the step on this call's batches (the call's step happens at the first replay);
        False if the capture failed and ``fallback`` lets training go on eagerly."""
        self.inputs = (_static_copy(source), _static_copy(target))
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        try:
            # thread_local: the data loader's pin-memory thread may call CUDA while this thread captures.
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self.outputs = self.step(*self.inputs)
        except Exception as exc:
            torch.cuda.set_stream(current)  # a failed capture_end leaves the capture stream current
            self.inputs, self.outputs = (), None
            if not self.fallback:
                raise RuntimeError(f"train.cuda_graph: capturing the training step failed "
                                   f"({type(exc).__name__}: {exc}); train without it (--no-cuda-graph)") from exc
            # Kept alive: a capture_end that fails leaves the allocator's capture filter in place,
            # which refers to the graph object. Nothing ran during the capture: the step is redone eagerly.
            self.failed_graph = graph
            self.stream = None  # a fresh side stream for the eager steps
            warnings.warn(f"train.cuda_graph: capturing the training step failed ({type(exc).__name__}: {exc}); "
                          "training on with eager steps (--no-cuda-graph skips the attempt)", stacklevel=3)
            return False
        self.graph = graph
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - reserved
        return True


def _static_copy(batch: Optional[Dict[str, Any]]) -> Optional[Dict[str, torch.Tensor]]:
    if batch is None:
        return None
    return {k: batch[k].clone() for k in INPUT_KEYS if k in batch}


def _shape_mismatch(statics: tuple, batches: tuple) -> Optional[str]:
    """How the batches differ from the captured ones, or None."""
    for static, batch, stream in zip(statics, batches, ("source", "target")):
        if (static is None) != (batch is None):
            return f"the step was captured {'without' if static is None else 'with'} a {stream} batch"
        for key, tensor in (static or {}).items():
            if batch[key].shape != tensor.shape:
                return (f"the {stream} {key} has shape {tuple(batch[key].shape)}, the captured one "
                        f"{tuple(tensor.shape)}")
    return None


def _tensors(outputs):
    if isinstance(outputs, torch.Tensor):
        yield outputs
    elif isinstance(outputs, (tuple, list)):
        for item in outputs:
            yield from _tensors(item)
