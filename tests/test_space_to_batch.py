"""train.space_to_batch: dilated convolutions run undilated on the input's phases
(advent_fast.models.space_to_batch), against the dilated convolutions themselves in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advent_fast.models import (
    batch_to_space,
    build_model,
    fold_frozen_batchnorm,
    space_to_batch,
    use_space_to_batch,
)

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d", [2, 3, 4])
@pytest.mark.parametrize("size", [(8, 12), (7, 5), (1, 3)])
def test_phases_hold_the_strided_pixels_and_batch_to_space_inverts(fmt, d, size):
    """Phase (i, j) of image n, at batch index (n*d + i)*d + j, is x[n, :, i::d, j::d] padded with zeros at its
    bottom and right; the inverse gives x back; both keep the memory format."""
    h, w = size
    x = torch.randn(2, 3, h, w).to(memory_format=FORMATS[fmt])
    phases = space_to_batch(x, d)
    hq, wq = -(-h // d), -(-w // d)
    assert phases.shape == (2 * d * d, 3, hq, wq)
    for n in range(2):
        for i in range(d):
            for j in range(d):
                strided = x[n, :, i::d, j::d]
                expected = F.pad(strided, (0, wq - strided.shape[2], 0, hq - strided.shape[1]))
                assert torch.equal(phases[(n * d + i) * d + j], expected), (n, i, j)
    back = batch_to_space(phases, d, (h, w), fmt == "channels_last")
    assert torch.equal(back, x)
    assert phases.is_contiguous(memory_format=FORMATS[fmt]) and back.is_contiguous(memory_format=FORMATS[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d, size", [(2, (91, 161)), (2, (8, 6)), (4, (13, 9)), (4, (3, 2))])
@pytest.mark.parametrize("bias", [True, False])
def test_dilated_convolution_on_the_phases_equals_the_dilated_convolution(fmt, d, size, bias):
    """Values and gradients (input, weight, bias) in float64, sizes d divides and does not (91x161 is
    ResNet-101's layer3 at 1280x720), sizes under d."""
    torch.manual_seed(0)
    dilated = nn.Conv2d(5, 4, 3, padding=d, dilation=d, bias=bias).double().to(memory_format=FORMATS[fmt])
    phased = copy.deepcopy(dilated)
    x = torch.randn(2, 5, *size, dtype=torch.float64).to(memory_format=FORMATS[fmt]).requires_grad_()
    upstream = torch.randn(2, 4, *size, dtype=torch.float64)
    assert use_space_to_batch(phased) == 1 and use_space_to_batch(phased) == 0
    assert (phased.dilation, phased.padding, phased.space_to_batch) == ((1, 1), (1, 1), d)
    results = []
    for conv in (dilated, phased):
        out = conv(x)
        results.append((out, torch.autograd.grad(out, [x, *conv.parameters()], upstream)))
    (ref, ref_grads), (got, got_grads) = results
    assert got.shape == ref.shape and got.is_contiguous(memory_format=FORMATS[fmt])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("arch, count", [("deeplabv2_r101", 26), ("deeplabv2_vgg16", 5), ("deeplabv2_small", 2)])
def test_every_dilated_backbone_convolution_and_no_head_takes_phases(arch, count):
    model = build_model(arch, 19, multi_level=arch != "deeplabv2_vgg16")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_space_to_batch(model) == count and use_space_to_batch(model) == 0
    phased = [m for m in model.modules() if getattr(m, "space_to_batch", None)]
    assert len(phased) == count
    assert all(m.dilation == (1, 1) for m in phased)
    heads = [conv for head in model.heads() for conv in head.modules() if isinstance(conv, nn.Conv2d)]
    assert heads and all(conv.dilation[0] >= 6 and not hasattr(conv, "space_to_batch") for conv in heads)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _step(model, x, upstream):
    aux, main = model(x)
    loss = (main * upstream).sum() + (0 if aux is None else aux.sum())
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return [t for t in (aux, main) if t is not None], grads


@pytest.mark.parametrize("arch, fmt", [("deeplabv2_r101", "channels_last"), ("deeplabv2_small", "contiguous"),
                                       ("deeplabv2_small", "channels_last")])
def test_model_with_phases_gives_the_same_outputs_gradients_and_batchnorm_statistics(arch, fmt):
    """The release's train-mode BatchNorm included (its batch statistics over the cut outputs), float64
    (ResNet-101's 100 layers, batch statistics over 30 pixels, amplify the convolutions' rounding to 1e-9).
    ResNet-101 at 33x45: layer3 and layer4 at 5x6, which neither 2 nor 4 divides."""
    torch.manual_seed(0)
    ref = build_model(arch, 19).double().to(memory_format=FORMATS[fmt])
    model = copy.deepcopy(ref)
    use_space_to_batch(model)
    x = torch.randn(1, 3, 33, 45, dtype=torch.float64).to(memory_format=FORMATS[fmt])
    upstream = torch.randn(1, 19, 5, 6, dtype=torch.float64)
    (ref_out, ref_grads), (out, grads) = _step(ref, x, upstream), _step(model, x, upstream)
    assert ref_out[-1].shape == (1, 19, 5, 6)
    for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    ref_buffers = dict(ref.named_buffers())
    for name, value in model.named_buffers():
        torch.testing.assert_close(value, ref_buffers[name], rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("phases_first", [True, False])
def test_phases_with_folded_frozen_batchnorm_in_either_order(phases_first):
    torch.manual_seed(0)
    ref = build_model("deeplabv2_small", 19, freeze_bn=True).double()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    model = copy.deepcopy(ref)
    steps = [use_space_to_batch, fold_frozen_batchnorm]
    for step in steps if phases_first else steps[::-1]:
        assert step(model) > 0
    x = torch.randn(2, 3, 35, 27, dtype=torch.float64)
    upstream = torch.randn(2, 19, 5, 4, dtype=torch.float64)
    (ref_out, ref_grads), (out, grads) = _step(ref, x, upstream), _step(model, x, upstream)
    for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_phases_trace_with_torch_compile_fullgraph():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=2, dilation=2)
    x = torch.randn(1, 4, 11, 7).to(memory_format=torch.channels_last)
    expected = conv(x)
    use_space_to_batch(conv)
    torch._dynamo.reset()
    got = torch.compile(conv, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_model_with_phases_pickles_and_deep_copies():
    """Each copy's convolutions run on the phases with the copy's own weights."""
    import pickle

    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19)
    use_space_to_batch(model)
    x = torch.randn(1, 3, 36, 60)
    with torch.no_grad():
        expected = model(x)[1]
        for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            phased = [m for m in twin.modules() if getattr(m, "space_to_batch", None)]
            assert len(phased) == 2 and all(m.forward.conv is m for m in phased)
            torch.testing.assert_close(twin(x)[1], expected, rtol=0, atol=0)
            phased[0].weight.mul_(2)  # the copy's weight, not the original's
            assert not torch.equal(twin(x)[1], expected)
