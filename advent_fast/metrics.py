"""Confusion matrix and IoU on the device, as the release computes them (``fast_hist``, ``per_class_iu``).

Rows are ground truth, columns predictions. Labels outside [0, num_classes) -- the ignore label 255
among them -- are dropped. IoU = diag / (row + col - diag), NaN for a class that occurs in neither
prediction nor label; mIoU = nanmean x 100, over all classes or a subset (mIoU-16, mIoU-13 from one
matrix).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    def __init__(self, num_classes: int, device: Optional[torch.device | str] = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a batch of predicted and true train ids (same shape, any device; no host sync)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        if self.matrix.device != label.device:
            self.matrix = self.matrix.to(label.device)
        n = self.num_classes
        label, pred = label.reshape(-1).long(), pred.reshape(-1).to(label.device).long()
        valid = (label >= 0) & (label < n)
        # Invalid pixels go to one extra bin that is cut off, instead of a data-dependent boolean
        # gather, which would force a device->host synchronisation. index_add_, not bincount: on CUDA
        # bincount reads the index range back to the host.
        index = torch.where(valid, label * n + pred.clamp(0, n - 1), n * n)
        counts = torch.zeros(n * n + 1, dtype=torch.int64, device=index.device)
        counts.index_add_(0, index, index.new_ones(()).expand_as(index))
        self.matrix += counts[: n * n].view(n, n)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrices of all torch.distributed ranks (a no-op without a process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU in [0, 1] (float64, CPU); NaN where a class is in neither prediction nor label."""
        m = self.matrix.double().cpu()
        diag = m.diag()
        return diag / (m.sum(0) + m.sum(1) - diag)

    def miou(self, classes: Optional[Sequence[int]] = None) -> float:
        """nanmean of the IoU x 100, over all classes or the given subset (NaN if none occurs)."""
        iou = self.iou()
        if classes is not None:
            iou = iou[list(classes)]
        return float(torch.nanmean(iou) * 100)
