"""Train-mode BatchNorm with frozen affine parameters, then optionally a residual add and ReLU, channels_last.

The release's ResNet-101 normalises every activation with its batch statistics (BatchNorm in train mode,
weight and bias frozen) and most of them go through a ReLU next. ATen has no cuDNN BatchNorm for bfloat16,
and its own kernels plus a separate ReLU pass read and write the activations 13 times a layer (forward
and backward). Here the activations x are an (M, C) matrix, M = N * H * W rows of C contiguous channels:

forward   pass 1 (_batch_norm_stats_kernel): per program a range of rows -> per channel mean and M2
                  (sum of squared deviations), from sums of the deviations from the range's first row
                  (no cancellation, unlike a plain sum of squares);
          _batch_norm_finish_stats_kernel: the partials merged (Chan's merge as sums; deterministic), then
                  mean, var = M2 / M, invstd = 1 / sqrt(var + eps), scale = weight * invstd; the
                  running statistics updated as ATen does (momentum, unbiased variance);
          pass 2 (_batch_norm_normalize_kernel): y = relu((x - mean) * scale + bias (+ residual)).
backward  with g = 0 where y <= 0, else dy (ReLU; the mask recomputed from x, rounded to y's dtype as y
          was, or with a residual read from y, which the next layer keeps anyway; the residual's gradient
          is g), sum_g = sum_rows g, sum_gx = sum_rows g (x - mean):
          pass 1 (_batch_norm_grad_stats_kernel) partials of both, merged by
          _batch_norm_finish_grad_stats_kernel;
          pass 2 (_batch_norm_grad_input_kernel): dx = scale (g - sum_g / M - (x - mean) invstd^2 sum_gx / M).
A frozen BatchNorm folded into the convolution before it (models.fold_frozen_batchnorm) leaves a per-channel
shift: shift_forward adds it with the residual and ReLU in the normalising pass (NORMALIZE=False), 2 or 3
activation-sized reads and writes against ATen's 4 (bias add, ReLU) or 7 (+ residual add); the backward is
ReLU's either way.
Eight activation-sized reads and writes (3 forward, 5 backward) against ATen's thirteen for BatchNorm and
ReLU (8 for BatchNorm alone, as here), twelve against sixteen with the residual add; float32 inside. No
weight or bias gradient (frozen, as in the release). NaN or inf in a channel makes that channel's statistics, outputs
and gradients NaN, as ATen's do; the ReLU keeps a NaN (it passes x where not x < 0).
"""
import torch
import triton
import triton.language as tl

from .softmax_entropy import ceil_div, next_power_of_2

BN_BLOCK_ROWS = 64
BN_BLOCK_CHANNELS = 64
BN_NUM_WARPS = 4
# Programs of the reducing passes (row ranges x channel blocks), about: a fixed number, not the SM count,
# so the partial sums, hence the bits, are the same on every GPU; at most 2 x BN_FINISH_PARTS row ranges a
# channel block for ResNet-101's tensors (64 channels or more): two tiles of them finish.
BN_REDUCE_PROGRAMS = 512
# The finishing kernels' blocks: channels (few, so that many programs share the work), and row ranges
# summed at a time (many: their loop is the kernels' serial part).
BN_FINISH_BLOCK = 16
BN_FINISH_PARTS = 256


@triton.jit
def _tile(ptr, rows, cols, C, ok):
    """The [rows, cols] tile of the (M, C) matrix at ptr, in float32 (0 outside ok)."""
    return tl.load(ptr + rows[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _normalized(x, mean, scale, bias):
    """(x - mean) * scale + bias: the forward's value before ReLU, and the backward's recomputation of it."""
    return (x - mean[None, :]) * scale[None, :] + bias[None, :]


@triton.jit
def _channel_affine(mean_ptr, scale_ptr, bias_ptr, cols, col_ok):
    """(mean, scale, bias) of these channels in float32: what _normalized applies."""
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    return mean, scale, tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _batch_norm_stats_kernel(x_ptr, mean_part_ptr, m2_part_ptr, M, C, rows_per_part,
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    part = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    first = part * rows_per_part
    last = tl.minimum(first + rows_per_part, M)
    # Sums of the deviations from a shift, the range's first row (one of the values: so no cancellation as in
    # a plain sum of squares; loaded with the first tile, not before it), kept per tile element and reduced
    # over the rows once, at the end: no cross-warp reduction per row block.
    shift = tl.load(x_ptr + first * C + cols, mask=col_ok, other=0.0).to(tl.float32)  # first < last: no empty range
    sum_d = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    sum_d2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = (rows < last)[:, None] & col_ok[None, :]
        d = tl.where(ok, _tile(x_ptr, rows, cols, C, ok) - shift[None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
    count = (last - first).to(tl.float32)
    d_total = tl.sum(sum_d, axis=0)
    m2 = tl.sum(sum_d2, axis=0) - d_total * d_total / count  # >= 0 but for rounding (a NaN stays NaN)
    tl.store(mean_part_ptr + part * C + cols, shift + d_total / count, mask=col_ok)
    tl.store(m2_part_ptr + part * C + cols, tl.where(m2 < 0.0, 0.0, m2), mask=col_ok)


@triton.jit
def _part_rows(parts, num_parts, M, rows_per_part):
    """Rows of each of these row ranges (0 past the last), float32."""
    return tl.where(parts < num_parts, tl.minimum(M - parts * rows_per_part, rows_per_part), 0).to(tl.float32)


@triton.jit
def _batch_norm_finish_stats_kernel(mean_part_ptr, m2_part_ptr, weight_ptr, running_mean_ptr, running_var_ptr,
                                    mean_ptr, invstd_ptr, scale_ptr, M, C, num_parts, rows_per_part, momentum, eps,
                                    UPDATE_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < C
    # Chan's merge of every range as plain sums over tiles of BLOCK_P ranges (a tree, not a serial chain),
    # with d_p = mean_p - shift (shift: the first range's mean, keeping the terms small):
    #   mean = shift + D / M,  M2 = sum_p M2_p + sum_p n_p d_p^2 - D^2 / M,  D = sum_p n_p d_p
    shift = tl.load(mean_part_ptr + cols, mask=ok, other=0.0)
    sum_d = tl.zeros([BLOCK], dtype=tl.float32)
    sum_d2 = tl.zeros([BLOCK], dtype=tl.float32)
    sum_m2 = tl.zeros([BLOCK], dtype=tl.float32)
    for first in range(0, num_parts, BLOCK_P):
        parts = first + tl.arange(0, BLOCK_P)
        n = _part_rows(parts, num_parts, M, rows_per_part)[:, None]
        tile_ok = (parts < num_parts)[:, None] & ok[None, :]
        offsets = parts[:, None] * C + cols[None, :]
        d = tl.where(tile_ok, tl.load(mean_part_ptr + offsets, mask=tile_ok, other=0.0) - shift[None, :], 0.0)
        sum_d += tl.sum(n * d, axis=0)
        sum_d2 += tl.sum(n * d * d, axis=0)
        sum_m2 += tl.sum(tl.load(m2_part_ptr + offsets, mask=tile_ok, other=0.0), axis=0)
    mean = shift + sum_d / M
    between = sum_d2 - sum_d * sum_d / M  # >= 0 but for rounding (not tl.maximum: a NaN stays NaN)
    m2 = sum_m2 + tl.where(between < 0.0, 0.0, between)
    var = m2 / M
    invstd = 1.0 / tl.sqrt(var + eps)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(mean_ptr + cols, mean, mask=ok)
    tl.store(invstd_ptr + cols, invstd, mask=ok)
    tl.store(scale_ptr + cols, weight * invstd, mask=ok)
    if UPDATE_RUNNING:
        # ATen: running = momentum * batch + (1 - momentum) * running, with the unbiased variance
        unbiased = m2 / (M - 1.0)
        running_mean = tl.load(running_mean_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        running_var = tl.load(running_var_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(running_mean_ptr + cols, momentum * mean + (1.0 - momentum) * running_mean, mask=ok)
        tl.store(running_var_ptr + cols, momentum * unbiased + (1.0 - momentum) * running_var, mask=ok)


@triton.jit
def _batch_norm_normalize_kernel(x_ptr, residual_ptr, y_ptr, mean_ptr, scale_ptr, bias_ptr, M, C,
                                 NORMALIZE: tl.constexpr, RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < M)[:, None] & col_ok[None, :]
    x = _tile(x_ptr, rows, cols, C, ok)
    if NORMALIZE:
        mean, scale, bias = _channel_affine(mean_ptr, scale_ptr, bias_ptr, cols, col_ok)
        y = _normalized(x, mean, scale, bias)
    else:  # a folded frozen BatchNorm's shift (its scale is in the convolution's weight)
        y = x + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        y += _tile(residual_ptr, rows, cols, C, ok)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not tl.maximum: a NaN stays NaN
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


# Where the backward's ReLU mask comes from (MASK): no ReLU; the output recomputed from x (BatchNorm + ReLU);
# the stored output (BatchNorm + residual + ReLU, whose output is the next block's input, kept anyway).
NO_MASK, MASK_FROM_X, MASK_FROM_Y = 0, 1, 2


@triton.jit
def _relu_grad(dy, x, y_ptr, rows, cols, C, ok, mean, scale, bias, MASK: tl.constexpr):
    """0 where the forward's output was <= 0, else dy (ATen's ReLU backward: a NaN output passes dy); dy
    without ReLU."""
    if MASK == 1:  # recomputed, rounded to the output's dtype as it was stored
        y = _normalized(x, mean, scale, bias).to(y_ptr.dtype.element_ty).to(tl.float32)
        dy = tl.where(y <= 0.0, 0.0, dy)
    if MASK == 2:
        dy = tl.where(_tile(y_ptr, rows, cols, C, ok) <= 0.0, 0.0, dy)
    return dy


@triton.jit
def _batch_norm_grad_stats_kernel(dy_ptr, x_ptr, y_ptr, mean_ptr, scale_ptr, bias_ptr, sum_g_part_ptr, sum_gx_part_ptr,
                                  M, C, rows_per_part, MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
    part = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean, scale, bias = _channel_affine(mean_ptr, scale_ptr, bias_ptr, cols, col_ok)
    first = part * rows_per_part
    last = tl.minimum(first + rows_per_part, M)
    sum_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # per tile element, reduced once at the end
    sum_gx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = (rows < last)[:, None] & col_ok[None, :]
        x = _tile(x_ptr, rows, cols, C, ok)
        g = _relu_grad(_tile(dy_ptr, rows, cols, C, ok), x, y_ptr, rows, cols, C, ok, mean, scale, bias, MASK)
        sum_g += g
        sum_gx += tl.where(ok, g * (x - mean[None, :]), 0.0)
    tl.store(sum_g_part_ptr + part * C + cols, tl.sum(sum_g, axis=0), mask=col_ok)
    tl.store(sum_gx_part_ptr + part * C + cols, tl.sum(sum_gx, axis=0), mask=col_ok)


@triton.jit
def _batch_norm_finish_grad_stats_kernel(sum_g_part_ptr, sum_gx_part_ptr, invstd_ptr, mean_g_ptr, coef_x_ptr, M, C,
                                         num_parts, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < C
    sum_g = tl.zeros([BLOCK], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK], dtype=tl.float32)
    for first in range(0, num_parts, BLOCK_P):
        parts = first + tl.arange(0, BLOCK_P)
        tile_ok = (parts < num_parts)[:, None] & ok[None, :]
        offsets = parts[:, None] * C + cols[None, :]
        sum_g += tl.sum(tl.load(sum_g_part_ptr + offsets, mask=tile_ok, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(sum_gx_part_ptr + offsets, mask=tile_ok, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + cols, mask=ok, other=0.0)
    tl.store(mean_g_ptr + cols, sum_g / M, mask=ok)
    tl.store(coef_x_ptr + cols, invstd * invstd * (sum_gx / M), mask=ok)


@triton.jit
def _batch_norm_grad_input_kernel(dy_ptr, x_ptr, y_ptr, dx_ptr, grad_residual_ptr, mean_ptr, scale_ptr, bias_ptr,
                                  mean_g_ptr, coef_x_ptr, M, C, MASK: tl.constexpr, WRITE_RESIDUAL_GRAD: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < M)[:, None] & col_ok[None, :]
    mean, scale, bias = _channel_affine(mean_ptr, scale_ptr, bias_ptr, cols, col_ok)
    mean_g = tl.load(mean_g_ptr + cols, mask=col_ok, other=0.0)
    coef_x = tl.load(coef_x_ptr + cols, mask=col_ok, other=0.0)
    x = _tile(x_ptr, rows, cols, C, ok)
    g = _relu_grad(_tile(dy_ptr, rows, cols, C, ok), x, y_ptr, rows, cols, C, ok, mean, scale, bias, MASK)
    dx = scale[None, :] * (g - mean_g[None, :] - (x - mean[None, :]) * coef_x[None, :])
    offsets = rows[:, None] * C + cols[None, :]
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if WRITE_RESIDUAL_GRAD:  # the residual's gradient: the masked upstream gradient
        tl.store(grad_residual_ptr + offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=ok)


def _layout(x):
    """(M, C, BLOCK_C, row parts, rows a part) of channels_last x viewed as an (M, C) matrix."""
    n, c, h, w = x.shape
    m = n * h * w
    block_c = min(BN_BLOCK_CHANNELS, next_power_of_2(c))
    parts = min(ceil_div(m, BN_BLOCK_ROWS), max(1, ceil_div(BN_REDUCE_PROGRAMS, ceil_div(c, block_c))))
    rows_per_part = ceil_div(ceil_div(m, parts), BN_BLOCK_ROWS) * BN_BLOCK_ROWS
    return m, c, block_c, ceil_div(m, rows_per_part), rows_per_part


def batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps, relu, residual=None):
    """-> (y, mean, invstd, scale): y = relu?(batch_norm(x) + residual?) in x's dtype and layout, the batch mean,
    1 / sqrt(var + eps) and weight * invstd (float32, (C,)); running_mean and running_var updated in place
    (both or neither given). x and residual: (N, C, H, W) channels_last contiguous, N * H * W >= 2."""
    m, c, block_c, parts, rows_per_part = _layout(x)
    device = x.device
    f32 = dict(dtype=torch.float32, device=device)
    mean_part, m2_part = torch.empty((parts, c), **f32), torch.empty((parts, c), **f32)
    _batch_norm_stats_kernel[(parts, ceil_div(c, block_c))](
        x, mean_part, m2_part, m, c, rows_per_part, BLOCK_M=BN_BLOCK_ROWS, BLOCK_C=block_c, num_warps=BN_NUM_WARPS)
    mean, invstd, scale = (torch.empty(c, **f32) for _ in range(3))
    update = running_mean is not None
    _batch_norm_finish_stats_kernel[(ceil_div(c, BN_FINISH_BLOCK),)](
        mean_part, m2_part, weight, running_mean if update else mean, running_var if update else mean,
        mean, invstd, scale, m, c, parts, rows_per_part, float(momentum), float(eps), UPDATE_RUNNING=update,
        BLOCK_P=BN_FINISH_PARTS, BLOCK=BN_FINISH_BLOCK, num_warps=BN_NUM_WARPS)
    y = torch.empty_like(x)
    _batch_norm_normalize_kernel[(ceil_div(m, BN_BLOCK_ROWS), ceil_div(c, block_c))](
        x, residual, y, mean, scale, bias, m, c, NORMALIZE=True, RELU=relu, HAS_RESIDUAL=residual is not None,
        BLOCK_M=BN_BLOCK_ROWS, BLOCK_C=block_c, num_warps=BN_NUM_WARPS)
    return y, mean, invstd, scale


def shift_forward(x, shift, relu, residual=None):
    """-> relu?(x + shift (+ residual)) in x's dtype and layout, one pass: a folded frozen BatchNorm's shift
    (float32 (C,)) with what follows it. x and residual: (N, C, H, W) channels_last contiguous."""
    m, c, block_c, _, _ = _layout(x)
    y = torch.empty_like(x)
    _batch_norm_normalize_kernel[(ceil_div(m, BN_BLOCK_ROWS), ceil_div(c, block_c))](
        x, residual, y, shift, shift, shift, m, c, NORMALIZE=False, RELU=relu, HAS_RESIDUAL=residual is not None,
        BLOCK_M=BN_BLOCK_ROWS, BLOCK_C=block_c, num_warps=BN_NUM_WARPS)
    return y


def batch_norm_backward(grad_y, x, bias, mean, invstd, scale, relu, y=None, want_residual_grad=False):
    """-> (grad_x, grad_residual or None) of batch_norm_forward's y (grad_x in x's dtype and layout). With
    ReLU after a residual, y is the forward's output (the ReLU mask); want_residual_grad: the residual's
    gradient too. grad_y, x, y channels_last contiguous."""
    m, c, block_c, parts, rows_per_part = _layout(x)
    mask = (MASK_FROM_Y if y is not None else MASK_FROM_X) if relu else NO_MASK
    f32 = dict(dtype=torch.float32, device=x.device)
    sum_g_part, sum_gx_part = torch.empty((parts, c), **f32), torch.empty((parts, c), **f32)
    _batch_norm_grad_stats_kernel[(parts, ceil_div(c, block_c))](
        grad_y, x, y if y is not None else x, mean, scale, bias, sum_g_part, sum_gx_part, m, c, rows_per_part,
        MASK=mask, BLOCK_M=BN_BLOCK_ROWS, BLOCK_C=block_c, num_warps=BN_NUM_WARPS)
    mean_g, coef_x = torch.empty(c, **f32), torch.empty(c, **f32)
    _batch_norm_finish_grad_stats_kernel[(ceil_div(c, BN_FINISH_BLOCK),)](
        sum_g_part, sum_gx_part, invstd, mean_g, coef_x, m, c, parts, BLOCK_P=BN_FINISH_PARTS, BLOCK=BN_FINISH_BLOCK,
        num_warps=BN_NUM_WARPS)
    grad_x = torch.empty_like(x)
    # without ReLU the residual's gradient is the upstream gradient itself
    write_residual_grad = want_residual_grad and relu
    grad_residual = torch.empty_like(x) if write_residual_grad else (grad_y if want_residual_grad else None)
    _batch_norm_grad_input_kernel[(ceil_div(m, BN_BLOCK_ROWS), ceil_div(c, block_c))](
        grad_y, x, y if y is not None else x, grad_x, grad_residual if write_residual_grad else grad_x, mean, scale,
        bias, mean_g, coef_x, m, c, MASK=mask, WRITE_RESIDUAL_GRAD=write_residual_grad, BLOCK_M=BN_BLOCK_ROWS,
        BLOCK_C=block_c, num_warps=BN_NUM_WARPS)
    return grad_x, grad_residual
