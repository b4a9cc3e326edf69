"""Fused target losses on bilinearly upsampled logits: docs/backend_contract.md evaluated on
u = upsample(x) (bilinear.py) without storing u or its gradient.

Per output pixel the math is the contract's (softmax_entropy.py): p, plogp, I_c = -plogp_c / log C,
E = sum_c I_c; MinEnt / ranked MinEnt / class prior as in target_forward.py; the backward's per-pixel
  q_c = -(grad_info_c + w) (plogp_c + p_c) / log C - p_c h_c,   G_c = q_c - p_c sum_j q_j   (= dL/du_c)
and dL/dx = the gather of G onto the low-res grid (bilinear.py).

Launches:
  forward: 1 cell kernel: reads the low-res logits (small, cache-resident), writes the full-resolution
           self-information map (x.dtype) and/or entropy map (float32) once, per-program partial sums of
           E and of p; the finishing kernel of target_forward.py (1 program); ranking adds the 5 passes of
           entropy_ranking.py over the entropy map.
  backward: 1 cell kernel: reads grad_info (+ grad_emap, + the saved keep mask when ranking) once,
            writes the (4, N, h, w, C) float32 tap partials; combine_taps writes grad_x once.
No host synchronisation: upstream scalar gradients, counts and class means are device tensors.
"""
import math

import torch
import triton
import triton.language as tl

from .bilinear import (
    CELL_NUM_WARPS,
    accumulate_taps,
    axis_scale,
    cell_program,
    cell_tile,
    chunk_tap_rows,
    combine_taps,
    store_tap_partials,
)
from .softmax_entropy import ENTROPY_LAUNCH_OPTIONS, ceil_div, softmax_entropy
from .target_backward import saved_for_backward, target_grad_constants, target_pixel_grad
from .target_forward import empty_f32_if, finish_target_forward


@triton.jit
def _upsampled_target_fwd_kernel(
    x_ptr,  # (N, C, h, w) low-res logits, any strides
    info_ptr,  # (N, C, H, W) self-information out, x.dtype, any strides
    emap_ptr,  # (N, H, W) float32 entropy map out, contiguous
    ent_part_ptr,  # (N, h * cell blocks) float32 partial sums of E
    cls_part_ptr,  # (N, h * cell blocks, BLOCK_C) float32 partial sums of p
    C,
    h,
    w,
    H,
    W,
    scale_h,
    scale_w,
    inv_log_c,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_in,
    stride_ic,
    stride_ih,
    stride_iw,
    WANT_INFO: tl.constexpr,
    WANT_EMAP: tl.constexpr,
    WANT_ENT_SUM: tl.constexpr,
    WANT_CLASS_SUM: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    SPAN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    LANES: tl.constexpr = BLOCK_CELLS * SPAN
    (cell_block, r, n, row_start, row_end, r1, cell, first_col, col_end, c1, max_width, offs_c, c_valid,
     tap_mask) = cell_program(C, h, w, H, W, scale_h, scale_w, BLOCK_CELLS, SPAN, BLOCK_C)
    n64 = n.to(tl.int64)
    x_img = x_ptr + n64 * stride_xn

    ent_acc = tl.zeros([LANES], dtype=tl.float32)
    cls_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for b0 in range(0, max_width, SPAN):
        j, pix_ok, _, _, top, bottom = chunk_tap_rows(x_img, b0, r, r1, cell, first_col, col_end, c1, scale_w,
                                                      tap_mask, offs_c, stride_xc, stride_xh, stride_xw, SPAN)
        mask = pix_ok[:, None] & c_valid[None, :]
        for i in range(row_start, row_end):
            wy1 = tl.fma(tl.cast(i, tl.float32), scale_h, 0.0) - r.to(tl.float32)  # source position - r
            # padded classes -inf (p = 0) after the lerp: a zero weight times -inf would be NaN
            u = tl.where(c_valid[None, :], (1.0 - wy1) * top + wy1 * bottom, float("-inf"))
            p, plogp, ent = softmax_entropy(u, inv_log_c)
            if WANT_INFO:
                info_ptrs = info_ptr + n64 * stride_in + offs_c[None, :] * stride_ic + i * stride_ih
                info_ptrs += j[:, None] * stride_iw
                tl.store(info_ptrs, (-plogp * inv_log_c).to(info_ptr.dtype.element_ty), mask=mask)
            if WANT_EMAP:
                tl.store(emap_ptr + n64 * H * W + i * W + j, ent, mask=pix_ok)
            if WANT_ENT_SUM:
                ent_acc += tl.where(pix_ok, ent, 0.0)
            if WANT_CLASS_SUM:
                cls_acc += tl.sum(tl.where(pix_ok[:, None], p, 0.0), axis=0)
    part = n * h * tl.num_programs(0) + r * tl.num_programs(0) + cell_block
    if WANT_ENT_SUM:
        tl.store(ent_part_ptr + part, tl.sum(ent_acc, axis=0))
    if WANT_CLASS_SUM:
        tl.store(cls_part_ptr + part * BLOCK_C + offs_c, cls_acc)


@triton.jit
def _upsampled_target_bwd_kernel(
    x_ptr,  # (N, C, h, w) low-res logits, any strides
    parts_ptr,  # (4, N, h, w, C) float32 tap partials out
    grad_info_ptr,  # (N, C, H, W) any strides and float dtype
    grad_emap_ptr,  # (N, H, W) float32 contiguous
    grad_ent_ptr,  # () float32
    grad_cp_ptr,  # () float32
    keep_ptr,  # (N, H, W) uint8 saved keep mask (ranked)
    kept_ptr,  # (N,) float32 saved kept counts K_n (ranked)
    cmean_ptr,  # (N, C) float32 saved class means m_nc
    prior_ptr,  # (C,) float32
    N,
    C,
    h,
    w,
    H,
    W,
    scale_h,
    scale_w,
    inv_log_c,
    inv_num_pixels,  # 1 / (N H W)
    inv_num_images,  # 1 / N
    mu,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_gin,
    stride_gic,
    stride_gih,
    stride_giw,
    HAS_GRAD_INFO: tl.constexpr,
    HAS_GRAD_EMAP: tl.constexpr,
    ENT_MODE: tl.constexpr,  # 0: no grad_ent, 1: MinEnt mean, 2: ranked
    HAS_GRAD_CP: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    SPAN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    LANES: tl.constexpr = BLOCK_CELLS * SPAN
    (cell_block, r, n, row_start, row_end, r1, cell, first_col, col_end, c1, max_width, offs_c, c_valid,
     tap_mask) = cell_program(C, h, w, H, W, scale_h, scale_w, BLOCK_CELLS, SPAN, BLOCK_C)
    n64 = n.to(tl.int64)
    x_img = x_ptr + n64 * stride_xn
    map_offset = n64 * H * W  # of grad_emap and keep

    w_all, w_kept, hinge_grad = target_grad_constants(
        grad_ent_ptr, grad_cp_ptr, kept_ptr, cmean_ptr, prior_ptr, n, C, offs_c, c_valid,
        inv_num_pixels, inv_num_images, mu, ENT_MODE, HAS_GRAD_CP)

    a00 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=tl.float32)
    a01 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=tl.float32)
    a10 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=tl.float32)
    a11 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=tl.float32)
    for b0 in range(0, max_width, SPAN):
        j, pix_ok, wx0, wx1, top, bottom = chunk_tap_rows(x_img, b0, r, r1, cell, first_col, col_end, c1, scale_w,
                                                          tap_mask, offs_c, stride_xc, stride_xh, stride_xw, SPAN)
        mask = pix_ok[:, None] & c_valid[None, :]
        # row-weighted sums over the cell row of the per-pixel gradient G: taps r (t_top) and r1 (t_bottom)
        t_top = tl.zeros([LANES, BLOCK_C], dtype=tl.float32)
        t_bottom = tl.zeros([LANES, BLOCK_C], dtype=tl.float32)
        for i in range(row_start, row_end):
            wy1 = tl.fma(tl.cast(i, tl.float32), scale_h, 0.0) - r.to(tl.float32)  # source position - r
            wy0 = 1.0 - wy1
            u = tl.where(c_valid[None, :], wy0 * top + wy1 * bottom, float("-inf"))
            p, plogp, _ = softmax_entropy(u, inv_log_c)
            grad = target_pixel_grad(
                p, plogp, grad_info_ptr, n64 * stride_gin,
                offs_c[None, :] * stride_gic + i * stride_gih + j[:, None] * stride_giw, mask, grad_emap_ptr,
                keep_ptr, map_offset, i * W + j, pix_ok, w_all, w_kept, hinge_grad, inv_log_c,
                HAS_GRAD_INFO, HAS_GRAD_EMAP, ENT_MODE, HAS_GRAD_CP, LANES)
            grad = tl.where(pix_ok[:, None], grad, 0.0)
            t_top += wy0 * grad
            t_bottom += wy1 * grad
        a00, a01, a10, a11 = accumulate_taps(a00, a01, a10, a11, t_top, t_bottom, wx0, wx1, BLOCK_CELLS, SPAN,
                                             BLOCK_C)
    store_tap_partials(parts_ptr, a00, a01, a10, a11, n, r, cell_block, N, h, w, C, BLOCK_CELLS, BLOCK_C)


def _launch_shape(x, out_h, out_w):
    N, C, h, w = x.shape
    block_cells, span, block_c = cell_tile(C, w, out_w)
    grid = (ceil_div(w, block_cells), h, N)
    return grid, dict(BLOCK_CELLS=block_cells, SPAN=span, BLOCK_C=block_c, num_warps=CELL_NUM_WARPS)


def upsampled_target_forward(x, out_h, out_w, prior, k, mu, want_info, want_emap, want_ent, want_cp):
    """The contract's forward on upsample(x) -> (info, emap, ent, cp, thresh, kept, cmean, keep).

    x: (N, C, h, w) logits of any strides. info: (N, C, out_h, out_w) in x.dtype, channels_last when x is;
    emap: (N, out_h, out_w) float32; keep: (N, out_h, out_w) uint8. Outputs not asked for are None.
    """
    N, C, h, w = x.shape
    device = x.device
    ranked = want_ent and k > 0
    want_ent_sum = want_ent and not ranked
    grid, meta = _launch_shape(x, out_h, out_w)
    programs = grid[0] * grid[1]  # per image

    info = full_resolution_like(x, out_h, out_w) if want_info else None
    emap = empty_f32_if(want_emap or ranked, (N, out_h, out_w), device)
    ent_part = empty_f32_if(want_ent_sum, (N, programs), device)
    cls_part = empty_f32_if(want_cp, (N, programs, meta["BLOCK_C"]), device)
    _upsampled_target_fwd_kernel[grid](
        x,
        info,
        emap,
        ent_part,
        cls_part,
        C,
        h,
        w,
        out_h,
        out_w,
        axis_scale(h, out_h),
        axis_scale(w, out_w),
        1.0 / math.log(C),
        *x.stride(),
        *(info.stride() if want_info else (0, 0, 0, 0)),
        WANT_INFO=want_info,
        WANT_EMAP=emap is not None,
        WANT_ENT_SUM=want_ent_sum,
        WANT_CLASS_SUM=want_cp,
        **meta,
        **ENTROPY_LAUNCH_OPTIONS,
    )
    return finish_target_forward(x, info, emap, ent_part, cls_part, prior, k, mu, want_emap, want_ent, want_cp,
                                 out_h * out_w, programs, max(1, meta["BLOCK_CELLS"] * meta["SPAN"]), meta["BLOCK_C"],
                                 CELL_NUM_WARPS)


def upsampled_target_backward(x, out_h, out_w, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean, prior,
                              mu):
    """The contract's backward on upsample(x), gathered onto x -> grad_x (x's dtype and, when dense, layout).

    grad_info (N, C, out_h, out_w) any strides; grad_emap (N, out_h, out_w) float32 contiguous; the others
    as in docs/backend_contract.md (None: no gradient from that output; ranking active iff keep given).
    """
    N, C, h, w = x.shape
    grid, meta = _launch_shape(x, out_h, out_w)
    parts = torch.empty((4, N, h, w, C), dtype=torch.float32, device=x.device)
    has_grad_info = grad_info is not None
    ent_mode, saved = saved_for_backward(grad_ent, grad_cp, keep, kept, cmean, prior)
    _upsampled_target_bwd_kernel[grid](
        x,
        parts,
        grad_info,
        grad_emap,
        grad_ent,
        grad_cp,
        *saved,
        N,
        C,
        h,
        w,
        out_h,
        out_w,
        axis_scale(h, out_h),
        axis_scale(w, out_w),
        1.0 / math.log(C),
        1.0 / (N * out_h * out_w),
        1.0 / N,
        mu,
        *x.stride(),
        *(grad_info.stride() if has_grad_info else (0, 0, 0, 0)),
        HAS_GRAD_INFO=has_grad_info,
        HAS_GRAD_EMAP=grad_emap is not None,
        ENT_MODE=ent_mode,
        HAS_GRAD_CP=grad_cp is not None,
        **meta,
    )
    return combine_taps(parts, x)


def full_resolution_like(x, out_h, out_w):
    """An empty (N, C, out_h, out_w) tensor in x's dtype, channels_last when x is (like F.interpolate)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x.shape[0], x.shape[1], out_h, out_w), dtype=x.dtype, device=x.device, memory_format=fmt)
