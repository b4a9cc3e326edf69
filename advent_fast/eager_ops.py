"""Calling the fused losses' custom ops without the dispatcher in eager mode.

A ``torch.library.custom_op`` with a registered autograd formula costs about 100-200 us of Python
per forward and backward (dispatcher, autograd wrapper, redispatch), more than the kernels
themselves at one image. Eager calls therefore run the op's implementation and the same autograd
formula through one ``torch.autograd.Function``; under ``torch.compile`` (and for ``opcheck``) the
custom op is used, so graphs trace it. Both paths run the same implementation functions: the
compile tests compare them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class FusedOp:
    """A custom op with its implementation and autograd formula.

    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` are the functions given to
    ``register_autograd``; ``backward`` calls ``ctx.backward_op``, which ``setup_context`` sets to
    the backward custom op and the eager path replaces with its implementation ``backward_impl``.
    """

    custom_op: Callable
    impl: Callable
    setup_context: Callable
    backward: Callable
    backward_impl: Callable

    def __call__(self, *inputs):
        if torch.compiler.is_compiling():
            return self.custom_op(*inputs)
        return _EagerFunction.apply(self, *inputs)


class _EagerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: FusedOp, *inputs):
        output = op.impl(*inputs)
        op.setup_context(ctx, inputs, output)
        ctx.backward_op = op.backward_impl
        ctx.op = op
        ctx.set_materialize_grads(False)  # unused outputs (e.g. the map when only a loss is taken) get None
        return output

    @staticmethod
    def backward(ctx, *grads):
        # Grad mode is on only in a backward with create_graph=True. The kernels' gradients have no
        # derivative themselves: refuse at once (once_differentiable would return a gradient without a
        # graph when the upstream gradient needs none, and a second derivative would silently be 0).
        if torch.is_grad_enabled():
            raise RuntimeError("advent_fast losses have first derivatives only: backward with create_graph=True "
                               "(for a second derivative) is not supported")
        return (None, *ctx.op.backward(ctx, *grads))
