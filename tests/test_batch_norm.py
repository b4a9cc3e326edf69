"""Train-mode BatchNorm (+ ReLU) and a folded frozen BatchNorm's shift (+ ReLU) in the fused kernels
(advent_fast/batch_norm.py, kernels/batch_norm.py) against ATen's in float64: outputs, input gradients,
running statistics; the models with them.

The kernels run under the Triton interpreter (tests/conftest.py), so shapes are small; with
TRITON_INTERPRET=0 and a GPU the same tests run them on CUDA tensors.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import advent_fast as af
from advent_fast.batch_norm import shift_relu, train_batch_norm
from advent_fast.kernels import batch_norm as kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
# (outputs, gradients): relative to the largest magnitude; outputs are stored in x's dtype
TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}
MOMENTUM, EPS = 0.1, 1e-5


@pytest.fixture(autouse=True)
def triton_backend():
    af.set_backend("triton")
    yield
    af.set_backend(None)


def activations(shape, dtype, scale=3.0, offset=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale + offset
    return x.to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)


def affine(channels, seed=1):
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    mean, var = torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5
    return [t.to(DEVICE) for t in (weight, bias, mean, var)]


# (ReLU, residual add) of each mode: BatchNorm alone, + ReLU (bn1, bn2), + residual + ReLU (bn3), + residual
MODES = {"bn": (False, False), "bn_relu": (True, False), "bn_add_relu": (True, True), "bn_add": (False, True)}


def reference(x, weight, bias, running_mean, running_var, relu, residual, grad_y):
    """ATen in float64 on x (and residual) as given, rounded to their dtype: (y, grad_x, grad_residual,
    running_mean, running_var)."""
    x64 = x.detach().double().requires_grad_()
    r64 = None if residual is None else residual.detach().double().requires_grad_()
    mean64, var64 = running_mean.double(), running_var.double()
    y = F.batch_norm(x64, mean64, var64, weight.double(), bias.double(), True, MOMENTUM, EPS)
    y = y if r64 is None else y + r64
    y = F.relu(y) if relu else y
    y.backward(grad_y.double())
    return y.detach(), x64.grad, None if r64 is None else r64.grad, mean64, var64


def close(got, want, rel):
    """Within rel x the largest finite magnitude (at least 1) where want is finite; non-finite where it is
    not (NaN or inf: which one depends on the implementation's order of operations)."""
    got, want = got.detach().double(), want.detach().double()
    finite = want.isfinite()
    assert torch.equal(got.isfinite(), finite), "non-finite elements differ"
    scale = want[finite].abs().max().clamp_min(1.0) if finite.any() else 1.0
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=rel * float(scale))


def check_against_reference(x, mode):
    relu, add = MODES[mode]
    weight, bias, running_mean, running_var = affine(x.shape[1])
    g = torch.Generator().manual_seed(2)
    grad_y = torch.randn(x.shape, generator=g).to(x.dtype).to(DEVICE)
    residual = None
    if add:
        residual = (torch.randn(x.shape, generator=g) * 2).to(x.dtype).to(DEVICE)
        residual = residual.contiguous(memory_format=torch.channels_last).requires_grad_()
    want_y, want_grad, want_grad_residual, want_mean, want_var = reference(
        x, weight, bias, running_mean, running_var, relu, residual, grad_y)
    x = x.detach().requires_grad_()
    y = train_batch_norm(x, weight, bias, running_mean, running_var, MOMENTUM, EPS, relu, residual)
    y.backward(grad_y)
    out_tol, grad_tol = TOL[x.dtype]
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    close(y, want_y, out_tol)
    close(x.grad, want_grad, grad_tol)
    if add:
        close(residual.grad, want_grad_residual, out_tol)  # the upstream gradient, masked
    close(running_mean, want_mean, 1e-6)
    close(running_var, want_var, 1e-6)
    return y, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", [(2, 19, 7, 11), (1, 130, 3, 5), (3, 2, 1, 1)])
def test_against_aten_in_float64(shape, dtype, mode):
    """C not a power of two and over one channel block (64), rows not a multiple of the row block, 2 rows."""
    check_against_reference(activations(shape, dtype), mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_row_ranges_of_several_chunks_merge_exactly(monkeypatch, mode):
    """Few row ranges of several row blocks each (the chunk merge inside a program), merged two ranges at a
    time by the finishing kernels."""
    monkeypatch.setattr(kernels, "BN_REDUCE_PROGRAMS", 3)
    monkeypatch.setattr(kernels, "BN_FINISH_PARTS", 2)
    monkeypatch.setattr(kernels, "BN_BLOCK_ROWS", 16)
    check_against_reference(activations((2, 5, 9, 17), torch.float32), mode)


def test_large_offsets_keep_the_variance():
    """Mean 1e4, spread 1: a sum of squares would cancel in float32 (errors of order 10 in a variance of 1);
    the per-chunk deviations keep the outputs as close to float64 as ATen's own float32 BatchNorm."""
    x = activations((2, 8, 16, 16), torch.float32, scale=1.0, offset=1e4)
    weight, bias, mean, var = affine(8)
    want = F.batch_norm(x.double(), mean.double(), var.double(), weight.double(), bias.double(), True, MOMENTUM, EPS)
    aten = F.batch_norm(x, mean.clone(), var.clone(), weight, bias, True, MOMENTUM, EPS)
    got = train_batch_norm(x, weight, bias, mean, var, MOMENTUM, EPS)
    error, aten_error = ((t.double() - want).abs().max().item() for t in (got, aten))
    # 1e-3: about a float32 ulp at 1e4, what rounding the mean itself costs any float32 implementation
    assert error < 1e-2 and error <= 2 * aten_error + 1e-3, (error, aten_error)


def test_nonfinite_activations_poison_their_channel_only():
    x = activations((2, 6, 5, 7), torch.float32)
    x[0, 1, 2, 3] = float("nan")
    x[1, 4, 0, 0] = float("inf")
    y, grad = check_against_reference(x, "bn_add_relu")
    bad = torch.tensor([1, 4])
    assert y[:, bad].isnan().all() and grad[:, bad].isnan().all()
    good = torch.tensor([0, 2, 3, 5])
    assert y[:, good].isfinite().all() and grad[:, good].isfinite().all()


def test_momentum_zero_keeps_the_running_statistics():
    """What activation checkpointing's recomputation asks for (models/_running_statistics_kept)."""
    x = activations((1, 4, 6, 6), torch.float32)
    weight, bias, mean, var = affine(4)
    before = mean.clone(), var.clone()
    train_batch_norm(x, weight, bias, mean, var, 0.0, EPS)
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])


def test_other_layouts_and_trained_affine_take_aten(monkeypatch):
    """NCHW activations, or a weight that needs a gradient: ATen's BatchNorm, same results."""
    def no_kernels(*args, **kwargs):
        raise AssertionError("the fused kernels ran")

    monkeypatch.setattr(kernels, "batch_norm_forward", no_kernels)
    x = activations((2, 3, 4, 5), torch.float32).contiguous()
    weight, bias, mean, var = affine(3)
    want = F.relu(F.batch_norm(x, mean.clone(), var.clone(), weight, bias, True, MOMENTUM, EPS))
    torch.testing.assert_close(train_batch_norm(x, weight, bias, mean, var, relu=True), want)
    weight.requires_grad_()
    x = x.contiguous(memory_format=torch.channels_last)
    train_batch_norm(x, weight, bias, mean, var).sum().backward()
    assert weight.grad is not None


@pytest.mark.parametrize("args, error, match", [
    (dict(x=torch.randn(2, 3, 4)), ValueError, r"x must have shape \(N, C, H, W\)"),
    (dict(x=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x must be float32"),
    (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
    (dict(running_var=torch.ones(3, 1)), ValueError, r"running_var must have shape \(3,\)"),
    (dict(x=torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
    (dict(eps=0.0), ValueError, "eps must be a positive float"),
    (dict(momentum="0.1"), TypeError, "momentum must be a float"),
    (dict(bias=[0.0, 0.0, 0.0]), TypeError, "bias must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(args, error, match):
    call = dict(x=torch.randn(2, 3, 4, 4), weight=torch.ones(3), bias=torch.zeros(3), running_mean=torch.zeros(3),
                running_var=torch.ones(3), momentum=0.1, eps=1e-5)
    call.update(args)
    with pytest.raises(error, match=match):
        train_batch_norm(**call)


def test_fused_bottleneck_equals_the_release_one(monkeypatch):
    """A ResNet-101 bottleneck with its BatchNorms fused (ReLU with bn1 and bn2): same outputs, input and
    weight gradients, running statistics and batch counts as nn.BatchNorm2d + nn.ReLU."""
    from advent_fast.models import FusedBatchNorm2d, use_fused_batchnorm
    from advent_fast.models.deeplabv2 import _resnet_layer

    # TF32 convolutions (a GPU's default) would round the two paths' float32 rounding differences to 1e-3
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    torch.manual_seed(0)
    plain = _resnet_layer(16, 8, 2, stride=1, dilation=2).to(DEVICE).to(memory_format=torch.channels_last)
    fused = _resnet_layer(16, 8, 2, stride=1, dilation=2).to(DEVICE).to(memory_format=torch.channels_last)
    fused.load_state_dict(plain.state_dict())
    assert use_fused_batchnorm(fused) == 7 and isinstance(fused[0].bn1, FusedBatchNorm2d)
    outputs = []
    for block in (plain, fused):
        x = activations((1, 16, 9, 13), torch.float32, offset=0.0).requires_grad_()
        y = block(x)
        y.backward(torch.ones_like(y))
        outputs.append((y, x.grad, [p.grad for p in block.parameters() if p.requires_grad]))
    (y0, g0, w0), (y1, g1, w1) = outputs
    close(y1, y0, 1e-5)
    close(g1, g0, 1e-4)
    for a, b in zip(w1, w0):  # sums over the pixels, in another order
        close(a, b, 1e-4)
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    fused.eval()  # eval mode: nn.BatchNorm2d's own forward, running statistics untouched
    x = activations((1, 16, 9, 13), torch.float32, offset=0.0)
    torch.testing.assert_close(fused(x), plain.eval()(x), rtol=1e-5, atol=1e-5)


# ---- a folded frozen BatchNorm's shift ------------------------------------------------------------------

SHIFT_MODES = {"shift": (False, False), "shift_relu": (True, False), "shift_add_relu": (True, True),
               "shift_add": (False, True)}


def check_shift_against_reference(x, mode):
    """shift_relu's output and gradients (x, residual) against ATen's ops in float64 on the same inputs."""
    relu, add = SHIFT_MODES[mode]
    g = torch.Generator().manual_seed(3)
    shift = (torch.randn(x.shape[1], generator=g) * 4).to(DEVICE)
    grad_y = torch.randn(x.shape, generator=g).to(x.dtype).to(DEVICE)
    residual = None
    if add:
        residual = (torch.randn(x.shape, generator=g) * 2).to(x.dtype).to(DEVICE)
        residual = residual.contiguous(memory_format=torch.channels_last).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    r64 = None if residual is None else residual.detach().double().requires_grad_()
    want = x64 + shift.double().reshape(1, -1, 1, 1) + (0 if r64 is None else r64)
    want = F.relu(want) if relu else want
    want.backward(grad_y.double())
    x = x.detach().requires_grad_()
    y = shift_relu(x, shift, relu, residual)
    y.backward(grad_y)
    out_tol = TOL[x.dtype][0]
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    close(y, want.detach(), out_tol)
    close(x.grad, x64.grad, 0.0)  # the upstream gradient, masked where the output is <= 0
    if add:
        close(residual.grad, r64.grad, 0.0)
    return y, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(SHIFT_MODES))
@pytest.mark.parametrize("shape", [(2, 19, 7, 11), (1, 130, 3, 5), (3, 2, 1, 1)])
def test_shift_against_aten_in_float64(shape, dtype, mode):
    check_shift_against_reference(activations(shape, dtype, offset=0.0), mode)


def test_shift_keeps_nonfinite_activations():
    """NaN stays NaN through the ReLU and passes the upstream gradient (ATen's ReLU); -inf gives 0."""
    x = activations((1, 3, 4, 4), torch.float32, offset=0.0)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("-inf")
    y, grad = check_shift_against_reference(x, "shift_relu")
    assert y[0, 1, 2, 3].isnan() and y[0, 2, 0, 0] == 0.0
    assert grad[0, 1, 2, 3] != 0.0 and grad[0, 2, 0, 0] == 0.0


def test_shift_other_layouts_and_trained_shift_take_aten(monkeypatch):
    """NCHW activations, or a shift that needs a gradient: ATen's ops (the shift cast to x's dtype first)."""
    def no_kernels(*args, **kwargs):
        raise AssertionError("the fused kernel ran")

    monkeypatch.setattr(kernels, "shift_forward", no_kernels)
    x = activations((2, 3, 4, 5), torch.bfloat16, offset=0.0).contiguous()
    shift = torch.randn(3, device=DEVICE)
    want = F.relu(x + shift.to(x.dtype).reshape(1, -1, 1, 1))
    assert torch.equal(shift_relu(x, shift, relu=True), want)
    shift.requires_grad_()
    x = x.contiguous(memory_format=torch.channels_last)
    shift_relu(x, shift).float().sum().backward()
    assert shift.grad is not None


@pytest.mark.parametrize("args, error, match", [
    (dict(x=torch.randn(2, 3, 4)), ValueError, r"x must have shape \(N, C, H, W\)"),
    (dict(x=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x must be float32"),
    (dict(shift=torch.ones(4)), ValueError, r"shift must have shape \(3,\)"),
    (dict(shift=[0.0, 0.0, 0.0]), TypeError, "shift must be a torch.Tensor"),
    (dict(residual=torch.randn(2, 3, 4, 5)), ValueError, "residual must match x"),
])
def test_shift_bad_input_names_the_argument(args, error, match):
    call = dict(x=torch.randn(2, 3, 4, 4), shift=torch.zeros(3), relu=True)
    call.update(args)
    with pytest.raises(error, match=match):
        shift_relu(**call)


def test_fused_folded_bottleneck_equals_the_folded_one(monkeypatch):
    """A ResNet-101 layer with frozen BatchNorm folded into its convolutions, the shifts then fused with the
    ReLUs and residual adds (use_fused_batchnorm): same outputs and gradients as with the shifts as
    convolution biases."""
    from advent_fast.models import FusedFoldedBatchNorm2d, use_fused_batchnorm
    from advent_fast.models.deeplabv2 import _resnet_layer, fold_frozen_batchnorm

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    layers = []
    for _ in range(2):
        layer = _resnet_layer(16, 8, 2, stride=1, dilation=2).to(DEVICE).to(memory_format=torch.channels_last)
        layer.freeze_bn = True  # what fold_frozen_batchnorm asks of a model
        layers.append(layer.eval())
    layers[1].load_state_dict(layers[0].state_dict())
    for bn in (m for m in layers[0].modules() if isinstance(m, torch.nn.BatchNorm2d)):
        with torch.no_grad():  # statistics other than the initial ones
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    layers[1].load_state_dict(layers[0].state_dict())
    assert fold_frozen_batchnorm(layers[0]) == fold_frozen_batchnorm(layers[1]) == 7
    assert use_fused_batchnorm(layers[1]) == 7 and isinstance(layers[1][0].bn3, FusedFoldedBatchNorm2d)
    outputs = []
    for layer in layers:
        x = activations((1, 16, 9, 13), torch.float32, offset=0.0).requires_grad_()
        y = layer(x)
        y.backward(torch.ones_like(y))
        outputs.append((y, x.grad, [p.grad for p in layer.parameters() if p.requires_grad]))
    (y0, g0, w0), (y1, g1, w1) = outputs
    close(y1.detach(), y0.detach(), 1e-5)
    close(g1, g0, 1e-4)
    for a, b in zip(w1, w0):
        close(a, b, 1e-4)
    assert layers[1].state_dict().keys() == layers[0].state_dict().keys()

