"""A step's weight casts and weight-gradient accumulation, many tensors a launch (advent_fast.weight_casts).

    out_i = x_i + acc_i   (or x_i without acc),  in float32, stored in out_i's dtype

Forward: every trainable weight to the autocast dtype (x: the float32 weight, no acc). Backward: every
weight's 16-bit gradient to float32, plus the gradient so far when an earlier backward of the step left
one (acc): one read of each, one write, where autocast's casts and autograd's accumulation take a cast
kernel and an add kernel a tensor. Tensors of a launch: separate pointer arguments (multi_tensor.py).
x, acc and out of a tensor share their strides and are dense: the kernel walks them in memory order.
"""
import triton
import triton.language as tl

from .multi_tensor import SLOTS, slot_arguments, slot_launches

CAST_BLOCK = 1024
CAST_NUM_WARPS = 4

_SLOT_ARGS = [f"{name}{i}" for i in range(SLOTS) for name in ("x", "acc", "out", "n")]


@triton.jit(do_not_specialize=[name for name in _SLOT_ARGS if name.startswith("n")])
def _cast_add_kernel(x0, acc0, out0, n0, x1, acc1, out1, n1, x2, acc2, out2, n2, x3, acc3, out3, n3,
                     x4, acc4, out4, n4, x5, acc5, out5, n5, x6, acc6, out6, n6, x7, acc7, out7, n7,
                     HAS_ACC: tl.constexpr, BLOCK: tl.constexpr):
    # Program (block, slot): the slot's tensor, a block of its elements.
    x_ptr, acc_ptr, out_ptr, n = slot_arguments(
        tl.program_id(1), x0, acc0, out0, n0, x1, acc1, out1, n1, x2, acc2, out2, n2,
        x3, acc3, out3, n3, x4, acc4, out4, n4, x5, acc5, out5, n5,
        x6, acc6, out6, n6, x7, acc7, out7, n7)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    value = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if HAS_ACC:
        value = tl.load(acc_ptr + offsets, mask=ok, other=0.0).to(tl.float32) + value
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=ok)


def cast_add(xs, accs, outs) -> None:
    """``outs[i] = xs[i] + accs[i]`` (``accs[i]`` None: ``xs[i]`` alone), computed in float32 and stored
    in ``outs[i]``'s dtype; each triple with the same strides, dense (module docstring)."""
    groups = {}
    for i, (x, acc, out) in enumerate(zip(xs, accs, outs)):
        key = (x.dtype, None if acc is None else acc.dtype, out.dtype)  # one compiled variant a group
        groups.setdefault(key, []).append(i)
    for (_, acc_dtype, _), grid, slots in slot_launches(
            groups, lambda i: (xs[i], xs[i] if accs[i] is None else accs[i], outs[i], xs[i].numel()),
            lambda i: xs[i].numel(), SLOTS, CAST_BLOCK):
        _cast_add_kernel[grid](*slots, HAS_ACC=acc_dtype is not None, BLOCK=CAST_BLOCK, num_warps=CAST_NUM_WARPS)
