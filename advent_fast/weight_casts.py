"""A step's 16-bit weights made by one autograd node (``train.fused_weight_casts``).

Under autocast each float32 weight is cast when a forward first uses it (the trainer keeps autocast's
cache open over the step, so once a step), and each backward casts the weight's 16-bit gradient back to
float32: a kernel a tensor, and from the step's second backward on another one, autograd's add to the
gradient so far. :func:`weights_cast_for_step` casts every trainable convolution weight and bias of a
module at once, one autograd node for all of them, and puts the casts in the module's place of the
parameters until it exits (forwards, backwards and activation checkpointing's recomputations all see
them; autocast leaves 16-bit tensors as they are). The node's backward casts each gradient and adds the
gradient so far in one pass, then leaves the sum for autograd's accumulation to take as it is (the
parameter's ``.grad`` is set to None first: nothing left to add). On the triton backend both directions
run in multi-tensor kernels (``kernels/weight_cast.py``, 8 tensors a launch); elsewhere in torch ops.
Same values as autocast's casts and autograd's accumulation, bit for bit.

Convolutions of another class (a folded frozen BatchNorm's: :class:`advent_fast.models.FoldedConv2d`,
which makes its own scaled weight once a step) keep their parameters.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence, Tuple

import torch
from torch import nn

from .backend import device_guard, get_backend


def _cast_add(xs: Sequence[torch.Tensor], accs: Sequence, outs: Sequence[torch.Tensor]) -> None:
    """``outs[i] = xs[i] + accs[i]`` (or ``xs[i]``) in float32, stored in ``outs[i]``'s dtype."""
    if not outs:
        return
    if get_backend(outs[0].device) == "triton":
        from .kernels.weight_cast import cast_add

        with device_guard(outs[0].device):
            cast_add(xs, accs, outs)
        return
    for x, acc, out in zip(xs, accs, outs):
        if acc is None:
            out.copy_(x)
        else:
            torch.add(acc, x, out=out)


def _in_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s strides (the kernel walks a tensor and its partners in memory order)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


class _CastWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: torch.Tensor):
        # Held as attributes, not saved tensors: the node runs in each of the step's backwards, and
        # autograd frees saved tensors after the first.
        ctx.weights = weights
        outs = [torch.empty_like(w, dtype=dtype) for w in weights]
        _cast_add(weights, [None] * len(weights), outs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        present = [i for i, g in enumerate(grads) if g is not None]
        weights = [ctx.weights[i] for i in present]
        accs = [None if w.grad is None else _in_layout(w.grad, w) for w in weights]
        outs = [torch.empty_like(w) for w in weights]
        _cast_add([_in_layout(grads[i], w) for i, w in zip(present, weights)], accs, outs)
        for w in weights:  # autograd's accumulation then takes each sum as the gradient: no add
            w.grad = None
        result: List = [None] * len(grads)
        for i, out in zip(present, outs):
            result[i] = out
        return (None, *result)


def castable_parameters(module: nn.Module) -> List[Tuple[nn.Module, str, nn.Parameter]]:
    """(owner, name, parameter) of every trainable weight and bias of ``module``'s plain convolutions."""
    return [(owner, name, p) for owner in module.modules() if type(owner) is nn.Conv2d
            for name, p in owner._parameters.items() if p is not None and p.requires_grad]


@contextlib.contextmanager
def weights_cast_for_step(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """``module``'s trainable convolution weights and biases cast to ``dtype`` by one autograd node, in
    the module's place of the parameters until exit (module docstring)."""
    entries = castable_parameters(module)
    if not entries:
        yield
        return
    casts = _CastWeights.apply(dtype, *[p for _, _, p in entries])
    try:
        for (owner, name, _), cast in zip(entries, casts):
            owner._parameters[name] = cast  # not setattr: a module refuses a non-Parameter there
        yield
    finally:
        for owner, name, p in entries:
            owner._parameters[name] = p
