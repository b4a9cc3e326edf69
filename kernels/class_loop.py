"""MinEnt (mean normalised entropy, no ranking, no other output) with the class axis inside each thread.

The general kernels load a [BLOCK_S, next_pow2(C)] tile. For NCHW logits Triton lays that tile out with the
pixels along the lanes (coalesced), which leaves the classes spread across the CTA's warps: every reduction
over classes (max, exp-sum, entropy sum; the backward's sum of q) is a cross-warp round trip through shared
memory with barriers, each per-pixel result is recomputed by every warp, and a C = 19 tile is 13/32 padding.
Here each thread owns LOOP_VEC pixels and walks the C classes (C constexpr, unrolled): each class row of a block
is one coalesced vector load, the class reductions stay in registers, and nothing is padded.

Per pixel, with m = max_c x_c, s_c = x_c - m, e_c = exp(s_c), z = sum e_c, t = sum_{e_c > 0} e_c s_c:
    H = -sum_c p_c log p_c = log z - t / z,  E = H / log C
    dE/dx_c = -p_c (log p_c + H) / log C = -p_c (s_c - t / z) / log C   (log z cancels; 0 where p_c = 0)
(z >= 1 and t <= 0: H is a sum of two non-negative terms, without cancellation for near one-hot pixels.)
The class rows are read once from DRAM; the later passes over the same block re-read them from L1/L2.
"""
import triton
import triton.language as tl

# Pixels per thread (a 16-byte load of fp32 or two 8-byte loads of 16-bit logits) and warps per CTA.
LOOP_VEC = 4
LOOP_NUM_WARPS = 4
# Class counts up to this are unrolled; larger C take the general tile kernels. Registers grow with
# C x LOOP_VEC (sm_90, 4 pixels a thread: C = 19 91-128 a thread, C = 24 up to 168, C = 48 spills).
MAX_LOOP_CLASSES = 24


@triton.jit
def _row_stats(ptrs, ok, stride_c, C: tl.constexpr, BLOCK: tl.constexpr):
    """(m, z, t) of BLOCK pixels (module docstring) from the C rows at ptrs + c * stride_c."""
    m = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    for c in tl.static_range(1, C):
        m = tl.maximum(m, tl.load(ptrs + c * stride_c, mask=ok, other=0.0).to(tl.float32))
    z = tl.zeros([BLOCK], dtype=tl.float32)
    t = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(C):
        s = tl.load(ptrs + c * stride_c, mask=ok, other=0.0).to(tl.float32) - m
        e = tl.exp(s)
        z += e
        t += tl.where(e == 0.0, 0.0, e * s)  # a -inf logit: e = 0, s = -inf
    return m, z, t


@triton.jit
def _minent_loop_fwd_kernel(
    x_ptr, ent_part_ptr, S, num_blocks, inv_log_c, stride_xn, stride_xc, stride_xs,
    C: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    num_programs = tl.num_programs(0)
    x_img = x_ptr + n.to(tl.int64) * stride_xn
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for block in range(pid, num_blocks, num_programs):
        offs = block * BLOCK + tl.arange(0, BLOCK)
        ok = offs < S
        _, z, t = _row_stats(x_img + offs * stride_xs, ok, stride_xc, C, BLOCK)
        ent = (tl.log(z) - t / z) * inv_log_c
        acc += tl.where(ok, tl.where(ent == 0.0, 0.0, ent), 0.0)
    tl.store(ent_part_ptr + n * num_programs + pid, tl.sum(acc, axis=0))


@triton.jit
def _minent_loop_bwd_kernel(
    x_ptr, grad_x_ptr, grad_ent_ptr, S, inv_log_c, inv_num_pixels,
    stride_xn, stride_xc, stride_xs, stride_gxn, stride_gxc, stride_gxs,
    C: tl.constexpr, BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    n = tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    ok = offs < S
    x_ptrs = x_ptr + n.to(tl.int64) * stride_xn + offs * stride_xs
    g_ptrs = grad_x_ptr + n.to(tl.int64) * stride_gxn + offs * stride_gxs
    m, z, t = _row_stats(x_ptrs, ok, stride_xc, C, BLOCK)
    w = -(tl.load(grad_ent_ptr) * inv_num_pixels) * inv_log_c
    inv_z = 1.0 / z
    h = t * inv_z
    for c in tl.static_range(C):
        s = tl.load(x_ptrs + c * stride_xc, mask=ok, other=0.0).to(tl.float32) - m
        e = tl.exp(s)
        p = e * inv_z
        g = tl.where(p == 0.0, 0.0, w * p * (s - h))  # p NaN (a NaN or +inf logit in the pixel) stays NaN
        tl.store(g_ptrs + c * stride_gxc, g.to(grad_x_ptr.dtype.element_ty), mask=ok)
