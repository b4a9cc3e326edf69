"""Fused target forward: self-information map, entropy map, MinEnt (+ranking) and class-prior losses.

Launches:
  1 main kernel: reads the logits once; per pixel softmax -> log p -> I_c, E; writes the info map
    and/or the entropy map; per program partial sums of E and per-class partial sums of p.
  1 finishing kernel (single program) when a loss is asked for: reduces the partials in a fixed order
    (deterministic, no float atomics) into the MinEnt mean, the class means m_nc and the class-prior
    hinge loss; with ranking, it replays the radix select into thresh and kept.
  ranking (k > 0): the 4 radix passes and the kept-sum pass read the entropy map (a temporary unless asked
    for; entropy_ranking.py); the last writes the keep mask the backward reads. The main kernels do not fuse
    pass 0: on an H200 (triton 3.6) the class-loop kernel's fused histogram counted keys that were not there
    (kept = k with fewer pixels kept), where the passes' own kernel never miscounted.
No host synchronisation: counts and scalars stay in device memory (safe under CUDA graph capture).
"""
import math

import torch
import triton
import triton.language as tl

from .entropy_ranking import NUM_PASSES, RADIX, radix_replay, rank_entropy
from . import class_loop
from .softmax_entropy import (ENTROPY_LAUNCH_OPTIONS, NUM_WARPS, block_sizes, ceil_div, check_indexable,
                              programs_per_image, softmax_entropy)


@triton.jit
def _target_fwd_kernel(
    x_ptr,  # (N, C, S) logits, any strides
    info_ptr,  # (N, C, S) self-information out, x.dtype
    emap_ptr,  # (N, S) float32 entropy map out, contiguous
    ent_part_ptr,  # (N, programs) float32 partial sums of E
    cls_part_ptr,  # (N, programs, BLOCK_C) float32 partial sums of p
    S,
    C,
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
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    num_programs = tl.num_programs(0)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < C
    x_img = x_ptr + n.to(tl.int64) * stride_xn
    ent_acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    cls_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    # grid-stride over pixel blocks: one partial per program, whatever S
    for block in range(pid, num_blocks, num_programs):
        offs_s = block * BLOCK_S + tl.arange(0, BLOCK_S)
        s_valid = offs_s < S
        mask = s_valid[:, None] & c_valid[None, :]
        x = tl.load(
            x_img + offs_s[:, None] * stride_xs + offs_c[None, :] * stride_xc, mask=mask, other=0.0
        ).to(tl.float32)
        # padded classes -inf (p = 0); padded pixels stay finite (0 logits) and are masked below
        x = tl.where(c_valid[None, :], x, float("-inf"))
        p, plogp, ent = softmax_entropy(x, inv_log_c)
        if WANT_INFO:
            info = -plogp * inv_log_c
            info_img = info_ptr + n.to(tl.int64) * stride_in
            info_ptrs = info_img + offs_s[:, None] * stride_is + offs_c[None, :] * stride_ic
            tl.store(info_ptrs, info.to(info_ptr.dtype.element_ty), mask=mask)
        if WANT_EMAP:
            tl.store(emap_ptr + n.to(tl.int64) * S + offs_s, ent, mask=s_valid)
        if WANT_ENT_SUM:
            ent_acc += tl.where(s_valid, ent, 0.0)
        if WANT_CLASS_SUM:
            cls_acc += tl.sum(tl.where(s_valid[:, None], p, 0.0), axis=0)
    part = n * num_programs + pid
    if WANT_ENT_SUM:
        tl.store(ent_part_ptr + part, tl.sum(ent_acc, axis=0))
    if WANT_CLASS_SUM:
        tl.store(cls_part_ptr + part * BLOCK_C + offs_c, cls_acc)


@triton.jit
def _target_finish_kernel(
    ent_part_ptr,  # (N, P_ENT) float32: sums of E (mode 1) or of the kept E (mode 2)
    cls_part_ptr,  # (N, P_CLS, BLOCK_C) float32 sums of p
    hist_ptr,  # (N, NUM_PASSES, RADIX) int32 radix histograms (mode 2)
    prior_ptr,  # (C,) float32
    ent_ptr,  # () float32 out
    cp_ptr,  # () float32 out
    cmean_ptr,  # (N, C) float32 out
    thresh_ptr,  # (N,) float32 out (mode 2)
    kept_ptr,  # (N,) float32 out (mode 2)
    N,
    C,
    S,
    inv_num_pixels,  # 1 / (N S), from the host: N * S overflows int32 for the largest inputs
    P_ENT,
    P_CLS,
    k,
    mu,
    ENT_MODE: tl.constexpr,  # 0: none, 1: mean over all pixels, 2: ranked
    WANT_CP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # ent_part rows are read BLOCK_P * BLOCK_C at a time: one tile's worth, like the class partials
    BLOCK_E: tl.constexpr = BLOCK_P * BLOCK_C
    offs_e = tl.arange(0, BLOCK_E)
    if ENT_MODE == 1:
        # MinEnt = sum_{n,s} E / (N * S)
        ent_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for start in range(0, N * P_ENT, BLOCK_E):
            ent_acc += tl.load(ent_part_ptr + start + offs_e, mask=start + offs_e < N * P_ENT, other=0.0)
        tl.store(ent_ptr, tl.sum(ent_acc, axis=0) * inv_num_pixels)
    if ENT_MODE == 2:
        # ranked: loss_n = sum_{keep} E / K_n, mean over images
        loss_sum = 0.0
        for n in range(N):
            kept_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
            for start in range(0, P_ENT, BLOCK_E):
                offs = start + offs_e
                kept_acc += tl.load(ent_part_ptr + n * P_ENT + offs, mask=offs < P_ENT, other=0.0)
            thresh_key, n_above, n_at = radix_replay(hist_ptr + n * (NUM_PASSES * RADIX), k, NUM_PASSES)
            kept = (n_above + n_at).to(tl.float32)
            tl.store(thresh_ptr + n, thresh_key.to(tl.float32, bitcast=True))
            tl.store(kept_ptr + n, kept)
            loss_sum += tl.sum(kept_acc, axis=0) / kept
        tl.store(ent_ptr, loss_sum / N)
    if WANT_CP:
        # m_nc = sum_s p / S; cp = mean_n sum_c hinge(mu * prior_c - m_nc), hinge keeps NaN
        offs_p = tl.arange(0, BLOCK_P)
        offs_c = tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        target = mu * tl.load(prior_ptr + offs_c, mask=c_valid, other=0.0)
        cp_sum = 0.0
        for n in range(N):
            cls_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
            for start in range(0, P_CLS, BLOCK_P):
                rows = start + offs_p
                cls_acc += tl.load(
                    cls_part_ptr + (n * P_CLS + rows)[:, None] * BLOCK_C + offs_c[None, :],
                    mask=(rows < P_CLS)[:, None],
                    other=0.0,
                )
            class_mean = tl.sum(cls_acc, axis=0) / S
            tl.store(cmean_ptr + n * C + offs_c, class_mean, mask=c_valid)
            gap = target - class_mean
            hinge = tl.where(gap < 0.0, 0.0, gap)
            cp_sum += tl.sum(tl.where(c_valid, hinge, 0.0), axis=0)
        tl.store(cp_ptr, cp_sum / N)


def empty_f32_if(wanted, shape, device):
    """An empty float32 tensor of that shape if wanted, else None (the kernels get a None pointer)."""
    return torch.empty(shape, dtype=torch.float32, device=device) if wanted else None


def target_forward(x, prior, k, mu, want_info, want_emap, want_ent, want_cp):
    """Contract forward (docs/backend_contract.md) -> (info, emap, ent, cp, thresh, kept, cmean, keep).

    x: (N, C, S) logits of any strides (read in place). Outputs that were not asked for are None (the
    kernels get None pointers for them).
    """
    check_indexable("logits", x)
    N, C, S = x.shape
    device = x.device
    ranked = want_ent and k > 0
    want_ent_sum = want_ent and not ranked
    block_s, block_c = block_sizes(C)
    loop = class_loop.takes_class_loop(x)  # pixel-contiguous, C <= 24: the classes inside each thread
    loop_rows, loop_vec = class_loop.loop_tile(C, want_info or want_cp)
    num_blocks = ceil_div(S, loop_rows * loop_vec if loop else block_s)
    programs = programs_per_image(num_blocks, N)

    info = torch.empty_like(x) if want_info else None
    emap = empty_f32_if(want_emap or ranked, (N, S), device)
    ent_part = empty_f32_if(want_ent_sum, (N, programs), device)
    cls_part = empty_f32_if(want_cp, (N, programs, block_c), device)
    outputs = dict(WANT_INFO=want_info, WANT_EMAP=emap is not None, WANT_ENT_SUM=want_ent_sum,
                   WANT_CLASS_SUM=want_cp)
    strides = (*x.stride(), *(info.stride() if want_info else (0, 0, 0)))
    if loop:
        class_loop._target_loop_fwd_kernel[(programs, N)](
            x, info, emap, ent_part, cls_part, S, num_blocks, 1.0 / math.log(C), *strides, **outputs, C=C,
            BLOCK_C=block_c, ROWS=loop_rows, VEC=loop_vec, num_warps=class_loop.LOOP_NUM_WARPS,
            **ENTROPY_LAUNCH_OPTIONS)
    else:
        _target_fwd_kernel[(programs, N)](
            x, info, emap, ent_part, cls_part, S, C, num_blocks, 1.0 / math.log(C), *strides, **outputs,
            BLOCK_S=block_s, BLOCK_C=block_c, num_warps=NUM_WARPS, **ENTROPY_LAUNCH_OPTIONS)
    return finish_target_forward(x, info, emap, ent_part, cls_part, prior, k, mu, want_emap, want_ent, want_cp, S,
                                 programs, block_s, block_c, NUM_WARPS)


def finish_target_forward(x, info, emap, ent_part, cls_part, prior, k, mu, want_emap, want_ent, want_cp,
                          num_pixels, num_parts, block_p, block_c, num_warps):
    """What follows a target forward's main kernel -> (info, emap, ent, cp, thresh, kept, cmean, keep).

    Ranking (want_ent and k > 0) runs its passes over emap, (N, num_pixels) once flattened (returned only
    if want_emap: the backward reads the keep mask, a quarter of its bytes); then the finishing kernel
    reduces ent_part (N, num_parts) and cls_part (N, num_parts, block_c), the main kernel's partial sums,
    reading block_p rows of block_c at a time. Outputs not asked for, info included, come back as None.
    """
    N, C = x.shape[:2]
    device = x.device
    ranked = want_ent and k > 0
    ent, cp = empty_f32_if(want_ent, (), device), empty_f32_if(want_cp, (), device)
    thresh, kept = empty_f32_if(ranked, (N,), device), empty_f32_if(ranked, (N,), device)
    cmean = empty_f32_if(want_cp, (N, C), device)
    keep = None
    hist = None
    if want_ent or want_cp:
        if ranked:
            hist, ent_part, keep = rank_entropy(emap.view(N, num_pixels), k)
            keep = keep.view(emap.shape)
        _target_finish_kernel[(1,)](
            ent_part,
            cls_part,
            hist,
            prior if want_cp else None,
            ent,
            cp,
            cmean,
            thresh,
            kept,
            N,
            C,
            num_pixels,
            1.0 / (N * num_pixels),
            ent_part.shape[1] if want_ent else 0,
            num_parts,
            k,
            mu,
            ENT_MODE=(2 if ranked else 1) if want_ent else 0,
            WANT_CP=want_cp,
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return info, emap if want_emap else None, ent, cp, thresh, kept, cmean, keep
