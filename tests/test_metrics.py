"""ConfusionMatrix against a brute-force numpy computation, subsets, and the all-reduce across ranks."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advent_fast.data.classes import CLASSES_13_OF_16
from advent_fast.metrics import ConfusionMatrix


def brute_force(preds, labels, n):
    """Release semantics, one pixel at a time: labels outside [0, n) are dropped."""
    matrix = np.zeros((n, n), np.int64)
    for pred, label in zip(preds, labels):
        for p, t in zip(pred.ravel(), label.ravel()):
            if 0 <= t < n:
                matrix[t, p] += 1
    iou = []
    for c in range(n):
        union = matrix[c, :].sum() + matrix[:, c].sum() - matrix[c, c]
        iou.append(matrix[c, c] / union if union else math.nan)
    return matrix, np.array(iou)


def random_batches(n, count=3, shape=(2, 9, 11), seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        label = rng.integers(0, n, shape)
        label[rng.random(shape) < 0.2] = 255
        label[rng.random(shape) < 0.02] = n  # out of range: dropped, as the release's fast_hist does
        pred = rng.integers(0, n, shape)
        batches.append((pred, label))
    return batches


def test_matches_brute_force_over_several_batches():
    n = 7
    batches = random_batches(n)
    # Class 5 is absent from labels and predictions: NaN. Class 6 only ever predicted: IoU 0.
    for pred, label in batches:
        pred[pred == 5] = 6
        label[(label == 5) | (label == 6)] = 0
    cm = ConfusionMatrix(n)
    for pred, label in batches:
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    matrix, iou = brute_force([p for p, _ in batches], [t for _, t in batches], n)
    assert np.array_equal(cm.matrix.numpy(), matrix)
    np.testing.assert_allclose(cm.iou().numpy(), iou, equal_nan=True)
    assert math.isnan(cm.iou()[5]) and cm.iou()[6] == 0
    assert cm.miou() == pytest.approx(np.nanmean(iou) * 100)
    assert ((cm.iou()[~cm.iou().isnan()] >= 0) & (cm.iou()[~cm.iou().isnan()] <= 1)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_update_on_cuda_matches_the_cpu_without_a_host_sync():
    n = 19
    batches = random_batches(n, shape=(2, 64, 128))
    cpu, gpu = ConfusionMatrix(n), ConfusionMatrix(n, device="cuda")
    device_batches = [(torch.from_numpy(p).cuda(), torch.from_numpy(t).cuda()) for p, t in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # evaluation queues the next image while this one counts
    try:
        for pred, label in device_batches:
            gpu.update(pred, label)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for pred, label in batches:
        cpu.update(torch.from_numpy(pred), torch.from_numpy(label))
    assert torch.equal(gpu.matrix.cpu(), cpu.matrix)


def test_subset_means_from_one_matrix():
    cm = ConfusionMatrix(16)
    for pred, label in random_batches(16, seed=1):
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    iou = cm.iou().numpy()
    assert cm.miou(CLASSES_13_OF_16) == pytest.approx(np.nanmean(iou[list(CLASSES_13_OF_16)]) * 100)
    assert cm.miou(range(16)) == pytest.approx(cm.miou())
    assert cm.miou([0, 3]) == pytest.approx((iou[0] + iou[3]) / 2 * 100)


def test_empty_matrix_is_nan_and_reset_clears():
    cm = ConfusionMatrix(3)
    assert math.isnan(cm.miou()) and cm.iou().isnan().all()
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert cm.miou([0, 1]) == 100.0 and math.isnan(cm.iou()[2])
    cm.reset()
    assert cm.matrix.sum() == 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


def _rank(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(4)
        pred, label = random_batches(4, count=1, seed=10 + rank)[0]
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
        cm.all_reduce()
        torch.save(cm.matrix, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_the_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks start in a fraction of a second (spawn re-imports torch in each).
    mp.start_processes(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    expected = sum(
        torch.from_numpy(brute_force([p], [t], 4)[0])
        for p, t in (random_batches(4, count=1, seed=10 + r)[0] for r in range(2))
    )
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected)


def test_all_reduce_without_a_process_group_is_a_no_op():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1]), torch.tensor([1]))
    assert cm.all_reduce().matrix.tolist() == [[0, 0], [0, 1]]
