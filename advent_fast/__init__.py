"""advent_fast: ADVENT (Vu et al., CVPR 2019) with fused entropy kernels.

Drop-in losses::

    import advent_fast as af
    loss = af.entropy_loss(logits)               # release entropy_loss(softmax(x))
    d_input = af.self_information(logits)        # release prob_2_entropy(softmax(x))
"""
from .backend import get_backend, set_backend
from .losses import (
    TargetLosses,
    class_prior_loss,
    entropy_loss,
    entropy_map,
    self_information,
    target_losses,
)
from .upsampled import upsampled_cross_entropy, upsampled_target_losses

__version__ = "0.1.0"

__all__ = [
    "TargetLosses",
    "class_prior_loss",
    "entropy_loss",
    "entropy_map",
    "get_backend",
    "self_information",
    "set_backend",
    "target_losses",
    "upsampled_cross_entropy",
    "upsampled_target_losses",
]
