"""Source cross-entropy on bilinearly upsampled logits, without the full-resolution logits.

    u = upsample(x) (bilinear.py),   count = number of pixels with y != ignore_index
    loss = sum_{counted pixels} (logsumexp(u) - u_y) / count
    dloss/du_c = (p_c - [c == y]) / count at counted pixels, p_c * 0 at ignored ones
    dloss/dx = the gather of dloss/du onto the low-res grid (bilinear.py)

The forward also accumulates the gradient (Liger-style): the backward is only a scale by
grad_loss / count, so the labels are read and the softmax computed once. Launches:
  forward: 1 cell kernel (bilinear.py tiles): reads the labels once and the low-res logits (a small,
           cache-resident gather), writes per-program loss / count partials and, when a gradient is wanted,
           the (4, N, h, w, C) float32 tap partials of the unscaled gradient sum_pixels (p - onehot);
           1 single-program kernel sums the partials in a fixed order (deterministic) into loss and count.
  backward: combine_taps reads the tap partials, scales by grad_loss / count, writes grad_x once.

Faithful to F.cross_entropy(F.interpolate(...)) for non-finite values: an ignored pixel adds nothing to
the loss, but its softmax backward (0 - p * 0) is NaN when its logits are, as in torch; count == 0 gives
a NaN loss (0 / 0) and a zero gradient. Labels outside [0, C) other than ignore_index make the loss and
their taps' gradients NaN (no device-side assert, no host synchronisation; the public function checks
CPU labels on the host).
"""
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
from .softmax_entropy import ceil_div

# partials the finishing kernel reads per step
BLOCK_FINISH = 1024


@triton.jit
def _upsampled_ce_fwd_kernel(
    x_ptr,  # (N, C, h, w) low-res logits, any strides
    labels_ptr,  # (N, H, W) integer labels, any strides
    parts_ptr,  # (4, N, h, w, C) float32 tap partials out (WANT_GRAD)
    loss_part_ptr,  # (N * h * cell blocks,) float32 out: sums of the pixel losses
    count_part_ptr,  # (N * h * cell blocks,) int32 out: counts of non-ignored pixels
    N,
    C,
    h,
    w,
    H,
    W,
    scale_h,
    scale_w,
    ignore_index,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_ln,
    stride_lh,
    stride_lw,
    WANT_GRAD: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    SPAN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    LANES: tl.constexpr = BLOCK_CELLS * SPAN
    (cell_block, r, n, row_start, row_end, r1, cell, first_col, col_end, c1, max_width, offs_c, c_valid,
     tap_mask) = cell_program(C, h, w, H, W, scale_h, scale_w, BLOCK_CELLS, SPAN, BLOCK_C)
    x_img = x_ptr + n.to(tl.int64) * stride_xn
    labels_img = labels_ptr + n.to(tl.int64) * stride_ln

    loss_acc = tl.zeros([LANES], dtype=tl.float32)
    count_acc = tl.zeros([LANES], dtype=tl.int32)
    a00 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=tl.float32)
    a01 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=tl.float32)
    a10 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=tl.float32)
    a11 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=tl.float32)
    for b0 in range(0, max_width, SPAN):
        j, pix_ok, wx0, wx1, top, bottom = chunk_tap_rows(x_img, b0, r, r1, cell, first_col, col_end, c1, scale_w,
                                                          tap_mask, offs_c, stride_xc, stride_xh, stride_xw, SPAN)
        # row-weighted sums over the cell row of the per-pixel gradient: taps r (t_top) and r1 (t_bottom)
        t_top = tl.zeros([LANES, BLOCK_C], dtype=tl.float32)
        t_bottom = tl.zeros([LANES, BLOCK_C], dtype=tl.float32)
        for i in range(row_start, row_end):
            wy1 = tl.fma(tl.cast(i, tl.float32), scale_h, 0.0) - r.to(tl.float32)  # source_position(i) - r
            wy0 = 1.0 - wy1
            u = tl.where(c_valid[None, :], wy0 * top + wy1 * bottom, float("-inf"))
            y = tl.load(labels_img + i * stride_lh + j * stride_lw, mask=pix_ok, other=0).to(tl.int64)
            counted = pix_ok & (y != ignore_index)
            in_range = (y >= 0) & (y < C)
            # log-softmax from the logits: nll = log(sum exp(u - max)) - (u_y - max)
            u_max = tl.max(u, axis=1)
            shifted = u - u_max[:, None]
            exp_shifted = tl.exp(shifted)
            denom = tl.sum(exp_shifted, axis=1)
            is_label = offs_c[None, :] == y[:, None]
            shifted_y = tl.sum(tl.where(is_label, shifted, 0.0), axis=1)
            nll = tl.where(in_range, tl.log(denom) - shifted_y, float("nan"))
            loss_acc += tl.where(counted, nll, 0.0)
            count_acc += counted.to(tl.int32)
            if WANT_GRAD:
                p = exp_shifted / denom[:, None]
                # counted: p - onehot (NaN for a bad label); ignored: p * 0, NaN only for NaN logits
                grad = tl.where(in_range[:, None], p - is_label.to(tl.float32), float("nan"))
                grad = tl.where(counted[:, None], grad, p * 0.0)
                grad = tl.where(pix_ok[:, None], grad, 0.0)
                t_top += wy0 * grad
                t_bottom += wy1 * grad
        if WANT_GRAD:
            a00, a01, a10, a11 = accumulate_taps(a00, a01, a10, a11, t_top, t_bottom, wx0, wx1, BLOCK_CELLS, SPAN,
                                                 BLOCK_C)
    if WANT_GRAD:
        store_tap_partials(parts_ptr, a00, a01, a10, a11, n, r, cell_block, N, h, w, C, BLOCK_CELLS, BLOCK_C)
    part = (n * h + r) * tl.num_programs(0) + cell_block
    tl.store(loss_part_ptr + part, tl.sum(loss_acc, axis=0))
    tl.store(count_part_ptr + part, tl.sum(count_acc, axis=0))


@triton.jit
def _ce_finish_kernel(loss_part_ptr, count_part_ptr, loss_ptr, count_ptr, num_parts, BLOCK: tl.constexpr):
    # fixed summation order: the same bits on every run; the count is exact (int32)
    offs = tl.arange(0, BLOCK)
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    count_acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, num_parts, BLOCK):
        mask = start + offs < num_parts
        loss_acc += tl.load(loss_part_ptr + start + offs, mask=mask, other=0.0)
        count_acc += tl.load(count_part_ptr + start + offs, mask=mask, other=0)
    count = tl.sum(count_acc, axis=0).to(tl.float32)
    tl.store(count_ptr, count)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / count)  # 0 / 0 = NaN when every pixel is ignored


def upsampled_cross_entropy_forward(x, labels, ignore_index, want_grad):
    """-> (loss, count, parts): 0-dim float32 loss and non-ignored count, and the (4, N, h, w, C) float32
    tap partials of the unscaled gradient (an empty tensor unless want_grad).

    x: (N, C, h, w) logits of any strides; labels: (N, H, W) integers of any strides.
    """
    N, C, h, w = x.shape
    H, W = labels.shape[1:]
    device = x.device
    f32 = torch.float32
    block_cells, span, block_c = cell_tile(C, w, W)
    cell_blocks = ceil_div(w, block_cells)
    num_parts = N * h * cell_blocks
    parts = torch.empty((4, N, h, w, C), dtype=f32, device=device) if want_grad else None
    loss_part = torch.empty(num_parts, dtype=f32, device=device)
    count_part = torch.empty(num_parts, dtype=torch.int32, device=device)
    _upsampled_ce_fwd_kernel[(cell_blocks, h, N)](
        x,
        labels,
        parts,
        loss_part,
        count_part,
        N,
        C,
        h,
        w,
        H,
        W,
        axis_scale(h, H),
        axis_scale(w, W),
        ignore_index,
        *x.stride(),
        *labels.stride(),
        WANT_GRAD=want_grad,
        BLOCK_CELLS=block_cells,
        SPAN=span,
        BLOCK_C=block_c,
        num_warps=CELL_NUM_WARPS,
    )
    loss = torch.empty((), dtype=f32, device=device)
    count = torch.empty((), dtype=f32, device=device)
    _ce_finish_kernel[(1,)](loss_part, count_part, loss, count, num_parts, BLOCK=BLOCK_FINISH)
    if parts is None:
        parts = torch.empty(0, dtype=f32, device=device)
    return loss, count, parts


def upsampled_cross_entropy_backward(x, parts, count, grad_loss):
    """grad_x = gather of the tap partials * grad_loss / count (0 when count == 0), in x's dtype."""
    return combine_taps(parts, x, grad_loss, count)
