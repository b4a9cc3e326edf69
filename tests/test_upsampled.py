"""Losses on bilinearly upsampled logits (advent_fast/upsampled.py, kernels/upsampled_*.py) against
upsample-then-loss.

The reference upsamples the same (dtype-rounded) logits with F.interpolate in float64 and evaluates
the losses there (advent_fast.reference, or F.cross_entropy); gradients come from autograd through
both, with random upstream gradients. Non-finite inputs are compared with F.interpolate in float32,
whose index and weight math the kernels reproduce. The kernels run under the Triton interpreter
(tests/conftest.py), so shapes are tiny; with TRITON_INTERPRET=0 and a GPU the same tests run them on
CUDA tensors.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import advent_fast as af
from advent_fast import reference as ref
from advent_fast import upsampled as up
from advent_fast.kernels.bilinear import axis_scale, cell_start
from advent_fast.upsampled import upsampled_cross_entropy, upsampled_target_losses

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
# Two variants of a kernel (constexpr flags: which outputs) sum in the same order: the interpreter gives
# the same bits; compiled for a GPU, each variant's multiply-adds may be contracted differently.
VARIANTS_TOL = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=2e-6, atol=1e-7)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (relative tolerance of outputs stored in the logits' dtype, relative gradient tolerance); float32
# outputs (losses, entropy map) are exact to float32 whatever the dtype.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}
F32_TOL = 2e-6
IGNORE = 255


@pytest.fixture
def triton_backend():
    af.set_backend("triton")
    yield
    af.set_backend(None)


def make_logits(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def make_labels(n, c, size, ignored=0.25, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,) + tuple(size), generator=g)
    labels[torch.rand(labels.shape, generator=g) < ignored] = IGNORE
    return labels.to(DEVICE)


def make_prior(c, seed=2):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(c, generator=g) ** 2 + 0.05
    return (p / p.sum()).to(DEVICE)


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def assert_close_rel(actual, expected, rtol, name):
    """max |actual - expected| <= rtol * max |expected| (NaN-free inputs)."""
    expected = expected.to(actual.device).double()
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.double() - expected).abs().max()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} x {scale:.3g}"


def assert_same_nan_and_close(actual, expected, name, rtol=1e-4):
    """Identical NaN (and infinity) positions; the finite values close."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN positions differ"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{name}: infinite positions differ"
    finite = expected.isfinite()
    if finite.any():
        assert_close_rel(actual[finite], expected[finite], rtol, name)


# ------------------------------------------------------------------------------------------------
# float64 references
# ------------------------------------------------------------------------------------------------
def ce_reference(logits, labels, ignore_index=IGNORE):
    """Loss and logits-gradient of F.cross_entropy(F.interpolate(x)) in float64 (upstream gradient 1)."""
    x64 = logits.detach().double().requires_grad_(True)
    loss = F.cross_entropy(upsample(x64, labels.shape[-2:]), labels.long(), ignore_index=ignore_index)
    loss.backward()
    return loss.detach(), x64.grad


def ce_fused(logits, labels, ignore_index=IGNORE):
    x = logits.detach().clone().requires_grad_(True)
    loss = upsampled_cross_entropy(x, labels, ignore_index)
    loss.backward()
    return loss.detach(), x.grad


def target_reference(u, prior=None, mu=0.5, keep=None):
    """The contract's target outputs of float64 full-resolution logits u; keep (N, H, W) turns on ranking."""
    c = u.shape[1]
    lp = torch.log_softmax(u, dim=1)
    p = lp.exp()
    info = -p * torch.where(p == 0, 0.0, lp) / math.log(c)
    emap = info.sum(dim=1)
    if keep is None:
        ent = emap.mean()
    else:
        ent = (torch.where(keep, emap, 0.0).flatten(1).sum(1) / keep.flatten(1).sum(1)).mean()
    out = dict(info=info, emap=emap, ent=ent)
    if prior is not None:
        gap = mu * prior.double() - p.flatten(2).mean(2)
        out["cp"] = torch.where(gap < 0, 0.0, gap).sum(1).mean()
    return out


def kept_pixels(emap, top_k):
    """The ranking's selection on the kernel's own float32 entropy map (ties and NaN kept)."""
    flat = emap.detach().flatten(1)
    k = ref.ranked_pixel_count(top_k, flat.shape[1])
    thresh = flat.topk(k, dim=1).values[:, -1]
    return ((flat >= thresh[:, None]) | flat.isnan()).view(emap.shape)


def check_target(logits, size, prior=None, top_k=None, mu=0.5, seed=3):
    """Every output of upsampled_target_losses and the logits' gradient (random upstream gradients
    for the maps, random scalars for the losses) against the float64 reference."""
    x = logits.detach().clone().requires_grad_(True)
    res = upsampled_target_losses(x, size, self_information=True, entropy=True, top_k=top_k, prior=prior,
                                  mu=mu, entropy_map=True)
    keep = kept_pixels(res.entropy_map, top_k) if top_k is not None else None
    x64 = logits.detach().double().requires_grad_(True)
    expected = target_reference(upsample(x64, size), prior, mu, keep)

    vtol, gtol = TOL[logits.dtype]
    n, c = logits.shape[:2]
    assert res.self_information.shape == (n, c) + tuple(size) and res.self_information.dtype == logits.dtype
    assert res.entropy_map.shape == (n,) + tuple(size) and res.entropy_map.dtype == torch.float32
    assert_close_rel(res.self_information, expected["info"], vtol, "self_information")
    assert_close_rel(res.entropy_map, expected["emap"], F32_TOL, "entropy_map")
    assert_close_rel(res.entropy_loss, expected["ent"], F32_TOL, "entropy_loss")
    if prior is not None:
        assert_close_rel(res.class_prior_loss, expected["cp"], F32_TOL, "class_prior_loss")

    g = torch.Generator().manual_seed(seed)
    up_info = torch.randn(res.self_information.shape, generator=g, dtype=torch.float64)
    up_emap = torch.randn(res.entropy_map.shape, generator=g, dtype=torch.float64)
    scalars = torch.randn(2, generator=g, dtype=torch.float64) * 100  # the loss gradients are ~1/pixels
    names = ["info", "emap", "ent"] + (["cp"] if prior is not None else [])
    fused = [res.self_information, res.entropy_map, res.entropy_loss, res.class_prior_loss]
    upstream = [up_info, up_emap, scalars[0], scalars[1]]
    sum(((f.double() * u.to(DEVICE)).sum() for f, u in zip(fused, upstream[:len(names)]))).backward()
    sum(((expected[k] * u.to(DEVICE)).sum() for k, u in zip(names, upstream))).backward()
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    assert_close_rel(x.grad, x64.grad, gtol, "grad")
    return res, x.grad


# ------------------------------------------------------------------------------------------------
# index math
# ------------------------------------------------------------------------------------------------
@triton.jit
def cell_starts_kernel(out_ptr, in_size, out_size, scale, BLOCK: tl.constexpr):
    c = tl.arange(0, BLOCK)
    tl.store(out_ptr + c, cell_start(c, in_size, out_size, scale))


def test_cell_start_matches_float32_index_math():
    """cell_start(c) is the first output index whose float32 floor(i * scale) reaches c, for the
    release's sizes and odd ones (downsampling, size 1, exact and inexact scales)."""
    pairs = [(65, 512), (129, 1024), (91, 720), (161, 1280), (129, 2048), (257, 2048), (33, 49), (5, 33),
             (7, 45), (13, 100), (1, 7), (7, 1), (1, 1), (2, 2), (9, 4), (17, 5), (300, 1001), (1024, 2047)]
    for in_size, out_size in pairs:
        scale = axis_scale(in_size, out_size)
        src = np.arange(out_size, dtype=np.float32) * np.float32(scale)  # ATen: float32 product
        floor = np.minimum(src.astype(np.int64), in_size - 1)
        expected = np.searchsorted(floor, np.arange(in_size + 2), side="left")
        block = triton.next_power_of_2(in_size + 2)
        got = torch.zeros(block, dtype=torch.int32, device=DEVICE)
        cell_starts_kernel[(1,)](got, in_size, out_size, scale, BLOCK=block)
        assert np.array_equal(got[: in_size + 2].cpu().numpy(), expected), (in_size, out_size)


# ------------------------------------------------------------------------------------------------
# source cross-entropy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [2, 19])
def test_cross_entropy_values_and_gradients(triton_backend, C, dtype):
    logits = make_logits((2, C, 3, 4), dtype)
    labels = make_labels(2, C, (17, 26))  # rows x8 exactly (zero weights), columns x8.33
    loss, grad = ce_fused(logits, labels)
    loss64, grad64 = ce_reference(logits, labels)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close_rel(loss, loss64, F32_TOL, "loss")
    assert_close_rel(grad, grad64, TOL[dtype][1], "grad")


SHAPES = [
    ((1, 19, 3, 5), (17, 33)),  # two cell blocks per row, scale 8 exactly
    ((1, 19, 4, 3), (13, 20)),  # non-integer scales, odd sizes
    ((1, 2, 9, 17), (65, 129)),  # the release's ratio (x8) on odd sizes
    ((2, 19, 1, 6), (3, 23)),  # a size-1 low-res axis
    ((1, 19, 5, 1), (9, 4)),  # the other one
    ((1, 3, 7, 9), (4, 5)),  # downsampling: some low-res pixels get no gradient
    ((1, 19, 3, 4), (1, 1)),  # output size 1: scale 0
]


@pytest.mark.parametrize("shape, size", SHAPES, ids=str)
def test_cross_entropy_shapes(triton_backend, shape, size):
    logits = make_logits(shape)
    labels = make_labels(shape[0], shape[1], size, ignored=0.1)
    loss, grad = ce_fused(logits, labels)
    loss64, grad64 = ce_reference(logits, labels)
    assert_close_rel(loss, loss64, F32_TOL, "loss")
    assert_close_rel(grad, grad64, 1e-4, "grad")


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_cross_entropy_layouts(triton_backend, layout):
    logits, labels = layout_logits(layout), make_labels(2, 19, (11, 13))
    labels_strided = labels.transpose(1, 2).contiguous().transpose(1, 2)  # labels of any strides too
    loss, grad = ce_fused(logits, labels_strided)
    loss64, grad64 = ce_reference(logits, labels)
    assert_close_rel(loss, loss64, F32_TOL, "loss")
    assert_close_rel(grad, grad64, 1e-4, "grad")
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)


def layout_logits(layout):
    """(2, 19, 4, 5) logits that are not contiguous NCHW."""
    if layout == "channels_last":
        return make_logits((2, 19, 4, 5)).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # strided batch, classes and columns
        return make_logits((3, 23, 4, 10))[::2, 2:21, :, ::2]
    if layout == "transposed":  # spatial dims swapped in memory
        return make_logits((2, 19, 5, 4)).transpose(2, 3)
    raise ValueError(layout)


@pytest.mark.parametrize("label_dtype, ignore_index", [(torch.uint8, 255), (torch.int32, 255),
                                                       (torch.int64, -100), (torch.int64, 0)])
def test_cross_entropy_label_dtypes_and_ignore_index(triton_backend, label_dtype, ignore_index):
    logits = make_logits((1, 19, 3, 4))
    labels = make_labels(1, 19, (9, 10), ignored=0.0)
    labels[:, :3] = ignore_index if ignore_index >= 0 else -100
    if label_dtype == torch.uint8:
        labels[:, 3:5] = 255  # ignored
    loss, grad = ce_fused(logits, labels.to(label_dtype), ignore_index)
    loss64, grad64 = ce_reference(logits, labels, ignore_index)
    assert_close_rel(loss, loss64, F32_TOL, "loss")
    assert_close_rel(grad, grad64, 1e-4, "grad")


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the interpreter's 0 / 0
def test_cross_entropy_all_ignored_is_nan_with_zero_gradient(triton_backend):
    logits = make_logits((1, 19, 3, 4))
    labels = torch.full((1, 9, 10), IGNORE, dtype=torch.int64, device=DEVICE)
    loss, grad = ce_fused(logits, labels)
    loss64, grad64 = ce_reference(logits, labels)
    assert loss.isnan() and loss64.isnan()
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(grad64, torch.zeros_like(grad64))


@pytest.mark.parametrize("bad", [19, -1])
def test_cross_entropy_kernel_gives_nan_for_a_label_out_of_range(triton_backend, bad):
    """What device labels out of [0, C) give (only host labels are checked, to keep the step free of
    host synchronisation): a NaN loss and NaN gradient partials, never a finite wrong loss."""
    logits, labels = make_logits((1, 19, 3, 4)), make_labels(1, 19, (9, 10))
    labels[0, 4, 5] = bad
    loss, _, parts = torch.ops.advent_fast.upsampled_cross_entropy_forward(logits, labels, IGNORE, True)
    assert loss.isnan() and parts.isnan().any()


def test_cross_entropy_computes_gradient_partials_only_for_autograd(triton_backend, monkeypatch):
    wanted = []
    real = up._ce_op
    monkeypatch.setattr(up, "_ce_op", lambda *args: wanted.append(args[-1]) or real(*args))
    logits, labels = make_logits((1, 19, 3, 4)).requires_grad_(True), make_labels(1, 19, (9, 10))
    with torch.no_grad():
        upsampled_cross_entropy(logits, labels)
    upsampled_cross_entropy(logits.detach(), labels)
    upsampled_cross_entropy(logits, labels)
    assert wanted == [False, False, True]


def test_cross_entropy_no_grad_computes_no_gradient(triton_backend):
    """Without autograd the forward skips the gradient partials; with it they give the same loss."""
    logits, labels = make_logits((1, 19, 3, 4)), make_labels(1, 19, (9, 10))
    loss, count, parts = torch.ops.advent_fast.upsampled_cross_entropy_forward(logits, labels, IGNORE, False)
    assert parts.numel() == 0
    assert count.item() == (labels != IGNORE).sum().item()
    with torch.no_grad():
        torch.testing.assert_close(upsampled_cross_entropy(logits.requires_grad_(True), labels), loss, **VARIANTS_TOL)
    loss_grad, _, parts_grad = torch.ops.advent_fast.upsampled_cross_entropy_forward(logits, labels, IGNORE, True)
    torch.testing.assert_close(loss_grad, loss, **VARIANTS_TOL)
    assert parts_grad.shape == (4, 1, 3, 4, 19)


# ------------------------------------------------------------------------------------------------
# target losses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [2, 19])
def test_target_values_and_gradients(triton_backend, C, dtype):
    check_target(make_logits((2, C, 3, 4), dtype), (9, 14), prior=make_prior(C), top_k=0.3)


@pytest.mark.parametrize("shape, size", SHAPES, ids=str)
def test_target_shapes(triton_backend, shape, size):
    check_target(make_logits(shape), size, prior=make_prior(shape[1]))


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_target_layouts(triton_backend, layout):
    logits = layout_logits(layout)
    res, grad = check_target(logits, (11, 13), prior=make_prior(19), top_k=0.5)
    if layout == "channels_last":  # like F.interpolate, the map and the gradient keep the layout
        assert res.self_information.is_contiguous(memory_format=torch.channels_last)
        assert grad.is_contiguous(memory_format=torch.channels_last)
    else:
        assert res.self_information.is_contiguous()


def test_target_upstream_info_gradient_of_any_strides(triton_backend):
    """The discriminator's gradient may arrive channels_last or transposed."""
    logits = make_logits((1, 19, 3, 4))
    for make_grad in (lambda g: g.contiguous(memory_format=torch.channels_last),
                      lambda g: g.transpose(2, 3).contiguous().transpose(2, 3)):
        x = logits.clone().requires_grad_(True)
        info = upsampled_target_losses(x, (9, 10)).self_information
        g = make_grad(torch.randn(info.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE))
        info.backward(g)
        x64 = logits.double().requires_grad_(True)
        target_reference(upsample(x64, (9, 10)))["info"].backward(g.double())
        assert_close_rel(x.grad, x64.grad, 1e-4, "grad")


@pytest.mark.parametrize("top_k", [1e-9, 0.3, 1.0])
def test_target_ranking(triton_backend, top_k):
    """k = 1, 30 % and all pixels; the threshold is the exact k-th largest of the entropy map."""
    res, _ = check_target(make_logits((2, 19, 3, 4)), (9, 10), top_k=top_k)
    plain = upsampled_target_losses(make_logits((2, 19, 3, 4)), (9, 10), self_information=False,
                                    entropy=True).entropy_loss
    if top_k == 1.0:
        torch.testing.assert_close(res.entropy_loss, plain, rtol=1e-6, atol=0)
    if top_k == 1e-9:  # the largest entropy of each image
        torch.testing.assert_close(res.entropy_loss, res.entropy_map.flatten(1).max(1).values.mean(),
                                   rtol=1e-6, atol=0)


def test_target_class_prior_hinges(triton_backend):
    """Hinges active for some classes only (all active: the gradient vanishes, the means sum to 1)."""
    logits = make_logits((2, 5, 3, 4))
    mean_p = torch.softmax(upsample(logits.double(), (9, 10)), 1).flatten(2).mean(2)
    prior = torch.zeros(5, device=DEVICE)
    prior[[0, 2]] = (mean_p.max(0).values[[0, 2]] * 1.5 / 0.5).float()
    x = logits.clone().requires_grad_(True)
    cp = upsampled_target_losses(x, (9, 10), self_information=False, prior=prior).class_prior_loss
    cp.backward()
    assert cp.item() > 0 and x.grad.abs().max() > 0
    check_target(logits, (9, 10), prior=prior)


def test_target_fused_equals_separate(triton_backend):
    logits, prior = make_logits((2, 19, 3, 4)), make_prior(19)
    size = (9, 10)
    res = upsampled_target_losses(logits, size, entropy=True, top_k=0.3, prior=prior, entropy_map=True)
    alone = dict(
        self_information=upsampled_target_losses(logits, size).self_information,
        entropy_loss=upsampled_target_losses(logits, size, self_information=False, entropy=True,
                                              top_k=0.3).entropy_loss,
        class_prior_loss=upsampled_target_losses(logits, size, self_information=False,
                                                 prior=prior).class_prior_loss,
        entropy_map=upsampled_target_losses(logits, size, self_information=False, entropy_map=True).entropy_map,
    )
    for name, value in alone.items():
        torch.testing.assert_close(getattr(res, name), value, **VARIANTS_TOL, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(res.entropy_map, res.self_information.sum(1), rtol=1e-6, atol=1e-6)
    assert upsampled_target_losses(logits, size, self_information=False) == (None, None, None, None)


def test_target_equals_interpolate_then_target_losses(triton_backend):
    """The promise of the API: advent_fast.target_losses of the interpolated logits (same backend)."""
    logits, prior = make_logits((1, 19, 4, 3)), make_prior(19)
    kwargs = dict(entropy=True, top_k=0.25, prior=prior, entropy_map=True)
    fused = upsampled_target_losses(logits, (13, 20), **kwargs)
    separate = af.target_losses(upsample(logits, (13, 20)), **kwargs)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# non-finite logits: as F.interpolate (float32) and then the loss
# ------------------------------------------------------------------------------------------------
def minus_inf_logits(size_case):
    """-inf logits on some low-res pixels of one class: taps with weight exactly 0 (scale 1/8) or tiny."""
    shape, size = size_case
    logits = make_logits(shape)
    logits[0, 3, 1, 2] = -math.inf  # one pixel, one class
    logits[:, 5, 0, :] = -math.inf  # a whole row of a class
    logits[-1, :, 2, 3] = -math.inf  # a pixel with every class -inf: NaN around it
    return logits, size


INF_CASES = [((1, 19, 3, 4), (17, 25)), ((2, 19, 4, 5), (11, 13))]  # exact x8 scale, inexact scales


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", INF_CASES, ids=str)
def test_minus_inf_logits_like_interpolate(triton_backend, case):
    """Against ATen's CPU interpolation, which the kernels follow: where a rounded source coordinate is a
    whole number its weight is exactly 0 and 0 * -inf is NaN. ATen's CUDA kernel may contract that
    product and subtraction into one fma (a tiny weight, -inf instead of NaN)."""
    logits, size = minus_inf_logits(case)
    prior = make_prior(19)
    kwargs = dict(entropy=True, prior=prior, entropy_map=True)
    x = logits.clone().requires_grad_(True)
    res = upsampled_target_losses(x, size, **kwargs)
    x32 = logits.detach().cpu().clone().requires_grad_(True)
    u = upsample(x32, size)
    assert u.isnan().any() and (u == -math.inf).any()  # both effects present
    expected = target_reference(u.double(), prior.cpu())
    assert_same_nan_and_close(res.self_information, expected["info"], "self_information")
    assert_same_nan_and_close(res.entropy_map, expected["emap"], "entropy_map")
    assert res.entropy_loss.isnan() and res.class_prior_loss.isnan()
    g = torch.Generator().manual_seed(7)
    upstream = torch.randn(res.self_information.shape, generator=g)
    res.self_information.backward(upstream.to(DEVICE))
    ref_info = target_reference(u, None)["info"]  # float32 autograd through F.interpolate
    ref_info.backward(upstream)
    assert_same_nan_and_close(x.grad, x32.grad, "grad", rtol=1e-3)

    # source cross-entropy: a -inf label logit is an infinite loss
    labels = make_labels(logits.shape[0], 19, size)
    loss, grad = ce_fused(logits, labels)
    x32.grad = None
    loss32 = F.cross_entropy(upsample(x32, size), labels.cpu(), ignore_index=IGNORE)
    loss32.backward()
    assert_same_nan_and_close(loss, loss32, "loss")
    assert_same_nan_and_close(grad, x32.grad, "ce grad", rtol=1e-3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_logit_propagates_to_its_support_only(triton_backend):
    """A NaN low-res logit makes the full-res pixels it touches NaN, every loss NaN, and the gradient
    NaN on the taps of those pixels, exactly as upsample-then-loss; at ignored pixels only the
    gradient is NaN (torch's softmax backward 0 - p * 0)."""
    logits = make_logits((1, 19, 4, 5))
    logits[0, 7, 1, 2] = math.nan
    size = (13, 17)
    x = logits.clone().requires_grad_(True)
    res = upsampled_target_losses(x, size, entropy=True, top_k=0.2, entropy_map=True)
    x32 = logits.clone().requires_grad_(True)
    u = upsample(x32, size)
    expected = target_reference(u, None)
    assert_same_nan_and_close(res.entropy_map, expected["emap"], "entropy_map")
    assert res.entropy_loss.isnan()
    (res.self_information.sum() + res.entropy_loss).backward()
    expected["info"].sum().backward()
    assert torch.equal(x.grad.isnan(), x32.grad.isnan())

    touched = u.isnan().any(1)  # (N, H, W)
    labels = make_labels(1, 19, size, ignored=0.0)
    labels[touched] = IGNORE  # every NaN pixel ignored: a finite loss, a NaN gradient
    loss, grad = ce_fused(logits, labels)
    x32.grad = None
    loss32 = F.cross_entropy(upsample(x32, size), labels, ignore_index=IGNORE)
    loss32.backward()
    assert loss.isfinite() and loss32.isfinite()
    assert_same_nan_and_close(loss, loss32, "loss")
    assert grad.isnan().any() and torch.equal(grad.isnan(), x32.grad.isnan())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_gather_sends_weight_times_gradient_to_all_four_taps(triton_backend):
    """The gradient gather is F.interpolate's backward: each pixel adds weight * G to all four taps, also
    with a zero weight, so an infinite G makes those taps NaN (0 * inf). Probed with infinite upstream
    gradients in the last row and column (where tap 1 is tap 0 itself) and on the low-res grid (scale
    1/8 exactly); the reference is the kernels' per-pixel gradient G (the contract's
    formula, float32) sent through torch's upsample backward."""
    logits = make_logits((3, 19, 3, 4))
    size = (17, 25)
    upstream = torch.randn((3, 19) + size, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    # probes whose taps do not overlap (another probe's NaN would hide a missing one)
    upstream[0, 2, 16, 12] = math.inf  # last row, between low-res columns 1 and 2
    upstream[0, 3, 16, 24] = math.inf  # the last pixel
    upstream[1, 4, 12, 24] = math.inf  # last column, between low-res rows 1 and 2
    upstream[2, 6, 8, 16] = math.inf  # on the low-res pixel (1, 2)
    upstream[2, 1, 5, 3] = -math.inf
    x = logits.clone().requires_grad_(True)
    upsampled_target_losses(x, size).self_information.backward(upstream)

    x32 = logits.clone().requires_grad_(True)
    u = upsample(x32, size)
    with torch.no_grad():
        lp = torch.log_softmax(u, dim=1)
        p = lp.exp()
        q = -upstream * (p * torch.where(p == 0, 0.0, lp) + p) / math.log(19)
        grad_u = q - p * q.sum(1, keepdim=True)
    u.backward(grad_u)
    assert x32.grad.isnan().any() and x32.grad.isinf().any()
    assert_same_nan_and_close(x.grad, x32.grad, "grad", rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# custom ops, torch.compile, fallback
# ------------------------------------------------------------------------------------------------
def test_opcheck(triton_backend):
    ops = torch.ops.advent_fast
    logits = make_logits((1, 5, 2, 3)).requires_grad_(True)
    labels = make_labels(1, 5, (4, 5))
    torch.library.opcheck(ops.upsampled_cross_entropy_forward.default, (logits, labels, IGNORE, True))
    loss, count, parts = ops.upsampled_cross_entropy_forward(logits.detach(), labels, IGNORE, True)
    torch.library.opcheck(ops.upsampled_cross_entropy_backward.default,
                          (logits.detach(), parts, count, torch.tensor(2.0, device=DEVICE)))
    prior = make_prior(5)
    torch.library.opcheck(ops.upsampled_target_forward.default,
                          (logits, 4, 5, prior, 6, 0.5, True, True, True, True))
    torch.library.opcheck(ops.upsampled_target_forward.default,
                          (logits.contiguous(memory_format=torch.channels_last), 4, 5, None, 0, 0.5, True, False,
                           True, False))
    info, emap, ent, cp, thresh, kept, cmean, keep = ops.upsampled_target_forward(
        logits.detach(), 4, 5, prior, 6, 0.5, True, True, True, True)
    assert keep.dtype == torch.uint8 and keep.shape == emap.shape
    torch.library.opcheck(ops.upsampled_target_backward.default,
                          (logits.detach(), 4, 5, torch.randn_like(info), torch.randn_like(emap),
                           torch.tensor(1.0, device=DEVICE), torch.tensor(2.0, device=DEVICE), keep, kept,
                           cmean, prior, 0.5))


def test_compile_fullgraph(triton_backend):
    torch._dynamo.reset()
    prior = make_prior(19)
    labels = make_labels(1, 19, (9, 10))

    def step(source, target):
        res = upsampled_target_losses(target, (9, 10), entropy=True, top_k=0.3, prior=prior)
        return (upsampled_cross_entropy(source, labels) + res.self_information.float().mean()
                + res.entropy_loss + res.class_prior_loss)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    source, target = make_logits((1, 19, 3, 4), seed=10), make_logits((1, 19, 3, 4), seed=11)
    leaves = [t.clone().requires_grad_(True) for t in (source, target, source, target)]
    compiled(*leaves[:2]).backward()
    step(*leaves[2:]).backward()
    torch.testing.assert_close(leaves[0].grad, leaves[2].grad)
    torch.testing.assert_close(leaves[1].grad, leaves[3].grad)


def test_other_backends_interpolate_then_use_the_losses(monkeypatch):
    """Off the Triton backend (and for axes too long for the kernels) the functions never reach the
    kernels and give upsample-then-loss."""
    def no_kernels():
        raise AssertionError("the Triton kernels were called")

    monkeypatch.setattr(up, "_kernels", no_kernels)
    logits, labels, prior = make_logits((1, 19, 3, 4)), make_labels(1, 19, (9, 10)), make_prior(19)
    u = upsample(logits, (9, 10))
    for backend, max_product in [("reference", up.MAX_AXIS_PRODUCT), ("triton", 30)]:
        monkeypatch.setattr(up, "MAX_AXIS_PRODUCT", max_product)
        af.set_backend(backend)
        try:
            loss = upsampled_cross_entropy(logits, labels)
            res = upsampled_target_losses(logits, (9, 10), entropy=True, prior=prior)
            expected = af.target_losses(u, entropy=True, prior=prior)
        finally:
            af.set_backend(None)
        assert torch.equal(loss, F.cross_entropy(u, labels, ignore_index=IGNORE))
        for a, b in zip(res, expected):
            assert (a is None and b is None) or torch.equal(a, b)


def test_full_resolution_logits_and_gradients_are_never_stored(triton_backend, monkeypatch):
    """Issue 5: the source cross-entropy and the target MinEnt (ranked or not) and class-prior losses,
    forward and backward, allocate nothing the size of the full-resolution logits: the largest buffer is
    the (4, N, h, w, C) tap partials (1/16 of them at the paper's 65x129 -> 512x1024), and nothing is
    interpolated."""
    def no_interpolation(*args):
        raise AssertionError("the logits were upsampled")

    sizes = []

    def recording(allocate):
        def allocate_and_record(*args, **kwargs):
            t = allocate(*args, **kwargs)
            sizes.append(t.numel())
            return t
        return allocate_and_record

    monkeypatch.setattr(up, "_interpolate", no_interpolation)
    for name in ("empty", "empty_like", "zeros", "zeros_like", "empty_strided", "full"):
        monkeypatch.setattr(torch, name, recording(getattr(torch, name)))
    n, c, (h, w), (H, W) = 2, 19, (5, 7), (33, 49)
    x = make_logits((n, c, h, w), seed=3).to(DEVICE).requires_grad_(True)
    labels, prior = make_labels(n, c, (H, W)).to(DEVICE), make_prior(c).to(DEVICE)
    res = upsampled_target_losses(x, (H, W), self_information=False, entropy=True, prior=prior)
    (res.entropy_loss + res.class_prior_loss + upsampled_cross_entropy(x, labels)).backward()
    upsampled_target_losses(x, (H, W), self_information=False, entropy=True, top_k=0.3).entropy_loss.backward()
    assert sizes and max(sizes) < n * c * H * W / 8, sorted(sizes)[-3:]


def test_full_resolution_maps_too_large_for_the_kernels_go_the_interpolating_way(triton_backend):
    x = torch.empty((1, 19, 64, 64), device="meta")
    assert up._use_kernels(x, (512, 1024))
    assert not up._use_kernels(x, (16384, 16384))  # 19 * 2**28 elements an image: past int32 offsets
    assert not up._use_kernels(torch.empty((65536, 2, 1, 1), device="meta"), (3, 4))  # the grid's image axis
    assert not up._use_kernels(torch.empty((1, 2, 65536, 1), device="meta"), (16, 4))  # the grid's row axis
    assert up._use_kernels(torch.empty((1, 2, 65535, 1), device="meta"), (16, 4))


def test_empty_batch(triton_backend):
    x = torch.zeros((0, 19, 3, 4), device=DEVICE, requires_grad=True)
    labels = torch.zeros((0, 9, 10), dtype=torch.int64, device=DEVICE)
    assert upsampled_cross_entropy(x, labels).isnan()
    res = upsampled_target_losses(x, (9, 10), entropy=True, entropy_map=True)
    assert res.self_information.shape == (0, 19, 9, 10) and res.entropy_map.shape == (0, 9, 10)
    assert res.entropy_loss.isnan()


BAD_CALLS = [
    (lambda x, y: upsampled_cross_entropy(x[0], y), ValueError, "logits must have shape"),
    (lambda x, y: upsampled_cross_entropy(x.double(), y), TypeError, "logits must be float"),
    (lambda x, y: upsampled_cross_entropy(x[:, :1], y), ValueError, "C >= 2"),
    (lambda x, y: upsampled_cross_entropy(x[:, :, :0], y), ValueError, "non-empty"),
    (lambda x, y: upsampled_cross_entropy(x.tolist(), y), TypeError, "logits must be a torch.Tensor"),
    (lambda x, y: upsampled_cross_entropy(x, y.float()), TypeError, "labels must be int64"),
    (lambda x, y: upsampled_cross_entropy(x, y[0]), ValueError, "labels must have shape"),
    (lambda x, y: upsampled_cross_entropy(x, y[:1]), ValueError, "labels have 1 images"),
    (lambda x, y: upsampled_cross_entropy(x, y[:, :0]), ValueError, "labels must have a non-empty"),
    (lambda x, y: upsampled_cross_entropy(x, y.to("meta")), ValueError, "labels are on"),
    (lambda x, y: upsampled_cross_entropy(x, y, ignore_index=255.0), TypeError, "ignore_index"),
    # label values are checked for host tensors only
    (lambda x, y: upsampled_cross_entropy(x.cpu(), y.cpu().masked_fill(y.cpu() == 3, 19)), ValueError,
     r"labels must be in \[0, 19\)"),
    (lambda x, y: upsampled_cross_entropy(x.cpu(), y.cpu().masked_fill(y.cpu() == 3, -1)), ValueError, r"got \[-1\]"),
    # uint8 255 is not ignore_index -1 (a comparison in uint8 would wrap -1 to 255)
    (lambda x, y: upsampled_cross_entropy(x.cpu(), y.cpu().to(torch.uint8), ignore_index=-1), ValueError,
     r"ignore_index=-1, got \[255\]"),
    (lambda x, y: upsampled_target_losses(x, (9, 0)), ValueError, "size must be positive"),
    (lambda x, y: upsampled_target_losses(x, (9, 10, 11)), TypeError, "size must be"),
    (lambda x, y: upsampled_target_losses(x, (9.0, 10)), TypeError, "size must be"),
    (lambda x, y: upsampled_target_losses(x, None), TypeError, "size must be"),
    (lambda x, y: upsampled_target_losses(x[0], (9, 10)), ValueError, "logits must have shape"),
    (lambda x, y: upsampled_target_losses(x.int(), (9, 10)), TypeError, "logits must be float"),
    (lambda x, y: upsampled_target_losses(x, (9, 10), top_k=0.0), ValueError, "top_k"),
    (lambda x, y: upsampled_target_losses(x, (9, 10), prior=[0.5, 0.5]), ValueError, "prior must have shape"),
    (lambda x, y: upsampled_target_losses(x, (9, 10), prior=torch.ones(19), mu=math.nan), ValueError, "mu"),
]


@pytest.mark.parametrize("call, error, match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_raises(triton_backend, call, error, match):
    with pytest.raises(error, match=match):
        call(make_logits((2, 19, 3, 4)), make_labels(2, 19, (9, 10)))


def test_int_size_means_square(triton_backend):
    logits = make_logits((1, 19, 3, 4))
    a = upsampled_target_losses(logits, 9, self_information=False, entropy_map=True).entropy_map
    b = upsampled_target_losses(logits, (9, 9), self_information=False, entropy_map=True).entropy_map
    assert a.shape == (1, 9, 9) and torch.equal(a, b)
