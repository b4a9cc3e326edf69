"""The Triton kernels on a real GPU: values, gradients, no host sync, CUDA-graph capture.

Skipped without CUDA. Run with ``TRITON_INTERPRET=0`` (conftest.py defaults it to 1), e.g. by
``benchmarks/run_gpu.sh``.
"""
import math
import os

import pytest
import torch

import advent_fast as af
from advent_fast import reference as ref
from test_losses import assert_swapped_classes_tie, swapped_class_logits

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and TRITON_INTERPRET=0",
)
DTYPES = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}


def prior_for(c, device="cuda"):
    p = torch.linspace(1, 3, c, device=device) ** 3
    return p / p.sum()


def losses(mod, x, prior):
    """All outputs of one module (fused or reference) as a flat list."""
    return [mod.entropy_loss(x), mod.entropy_loss(x, 0.3), mod.entropy_map(x).float(),
            mod.self_information(x), mod.class_prior_loss(x, prior, 0.8)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_swapped_classes_have_one_entropy_and_rank_as_a_tie(dtype):
    """Two classes in either order give bitwise the same entropy (the class sum is not contracted into a
    multiply-add, whose rounding depends on the order), so entropy ranking keeps such ties whole, as the
    release and the float64 reference do; also through the fused upsampling."""
    x = swapped_class_logits(dtype, 300, device="cuda")
    assert_swapped_classes_tie(x)
    # align_corners with 2h - 1 output rows: output row r + 16 interpolates rows 8-15 with the weights
    # that row r gives rows 0-7, so their logits are the same in swapped classes
    up = af.upsampled_target_losses(x, (31, 300), self_information=False, entropy_map=True).entropy_map
    assert torch.equal(up[:, :15], up[:, 16:])


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
# two classes first: the case that failed on an H200 (2026-11-27) before the ranked entropies lost their
# multiply-add contraction
@pytest.mark.parametrize("shape", [(3, 2, 17, 300), (2, 19, 65, 129), (1, 16, 91, 161)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_against_reference(dtype, shape, layout):
    torch.manual_seed(0)
    logits = (torch.randn(shape, device="cuda") * 4).to(dtype)
    logits[:, 1, :3] = -math.inf
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    prior = prior_for(shape[1])
    x = logits.detach().requires_grad_(True)
    x64 = logits.detach().double().requires_grad_(True)
    outs, outs64 = losses(af, x, prior), losses(ref, x64, prior.double())
    ups = [torch.randn(o.shape, device="cuda", dtype=torch.float64) for o in outs64]
    sum((o.double() * u).sum() for o, u in zip(outs, ups)).backward()
    sum((o * u).sum() for o, u in zip(outs64, ups)).backward()
    vtol, gtol = DTYPES[dtype]
    for i, (o, o64) in enumerate(zip(outs, outs64)):
        tol = vtol if o.dtype != torch.float32 else 1e-5
        err = (o.double() - o64).abs().max().item()
        assert err <= tol * max(o64.abs().max().item(), 1e-30), f"output {i}: {err}"
    err = (x.grad.double() - x64.grad).abs().max().item()
    assert err <= gtol * x64.grad.abs().max().item()
    assert torch.isfinite(x.grad).all()


def test_no_host_sync_and_graph_capture():
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 64, 128, device="cuda")
    prior = prior_for(19)
    x = logits.clone().requires_grad_(True)

    def step():
        res = af.target_losses(x, self_information=True, entropy=True, top_k=0.3, prior=prior)
        (res.self_information.mean() + res.entropy_loss + res.class_prior_loss).backward()
        # Detached: a result holding the autograd graph keeps x's AccumulateGrad node alive, with the
        # stream it was made on (the default one), and capture fails when the backward syncs with it.
        return res.entropy_loss.detach()

    step()  # compile the kernels outside the checks
    x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = step().clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager_grad = x.grad.clone()

    x.grad = torch.zeros_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad.zero_()
    with torch.cuda.graph(graph, stream=stream):
        captured = step()
    x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, eager_grad, rtol=0, atol=0)



@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    """Triton launches on the current device: the ops make the tensors' device current (cuda:1 here while
    cuda:0 is current), for the losses on the logits and on their upsampling, forward and backward."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.randn(2, 19, 17, 33, device="cuda:1")
    labels = torch.randint(0, 19, (2, 65, 129), device="cuda:1")
    prior = prior_for(19, device="cuda:1")
    torch.cuda.set_device(0)

    def losses_and_grad(x, fused):
        target = (af if fused else ref).target_losses(x, self_information=True, entropy=True, top_k=0.3,
                                                      prior=prior)
        if fused:
            up = af.upsampled_target_losses(x, (65, 129), entropy=True)
            ce = af.upsampled_cross_entropy(x, labels)
        else:
            u = F.interpolate(x, size=(65, 129), mode="bilinear", align_corners=True)
            up, ce = ref.target_losses(u, entropy=True), F.cross_entropy(u, labels, ignore_index=255)
        outs = [target.self_information.sum(), target.entropy_loss, target.class_prior_loss,
                up.self_information.sum(), up.entropy_loss, ce]
        sum(outs).backward()
        return outs + [x.grad]

    fused = losses_and_grad(logits.detach().requires_grad_(True), True)
    expected = losses_and_grad(logits.detach().double().requires_grad_(True), False)
    for i, (out, out64) in enumerate(zip(fused, expected)):
        assert out.device == torch.device("cuda:1")
        torch.testing.assert_close(out.double(), out64, rtol=1e-4, atol=1e-6, msg=lambda m: f"output {i}: {m}")
