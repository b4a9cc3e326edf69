"""Losses on bilinearly upsampled logits, without the full-resolution logits or their gradient.

The release upsamples the model's 1/8-resolution logits to the image size with
``F.interpolate(x, size, mode="bilinear", align_corners=True)`` and computes the losses there. These
functions take the low-resolution logits and give the same values and gradients:

- :func:`upsampled_cross_entropy` (source): ``F.cross_entropy(F.interpolate(x.float(), ...), labels,
  ignore_index=...)``, mean over the non-ignored pixels.
- :func:`upsampled_target_losses` (target): :func:`advent_fast.target_losses` of the upsampled logits.

On the Triton backend (``advent_fast.get_backend(device) == "triton"``) the kernels of
``kernels/upsampled_*.py`` interpolate inside the loss kernels and gather the gradient onto the
low-resolution logits (no atomics; ``kernels/bilinear.py``). They run as the custom ops
``advent_fast::upsampled_cross_entropy_{forward,backward}`` and
``advent_fast::upsampled_target_{forward,backward}`` (eager calls skip the dispatcher:
:mod:`advent_fast.eager_ops`). On every other backend, for empty batches, and
for axes too long for the kernels' exact index math (low-res x full-res size >= 2**22 on one axis),
the functions interpolate and call the ordinary losses instead: the same results, with the
full-resolution memory.

Non-finite logits behave as with ``F.interpolate`` first: the kernels use ATen's float32 index and
weight formulas and multiply all four taps, so a -inf logit whose tap weight is exactly 0 gives NaN
(0 * -inf) exactly where ``F.interpolate`` does on the CPU (on CUDA, ATen may fuse that weight's
computation into an fma and give -inf there instead), and a NaN reaches every pixel it touches.
One difference for float16 / bfloat16 logits: the kernels interpolate in float32, whereas
``F.interpolate`` on such logits rounds the upsampled values to their dtype first (the kernels are
the more exact; :func:`upsampled_cross_entropy`'s definition interpolates in float32 anyway).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import device_guard, get_backend
from .eager_ops import FusedOp
from .losses import (BackendForwardOut, ForwardOut, PriorLike, _check_logits, _check_prior, _check_top_k, _grad_or_none,
                     fake_target_outputs, target_losses, with_placeholders)
from .reference import TargetLosses, ranked_pixel_count

__all__ = ["upsampled_cross_entropy", "upsampled_target_losses"]

LABEL_DTYPES = (torch.int64, torch.int32, torch.uint8)
# cell_start (kernels/bilinear.py) is exact while low-res size x full-res size < 2**23 on an axis; a
# factor 2 of margin
MAX_AXIS_PRODUCT = 2**22
SizeLike = Union[int, Sequence[int], torch.Size]


def _interpolate(logits: Tensor, size: Tuple[int, int]) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def _use_kernels(logits: Tensor, size: Tuple[int, int]) -> bool:
    """Whether the fused kernels run: on the Triton backend, for sizes their index math covers
    (MAX_AXIS_PRODUCT on each axis, the per-pixel kernels' limits on the full-resolution maps) and
    their grid (cell blocks, h, N) fits CUDA's (65535 on the second and third axes: MAX_IMAGES).
    Otherwise the ops interpolate, then call the per-pixel losses (whose launchers refuse, with a
    ValueError, what they cannot address)."""
    (n, c, h, w), (H, W) = logits.shape, size
    if get_backend(logits.device) != "triton" or n == 0:
        return False
    if h * H >= MAX_AXIS_PRODUCT or w * W >= MAX_AXIS_PRODUCT:
        return False
    from .kernels.softmax_entropy import MAX_IMAGE_SPAN, MAX_IMAGES

    return n <= MAX_IMAGES and h <= MAX_IMAGES and c * H * W <= MAX_IMAGE_SPAN


def _kernels():
    """The Triton launchers; only the Triton backend runs these ops (the public functions fall back)."""
    from .kernels import upsampled_cross_entropy, upsampled_target

    return upsampled_cross_entropy, upsampled_target


def _check_triton(x: Tensor) -> None:
    if get_backend(x.device) != "triton":
        raise RuntimeError(
            "the advent_fast::upsampled_* ops run the Triton kernels only (CUDA tensors, or CPU tensors with "
            "the triton backend under TRITON_INTERPRET=1); the public functions fall back by themselves")


# ----------------------------------------------------------------------------------------------
# Custom ops: source cross-entropy
# ----------------------------------------------------------------------------------------------
def _ce_forward_impl(x, labels, ignore_index, want_grad):
    _check_triton(x)
    ce, _ = _kernels()
    with device_guard(x.device):
        return ce.upsampled_cross_entropy_forward(x, labels, ignore_index, want_grad)


def _ce_backward_impl(x, parts, count, grad_loss):
    _check_triton(x)
    ce, _ = _kernels()
    with device_guard(x.device):
        return ce.upsampled_cross_entropy_backward(x, parts, count, grad_loss)


@torch.library.custom_op("advent_fast::upsampled_cross_entropy_forward", mutates_args=())
def _ce_forward(x: Tensor, labels: Tensor, ignore_index: int, want_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (loss, count of non-ignored pixels, (4, N, h, w, C) float32 tap partials of the unscaled
    gradient, or an empty tensor unless want_grad)."""
    return _ce_forward_impl(x, labels, ignore_index, want_grad)


@_ce_forward.register_fake
def _(x, labels, ignore_index, want_grad):
    n, c, h, w = x.shape
    f32 = dict(dtype=torch.float32)
    parts = x.new_empty((4, n, h, w, c), **f32) if want_grad else x.new_empty(0, **f32)
    return x.new_empty((), **f32), x.new_empty((), **f32), parts


@torch.library.custom_op("advent_fast::upsampled_cross_entropy_backward", mutates_args=())
def _ce_backward(x: Tensor, parts: Tensor, count: Tensor, grad_loss: Tensor) -> Tensor:
    """grad_x = gather(parts) * grad_loss / count (0 when count == 0), in x's dtype and layout."""
    return _ce_backward_impl(x, parts, count, grad_loss)


@_ce_backward.register_fake
def _(x, parts, count, grad_loss):
    return torch.empty_like(x)


def _ce_setup_context(ctx, inputs, output):
    x, _, _, want_grad = inputs
    _, count, parts = output
    ctx.want_grad = want_grad
    ctx.backward_op = _ce_backward
    ctx.save_for_backward(x, parts, count)


def _ce_autograd(ctx, grad_loss, _grad_count, _grad_parts):
    if not ctx.want_grad:
        raise RuntimeError("advent_fast::upsampled_cross_entropy_forward was called with want_grad=False: "
                           "it saved no gradient to backpropagate")
    x, parts, count = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None
    return ctx.backward_op(x, parts, count, grad_loss.float()), None, None, None


_ce_forward.register_autograd(_ce_autograd, setup_context=_ce_setup_context)
_ce_op = FusedOp(_ce_forward, _ce_forward_impl, _ce_setup_context, _ce_autograd, _ce_backward_impl)


# ----------------------------------------------------------------------------------------------
# Custom ops: target losses (docs/backend_contract.md on the upsampled logits)
# ----------------------------------------------------------------------------------------------
def _target_forward_impl(x, out_h, out_w, prior, k, mu, want_info, want_emap, want_ent,
                         want_cp) -> BackendForwardOut:
    _check_triton(x)
    _, target = _kernels()
    with device_guard(x.device):
        return tuple(target.upsampled_target_forward(x, out_h, out_w, prior, k, mu, want_info, want_emap,
                                                     want_ent, want_cp))


def _target_backward_impl(x, out_h, out_w, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean, prior,
                          mu) -> Tensor:
    _check_triton(x)
    _, target = _kernels()
    with device_guard(x.device):
        return target.upsampled_target_backward(x, out_h, out_w, grad_info, grad_emap, grad_ent, grad_cp, keep,
                                                kept, cmean, prior, mu)


@torch.library.custom_op("advent_fast::upsampled_target_forward", mutates_args=())
def _target_forward(x: Tensor, out_h: int, out_w: int, prior: Optional[Tensor], k: int, mu: float,
                    want_info: bool, want_emap: bool, want_ent: bool, want_cp: bool) -> ForwardOut:
    """-> (info, emap, ent, cp, thresh, kept, cmean, keep) of the contract, info (N, C, out_h, out_w),
    emap and keep (N, out_h, out_w)."""
    return with_placeholders(x, _target_forward_impl(x, out_h, out_w, prior, k, mu, want_info, want_emap,
                                                     want_ent, want_cp))


@_target_forward.register_fake
def _(x, out_h, out_w, prior, k, mu, want_info, want_emap, want_ent, want_cp):
    return fake_target_outputs(x, lambda: _kernels()[1].full_resolution_like(x, out_h, out_w),
                               (out_h, out_w), k, want_info, want_emap, want_ent, want_cp)


@torch.library.custom_op("advent_fast::upsampled_target_backward", mutates_args=())
def _target_backward(x: Tensor, out_h: int, out_w: int, grad_info: Optional[Tensor],
                     grad_emap: Optional[Tensor], grad_ent: Optional[Tensor], grad_cp: Optional[Tensor],
                     keep: Optional[Tensor], kept: Optional[Tensor], cmean: Optional[Tensor],
                     prior: Optional[Tensor], mu: float) -> Tensor:
    return _target_backward_impl(x, out_h, out_w, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean,
                                 prior, mu)


@_target_backward.register_fake
def _(x, out_h, out_w, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean, prior, mu):
    return torch.empty_like(x)


def _target_setup_context(ctx, inputs, output):
    x, out_h, out_w, prior, k, mu, want_info, want_emap, want_ent, want_cp = inputs
    _, _, _, _, _, kept, cmean, keep = output
    ranked = want_ent and k > 0
    ctx.flags = (want_info, want_emap, want_ent, want_cp)
    ctx.args = (out_h, out_w, mu)
    ctx.backward_op = _target_backward
    ctx.save_for_backward(x, prior if want_cp else None, keep if ranked else None, kept if ranked else None,
                          cmean if want_cp else None)


def _target_autograd(ctx, g_info, g_emap, g_ent, g_cp, _g_thresh, _g_kept, _g_cmean, _g_keep):
    want_info, want_emap, want_ent, want_cp = ctx.flags
    out_h, out_w, mu = ctx.args
    x, prior, keep, kept, cmean = ctx.saved_tensors
    grad_x = ctx.backward_op(
        x, out_h, out_w, _grad_or_none(g_info, want_info, keep_strides=True), _grad_or_none(g_emap, want_emap),
        _grad_or_none(g_ent, want_ent), _grad_or_none(g_cp, want_cp), keep, kept, cmean, prior, mu,
    )
    return (grad_x,) + (None,) * 9


_target_forward.register_autograd(_target_autograd, setup_context=_target_setup_context)
_target_op = FusedOp(_target_forward, _target_forward_impl, _target_setup_context, _target_autograd,
                     _target_backward_impl)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _check_low_res_logits(logits: Tensor) -> None:
    _check_logits(logits, spatial_dims=2)
    if logits.shape[2] < 1 or logits.shape[3] < 1:
        raise ValueError(f"logits must have a non-empty (h, w), got shape {tuple(logits.shape)}")


def _check_size(size: SizeLike) -> Tuple[int, int]:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    try:
        out_h, out_w = size
    except (TypeError, ValueError):
        raise TypeError(f"size must be an int or a pair (H, W) of ints, got {size!r}") from None
    for value in (out_h, out_w):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"size must be an int or a pair (H, W) of ints, got {size!r}")
        if value < 1:
            raise ValueError(f"size must be positive, got {tuple(size)}")
    return int(out_h), int(out_w)


def _check_labels(labels: Tensor, logits: Tensor, ignore_index: int) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64, int32 or uint8, got {labels.dtype}")
    if labels.dim() != 3:
        raise ValueError(f"labels must have shape (N, H, W), got shape {tuple(labels.shape)}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} images but logits have {logits.shape[0]}")
    if labels.shape[1] < 1 or labels.shape[2] < 1:
        raise ValueError(f"labels must have a non-empty (H, W), got shape {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # The value check reads the labels: host tensors only, so device labels cost no sync (there, an
    # out-of-range label makes the Triton loss NaN; the fallback path raises torch's device assert).
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        num_classes = logits.shape[1]
        wide = labels.long()  # uint8 labels would compare with ignore_index modulo 256
        bad = (wide != ignore_index) & ((wide < 0) | (wide >= num_classes))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {num_classes}) or ignore_index={ignore_index}, got "
                             f"{sorted(set(labels[bad].tolist()))[:8]}")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def upsampled_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Cross-entropy of the logits upsampled to the labels' size, float32 scalar.

    Equals ``F.cross_entropy(F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
    align_corners=True), labels, ignore_index=ignore_index)``: the mean over non-ignored pixels, NaN when
    every pixel is ignored (with a zero gradient, as torch).

    Args:
        logits: (N, C, h, w) float32/float16/bfloat16, any strides.
        labels: (N, H, W) int64, int32 or uint8 class indices in [0, C), or ``ignore_index``. CPU labels
            are checked on the host (ValueError); on CUDA an out-of-range label makes the loss NaN
            (checking there would need a host synchronisation).
        ignore_index: label of the pixels that do not count.
    """
    _check_low_res_logits(logits)
    _check_labels(labels, logits, ignore_index)
    size = (labels.shape[1], labels.shape[2])
    if not _use_kernels(logits, size):
        return F.cross_entropy(_interpolate(logits.float(), size), labels.long(), ignore_index=int(ignore_index))
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _, _ = _ce_op(logits, labels, int(ignore_index), want_grad)
    return loss


def upsampled_target_losses(
    logits: Tensor,
    size: SizeLike,
    *,
    self_information: bool = True,
    entropy: bool = False,
    top_k: Optional[float] = None,
    prior: Optional[PriorLike] = None,
    mu: float = 0.5,
    entropy_map: bool = False,
) -> TargetLosses:
    """:func:`advent_fast.target_losses` of ``F.interpolate(logits, size, mode="bilinear",
    align_corners=True)``, from the low-resolution logits.

    Args:
        logits: (N, C, h, w) float32/float16/bfloat16, any strides.
        size: (H, W) (or one int for both) of the upsampled logits.
        self_information, entropy, top_k, prior, mu, entropy_map: as in :func:`advent_fast.target_losses`,
            on the upsampled logits (ranking over each image's H * W pixels).
    Returns:
        :class:`TargetLosses`: self_information (N, C, H, W) in the logits' dtype (channels_last when the
        logits are), entropy_map (N, H, W) float32, scalar losses float32; fields not asked for are None.
    """
    _check_low_res_logits(logits)
    out_h, out_w = _check_size(size)
    _check_top_k(top_k)
    if prior is not None:
        prior = _check_prior(prior, logits, mu)
    if not _use_kernels(logits, (out_h, out_w)):
        return target_losses(_interpolate(logits, (out_h, out_w)), self_information=self_information,
                             entropy=entropy, top_k=top_k, prior=prior, mu=mu, entropy_map=entropy_map)
    if not (self_information or entropy or entropy_map or prior is not None):
        return TargetLosses(None, None, None, None)
    k = ranked_pixel_count(top_k, out_h * out_w) if (entropy and top_k is not None) else 0
    info, emap, ent, cp, _, _, _, _ = _target_op(
        logits, out_h, out_w, prior, k, float(mu), self_information, entropy_map, entropy, prior is not None)
    return TargetLosses(
        info if self_information else None,
        ent if entropy else None,
        cp if prior is not None else None,
        emap if entropy_map else None,
    )
