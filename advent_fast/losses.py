"""Public fused losses: entropy, self-information, entropy ranking and class prior.

Every public function is a thin front of ONE pair of torch.library custom ops,
``advent_fast::target_forward`` / ``advent_fast::target_backward``, which read the logits once
(forward) and once more for the gradient (backward). The ops run on the backend chosen by
:mod:`advent_fast.backend`; their exact semantics are in ``docs/backend_contract.md``. Eager calls
skip the dispatcher (:mod:`advent_fast.eager_ops`); compiled graphs trace the custom ops.
Inputs are validated here, on the host, so a bad call fails with the argument's name.

Empty inputs (N = 0 or no pixels) launch nothing: maps are empty and scalar losses are NaN,
the mean over no pixels, as ``torch.mean`` gives.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference
from .backend import device_guard, get_backend
from .eager_ops import FusedOp
from .reference import TargetLosses, ranked_pixel_count

__all__ = [
    "TargetLosses",
    "class_prior_loss",
    "entropy_loss",
    "entropy_map",
    "self_information",
    "target_losses",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PriorLike = Union[Tensor, Sequence[float]]


# ----------------------------------------------------------------------------------------------
# Backend dispatch
# ----------------------------------------------------------------------------------------------
def _backend_ops(device: torch.device):
    name = get_backend(device)
    if name == "triton":
        from . import kernels

        return kernels.target_forward, kernels.target_backward
    if name == "cpp":
        from . import _C  # noqa: F401  (loading registers torch.ops.advent_fast_C)

        return torch.ops.advent_fast_C.target_forward, torch.ops.advent_fast_C.target_backward
    raise RuntimeError("the reference backend does not run the fused ops")  # unreachable by design


ForwardOut = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
# What a backend's forward returns: ForwardOut, or None in place of an output that was not asked for.
BackendForwardOut = Tuple[Optional[Tensor], ...]


def _forward_impl(x, prior, k, mu, want_info, want_emap, want_ent, want_cp) -> BackendForwardOut:
    forward, _ = _backend_ops(x.device)
    with device_guard(x.device):
        return tuple(forward(x, prior, k, mu, want_info, want_emap, want_ent, want_cp))


def with_placeholders(x: Tensor, outputs: BackendForwardOut) -> ForwardOut:
    """A target forward's outputs as its custom op returns them: each None (an output not asked for) a
    fresh empty tensor (x.dtype for info, uint8 for keep, float32 for the others), as the op's schema
    needs tensors that do not alias each other. Eager calls skip these allocations."""
    dtypes = (x.dtype, *(torch.float32,) * 6, torch.uint8)
    return tuple(x.new_empty(0, dtype=dtype) if t is None else t for t, dtype in zip(outputs, dtypes))


def _backward_impl(x, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean, prior, mu) -> Tensor:
    _, backward = _backend_ops(x.device)
    with device_guard(x.device):
        return backward(x, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean, prior, mu)


@torch.library.custom_op("advent_fast::target_forward", mutates_args=())
def _target_forward(x: Tensor, prior: Optional[Tensor], k: int, mu: float, want_info: bool,
                    want_emap: bool, want_ent: bool, want_cp: bool) -> ForwardOut:
    return with_placeholders(x, _forward_impl(x, prior, k, mu, want_info, want_emap, want_ent, want_cp))


@_target_forward.register_fake
def _(x, prior, k, mu, want_info, want_emap, want_ent, want_cp):
    return fake_target_outputs(x, lambda: torch.empty_like(x), x.shape[2:], k, want_info, want_emap,
                               want_ent, want_cp)


def fake_target_outputs(x, make_info, pixel_shape, k, want_info, want_emap, want_ent, want_cp) -> ForwardOut:
    """Shapes of a target forward op's outputs (docs/backend_contract.md): ``make_info()`` builds
    the self-information map, ``pixel_shape`` is the entropy map's (and the keep mask's) shape after N."""
    n, c = x.shape[:2]
    f32 = dict(dtype=torch.float32, device=x.device)
    ranked = want_ent and k > 0
    return with_placeholders(x, (
        make_info() if want_info else None,
        x.new_empty((n, *pixel_shape), **f32) if want_emap else None,
        x.new_empty((), **f32) if want_ent else None,
        x.new_empty((), **f32) if want_cp else None,
        x.new_empty((n,), **f32) if ranked else None,
        x.new_empty((n,), **f32) if ranked else None,
        x.new_empty((n, c), **f32) if want_cp else None,
        x.new_empty((n, *pixel_shape), dtype=torch.uint8) if ranked else None,
    ))


@torch.library.custom_op("advent_fast::target_backward", mutates_args=())
def _target_backward(x: Tensor, grad_info: Optional[Tensor], grad_emap: Optional[Tensor],
                     grad_ent: Optional[Tensor], grad_cp: Optional[Tensor], keep: Optional[Tensor],
                     kept: Optional[Tensor], cmean: Optional[Tensor], prior: Optional[Tensor],
                     mu: float) -> Tensor:
    return _backward_impl(x, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean, prior, mu)


@_target_backward.register_fake
def _(x, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean, prior, mu):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, prior, k, mu, want_info, want_emap, want_ent, want_cp = inputs
    _, _, _, _, _, kept, cmean, keep = output
    ranked = want_ent and k > 0
    ctx.flags = (want_info, want_emap, want_ent, want_cp, ranked)
    ctx.mu = mu
    ctx.backward_op = _target_backward
    ctx.save_for_backward(x, prior if want_cp else None, keep if ranked else None, kept if ranked else None,
                          cmean if want_cp else None)


def _grad_or_none(grad: Optional[Tensor], wanted: bool, keep_strides: bool = False) -> Optional[Tensor]:
    """The gradient of one forward output as the backward kernels take it.

    Autograd hands zeros (or None) for outputs the loss did not use; an unrequested output is an
    empty placeholder whose gradient carries nothing. The self-information gradient keeps its
    strides (the kernels read any); the float32 outputs' gradients are made contiguous.
    """
    if not wanted or grad is None:
        return None
    return grad if keep_strides else grad.float().contiguous()


def _backward(ctx, g_info, g_emap, g_ent, g_cp, _g_thresh, _g_kept, _g_cmean, _g_keep):
    want_info, want_emap, want_ent, want_cp, ranked = ctx.flags
    x, prior, keep, kept, cmean = ctx.saved_tensors
    grad_x = ctx.backward_op(
        x, _grad_or_none(g_info, want_info, keep_strides=True), _grad_or_none(g_emap, want_emap),
        _grad_or_none(g_ent, want_ent), _grad_or_none(g_cp, want_cp),
        keep, kept, cmean, prior, ctx.mu,
    )
    return grad_x, None, None, None, None, None, None, None


_target_forward.register_autograd(_backward, setup_context=_setup_context)
_target_op = FusedOp(_target_forward, _forward_impl, _setup_context, _backward, _backward_impl)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _check_logits(logits: Tensor, spatial_dims: Optional[int] = None) -> None:
    """Type, rank (at least 3, or exactly 2 + ``spatial_dims``), dtype and class count."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if spatial_dims is not None and logits.dim() != 2 + spatial_dims:
        raise ValueError(f"logits must have shape (N, C, h, w), got shape {tuple(logits.shape)}")
    if logits.dim() < 3:
        raise ValueError("logits must have shape (N, C, *spatial) with at least 3 dims, "
                         f"got shape {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError("logits must be float32, float16 or bfloat16 (float64: use "
                        f"advent_fast.reference), got {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have C >= 2 classes on dim 1, got shape {tuple(logits.shape)}")


def _check_top_k(top_k: Optional[float]) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Real):
        raise TypeError(f"top_k must be a float in (0, 1] or None, got {type(top_k).__name__}")
    if not 0.0 < top_k <= 1.0:  # also rejects NaN
        raise ValueError(f"top_k must be in (0, 1], got {top_k}")


def _check_prior(prior: PriorLike, logits: Tensor, mu: float) -> Tensor:
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu):
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    if not isinstance(prior, Tensor):
        prior = torch.as_tensor(prior, dtype=torch.float32, device=logits.device)
    num_classes = logits.shape[1]
    if prior.dim() != 1 or prior.shape[0] != num_classes:
        raise ValueError(f"prior must have shape ({num_classes},) to match the logits' classes, "
                         f"got {tuple(prior.shape)}")
    if not prior.is_floating_point():
        raise TypeError(f"prior must be a floating tensor, got {prior.dtype}")
    if prior.device != logits.device:
        raise ValueError(f"prior is on {prior.device} but logits are on {logits.device}")
    # Value checks read the data: done for host tensors only, so device priors cost no sync.
    if prior.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()):
            raise ValueError(f"prior must be finite and non-negative, got {prior.tolist()}")
    return prior.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def target_losses(
    logits: Tensor,
    *,
    self_information: bool = True,
    entropy: bool = False,
    top_k: Optional[float] = None,
    prior: Optional[PriorLike] = None,
    mu: float = 0.5,
    entropy_map: bool = False,
) -> TargetLosses:
    """Everything the trainer's target branch needs from ONE read of the logits.

    Args:
        logits: (N, C, *spatial) float32/float16/bfloat16, any strides.
        self_information: return the weighted self-information map (discriminator input).
        entropy: return the MinEnt loss; with ``top_k`` the entropy-ranked (MinEnt+ER) loss.
        top_k: fraction in (0, 1] of each image's highest-entropy pixels kept.
        prior: source class prior (C,): adds the class-prior loss with weight ``mu``.
        entropy_map: return the (N, *spatial) float32 normalised entropy map.
    Returns:
        :class:`TargetLosses`; fields not asked for are None.
    """
    _check_logits(logits)
    _check_top_k(top_k)
    if prior is not None:
        prior = _check_prior(prior, logits, mu)
    kwargs = dict(self_information=self_information, entropy=entropy, top_k=top_k,
                  prior=prior, mu=mu, entropy_map=entropy_map)
    if get_backend(logits.device) == "reference":
        # The naive code in float32 for 16-bit logits, as the kernels compute inside: in float16 its 1e-30
        # epsilon underflows, and p = 0 (a -inf logit, or a confident pixel) would give 0 * -inf = NaN.
        half = logits.dtype in (torch.float16, torch.bfloat16)
        result = reference.target_losses(logits.float() if half else logits, **kwargs)
        if half and result.self_information is not None:
            result = result._replace(self_information=result.self_information.to(logits.dtype))
        return result
    if not (self_information or entropy or entropy_map or prior is not None):
        return TargetLosses(None, None, None, None)

    n, c = logits.shape[:2]
    spatial = logits.shape[2:]
    num_pixels = math.prod(spatial)
    if n * num_pixels == 0:
        return _empty_result(logits, **kwargs)

    x = logits.reshape(n, c, num_pixels)  # a view for contiguous and channels_last inputs
    k = ranked_pixel_count(top_k, num_pixels) if (entropy and top_k is not None) else 0
    info, emap, ent, cp, _, _, _, _ = _target_op(
        x, prior, k, float(mu), self_information, entropy_map, entropy, prior is not None)
    return TargetLosses(
        info.view(logits.shape) if self_information else None,
        ent if entropy else None,
        cp if prior is not None else None,
        emap.view((n,) + tuple(spatial)) if entropy_map else None,
    )


def _empty_result(logits, *, self_information, entropy, top_k, prior, mu, entropy_map):
    # Zero-element arithmetic keeps the results attached to the graph; nothing is computed.
    nan_loss = logits.float().sum() * float("nan")
    return TargetLosses(
        logits * 0 if self_information else None,
        nan_loss if entropy else None,
        nan_loss.clone() if prior is not None else None,
        logits.float().sum(dim=1) * 0 if entropy_map else None,
    )


def entropy_map(logits: Tensor) -> Tensor:
    """Normalised entropy -sum_c p_c log p_c / log C per pixel: (N, *spatial) float32 in [0, 1]."""
    return target_losses(logits, self_information=False, entropy_map=True).entropy_map


def entropy_loss(logits: Tensor, top_k: Optional[float] = None) -> Tensor:
    """The release's MinEnt loss (mean normalised entropy), float32 scalar.

    ``top_k`` in (0, 1]: entropy ranking (MinEnt+ER): per image, the mean entropy of the pixels
    at or above the k-th largest, k = ceil(top_k * pixels) (ties kept), then the mean over images.
    """
    return target_losses(logits, self_information=False, entropy=True, top_k=top_k).entropy_loss


def self_information(logits: Tensor) -> Tensor:
    """The release's ``prob_2_entropy(softmax(x))``: -p_c log p_c / log C, in the logits' dtype."""
    return target_losses(logits, self_information=True).self_information


def class_prior_loss(logits: Tensor, prior: PriorLike, mu: float = 0.5) -> Tensor:
    """Class-ratio prior (paper Eq. 10): sum_c max(0, mu * prior_c - mean p_c), mean over images."""
    if prior is None:
        raise ValueError("prior must be given (the source class histogram, shape (C,))")
    return target_losses(logits, self_information=False, prior=prior, mu=mu).class_prior_loss
