"""Fused target backward: one kernel, reads the logits (+ grad_info, + the saved keep mask when
ranking) once and writes grad_x once. Upstream scalar gradients, counts and class means are device
tensors read inside the kernel: no host synchronisation.

Per pixel, with p, plogp recomputed from the logits (softmax_entropy.py):
  w    = grad_emap[n, s] + grad_ent / (N S)                      (MinEnt)
                         + grad_ent / (N K_n) * keep_ns          (ranked; the forward's keep mask)
  h_c  = grad_cp / (N S) * [mu prior_c - m_nc > 0]               (class prior hinge)
  q_c  = p_c dL/dp_c = -(grad_info_c + w) (plogp_c + p_c) / log C - p_c h_c
  grad_x_c = q_c - p_c sum_j q_j                                 (softmax backward)
q goes through the guarded plogp, never p * log p, so a -inf logit (p = 0) gets an exact 0 gradient.
"""
import math

import torch
import triton
import triton.language as tl

from . import class_loop
from .softmax_entropy import NUM_WARPS, block_sizes, ceil_div, check_indexable, softmax_entropy


@triton.jit
def target_grad_constants(
    grad_ent_ptr,
    grad_cp_ptr,
    kept_ptr,
    cmean_ptr,
    prior_ptr,
    n,
    C,
    offs_c,
    c_valid,
    inv_num_pixels,
    inv_num_images,
    mu,
    ENT_MODE: tl.constexpr,
    HAS_GRAD_CP: tl.constexpr,
):
    """The per-pixel gradient's pieces that do not depend on the pixel, for image n (the pointers as in
    _target_bwd_kernel) -> (w_all, w_kept, hinge_grad), 0 where their term is off:
    w_all = grad_ent / (N S) (MinEnt); w_kept = grad_ent / (N K_n) (ranked); hinge_grad = h_nc (class prior).
    """
    w_all = 0.0
    w_kept = 0.0
    hinge_grad = 0.0
    if ENT_MODE == 1:
        w_all = tl.load(grad_ent_ptr) * inv_num_pixels
    if ENT_MODE == 2:
        w_kept = tl.load(grad_ent_ptr) * inv_num_images / tl.load(kept_ptr + n)
    if HAS_GRAD_CP:
        target = mu * tl.load(prior_ptr + offs_c, mask=c_valid, other=0.0)
        class_mean = tl.load(cmean_ptr + n * C + offs_c, mask=c_valid, other=0.0)
        hinge_grad = tl.where(target - class_mean > 0.0, tl.load(grad_cp_ptr) * inv_num_pixels, 0.0)
    return w_all, w_kept, hinge_grad


@triton.jit
def target_pixel_grad(
    p,  # [PIXELS, BLOCK_C] softmax of the pixels (softmax_entropy)
    plogp,  # [PIXELS, BLOCK_C] guarded p log p (softmax_entropy)
    grad_info_ptr,  # grad_info of the pixels at info_offset + info_offs
    info_offset,
    info_offs,  # [PIXELS, BLOCK_C]
    mask,  # [PIXELS, BLOCK_C] valid pixels and classes
    grad_emap_ptr,  # grad_emap, and keep_ptr the saved keep mask, of the pixels at map_offset + map_offs
    keep_ptr,
    map_offset,
    map_offs,  # [PIXELS]
    pix_ok,  # [PIXELS] valid pixels
    w_all,  # target_grad_constants
    w_kept,
    hinge_grad,
    inv_log_c,
    HAS_GRAD_INFO: tl.constexpr,
    HAS_GRAD_EMAP: tl.constexpr,
    ENT_MODE: tl.constexpr,  # 0: no grad_ent, 1: MinEnt mean, 2: ranked
    HAS_GRAD_CP: tl.constexpr,
    PIXELS: tl.constexpr,
):
    """The gradient of the target losses with respect to the logits of PIXELS pixels (module docstring)."""
    # w: the gradient reaching E of each pixel
    w = tl.zeros([PIXELS], dtype=tl.float32) + w_all
    if HAS_GRAD_EMAP:
        w += tl.load(grad_emap_ptr + map_offset + map_offs, mask=pix_ok, other=0.0)
    if ENT_MODE == 2:  # the forward's selection, E >= t or isnan(E)
        keep = tl.load(keep_ptr + map_offset + map_offs, mask=pix_ok, other=0)
        w += tl.where(keep != 0, w_kept, 0.0)
    g = w[:, None]
    if HAS_GRAD_INFO:
        g = g + tl.load(grad_info_ptr + info_offset + info_offs, mask=mask, other=0.0).to(tl.float32)
    # q = p dL/dp through the guarded plogp (a -inf logit: exact 0), then the softmax backward
    q = -g * (plogp + p) * inv_log_c
    if HAS_GRAD_CP:
        q -= p * hinge_grad[None, :]
    return q - p * tl.sum(q, axis=1)[:, None]


@triton.jit
def _target_bwd_kernel(
    x_ptr,  # (N, C, S) logits, any strides
    grad_x_ptr,  # (N, C, S) out, x.dtype
    grad_info_ptr,  # (N, C, S) any strides and float dtype
    grad_emap_ptr,  # (N, S) float32 contiguous
    grad_ent_ptr,  # () float32
    grad_cp_ptr,  # () float32
    keep_ptr,  # (N, S) uint8 saved keep mask (ranked)
    kept_ptr,  # (N,) float32 saved kept counts K_n (ranked)
    cmean_ptr,  # (N, C) float32 saved class means m_nc
    prior_ptr,  # (C,) float32
    S,
    C,
    inv_log_c,
    inv_num_pixels,  # 1 / (N S)
    inv_num_images,  # 1 / N
    mu,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_gxn,
    stride_gxc,
    stride_gxs,
    stride_gin,
    stride_gic,
    stride_gis,
    HAS_GRAD_INFO: tl.constexpr,
    HAS_GRAD_EMAP: tl.constexpr,
    ENT_MODE: tl.constexpr,  # 0: no grad_ent, 1: MinEnt mean, 2: ranked
    HAS_GRAD_CP: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    block = tl.program_id(0)
    n = tl.program_id(1)
    offs_s = block * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    s_valid = offs_s < S
    c_valid = offs_c < C
    mask = s_valid[:, None] & c_valid[None, :]
    n64 = n.to(tl.int64)
    x = tl.load(
        x_ptr + n64 * stride_xn + offs_s[:, None] * stride_xs + offs_c[None, :] * stride_xc,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    x = tl.where(c_valid[None, :], x, float("-inf"))
    p, plogp, _ = softmax_entropy(x, inv_log_c)
    w_all, w_kept, hinge_grad = target_grad_constants(
        grad_ent_ptr, grad_cp_ptr, kept_ptr, cmean_ptr, prior_ptr, n, C, offs_c, c_valid,
        inv_num_pixels, inv_num_images, mu, ENT_MODE, HAS_GRAD_CP)
    grad_x = target_pixel_grad(
        p, plogp, grad_info_ptr, n64 * stride_gin, offs_s[:, None] * stride_gis + offs_c[None, :] * stride_gic,
        mask, grad_emap_ptr, keep_ptr, n64 * S, offs_s, s_valid, w_all, w_kept, hinge_grad,
        inv_log_c, HAS_GRAD_INFO, HAS_GRAD_EMAP, ENT_MODE, HAS_GRAD_CP, BLOCK_S)
    tl.store(
        grad_x_ptr + n64 * stride_gxn + offs_s[:, None] * stride_gxs + offs_c[None, :] * stride_gxc,
        grad_x.to(grad_x_ptr.dtype.element_ty),
        mask=mask,
    )


def saved_for_backward(grad_ent, grad_cp, keep, kept, cmean, prior):
    """(ENT_MODE, the saved tensors a backward kernel reads: keep, kept, cmean, prior, with None for those
    its mode does not need). ENT_MODE: 0 no entropy gradient, 1 MinEnt mean, 2 ranked."""
    ent_mode = 0 if grad_ent is None else (1 if keep is None else 2)
    ranked, prior_grad = ent_mode == 2, grad_cp is not None
    return ent_mode, (keep if ranked else None, kept if ranked else None,
                      cmean if prior_grad else None, prior if prior_grad else None)


def target_backward(x, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean, prior, mu):
    """Contract backward (docs/backend_contract.md) -> grad_x, with x's dtype and (when dense) layout."""
    check_indexable("logits", x)
    if grad_info is not None:
        check_indexable("the self-information gradient", grad_info)
    N, C, S = x.shape
    block_s, block_c = block_sizes(C)
    grad_x = torch.empty_like(x)
    has_grad_info = grad_info is not None
    ent_mode, saved = saved_for_backward(grad_ent, grad_cp, keep, kept, cmean, prior)
    args = (x, grad_x, grad_info, grad_emap, grad_ent, grad_cp, *saved, S)
    scalars = (1.0 / math.log(C), 1.0 / (N * S), 1.0 / N, mu)
    strides = (*x.stride(), *grad_x.stride(), *(grad_info.stride() if has_grad_info else (0, 0, 0)))
    sources = dict(HAS_GRAD_INFO=has_grad_info, HAS_GRAD_EMAP=grad_emap is not None, ENT_MODE=ent_mode,
                   HAS_GRAD_CP=grad_cp is not None)
    if class_loop.takes_class_loop(x):  # pixel-contiguous, C <= 24: the classes inside each thread
        rows, vec = class_loop.loop_tile(C, has_grad_info or grad_cp is not None)
        class_loop._target_loop_bwd_kernel[(ceil_div(S, rows * vec), N)](
            *args, *scalars, *strides, **sources, C=C, ROWS=rows, VEC=vec, num_warps=class_loop.LOOP_NUM_WARPS)
    else:
        _target_bwd_kernel[(ceil_div(S, block_s), N)](
            *args, C, *scalars, *strides, **sources, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return grad_x
