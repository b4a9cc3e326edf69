"""Entropy ranking: exact k-th largest entropy per image by radix select, and the kept-pixel sums.

Keys: E >= 0 (+0.0, never -0.0), so the int32 bit pattern of E orders like the float. Every NaN maps to
0x7FFFFFFF, above +inf (0x7F800000): NaN counts as the largest, like torch.topk, and a kept NaN makes
the loss NaN. keep = key >= key(t) is then exactly `E >= t or isnan(E)`, also when t itself is NaN.

Select: 4 passes over 8-bit digits, most significant first. Pass j histograms digit j of the keys whose
digits 0..j-1 equal the ones already chosen (int32 atomics: exact and order-free, so deterministic).
The chosen digit is the largest d with count(keys in the range with digit >= d) >= k_rem; keys with a
larger digit are strictly above the threshold and leave k_rem. There is no select kernel: every
consumer replays the choices from the (N, 4, 256) histogram buffer, a few hundred integers per image,
so the whole select stays on the device with no state but the histograms. The last pass also writes the
(N, S) uint8 keep mask that the backward reads: the same selection, at a quarter of the entropy map's bytes,
so the map itself need not outlive the forward.

Launches: 4 histogram passes and 1 kept-sum pass, each one kernel over the (N, S) entropy map. (Pass 0 was
once fused into the kernels that compute the entropies; on an H200 the class-loop kernel's fused histogram
miscounted, so every pass runs here.)
"""
import torch
import triton
import triton.language as tl

from .softmax_entropy import NUM_WARPS, ceil_div, programs_per_image

# constexpr globals: the kernels read them
RADIX_BITS = tl.constexpr(8)
RADIX = tl.constexpr(256)
NUM_PASSES = tl.constexpr(4)
NAN_KEY = tl.constexpr(0x7FFFFFFF)
# Entropy values per loop step of a pass program.
BLOCK_R = 2048


@triton.jit
def rank_key(ent):
    """int32 ordering key of E >= 0: its bits, every NaN -> NAN_KEY (above +inf)."""
    return tl.where(ent != ent, NAN_KEY, ent.to(tl.int32, bitcast=True))


@triton.jit
def digit_histogram(key, PASS: tl.constexpr, mask):
    """[RADIX] int32 counts of digit PASS (0: the top 8 bits) of the keys where mask holds."""
    # the lowering bins by the low 8 bits of its input: the mask keeps the digit there
    return tl.histogram((key >> (32 - RADIX_BITS * (PASS + 1))) & (RADIX - 1), RADIX, mask=mask)


@triton.jit
def add_histogram(pass_hist_ptr, counts):
    """Add one program's [RADIX] counts into a pass's histogram row: one int32 atomic per non-empty bin
    (exact and order-free, so deterministic)."""
    bins = tl.arange(0, RADIX)
    tl.atomic_add(pass_hist_ptr + bins, counts, mask=counts > 0, sem="relaxed")


@triton.jit
def radix_replay(hist_ptr, k, NUM_DONE: tl.constexpr):
    """Replay the first NUM_DONE digit choices of one image from its histograms.

    Returns (prefix, n_above, n_at): prefix = the chosen digits (the threshold key once all 4 are done),
    n_above = keys strictly above the current range, n_at = keys in it (= count(key == t) when done).
    """
    bins = tl.arange(0, RADIX)
    prefix = 0
    k_rem = k
    n_above = 0
    n_at = 0
    for i in tl.static_range(NUM_DONE):
        counts = tl.load(hist_ptr + i * RADIX + bins)
        # at_or_above[d] = count of digits >= d (suffix sum)
        at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
        digit = tl.sum((at_or_above >= k_rem).to(tl.int32), axis=0) - 1
        above = tl.sum(tl.where(bins > digit, counts, 0), axis=0)
        n_at = tl.sum(tl.where(bins == digit, counts, 0), axis=0)
        k_rem = k_rem - above
        n_above = n_above + above
        prefix = prefix | (digit << (32 - RADIX_BITS * (i + 1)))
    return prefix, n_above, n_at


@triton.jit
def _rank_pass_kernel(
    emap_ptr,  # (N, S) float32 entropy map
    hist_ptr,  # (N, NUM_PASSES, RADIX) int32, zeroed before pass 0
    kept_sum_ptr,  # (N, programs) float32 partial sums of kept E (last pass only)
    keep_ptr,  # (N, S) uint8 keep mask out (last pass only)
    S,
    k,
    PASS: tl.constexpr,  # 0..3: histogram of digit PASS; NUM_PASSES: sum of the kept E
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    num_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    emap_row = emap_ptr + n.to(tl.int64) * S
    keep_row = keep_ptr + n.to(tl.int64) * S
    hist_row = hist_ptr + n * (NUM_PASSES * RADIX)
    prefix, _, _ = radix_replay(hist_row, k, PASS)

    if PASS < NUM_PASSES:
        SHIFT: tl.constexpr = 32 - RADIX_BITS * (PASS + 1)
        counts = tl.zeros([RADIX], dtype=tl.int32)
        for start in range(pid * BLOCK, S, num_programs * BLOCK):
            s = start + offs
            in_range = s < S
            key = rank_key(tl.load(emap_row + s, mask=in_range, other=0.0))
            if PASS > 0:
                # only the keys whose higher digits are the ones chosen so far
                in_range = in_range & ((key >> (SHIFT + RADIX_BITS)) == (prefix >> (SHIFT + RADIX_BITS)))
            counts += digit_histogram(key, PASS, in_range)
        add_histogram(hist_row + PASS * RADIX, counts)
    else:
        # prefix is now the threshold key; keep = key >= key(t) <=> E >= t or isnan(E)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(pid * BLOCK, S, num_programs * BLOCK):
            s = start + offs
            in_range = s < S
            ent = tl.load(emap_row + s, mask=in_range, other=0.0)
            keep = in_range & (rank_key(ent) >= prefix)
            tl.store(keep_row + s, keep.to(tl.uint8), mask=in_range)
            acc += tl.where(keep, ent, 0.0)
        tl.store(kept_sum_ptr + n * num_programs + pid, tl.sum(acc, axis=0))


def rank_entropy(emap, k):
    """Radix-select the k-th largest entropy of each image of the (N, S) float32 map `emap`.

    Returns (hist, kept_sum, keep): the (N, 4, 256) digit histograms (the finishing kernel replays them
    into thresh and kept), the (N, programs) partial sums of the kept E and the (N, S) uint8 keep mask.
    """
    num_images, num_pixels = emap.shape
    programs = programs_per_image(ceil_div(num_pixels, BLOCK_R), num_images)
    # each pass adds its counts into its zeroed row
    hist = torch.zeros((num_images, NUM_PASSES.value, RADIX.value), dtype=torch.int32, device=emap.device)
    kept_sum = torch.empty((num_images, programs), dtype=torch.float32, device=emap.device)
    keep = torch.empty((num_images, num_pixels), dtype=torch.uint8, device=emap.device)
    grid = (programs, num_images)
    for pass_index in range(NUM_PASSES.value + 1):
        _rank_pass_kernel[grid](
            emap, hist, kept_sum, keep, num_pixels, k, PASS=pass_index, BLOCK=BLOCK_R, num_warps=NUM_WARPS
        )
    return hist, kept_sum, keep
