"""Bilinear upsampling with align_corners=True inside the loss kernels, and the atomic-free gather of its
gradient onto the low-resolution grid.

Index math, per axis (in = low-res size, out = full-res size), in float32 like ATen's CPU kernel (its CUDA
kernel computes the same, unless nvcc contracted src and w1 into one fma: see below):
    scale = (in - 1) / (out - 1)      (0 when out == 1), rounded once to float32 on the host
    src   = float32(i) * scale        (one rounded product)
    i0    = floor(src) (src >= 0: truncation), at most in - 1;   i1 = i0 + 1 if i0 < in - 1 else i0
    w1    = src - i0;   w0 = 1 - w1
    value = w0_h (w0_w x[i0, j0] + w1_w x[i0, j1]) + w1_h (w0_w x[i1, j0] + w1_w x[i1, j1])
All four taps are multiplied, also by a zero weight, as ATen does: an infinite tap with weight 0 makes the
value NaN (0 * -inf), and in the backward a NaN gradient reaches all four taps of its pixel.
The kernels write src as tl.fma(i, scale, 0.0): a rounded product that the GPU compiler cannot contract
with the subtraction that follows into one fma (which would skip the rounding, so that exact zero weights
became tiny ones). They write it inline: a nested jit call costs milliseconds under the interpreter.

Cells: along an axis, cell c = the output indices with i0 == c, an interval [cell_start(c), cell_start(c+1)).
Every output pixel of cell (r, c) has the taps rows {r, r1}, columns {c, c1} (r1 = min(r + 1, h - 1)).

Tiles: one program = one low-res row r (cell row), BLOCK_CELLS consecutive cells of it, one image, all
classes. Lane l of its [BLOCK_CELLS * SPAN, BLOCK_C] tiles is cell l // SPAN and output column
cell_start + b0 + l % SPAN, for chunks b0 = 0, SPAN, ... up to the widest cell (SPAN = the usual cell
width rounded up to a power of two, so there is usually one chunk and lanes run along consecutive output
columns: coalesced, which tl.max_contiguous tells the compiler). The two column-interpolated tap rows
are computed once per chunk; each output row of the cell row then costs one more lerp per element. Each
output pixel is computed exactly once.

Gradient gather without atomics: the kernels sum each output pixel's gradient G into its cell's four
tap partials A_q[r, c], q = (row tap, column tap): A_00 = sum w0_h w0_w G, A_01 = sum w0_h w1_w G, ...,
and store them to a (4, N, h, w, C) float32 buffer (each cell written by one program, no atomics, so the
result is deterministic). combine_taps then gathers, for each low-res pixel, the partials of the cells
that name it as a tap: grad[r, c] = A_00[r, c] + A_01[r, c-1] + A_10[r-1, c] + A_11[r-1, c-1], plus, at
the last row / column (where i1 == i0), the tap-1 partials of the cell itself.
"""
import numpy as np
import torch
import triton
import triton.language as tl

from .softmax_entropy import ceil_div, next_power_of_2

# Elements per [lanes, BLOCK_C] cell tile. The cell kernels keep four such tiles live (the two tap rows
# and two row-weighted gradient sums) besides the softmax temporaries: 1K fp32 with 8 warps = 4 values a
# thread per tile. Compiled for sm_90 they then take 120-160 registers without spills
# (benchmarks/kernel_resources.py; 2K with 4 warps: 170-250).
CELL_TILE_ELEMENTS = 1024
CELL_NUM_WARPS = 8
# low-res pixels per tile of combine_taps
COMBINE_TILE_ELEMENTS = 4096


def axis_scale(in_size, out_size):
    """ATen's float32 (in - 1) / (out - 1) for align_corners=True, as an exactly representable Python float."""
    if out_size <= 1:
        return 0.0
    return float(np.float32(in_size - 1) / np.float32(out_size - 1))


def cell_tile(num_classes, in_size, out_size):
    """(BLOCK_CELLS, SPAN, BLOCK_C) for the columns axis (in -> out) and C classes."""
    block_c = next_power_of_2(num_classes)
    lanes = max(1, CELL_TILE_ELEMENTS // block_c)
    # cells are floor or ceil of (out - 1) / (in - 1) wide (one more after float32 rounding: a 2nd chunk)
    width = ceil_div(out_size - 1, in_size - 1) if in_size > 1 else out_size
    span = min(next_power_of_2(max(width, 1)), lanes)
    block_cells = min(lanes // span, next_power_of_2(in_size))
    return block_cells, span, block_c


@triton.jit
def cell_start(c, in_size, out_size, scale):
    """First output index whose i0 is >= c (out_size if none): cell c is [cell_start(c), cell_start(c + 1)).

    In exact arithmetic it is guess = ceil(c (out - 1) / (in - 1)). The float32 source coordinates err by
    at most about c 2**-23, less than the spacing 1 / (out - 1) of the exact ones while c (out - 1) < 2**23:
    below guess they stay below c, and from guess + 1 on they stay at or above it. Only the source of guess
    itself (exactly c when the boundary falls on an output index) can round down to just under c: then
    the cell starts at guess + 1. in == 1 (scale 0, every i0 is 0) and out == 1 come out right too.
    Callers keep in * out < 2**22 (advent_fast/upsampled.py interpolates instead beyond that).
    """
    denom = tl.maximum(in_size - 1, 1)
    guess = ((c.to(tl.int64) * (out_size - 1) + denom - 1) // denom).to(tl.int32)
    guess_floor = tl.minimum(tl.fma(guess.to(tl.float32), scale, 0.0).to(tl.int32), in_size - 1)
    return tl.minimum(guess + (guess_floor < c).to(tl.int32), out_size)


@triton.jit
def cell_program(C, h, w, H, W, scale_h, scale_w, BLOCK_CELLS: tl.constexpr, SPAN: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Where this program of a cell kernel (grid: cell blocks, low-res rows, images) works:
    (cell_block, r, n): its ids; (row_start, row_end, r1): the output rows of cell row r and its second tap
    row; per lane (cell, first output column, end of the cell, tap column c1); the widest cell's width;
    the class offsets, their validity and the [lanes, BLOCK_C] mask of the tap loads."""
    cell_block = tl.program_id(0)
    r = tl.program_id(1)
    n = tl.program_id(2)
    lanes = tl.arange(0, BLOCK_CELLS * SPAN)
    cell = cell_block * BLOCK_CELLS + lanes // SPAN
    start = cell_start(cell, w, W, scale_w)
    end = cell_start(cell + 1, w, W, scale_w)  # cells past the grid: start == end == W
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < C
    return (cell_block, r, n, cell_start(r, h, H, scale_h), cell_start(r + 1, h, H, scale_h),
            tl.minimum(r + 1, h - 1), cell, start + lanes % SPAN, end, tl.minimum(cell + 1, w - 1),
            tl.max(end - start, axis=0), offs_c, c_valid, (cell < w)[:, None] & c_valid[None, :])


@triton.jit
def chunk_tap_rows(x_img, b0, r, r1, cell, first_col, col_end, c1, scale_w, tap_mask, offs_c, stride_xc,
                   stride_xh, stride_xw, SPAN: tl.constexpr):
    """Chunk b0 of a cell tile: per lane the output column j, whether it is in its cell, the column weights
    (w0, w1), and the two tap rows interpolated along the columns, w0 x[., c] + w1 x[., c1] (ATen's order;
    a zero weight on an infinite tap is NaN there too): [lanes, BLOCK_C] float32, 0 where masked."""
    j = tl.max_contiguous(first_col + b0, SPAN)  # runs of SPAN consecutive columns per cell
    w1 = tl.fma(j.to(tl.float32), scale_w, 0.0) - cell.to(tl.float32)  # source position - j0
    w0 = 1.0 - w1
    class_offs = offs_c[None, :] * stride_xc
    left = cell[:, None] * stride_xw + class_offs
    right = c1[:, None] * stride_xw + class_offs
    top_row = x_img + r * stride_xh
    bottom_row = x_img + r1 * stride_xh
    top = w0[:, None] * tl.load(top_row + left, mask=tap_mask, other=0.0).to(tl.float32)
    top += w1[:, None] * tl.load(top_row + right, mask=tap_mask, other=0.0).to(tl.float32)
    bottom = w0[:, None] * tl.load(bottom_row + left, mask=tap_mask, other=0.0).to(tl.float32)
    bottom += w1[:, None] * tl.load(bottom_row + right, mask=tap_mask, other=0.0).to(tl.float32)
    return j, j < col_end, w0, w1, top, bottom


@triton.jit
def accumulate_taps(a00, a01, a10, a11, t_top, t_bottom, w0, w1, BLOCK_CELLS: tl.constexpr, SPAN: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Add a chunk's row-weighted gradient sums t_top (row tap r) and t_bottom (row tap r1), [lanes, BLOCK_C],
    to the four [BLOCK_CELLS, BLOCK_C] tap partials: column weights w0 (tap c) and w1 (tap c1), then the sum
    over each cell's lanes."""
    w0 = w0[:, None]
    w1 = w1[:, None]
    a00 += tl.sum(tl.reshape(w0 * t_top, (BLOCK_CELLS, SPAN, BLOCK_C)), axis=1)
    a01 += tl.sum(tl.reshape(w1 * t_top, (BLOCK_CELLS, SPAN, BLOCK_C)), axis=1)
    a10 += tl.sum(tl.reshape(w0 * t_bottom, (BLOCK_CELLS, SPAN, BLOCK_C)), axis=1)
    a11 += tl.sum(tl.reshape(w1 * t_bottom, (BLOCK_CELLS, SPAN, BLOCK_C)), axis=1)
    return a00, a01, a10, a11


@triton.jit
def store_tap_partials(parts_ptr, a00, a01, a10, a11, n, r, cell_block, N, h, w, C,
                       BLOCK_CELLS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Write the four [BLOCK_CELLS, BLOCK_C] tap partials of this program's cells to (4, N, h, w, C)."""
    cells = cell_block * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (cells < w)[:, None] & (offs_c < C)[None, :]
    cell_offs = ((n * h + r) * w + cells).to(tl.int64)[:, None] * C + offs_c[None, :]
    tap_stride = tl.cast(N, tl.int64) * h * w * C  # N == 1 arrives as a constexpr int
    tl.store(parts_ptr + cell_offs, a00, mask=mask)
    tl.store(parts_ptr + tap_stride + cell_offs, a01, mask=mask)
    tl.store(parts_ptr + 2 * tap_stride + cell_offs, a10, mask=mask)
    tl.store(parts_ptr + 3 * tap_stride + cell_offs, a11, mask=mask)


@triton.jit
def _combine_taps_kernel(
    parts_ptr,  # (4, N, h, w, C) float32 tap partials of the cells
    grad_x_ptr,  # (N, C, h, w) out, any strides, x.dtype
    numer_ptr,  # () float32: the result is scaled by numer / denom (0 when denom == 0)
    denom_ptr,  # () float32
    N,
    C,
    h,
    w,
    stride_gn,
    stride_gc,
    stride_gh,
    stride_gw,
    HAS_SCALE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    block = tl.program_id(0)
    n = tl.program_id(1)
    offs_p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    p_valid = offs_p < h * w
    mask = p_valid[:, None] & (offs_c < C)[None, :]
    r = offs_p // w
    c = offs_p % w
    tap_stride = tl.cast(N, tl.int64) * h * w * C  # N == 1 arrives as a constexpr int
    # partial of tap q of cell (row, col); `also` masks the cells that are not a source of this pixel
    image = parts_ptr + n.to(tl.int64) * h * w * C + offs_c[None, :]
    not_first_row = r >= 1
    not_first_col = c >= 1
    last_row = r == h - 1
    last_col = c == w - 1
    # tap 00: the pixel's own cell
    grad = tl.load(image + ((r * w + c) * C)[:, None], mask=mask, other=0.0)
    # tap 01 (column c1): cell (r, c - 1), and at the last column the cell itself
    ptrs = image + tap_stride
    grad += tl.load(ptrs + ((r * w + c - 1) * C)[:, None], mask=mask & not_first_col[:, None], other=0.0)
    grad += tl.load(ptrs + ((r * w + c) * C)[:, None], mask=mask & last_col[:, None], other=0.0)
    # tap 10 (row r1): cell (r - 1, c), and at the last row the cell itself
    ptrs = image + 2 * tap_stride
    grad += tl.load(ptrs + (((r - 1) * w + c) * C)[:, None], mask=mask & not_first_row[:, None], other=0.0)
    grad += tl.load(ptrs + ((r * w + c) * C)[:, None], mask=mask & last_row[:, None], other=0.0)
    # tap 11: cells (r - 1 or r at the last row) x (c - 1 or c at the last column); the corner's own
    # term weighs w1_h w1_w, both 0 or tiny there, and only keeps the sum the same as ATen's
    ptrs = image + 3 * tap_stride
    m = mask & (not_first_row & not_first_col)[:, None]
    grad += tl.load(ptrs + (((r - 1) * w + c - 1) * C)[:, None], mask=m, other=0.0)
    m = mask & (not_first_row & last_col)[:, None]
    grad += tl.load(ptrs + (((r - 1) * w + c) * C)[:, None], mask=m, other=0.0)
    m = mask & (last_row & not_first_col)[:, None]
    grad += tl.load(ptrs + ((r * w + c - 1) * C)[:, None], mask=m, other=0.0)
    m = mask & (last_row & last_col)[:, None]
    grad += tl.load(ptrs + ((r * w + c) * C)[:, None], mask=m, other=0.0)
    if HAS_SCALE:
        denom = tl.load(denom_ptr)
        grad *= tl.where(denom == 0.0, 0.0, tl.load(numer_ptr) / denom)
    out = grad_x_ptr + n.to(tl.int64) * stride_gn + offs_c[None, :] * stride_gc
    out += (r * stride_gh + c * stride_gw)[:, None]
    tl.store(out, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


def combine_taps(parts, x, numer=None, denom=None):
    """grad_x (x's shape, dtype and, when dense, layout) from the (4, N, h, w, C) tap partials.

    With numer / denom (0-dim float32 device tensors) the result is scaled by numer / denom, or by 0 when
    denom == 0 (no host synchronisation)."""
    N, C, h, w = x.shape
    grad_x = torch.empty_like(x)
    block_c = next_power_of_2(C)
    block_p = max(1, min(COMBINE_TILE_ELEMENTS // block_c, next_power_of_2(h * w)))
    _combine_taps_kernel[(ceil_div(h * w, block_p), N)](
        parts,
        grad_x,
        numer,
        denom,
        N,
        C,
        h,
        w,
        *grad_x.stride(),
        HAS_SCALE=numer is not None,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=CELL_NUM_WARPS,
    )
    return grad_x
