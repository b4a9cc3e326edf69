"""Naive PyTorch losses, written the way the ADVENT release computes them.

Softmax first, then ``log2(p + 1e-30) / log2(C)``, in the logits' own dtype; the result is
cast to float32 at the end (float64 inputs stay float64, which is how tests build an exact
reference). Same signatures as the fused ops in :mod:`advent_fast.losses`; tests and
benchmarks compare against these.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "TargetLosses",
    "class_prior_loss",
    "entropy_loss",
    "entropy_map",
    "ranked_pixel_count",
    "self_information",
    "target_losses",
]


class TargetLosses(NamedTuple):
    """What the fused target call returns; fields that were not asked for are None."""

    self_information: Optional[torch.Tensor]
    entropy_loss: Optional[torch.Tensor]
    class_prior_loss: Optional[torch.Tensor]
    entropy_map: Optional[torch.Tensor]


def ranked_pixel_count(top_k: float, num_pixels: int) -> int:
    """k = ceil(top_k * num_pixels), computed exactly on the float's rational value.

    ``0.3 * 10`` is 3.0000000000000004 in floating point and would give 4; the exact
    product of the float 0.3 (slightly below 3/10) and 10 is below 3, so k = 3.
    Integer arithmetic (not ``fractions``) so that torch.compile traces it.
    """
    numerator, denominator = float(top_k).as_integer_ratio()
    return max(1, min(num_pixels, -(-numerator * num_pixels // denominator)))


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def self_information(logits: torch.Tensor) -> torch.Tensor:
    """Release ``prob_2_entropy(F.softmax(x, 1))``: -p log2(p + 1e-30) / log2(C), per class."""
    p = F.softmax(logits, dim=1)
    return -p * torch.log2(p + 1e-30) / math.log2(logits.shape[1])


def entropy_map(logits: torch.Tensor) -> torch.Tensor:
    """Normalised entropy per pixel, (N, *spatial), in [0, 1]."""
    return self_information(logits).sum(dim=1).to(_out_dtype(logits))


def entropy_loss(logits: torch.Tensor, top_k: Optional[float] = None) -> torch.Tensor:
    """Release ``entropy_loss(F.softmax(x, 1))`` (mean of the entropy map); with ``top_k``,
    entropy ranking: per image the mean over pixels whose entropy is >= the k-th largest
    (ties kept, NaN counts as largest), then the mean over images."""
    ent = entropy_map(logits)
    if top_k is None:
        return ent.mean()
    flat = ent.flatten(1)
    if flat.numel() == 0:
        return flat.sum() * float("nan")
    k = ranked_pixel_count(top_k, flat.shape[1])
    threshold = flat.detach().topk(k, dim=1).values[:, -1:]
    keep = (flat.detach() >= threshold) | flat.detach().isnan()
    kept_sum = torch.where(keep, flat, torch.zeros_like(flat)).sum(dim=1)
    return (kept_sum / keep.sum(dim=1)).mean()


def class_prior_loss(logits: torch.Tensor, prior: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """Paper Eq. 10: sum_c max(0, mu * prior_c - mean_{pixels} p_c) per image, mean over images."""
    p = F.softmax(logits, dim=1)
    class_mean = p.flatten(2).mean(dim=2)
    gap = mu * prior.to(class_mean.dtype) - class_mean
    # relu keeps NaN (a NaN class mean gives a NaN loss).
    return torch.relu(gap).sum(dim=1).mean().to(_out_dtype(logits))


def target_losses(
    logits: torch.Tensor,
    *,
    self_information: bool = True,
    entropy: bool = False,
    top_k: Optional[float] = None,
    prior: Optional[torch.Tensor] = None,
    mu: float = 0.5,
    entropy_map: bool = False,
) -> TargetLosses:
    """The separate reference ops, bundled like :func:`advent_fast.target_losses`."""
    return TargetLosses(
        _self_information(logits) if self_information else None,
        _entropy_loss(logits, top_k) if entropy else None,
        _class_prior_loss(logits, prior, mu) if prior is not None else None,
        _entropy_map(logits) if entropy_map else None,
    )


# Aliases for target_losses, whose keyword arguments shadow the functions' names.
_self_information, _entropy_loss, _class_prior_loss, _entropy_map = (
    self_information,
    entropy_loss,
    class_prior_loss,
    entropy_map,
)
