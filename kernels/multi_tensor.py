"""Launch plans of the multi-tensor kernels (release_sgd.py, weight_cast.py).

Such a kernel takes up to a fixed number of tensors a launch ("slots"), each as separate pointer and size
arguments, not as a device table of addresses: a captured CUDA graph bakes kernel arguments, so a replay
works on the tensors it was captured with without a table to keep. Program (block, slot) takes a block of
its slot's tensor.
"""
from .softmax_entropy import ceil_div


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
