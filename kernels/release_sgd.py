"""ReleaseSGD's update (advent_fast.models.ReleaseSGD with fused=True) in one pass over each tensor.

torch 0.4.1 updated a tensor listed k times in a parameter group k times in sequence, adding the weight decay
to the gradient in place each time (the release's groups list most ResNet-101 tensors 3 or 4 times):
    for r in 1..k:   g = g + wd * p;   b = m * b + g;   p = p - lr * b          (b = g without momentum)
As k multi-tensor adds and k passes of torch's fused SGD kernel, that reads and writes 8 tensor-sized arrays
per listing; here the k updates run in registers: p, g and b are read once, p and b written once, whatever k.
The gradient itself is left as it is (unlike 0.4.1, as ReleaseSGD's other paths). Arithmetic in float32
(torch's fused SGD's too). A non-zero found_inf skips the update: the step's losses were not finite.

Each launch takes up to SLOTS tensors of one multiplicity and dtype as separate pointer arguments
(multi_tensor.py): a replayed CUDA graph updates the gradients it was captured with.
"""
import torch
import triton
import triton.language as tl

from .multi_tensor import SLOTS, slot_arguments, slot_launches

SGD_BLOCK = 1024
SGD_NUM_WARPS = 4

_SLOT_ARGS = [f"{name}{i}" for i in range(SLOTS) for name in ("p", "g", "b", "n")]


@triton.jit(do_not_specialize=[name for name in _SLOT_ARGS if name.startswith("n")])
def _release_sgd_kernel(p0, g0, b0, n0, p1, g1, b1, n1, p2, g2, b2, n2, p3, g3, b3, n3,
                        p4, g4, b4, n4, p5, g5, b5, n5, p6, g6, b6, n6, p7, g7, b7, n7,
                        lr_ptr, lr, found_inf_ptr, momentum, weight_decay, PASSES: tl.constexpr,
                        HAS_MOMENTUM: tl.constexpr, LR_FROM_PTR: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                        BLOCK: tl.constexpr):
    # Program (block, slot): the slot's tensor, a block of its elements.
    p_ptr, g_ptr, b_ptr, n = slot_arguments(tl.program_id(1), p0, g0, b0, n0, p1, g1, b1, n1, p2, g2, b2, n2,
                                            p3, g3, b3, n3, p4, g4, b4, n4, p5, g5, b5, n5,
                                            p6, g6, b6, n6, p7, g7, b7, n7)
    if HAS_FOUND_INF:  # skip the whole update: no element is loaded or stored
        n = tl.where(tl.load(found_inf_ptr) == 0.0, n, 0)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    p = tl.load(p_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if HAS_MOMENTUM:
        b = tl.load(b_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    for _ in tl.static_range(PASSES):
        g = g + weight_decay * p
        if HAS_MOMENTUM:
            b = momentum * b + g
            p = p - lr * b
        else:
            p = p - lr * g
    tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=ok)
    if HAS_MOMENTUM:
        tl.store(b_ptr + offsets, b.to(b_ptr.dtype.element_ty), mask=ok)


def release_sgd_update(params, grads, buffers, multiplicity, lr, momentum, weight_decay, found_inf=None):
    """Updates ``params`` (and the momentum ``buffers``, None without momentum) in place: each tensor
    ``multiplicity[i]`` times (module docstring). Each param, its gradient and its buffer: one dtype, the same
    strides, dense (contiguous in some memory format); ``lr`` a float or a 0-d float tensor (read on the
    device); ``found_inf``: a 0-d float tensor or None."""
    lr_ptr = lr if isinstance(lr, torch.Tensor) else None
    groups = {}
    for i, (p, k) in enumerate(zip(params, multiplicity)):
        groups.setdefault((k, p.dtype), []).append(i)
    for (k, _), grid, slots in slot_launches(
            groups, lambda i: (params[i], grads[i], params[i] if buffers is None else buffers[i], params[i].numel()),
            lambda i: params[i].numel(), SLOTS, SGD_BLOCK):
        _release_sgd_kernel[grid](
            *slots, lr_ptr, 0.0 if lr_ptr is not None else float(lr), found_inf, float(momentum),
            float(weight_decay), PASSES=k, HAS_MOMENTUM=buffers is not None, LR_FROM_PTR=lr_ptr is not None,
            HAS_FOUND_INF=found_inf is not None, BLOCK=SGD_BLOCK, num_warps=SGD_NUM_WARPS)
