"""The target forward and backward (docs/backend_contract.md) on pixel-contiguous logits, the classes in each thread.

The general kernels load a [BLOCK_S, next_pow2(C)] tile. For NCHW logits Triton lays that tile out with the
pixels along the lanes (coalesced), which leaves the classes spread across the CTA's warps: every reduction
over classes (max, exp-sum, entropy sum; the backward's sum of q) is a cross-warp round trip through shared
memory with barriers, each per-pixel result is recomputed by every warp, and a C = 19 tile is 13/32 padding.
Here each thread owns LOOP_VEC consecutive pixels (a [ROWS, LOOP_VEC] block, ROWS = 32 x warps) and walks the
C classes (C constexpr, unrolled): each class row of a block is one coalesced vector load, the class
reductions stay in registers, and nothing is padded. The class rows are read once from DRAM; the later
passes over the same block (max, sums, outputs) re-read them from L1/L2.

Per pixel, with m = max_c x_c, s_c = x_c - m, e_c = exp(s_c), z = sum e_c, t = sum_{e_c > 0} e_c s_c,
L = log z, p_c = e_c / z:
    H = -sum_c p_c log p_c = L - t / z,  E = H / log C   (z >= 1 and t <= 0: two non-negative terms, no
                                                           cancellation for near one-hot pixels)
    I_c = -p_c (s_c - L) / log C   (0 where p_c = 0)
No multiply-add contraction (ENTROPY_LAUNCH_OPTIONS): z and t are then sums of the same rounded terms in any
class order, so for C = 2 swapped logits give the same E, as the ranking needs.

Backward, with g_c = grad_info_c + w (w: the gradient reaching E, target_backward.py) and h_c the class-prior
hinge gradient, the contract's q_c - p_c sum_j q_j splits into
    -w p_c (s_c - t / z) / log C                      (dE/dx_c: log z cancels; 0 where p_c = 0)
    -(gi_c (plogp_c + p_c) - p_c GI) / log C,  GI = sum_j gi_j (plogp_j + p_j) = (A + (1 - L) B) / z
    -p_c (h_c - D / z)
where A = sum_j gi_j e_j s_j, B = sum_j gi_j e_j, D = sum_j h_j e_j accumulate with z and t, before L is
known: two passes over the classes before the one that writes, as in the forward.
NaN: a NaN (or +inf) logit makes the pixel's p, hence all its outputs, NaN; a NaN in grad_info or w makes
the pixel's gradient NaN (also where p_c = 0, as the general kernels' q_c - p_c * NaN).
"""
import triton
import triton.language as tl

# Pixels per thread (a 16-byte load of fp32 or an 8-byte load of 16-bit logits) and warps per CTA.
LOOP_VEC = 4
LOOP_NUM_WARPS = 4
# Class counts up to this are unrolled; larger C take the general tile kernels.
MAX_LOOP_CLASSES = 24
# Above this many classes the heavy variants (forward: info map or class sums; backward: grad_info or
# grad_cp) take LOOP_VEC / 2 pixels a thread. ptxas keeps a pass's loaded rows, their addresses and the
# per-class terms live into the next pass: on sm_90 at 4 pixels a thread, C = 19 with every gradient took
# 255 registers, C = 24 spilled 40 (forward) and 200 (backward) bytes a thread (benchmarks/kernel_resources.py).
HEAVY_LOOP_CLASSES = 16


def takes_class_loop(x):
    """Whether the (N, C, S) logits x take these kernels: pixels contiguous (NCHW), at most MAX_LOOP_CLASSES
    classes. channels_last (classes contiguous) and strided pixels keep the general tile kernels."""
    return x.shape[1] <= MAX_LOOP_CLASSES and x.stride(2) == 1


def loop_tile(num_classes, heavy):
    """(ROWS, VEC) of a variant's pixel block: 32 x LOOP_NUM_WARPS rows of threads, VEC pixels a thread
    (heavy: see HEAVY_LOOP_CLASSES)."""
    vec = max(1, LOOP_VEC // 2) if heavy and num_classes > HEAVY_LOOP_CLASSES else LOOP_VEC
    return 32 * LOOP_NUM_WARPS, vec


@triton.jit
def _block_offsets(block, ROWS: tl.constexpr, VEC: tl.constexpr):
    """[ROWS, VEC] pixel indices of a block: VEC consecutive pixels a thread (the reductions over the VEC
    axis stay in the thread)."""
    return block * (ROWS * VEC) + tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def _row(ptrs, ok, stride_c, c: tl.constexpr):
    """Row c of the pixels (the C rows at ptrs + c * stride_c) in float32."""
    return tl.load(ptrs + c * stride_c, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _row_max(ptrs, ok, stride_c, C: tl.constexpr):
    """max_c of the pixels' logits, the C rows at ptrs + c * stride_c."""
    m = _row(ptrs, ok, stride_c, 0)
    for c in tl.static_range(1, C):
        m = tl.maximum(m, _row(ptrs, ok, stride_c, c))
    return m


@triton.jit
def _row_shifted(ptrs, ok, stride_c, m, c: tl.constexpr):
    """(s_c, e_c) of the pixels (module docstring)."""
    s = _row(ptrs, ok, stride_c, c) - m
    return s, tl.exp(s)


@triton.jit
def _e_times_s(e, s):
    """e_c s_c, 0 where e_c = 0 (a -inf logit: s = -inf)."""
    return tl.where(e == 0.0, 0.0, e * s)


@triton.jit
def _target_loop_fwd_kernel(
    x_ptr,  # (N, C, S) logits, pixel stride 1
    info_ptr,  # (N, C, S) self-information out, x.dtype
    emap_ptr,  # (N, S) float32 entropy map out, contiguous
    ent_part_ptr,  # (N, programs) float32 partial sums of E
    cls_part_ptr,  # (N, programs, BLOCK_C) float32 partial sums of p (0 in the padded columns)
    S,
    num_blocks,
    inv_log_c,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_in,
    stride_ic,
    stride_is,
    WANT_INFO: tl.constexpr,
    WANT_EMAP: tl.constexpr,
    WANT_ENT_SUM: tl.constexpr,
    WANT_CLASS_SUM: tl.constexpr,
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    num_programs = tl.num_programs(0)
    x_img = x_ptr + n.to(tl.int64) * stride_xn
    ent_acc = tl.zeros([ROWS, VEC], dtype=tl.float32)
    # per-thread class sums, column c = class c: the compare with the constexpr c folds away when a thread
    # holds whole rows (the [ROWS, VEC] blocks' layout), so an update is one add
    cls_acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_C)[None, :]
    # grid-stride over pixel blocks: one partial per program, whatever S
    for block in range(pid, num_blocks, num_programs):
        offs = _block_offsets(block, ROWS, VEC)
        ok = offs < S
        x_ptrs = x_img + offs * stride_xs
        m = _row_max(x_ptrs, ok, stride_xc, C)
        z = tl.zeros([ROWS, VEC], dtype=tl.float32)
        t = tl.zeros([ROWS, VEC], dtype=tl.float32)
        for c in tl.static_range(C):
            s, e = _row_shifted(x_ptrs, ok, stride_xc, m, c)
            z += e
            t += _e_times_s(e, s)
        log_z = tl.log(z)
        ent = (log_z - t / z) * inv_log_c
        ent = tl.where(ent == 0.0, 0.0, ent)  # -0.0 -> +0.0 (the ranking keys), as softmax_entropy
        if WANT_INFO or WANT_CLASS_SUM:
            inv_z = 1.0 / z
            for c in tl.static_range(C):
                s, e = _row_shifted(x_ptrs, ok, stride_xc, m, c)
                p = e * inv_z
                if WANT_INFO:
                    info = -(p * tl.where(p == 0.0, 0.0, s - log_z)) * inv_log_c
                    info_ptrs = info_ptr + n.to(tl.int64) * stride_in + offs * stride_is
                    tl.store(info_ptrs + c * stride_ic, info.to(info_ptr.dtype.element_ty), mask=ok)
                if WANT_CLASS_SUM:
                    p_sum = tl.sum(tl.where(ok, p, 0.0), axis=1)
                    cls_acc = tl.where(cols == c, cls_acc + p_sum[:, None], cls_acc)
        if WANT_EMAP:
            tl.store(emap_ptr + n.to(tl.int64) * S + offs, ent, mask=ok)
        if WANT_ENT_SUM:
            ent_acc += tl.where(ok, ent, 0.0)
    part = n * num_programs + pid
    if WANT_ENT_SUM:
        tl.store(ent_part_ptr + part, tl.sum(tl.sum(ent_acc, axis=1), axis=0))
    if WANT_CLASS_SUM:
        tl.store(cls_part_ptr + part * BLOCK_C + tl.arange(0, BLOCK_C), tl.sum(cls_acc, axis=0))


@triton.jit
def _hinge_grad(prior_ptr, cmean_ptr, n, grad_cp_scaled, mu, C: tl.constexpr, c: tl.constexpr):
    """h_nc = grad_cp / (N S) * [mu prior_c - m_nc > 0] (target_grad_constants, one class)."""
    gap = mu * tl.load(prior_ptr + c) - tl.load(cmean_ptr + n * C + c)
    return tl.where(gap > 0.0, grad_cp_scaled, 0.0)


@triton.jit
def _target_loop_bwd_kernel(
    x_ptr,  # (N, C, S) logits, pixel stride 1
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
    C: tl.constexpr,
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
):
    block = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    offs = _block_offsets(block, ROWS, VEC)
    ok = offs < S
    x_ptrs = x_ptr + n64 * stride_xn + offs * stride_xs
    gx_ptrs = grad_x_ptr + n64 * stride_gxn + offs * stride_gxs
    # w: the gradient reaching E of each pixel (target_pixel_grad)
    w = tl.zeros([ROWS, VEC], dtype=tl.float32)
    if ENT_MODE == 1:
        w += tl.load(grad_ent_ptr) * inv_num_pixels
    if HAS_GRAD_EMAP:
        w += tl.load(grad_emap_ptr + n64 * S + offs, mask=ok, other=0.0)
    if ENT_MODE == 2:  # the forward's selection, E >= t or isnan(E)
        w_kept = tl.load(grad_ent_ptr) * inv_num_images / tl.load(kept_ptr + n)
        keep = tl.load(keep_ptr + n64 * S + offs, mask=ok, other=0)
        w += tl.where(keep != 0, w_kept, 0.0)
    grad_cp_scaled = 0.0
    if HAS_GRAD_CP:
        grad_cp_scaled = tl.load(grad_cp_ptr) * inv_num_pixels

    m = _row_max(x_ptrs, ok, stride_xc, C)
    z = tl.zeros([ROWS, VEC], dtype=tl.float32)
    t = tl.zeros([ROWS, VEC], dtype=tl.float32)
    gi_es = tl.zeros([ROWS, VEC], dtype=tl.float32)  # A
    gi_e = tl.zeros([ROWS, VEC], dtype=tl.float32)  # B
    h_e = tl.zeros([ROWS, VEC], dtype=tl.float32)  # D
    for c in tl.static_range(C):
        s, e = _row_shifted(x_ptrs, ok, stride_xc, m, c)
        es = _e_times_s(e, s)
        z += e
        t += es
        if HAS_GRAD_INFO:
            gi = _row(grad_info_ptr + n64 * stride_gin + offs * stride_gis, ok, stride_gic, c)
            gi_es += gi * es
            gi_e += gi * e
        if HAS_GRAD_CP:
            h_e += _hinge_grad(prior_ptr, cmean_ptr, n, grad_cp_scaled, mu, C, c) * e
    inv_z = 1.0 / z
    log_z = tl.log(z)
    t_z = t * inv_z
    gi_sum = (gi_es + (1.0 - log_z) * gi_e) * inv_z  # GI
    h_sum = h_e * inv_z  # D / z
    for c in tl.static_range(C):
        s, e = _row_shifted(x_ptrs, ok, stride_xc, m, c)
        p = e * inv_z
        if ENT_MODE != 0 or HAS_GRAD_EMAP:
            # w NaN stays NaN (w * 0); s = -inf where p = 0 is guarded
            g = -(w * tl.where(p == 0.0, 0.0, p * (s - t_z))) * inv_log_c
        else:
            g = p * 0.0  # NaN where p is, as the general kernels' q - p sum q
        if HAS_GRAD_INFO:
            gi = _row(grad_info_ptr + n64 * stride_gin + offs * stride_gis, ok, stride_gic, c)
            plogp = p * tl.where(p == 0.0, 0.0, s - log_z)
            g -= (gi * (plogp + p) - p * gi_sum) * inv_log_c
        if HAS_GRAD_CP:
            g -= p * (_hinge_grad(prior_ptr, cmean_ptr, n, grad_cp_scaled, mu, C, c) - h_sum)
        tl.store(gx_ptrs + c * stride_gxc, g.to(grad_x_ptr.dtype.element_ty), mask=ok)
