"""Per-pixel softmax / entropy math shared by the forward and backward kernels, and the tile sizes.

A tile is [BLOCK_S pixels x BLOCK_C classes] of logits x[n, :, s]; BLOCK_C is C rounded up to a power
of two. Padded classes hold -inf logits, so their p is exactly 0 and they drop out of every sum.

    p_c     = exp(x_c - max) / sum_j exp(x_j - max)
    lp_c    = x_c - max - log(sum_j exp(x_j - max))          (log p from the logits: no epsilon)
    plogp_c = 0 if p_c == 0 else p_c * lp_c                  (a -inf logit: 0 * -inf would be NaN)
              computed as p * where(p == 0, 0, lp): the same values (NaN p stays NaN) without
              evaluating 0 * -inf at all
    E       = -sum_c plogp_c / log C                         (normalised entropy, -0.0 -> +0.0)

Non-finite logits: a NaN logit makes its exp NaN, hence the exp-sum and every p of the pixel NaN
(whether or not tl.max dropped it); +inf gives inf - inf = NaN; a pixel of all -inf gives
-inf - (-inf) = NaN. So non-finite inputs never turn into finite garbage.

Ties: the kernels that compute the entropies ranked by MinEnt+ER are compiled without multiply-add
contraction (ENTROPY_LAUNCH_OPTIONS). With it, the class sum of two products became fma(p_0, lp_0,
p_1 lp_1) on GPUs, whose rounding depends on which class comes first: two pixels with the same logits in
swapped classes (frequent for C = 2 in bf16) got entropies an ulp apart, and ranking split a tie that
the release (a multiply, then a sum) and a float64 reference keep whole.

The tile order needs no switch: Triton specialises integer arguments equal to 1, so a unit stride
(pixels in NCHW, classes in channels_last) is a compile-time constant and its coalescing pass lays the
tile out along whichever axis is contiguous in memory.
"""
import triton
import triton.language as tl

# Launch options of the kernels whose entropies are ranked (module docstring, "Ties").
ENTROPY_LAUNCH_OPTIONS = {"enable_fp_fusion": False}
# Elements per [BLOCK_S, BLOCK_C] tile: 4K fp32 = 16 values a thread with 8 warps (about 100 registers).
TILE_ELEMENTS = 4096
NUM_WARPS = 8
# Cap on the programs of a reducing kernel (all images together). Each program loops over several tiles
# and writes one partial, so the partial buffers, and the finishing kernel that reads them, stay small.
# A fixed number (not the SM count) keeps the summation order, hence the bits, the same on every GPU.
MAX_PROGRAMS = 1024
# The kernels index within an image with 32-bit offsets (the image's own offset is 64-bit), and run the
# images along a grid axis other than the first, which CUDA caps at 65535.
MAX_IMAGE_SPAN = 2**31 - 1
MAX_IMAGES = 65535


def ceil_div(a, b):
    """ceil(a / b) for positive host integers, as triton.cdiv: that and triton.next_power_of_2 are
    Triton constexpr functions, whose calls from Python cost 2-3 us each, several per launch."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n, for host integers n >= 1 (triton.next_power_of_2, see ceil_div)."""
    return 1 << (n - 1).bit_length()


def block_sizes(num_classes):
    """(BLOCK_S, BLOCK_C) for C classes: all classes in one tile, about TILE_ELEMENTS elements."""
    block_c = next_power_of_2(num_classes)
    return max(1, TILE_ELEMENTS // block_c), block_c


def check_indexable(name, t):
    """ValueError, naming the tensor, if the kernels cannot address it: images spanning more than
    MAX_IMAGE_SPAN elements, or more than MAX_IMAGES images."""
    if t.shape[0] > MAX_IMAGES:
        raise ValueError(f"{name} has {t.shape[0]} images; the Triton kernels take at most {MAX_IMAGES} a call")
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
    if span > MAX_IMAGE_SPAN:
        raise ValueError(f"one image of {name} {tuple(t.shape)} spans {span} elements; the Triton kernels address "
                         f"at most 2**31 - 1 within an image (split the image, or ADVENT_FAST_BACKEND=reference)")


def programs_per_image(num_blocks, num_images):
    """Programs along the pixel axis of a reducing kernel: one per block up to the MAX_PROGRAMS cap."""
    return max(1, min(num_blocks, MAX_PROGRAMS // num_images))


@triton.jit
def softmax_entropy(x, inv_log_c):
    """x: [BLOCK_S, BLOCK_C] float32 logits (-inf in padded classes) -> (p, plogp, E)."""
    x_max = tl.max(x, axis=1)
    shifted = x - x_max[:, None]
    exp_shifted = tl.exp(shifted)
    denom = tl.sum(exp_shifted, axis=1)
    p = exp_shifted / denom[:, None]
    log_p = shifted - tl.log(denom)[:, None]
    plogp = p * tl.where(p == 0.0, 0.0, log_p)
    ent = -tl.sum(plogp, axis=1) * inv_log_c
    # every plogp <= 0, so E >= 0 except -0.0 for one-hot pixels: the radix select orders the int32
    # bits of E, in which -0.0 would be the smallest negative number.
    ent = tl.where(ent == 0.0, 0.0, ent)
    return p, plogp, ent
