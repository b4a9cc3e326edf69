"""Dilated convolutions run as undilated ones on the input's phases (``train.space_to_batch``).

A 3x3 convolution with dilation d and padding d reads, for output pixel (y, x), the inputs
(y + d*a, x + d*b) with a, b in {-1, 0, 1}: all in the same phase (y mod d, x mod d), one step apart
inside it. So it equals the undilated 3x3 convolution with padding 1 of each phase image, the phases
stacked along the batch (space to batch, as TensorFlow's ``atrous_conv2d`` runs it), the result put back
in place (batch to space). Where d does not divide the height or width (ResNet-101
at 1280x720 has 91x161 at output stride 8), the input is padded with zeros at the bottom and right first:
those zeros are what the dilated convolution's padding reads there, and the outputs computed at the padded
positions are cut off. Same values and gradients up to float rounding (the convolution sums in another
order); the parameters, state dict and module tree stay as they are.

Why: cuDNN has at times run dilated convolutions, their backward above all, several times slower than
undilated ones of the same size; what it costs inside the training step today is for
``benchmarks/bench_train_step.py --variants fast fast_space_to_batch`` to say. The rearrangements cost one
copy of the input and one of the output (a second each where d does not divide the size), forward and
backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels_last (and not also contiguous, as one-pixel images are)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def space_to_batch(x: torch.Tensor, d: int) -> torch.Tensor:
    """(N, C, H, W) -> (N*d*d, C, ceil(H/d), ceil(W/d)): batch index (n*d + i)*d + j holds image n's
    pixels (i + d*y, j + d*x), zeros past its bottom and right edges. channels_last stays channels_last."""
    n, c, h, w = x.shape
    hq, wq = -(-h // d), -(-w // d)
    channels_last = _is_channels_last(x)
    if (hq * d, wq * d) != (h, w):
        x = F.pad(x, (0, wq * d - w, 0, hq * d - h))
    if channels_last:  # rearranged as (N, H, W, C): one copy into a channels_last result
        phases = x.permute(0, 2, 3, 1).unflatten(2, (wq, d)).unflatten(1, (hq, d)).permute(0, 2, 4, 1, 3, 5)
        return phases.reshape(n * d * d, hq, wq, c).permute(0, 3, 1, 2)
    phases = x.unflatten(3, (wq, d)).unflatten(2, (hq, d)).permute(0, 3, 5, 1, 2, 4)
    return phases.reshape(n * d * d, c, hq, wq)


def batch_to_space(y: torch.Tensor, d: int, size: tuple[int, int], channels_last: bool) -> torch.Tensor:
    """The inverse of :func:`space_to_batch`, cut to ``size`` (H, W); contiguous, channels_last or not
    (phases of one pixel are both: the image's layout decides)."""
    h, w = size
    nd, c, hq, wq = y.shape
    n = nd // (d * d)
    if channels_last:
        x = y.permute(0, 2, 3, 1).unflatten(0, (n, d, d)).permute(0, 3, 1, 4, 2, 5).reshape(n, hq * d, wq * d, c)
        return x[:, :h, :w].contiguous().permute(0, 3, 1, 2)
    x = y.unflatten(0, (n, d, d)).permute(0, 3, 4, 1, 5, 2).reshape(n, c, hq * d, wq * d)
    return x[:, :, :h, :w].contiguous()


class _PhaseForward:
    """A convolution's forward on the phases of its input: its own class's forward (plain, folded with its
    BatchNorm, with cast weights: whatever it is) on :func:`space_to_batch` of the input. An object, not a
    bound function, so that the model still pickles and deep-copies (each copy with its own)."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv, d = self.conv, self.conv.space_to_batch
        y = type(conv).forward(conv, space_to_batch(x, d))
        return batch_to_space(y, d, tuple(x.shape[-2:]), _is_channels_last(x))


def _takes_phases(m: nn.Module) -> bool:
    """A 3x3 convolution with one dilation d > 1 on both axes, zero padding d and stride 1."""
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)
            and m.dilation[0] == m.dilation[1] > 1 and m.padding == m.dilation and m.padding_mode == "zeros")


def use_space_to_batch(module: nn.Module) -> int:
    """Every dilated 3x3 convolution of ``module`` runs on the input's phases, in place; returns how many. Of a
    segmentation model, those of its backbone (``backbone_roots``; the classifier heads' dilations, 6 to 24,
    would make 36 to 576 phases of a few pixels each): ResNet-101 26, layer3's at d = 2 and layer4's at
    d = 4; VGG-16 5; the small model 2. Each keeps its class and parameters; its ``dilation`` and ``padding``
    become 1 and its ``space_to_batch`` attribute holds d. Idempotent: a second call returns 0."""
    roots = module.backbone_roots() if hasattr(module, "backbone_roots") else [module]
    convs = [m for root in roots for m in root.modules() if _takes_phases(m)]
    for conv in convs:
        conv.space_to_batch = conv.dilation[0]
        conv.dilation, conv.padding = (1, 1), (1, 1)
        conv.forward = _PhaseForward(conv)  # calls the class's forward: also after a class change (folding)
    return len(convs)
