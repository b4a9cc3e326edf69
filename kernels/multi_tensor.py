"""Launch plans of the multi-tensor kernels (release_sgd.py, weight_cast.py).

Such a kernel takes up to a fixed number of tensors a launch ("slots"), each as separate pointer and size
arguments, not as a device table of addresses: a captured CUDA graph bakes kernel arguments, so a replay
works on the tensors it was captured with without a table to keep. Program (block, slot) takes a block of
its slot's tensor.
"""
import triton
import triton.language as tl  # noqa: F401  (the interpreter wants it in a jit function's globals)

from .softmax_entropy import ceil_div

SLOTS = 8  # tensors a launch: the kernels' argument slots, each (3 pointers, an element count)


def slot_launches(groups, slot_args, numel, slots: int, block: int):
    """(group key, grid, arguments) of each launch: for each group (key -> tensor indices, one compiled
    variant of the kernel), its tensors sorted by size (similar sizes share a launch: fewer idle programs)
    and ``slots`` a launch, each tensor's ``slot_args(i)``; unused slots repeat the first tensor's (never
    read: no program takes them). The grid: blocks of the launch's largest tensor x its tensors."""
    for key, members in groups.items():
        members = sorted(members, key=numel)
        for first in range(0, len(members), slots):
            chunk = members[first:first + slots]
            args = [a for i in chunk for a in slot_args(i)]
            args += args[:len(args) // len(chunk)] * (slots - len(chunk))
            yield key, (ceil_div(max(numel(i) for i in chunk), block), len(chunk)), args


@triton.jit
def slot_arguments(slot, a0, b0, c0, n0, a1, b1, c1, n1, a2, b2, c2, n2, a3, b3, c3, n3,
                   a4, b4, c4, n4, a5, b5, c5, n5, a6, b6, c6, n6, a7, b7, c7, n7):
    """The (3 pointers, element count) of launch slot ``slot`` (the program's axis-1 index)."""
    a, b, c, n = a0, b0, c0, n0
    if slot == 1:
        a, b, c, n = a1, b1, c1, n1
    if slot == 2:
        a, b, c, n = a2, b2, c2, n2
    if slot == 3:
        a, b, c, n = a3, b3, c3, n3
    if slot == 4:
        a, b, c, n = a4, b4, c4, n4
    if slot == 5:
        a, b, c, n = a5, b5, c5, n5
    if slot == 6:
        a, b, c, n = a6, b6, c6, n6
    if slot == 7:
        a, b, c, n = a7, b7, c7, n7
    return a, b, c, n
