"""The release's fully convolutional discriminator (DCGAN-like, one per head)."""
from __future__ import annotations

from torch import nn


class FCDiscriminator(nn.Sequential):
    """Five 4x4 stride-2 convs, C -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1, LeakyReLU(0.2) between,
    no normalisation; outputs a map of logits at 1/32 of the input size.

    An ``nn.Sequential`` so state-dict keys are the release's ``0.weight`` ... ``8.bias``.
    """

    def __init__(self, num_classes: int, ndf: int = 64):
        widths = (num_classes, ndf, ndf * 2, ndf * 4, ndf * 8)
        layers: list[nn.Module] = []
        for in_ch, out_ch in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1),
                       nn.LeakyReLU(negative_slope=0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, kernel_size=4, stride=2, padding=1))
        super().__init__(*layers)
        self.num_classes = num_classes
