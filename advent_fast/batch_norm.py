"""Train-mode BatchNorm (+ residual, + ReLU) in fused kernels: the release ResNet-101's normalisation.

:func:`train_batch_norm` equals ``F.batch_norm(x, running_mean, running_var, weight, bias, training=True,
momentum=momentum, eps=eps)``, plus a residual if given, followed by ``F.relu`` if ``relu``: the batch
statistics normalise, the running ones are updated in place (momentum, unbiased variance), and the gradient
reaches ``x`` and the residual only (the affine parameters are frozen, as in the release). On the Triton
backend, for (N, C, H, W) channels_last activations, it runs the kernels of ``kernels/batch_norm.py`` (8
activation-sized reads and writes, forward and backward, against the 13 of ATen's BatchNorm, which has no
cuDNN kernel for bfloat16, and a separate ReLU; 12 against 16 with the residual add); everywhere else, and
under torch.compile, ATen's.
:class:`advent_fast.models.FusedBatchNorm2d` (``train.fused_batchnorm``) puts it into a model.

:func:`shift_relu` is what remains of a frozen BatchNorm folded into the convolution before it
(:func:`advent_fast.models.fold_frozen_batchnorm`): ``x + shift``, plus a residual, then ReLU, in one pass
(2 or 3 activation-sized reads and writes against ATen's 4 or 7); :class:`advent_fast.models.FusedFoldedBatchNorm2d`
puts it into a folded model.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.autograd.function import once_differentiable

from .backend import device_guard, get_backend

__all__ = ["shift_relu", "train_batch_norm"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The kernels index the (M, C) activations with 32-bit offsets.
MAX_ELEMENTS = 2**31 - 1


def _kernels():
    from .kernels import batch_norm

    return batch_norm


class _TrainBatchNorm(torch.autograd.Function):
    """The kernels' forward (running statistics updated in place) and backward (the gradients of x and of
    the residual; none for the frozen affine parameters).

    Not a torch.library custom op: one that mutates its inputs (the running statistics) cannot have an
    autograd formula, and under torch.compile ATen's BatchNorm is the better input anyway (Inductor
    fuses it with its neighbours), so compiled code takes that path."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu, residual):
        with device_guard(x.device):
            y, mean, invstd, scale = _kernels().batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                                   momentum, eps, relu, residual)
        ctx.relu = relu
        mask_from_output = relu and residual is not None  # the ReLU mask: y itself, not x alone
        ctx.save_for_backward(x, bias, mean, invstd, scale, y if mask_from_output else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, bias, mean, invstd, scale, y = ctx.saved_tensors
        with device_guard(x.device):
            grad_x, grad_residual = _kernels().batch_norm_backward(
                grad_y.contiguous(memory_format=torch.channels_last), x, bias, mean, invstd, scale, ctx.relu, y,
                want_residual_grad=ctx.needs_input_grad[8])
        return grad_x, None, None, None, None, None, None, None, grad_residual


def _check_inputs(x, per_channel: dict, residual) -> None:
    """x: (N, C, H, W) float; each of ``per_channel`` (name -> tensor): a float (C,) tensor on x's device;
    residual: None or x's shape, dtype and device. Errors name the argument."""
    for name, t in (("x", x), *per_channel.items()):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    for name, t in per_channel.items():
        if t.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) for x with {channels} channels, "
                             f"got {tuple(t.shape)}")
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got shape "
                         f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}")


def _check(x, weight, bias, running_mean, running_var, momentum, eps, residual) -> None:
    _check_inputs(x, {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var},
                  residual)
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if x.numel() // max(x.shape[1], 1) < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got x of shape {tuple(x.shape)}")


def _use_kernels(x: Tensor, residual: Optional[Tensor], frozen: tuple) -> bool:
    """Whether the fused kernels run: Triton backend, channels_last activations (and residual) the 32-bit
    offsets cover, ``frozen`` per-channel tensors that need no gradient (the kernels give none), not traced
    by torch.compile."""
    channels_last = torch.channels_last
    return (get_backend(x.device) == "triton" and not torch.compiler.is_compiling()
            and x.is_contiguous(memory_format=channels_last) and x.numel() <= MAX_ELEMENTS
            and (residual is None or residual.is_contiguous(memory_format=channels_last))
            and not any(t.requires_grad for t in frozen))


def add_relu(y: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """``y + residual`` (if given), then ReLU in place (if ``relu``): what follows BatchNorm on ATen's path."""
    y = y if residual is None else y + residual
    return F.relu(y, inplace=True) if relu else y


def train_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                     momentum: float = 0.1, eps: float = 1e-5, relu: bool = False,
                     residual: Optional[Tensor] = None) -> Tensor:
    """Train-mode BatchNorm of ``x`` (N, C, H, W), plus ``residual`` if given, then ReLU if ``relu``; updates
    the running statistics.

    Equals ``F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)`` (``+ residual``,
    then ``F.relu``) up to float rounding (the sum rounded once, not twice). Fused on the Triton backend for
    channels_last ``x`` (and residual) with weight and bias that need no gradient, outside torch.compile
    (module docstring); ATen's otherwise. First derivatives only on the fused path.

    Args:
        x: (N, C, H, W) float32/float16/bfloat16 activations, N * H * W >= 2.
        weight, bias: (C,) affine parameters (any float dtype).
        running_mean, running_var: (C,) running statistics, updated in place.
        momentum: weight of this batch's statistics in the running ones (ATen's convention).
        eps: added to the variance.
        relu: apply ReLU to the output (one pass with the normalisation).
        residual: added before the ReLU (a ResNet block's shortcut): x's shape, dtype and device.
    Returns:
        The normalised activations in x's dtype and memory format.
    """
    _check(x, weight, bias, running_mean, running_var, momentum, eps, residual)
    if not _use_kernels(x, residual, (weight, bias)):
        return add_relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps), residual, relu)
    return _TrainBatchNorm.apply(x, weight, bias, running_mean, running_var, float(momentum), float(eps), bool(relu),
                                 residual)


class _ShiftReLU(torch.autograd.Function):
    """The shift kernel's forward; backward: ReLU's (ATen's threshold_backward on the output, as F.relu's),
    the one masked gradient going to x and to the residual; none for the shift (frozen)."""

    @staticmethod
    def forward(ctx, x, shift, relu, residual):
        with device_guard(x.device):
            y = _kernels().shift_forward(x, shift, relu, residual)
        ctx.relu = relu
        ctx.save_for_backward(y if relu else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad_y, y, 0) if ctx.relu else grad_y
        return grad, None, None, grad if ctx.needs_input_grad[3] else None


def shift_relu(x: Tensor, shift: Tensor, relu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """``x + shift`` (one value per channel), plus ``residual`` if given, then ReLU if ``relu``: what remains
    of a frozen BatchNorm folded into the convolution that computed ``x``, with what follows it.

    One kernel on the Triton backend for channels_last ``x`` (and residual) and a shift that needs no
    gradient, outside torch.compile, its sum rounded once; ATen's ops otherwise (the shift cast to x's dtype
    first, as a convolution's bias is, and each add rounded).

    Args:
        x: (N, C, H, W) float32/float16/bfloat16 activations.
        shift: (C,) per-channel shift, any float dtype (float32 inside the kernel).
        relu: apply ReLU to the output.
        residual: added before the ReLU: x's shape, dtype and device.
    Returns:
        The shifted activations in x's dtype and memory format.
    """
    _check_inputs(x, {"shift": shift}, residual)
    if not _use_kernels(x, residual, (shift,)):
        return add_relu(x + shift.to(x.dtype).reshape(1, -1, 1, 1), residual, relu)
    return _ShiftReLU.apply(x, shift, bool(relu), residual)
