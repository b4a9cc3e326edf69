"""Models: release state-dict layout, shapes, BatchNorm semantics, optimiser groups, loading.

Release facts are hard-coded here (computed once from the release state-dict manifest); the
tests never read it. ResNet-101 is built on the "meta" device (shapes, no data) wherever values
are not needed.
"""
import copy
import hashlib
import math
import os
import warnings
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from advent_fast.models import (
    ARCHS,
    ASPPHead,
    DeepLabV2ResNet101,
    DeepLabV2Small,
    DeepLabV2VGG16,
    FCDiscriminator,
    ReleaseSGD,
    build_model,
    checkpoint_dict,
    fold_frozen_batchnorm,
    load_init_weights,
    load_model_state,
    load_training_init,
    model_from_checkpoint,
    save_checkpoint,
    shared_scaled_weights,
)

# sha256 of the "name:d0xd1x..." lines (scalars: "name:") of the release ResNetMulti (C=19).
R101_ENTRIES = 640
R101_SORTED_SHA256 = "76fc2a12a9a9d47abc9066d3fcccaf88b040b6abb49937d59aa2ec11153f4bab"
R101_ORDERED_SHA256 = "7b2bbb3075ed4ec2870a56e6aef60175cd5740e04ae8376db49c8e321bbcc2b6"
R101_PARAMS = 44_601_560
R101_FROZEN_BN_PARAMS = 105_344
DISCRIMINATOR_KEYS = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias",
                      "6.weight", "6.bias", "8.weight", "8.bias"]
DISCRIMINATOR_SORTED_SHA256 = "2756d4965fbbece8069da86a712ce9ff918a6a6414c78f4d7df21b02770c3ed3"
DISCRIMINATOR_PARAMS = 2_781_121


def layout_sha256(state_dict, ordered=False):
    lines = [f"{k}:{'x'.join(map(str, v.shape))}" for k, v in state_dict.items()]
    return hashlib.sha256("\n".join(lines if ordered else sorted(lines)).encode()).hexdigest()


def stride8(size):
    """conv1 7x7/2 pad 3, maxpool 3x3/2 pad 1 ceil_mode, layer2's 1x1 stride 2."""
    size = (size - 1) // 2 + 1
    size = math.ceil((size - 1) / 2) + 1
    return (size - 1) // 2 + 1


@pytest.fixture(scope="module")
def meta_r101():
    with torch.device("meta"):
        return DeepLabV2ResNet101(19)


@pytest.fixture(scope="module")
def r101():
    torch.manual_seed(0)
    return DeepLabV2ResNet101(19)


def backbone_items(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("layer5.", "layer6."))}


def head_items(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("layer5.", "layer6."))}


def assert_same_tensors(actual, expected):
    assert actual.keys() == expected.keys()
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


# ---- architecture ---------------------------------------------------------------------------

def test_r101_state_dict_matches_release_layout(meta_r101):
    sd = meta_r101.state_dict()
    assert len(sd) == R101_ENTRIES
    assert layout_sha256(sd) == R101_SORTED_SHA256
    assert layout_sha256(sd, ordered=True) == R101_ORDERED_SHA256


def test_r101_parameter_counts(meta_r101):
    params = list(meta_r101.parameters())
    assert sum(p.numel() for p in params) == R101_PARAMS
    frozen = [p for p in params if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == R101_FROZEN_BN_PARAMS
    bn_params = {id(p) for m in meta_r101.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in frozen} == bn_params


def test_r101_is_caffe_style_and_dilated(meta_r101):
    m = meta_r101
    assert (m.conv1.kernel_size, m.conv1.stride) == ((7, 7), (2, 2))
    assert m.maxpool.ceil_mode and m.maxpool.kernel_size == 3 and m.maxpool.stride == 2
    assert [len(layer) for layer in (m.layer1, m.layer2, m.layer3, m.layer4)] == [3, 4, 23, 3]
    assert m.layer2[0].conv1.stride == (2, 2) and m.layer2[0].conv2.stride == (1, 1)
    for layer, dilation in ((m.layer1, 1), (m.layer2, 1), (m.layer3, 2), (m.layer4, 4)):
        for block in layer:
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.padding == (dilation, dilation)
    for head in (m.layer5, m.layer6):
        assert [(c.dilation[0], c.padding[0]) for c in head.conv2d_list] == [(6, 6), (12, 12), (18, 18), (24, 24)]


def test_r101_release_output_sizes_shape_only(meta_r101):
    assert (stride8(720), stride8(1280)) == (91, 161)
    assert (stride8(512), stride8(1024)) == (65, 129)
    for h, w in ((720, 1280), (512, 1024)):
        aux, main = meta_r101(torch.empty(1, 3, h, w, device="meta"))
        assert aux.shape == main.shape == (1, 19, stride8(h), stride8(w))


def test_r101_forward_uses_batch_statistics_and_updates_running_stats(r101):
    bn = r101.layer3[5].bn2
    before = bn.running_mean.clone()
    # 24x40: the ceil-mode max-pool gives 7x11 (floor would give 6x10), layer2 then 4x6.
    aux, main = r101(torch.randn(1, 3, 24, 40))
    assert aux.shape == main.shape == (1, 19, stride8(24), stride8(40)) == (1, 19, 4, 6)
    assert all(m.training for m in r101.modules())
    assert int(r101.bn1.num_batches_tracked) == 1
    assert not torch.equal(bn.running_mean, before)


def test_single_level_r101_has_no_aux_head():
    with torch.device("meta"):
        model = DeepLabV2ResNet101(19, multi_level=False)
        aux, main = model(torch.empty(1, 3, 65, 129))
    assert aux is None and main.shape == (1, 19, 9, 17)
    assert not any(k.startswith("layer5.") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == R101_PARAMS - 4 * (19 * 1024 * 9 + 19)


def test_aspp_head_sums_all_four_branches():
    torch.manual_seed(0)
    head = ASPPHead(8, 3)
    x = torch.randn(2, 8, 30, 30)
    expected = sum(conv(x) for conv in head.conv2d_list)
    torch.testing.assert_close(head(x), expected)
    big = ASPPHead(1024, 19)
    assert abs(float(big.conv2d_list[0].weight.detach().std()) - 0.01) < 5e-4


@pytest.mark.parametrize("classes, multiple", [(19, 8), (19, 32), (16, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_aspp_head_with_padded_output_channels_gives_the_same_logits_and_gradients(classes, multiple, channels_last):
    """train.classifier_channels_multiple: zero filters up to a multiple of 8 or 32, sliced off (16
    classes need none), against the plain head in float64: same values and gradients, same state dict."""
    torch.manual_seed(0)
    plain = ASPPHead(12, classes).double()
    padded = copy.deepcopy(plain)
    padded.channels_multiple = multiple
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain, padded = plain.to(memory_format=fmt), padded.to(memory_format=fmt)
    x = torch.randn(2, 12, 9, 13, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    upstream = torch.randn(2, classes, 9, 13, dtype=torch.float64)
    outputs = []
    for head in (plain, padded):
        out = head(x)
        grads = torch.autograd.grad(out, [x, *head.parameters()], upstream)
        outputs.append((out, grads))
    (ref, ref_grads), (got, got_grads) = outputs
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, ref_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert padded.state_dict().keys() == plain.state_dict().keys()
    assert all(v.shape[0] == classes for v in padded.state_dict().values())


def test_vgg16_layout_and_output_stride():
    model = DeepLabV2VGG16(19, multi_level=False)
    convs = {i: m for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)}
    assert list(convs) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 3
    assert all(convs[i].dilation == (2, 2) and convs[i].padding == (2, 2) for i in (23, 25, 27))
    assert (convs[29].in_channels, convs[29].out_channels, convs[29].dilation) == (512, 1024, (4, 4))
    assert (convs[31].in_channels, convs[31].out_channels, convs[31].dilation) == (1024, 1024, (4, 4))
    with torch.no_grad():
        aux, main = model(torch.randn(1, 3, 64, 128))
    assert aux is None and main.shape == (1, 19, 8, 16)


def test_small_model_shapes_and_release_bn_semantics():
    model = DeepLabV2Small(19)
    bn_params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert bn_params and not any(p.requires_grad for p in bn_params)
    bn = model.stage1[1]
    before = bn.running_mean.clone()
    aux, main = model(torch.randn(1, 3, 128, 256))
    assert aux.shape == main.shape == (1, 19, 16, 32)
    assert not torch.equal(bn.running_mean, before)
    assert model(torch.randn(1, 3, 128, 256))[0] is not None
    assert DeepLabV2Small(19, multi_level=False)(torch.randn(1, 3, 64, 64))[0] is None


def test_freeze_bn_keeps_batchnorm_in_eval_mode_under_train():
    torch.manual_seed(0)
    model = DeepLabV2Small(19, freeze_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and not any(bn.training for bn in bns)
    stats = [bn.running_mean.clone() for bn in bns]
    x = torch.randn(1, 3, 64, 128)
    _, main = model(x)
    assert all(torch.equal(bn.running_mean, s) for bn, s in zip(bns, stats))
    assert all(int(bn.num_batches_tracked) == 0 for bn in bns)
    torch.testing.assert_close(main, model.eval()(x)[1])


def test_discriminator_layout():
    d = FCDiscriminator(19)
    assert list(d.state_dict()) == DISCRIMINATOR_KEYS
    assert layout_sha256(d.state_dict()) == DISCRIMINATOR_SORTED_SHA256
    assert sum(p.numel() for p in d.parameters()) == DISCRIMINATOR_PARAMS
    convs = [m for m in d if isinstance(m, nn.Conv2d)]
    assert all((c.kernel_size, c.stride, c.padding) == ((4, 4), (2, 2), (1, 1)) for c in convs)
    assert [m.negative_slope for m in d if isinstance(m, nn.LeakyReLU)] == [0.2] * 4
    assert isinstance(d[-1], nn.Conv2d)
    assert d(torch.empty(1, 19, 512, 1024, device="meta")).shape == (1, 1, 16, 32)


def test_build_model_and_unknown_arch():
    assert set(ARCHS) == {"deeplabv2_r101", "deeplabv2_vgg16", "deeplabv2_small"}
    assert isinstance(build_model("deeplabv2_small", 7, multi_level=False, width=8), DeepLabV2Small)
    with torch.device("meta"):
        assert isinstance(build_model("deeplabv2_r101", 19), DeepLabV2ResNet101)
        assert isinstance(build_model("deeplabv2_vgg16", 19, multi_level=False), DeepLabV2VGG16)
        with pytest.raises(ValueError, match="single-level"):
            build_model("deeplabv2_vgg16", 19)
    with pytest.raises(ValueError) as err:
        build_model("deeplabv3", 19)
    assert all(arch in str(err.value) for arch in ARCHS)


# ---- optimiser groups -----------------------------------------------------------------------

def release_1x_generator(model):
    """The release's get_1x_lr_params_no_scale, written out independently."""
    for root in (model.conv1, model.bn1, model.layer1, model.layer2, model.layer3, model.layer4):
        for module in root.modules():
            for p in module.parameters():
                if p.requires_grad:
                    yield p


def test_release_grouping_repeats_backbone_tensors_like_the_release(meta_r101):
    backbone, heads = meta_r101.optim_parameters(2.5e-4, grouping="release")
    entries = backbone["params"]
    assert len(entries) == 314 and len({id(p) for p in entries}) == 104
    assert [id(p) for p in entries] == [id(p) for p in release_1x_generator(meta_r101)]
    assert all(p.requires_grad for p in entries)
    counts = {id(p): 0 for p in entries}
    for p in entries:
        counts[id(p)] += 1
    assert counts[id(meta_r101.conv1.weight)] == 1
    assert counts[id(meta_r101.layer3[7].conv2.weight)] == 3
    assert counts[id(meta_r101.layer2[0].downsample[0].weight)] == 4
    assert backbone["lr"] == 2.5e-4 and heads["lr"] == pytest.approx(2.5e-3)
    head_ids = [id(p) for p in (*meta_r101.layer5.parameters(), *meta_r101.layer6.parameters())]
    assert [id(p) for p in heads["params"]] == head_ids


def test_clean_grouping_lists_each_trainable_tensor_once(meta_r101):
    backbone, heads = meta_r101.optim_parameters(1.0, grouping="clean")
    ids = [id(p) for p in backbone["params"]]
    assert len(ids) == len(set(ids)) == 104
    assert set(ids) == {id(p) for p in release_1x_generator(meta_r101)}
    assert len(heads["params"]) == 16 and heads["lr"] == 10.0
    with pytest.raises(ValueError, match="grouping"):
        meta_r101.optim_parameters(1.0, grouping="fancy")


def test_release_grouping_only_for_r101():
    model = DeepLabV2Small(19)
    with pytest.raises(ValueError, match="clean"):
        model.optim_parameters(1.0, grouping="release")
    backbone, heads = model.optim_parameters(1.0, grouping="clean")
    assert len(backbone["params"]) == 7 and len(heads["params"]) == 16


def sgd_041_reference(params0, entry_order, grads_per_step, lr, momentum, weight_decay):
    """torch 0.4.1 SGD.step over one group listing tensors with repeats (weight decay added
    in place to the gradient, zero-initialised momentum buffer)."""
    params = [p.clone() for p in params0]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        grads = [g.clone() for g in grads]
        for i in entry_order:
            grads[i].add_(params[i], alpha=weight_decay)
            bufs[i].mul_(momentum).add_(grads[i])
            params[i].add_(bufs[i], alpha=-lr)
    return params


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_release_sgd_matches_torch_041_on_repeated_entries(fused, weight_decay):
    torch.manual_seed(0)
    a, b = (nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in (5, 3))
    start = [a.detach().clone(), b.detach().clone()]
    order = [0, 1, 0, 0, 1, 0]
    grads = [[torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)] for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no duplicate-parameter warning: repeats are counted
        opt = ReleaseSGD([{"params": [(a, b)[i] for i in order], "lr": 0.1}], lr=0.1,
                         momentum=0.9, weight_decay=weight_decay, fused=fused)
    assert opt.param_groups[0]["multiplicity"] == [4, 2]
    for ga, gb in grads:
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        assert torch.equal(a.grad, ga) and torch.equal(b.grad, gb)  # unlike 0.4.1, gradients stay as they were
    expected = sgd_041_reference(start, order, grads, 0.1, 0.9, weight_decay)
    torch.testing.assert_close(a.detach(), expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(b.detach(), expected[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_release_sgd_equals_torch_sgd_without_repeats(fused):
    torch.manual_seed(0)
    model = DeepLabV2Small(5, width=4)
    twin = DeepLabV2Small(5, width=4)
    twin.load_state_dict(model.state_dict())
    ours = ReleaseSGD(model.optim_parameters(0.01, "clean"), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=fused)
    ref = torch.optim.SGD(twin.optim_parameters(0.01, "clean"), lr=0.01, momentum=0.9, weight_decay=5e-4,
                          fused=fused)
    x = torch.randn(1, 3, 32, 32)
    for _ in range(2):
        for net, opt in ((model, ours), (twin, ref)):
            opt.zero_grad()
            aux, main = net(x)
            (aux.square().mean() + main.square().mean()).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_fused_release_sgd_skips_on_found_inf_and_takes_a_tensor_lr():
    torch.manual_seed(0)
    a, b = (nn.Parameter(torch.randn(n)) for n in (5, 3))
    lr = torch.tensor(0.1)
    opt = ReleaseSGD([{"params": [a, b, a], "lr": lr}], lr=lr, momentum=0.9, weight_decay=0.05, fused=True)
    a.grad, b.grad = torch.randn(5), torch.full((3,), float("nan"))
    before = [a.detach().clone(), b.detach().clone()]
    opt.found_inf = torch.tensor(1.0)
    opt.step()  # skipped on the device: weights and momentum untouched
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert all(not buf.any() for buf in (opt.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"]))
    b.grad = torch.randn(3)
    opt.found_inf = torch.tensor(0.0)
    lr.fill_(0.2)  # read at the step, as a CUDA-graph replay would
    opt.step()
    expected = sgd_041_reference(before, [0, 1, 0], [[a.grad, b.grad]], 0.2, 0.9, 0.05)
    torch.testing.assert_close(a.detach(), expected[0])
    torch.testing.assert_close(b.detach(), expected[1])


# ReleaseSGD's kernel: on CPU tensors under the interpreter (tests/conftest.py); with TRITON_INTERPRET=0 and a
# GPU (benchmarks/run_gpu.sh) on CUDA tensors.
SGD_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"


@pytest.fixture
def release_sgd_launches(monkeypatch):
    """The Triton backend, ReleaseSGD's kernel launches counted."""
    import advent_fast as af
    from advent_fast.kernels import release_sgd

    launches = []
    update = release_sgd.release_sgd_update
    monkeypatch.setattr(release_sgd, "release_sgd_update", lambda *a: launches.append(1) or update(*a))
    af.set_backend("triton")
    yield launches
    af.set_backend(None)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("lr_tensor", [False, True])
def test_release_sgd_kernel_matches_torch_041(release_sgd_launches, momentum, lr_tensor):
    """The Triton kernel (all k passes of a tensor in registers): the 0.4.1 updates, computed in float64, to
    float32 rounding; multiplicities 1-4, sizes around the kernel's block, a group of more tensors than a
    launch takes, three steps (the momentum carried)."""
    from advent_fast.kernels.multi_tensor import SLOTS
    from advent_fast.kernels.release_sgd import SGD_BLOCK

    torch.manual_seed(0)
    sizes = [1, 5, SGD_BLOCK + 3, 2 * SGD_BLOCK] + [7] * (SLOTS + 2)
    params = [nn.Parameter(torch.randn(n, device=SGD_DEVICE)) for n in sizes]
    order = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3] + [4 + i for i in range(SLOTS + 2)] * 2  # k = 1, 2, 3, 4, then 2
    start = [p.detach().double().clone() for p in params]
    grads = [[torch.randn(n, device=SGD_DEVICE) for n in sizes] for _ in range(3)]
    lr = torch.tensor(0.1, device=SGD_DEVICE) if lr_tensor else 0.1
    opt = ReleaseSGD([{"params": [params[i] for i in order], "lr": lr}], lr=lr, momentum=momentum,
                     weight_decay=0.05, fused=True)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, step))  # the gradients stay as they were
    assert len(release_sgd_launches) == 3
    expected = sgd_041_reference(start, order, [[g.double() for g in step] for step in grads], 0.1, momentum,
                                 0.05)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-6)


def test_release_sgd_kernel_skips_on_found_inf_and_takes_channels_last_and_bf16(release_sgd_launches):
    """found_inf = 1: nothing changes (weights, momentum); a channels_last 1x1 conv weight whose gradient
    has other strides on its size-1 dimensions, and bfloat16 params, take the kernel too."""
    torch.manual_seed(0)
    conv = nn.Parameter(torch.empty_strided((6, 5, 1, 1), (5, 1, 5, 5), device=SGD_DEVICE).copy_(
        torch.randn(6, 5, 1, 1)))
    half = nn.Parameter(torch.randn(9, dtype=torch.bfloat16, device=SGD_DEVICE))
    lr = torch.tensor(0.1, device=SGD_DEVICE)
    opt = ReleaseSGD([{"params": [conv, half, conv], "lr": lr}], lr=lr, momentum=0.9, weight_decay=0.05, fused=True)
    conv.grad = torch.randn(6, 5, 1, 1, device=SGD_DEVICE)
    half.grad = torch.randn(9, dtype=torch.bfloat16, device=SGD_DEVICE)
    assert conv.grad.stride() != conv.stride()  # contiguous: the same element order as channels_last here
    before = [conv.detach().clone(), half.detach().clone()]
    opt.found_inf = torch.tensor(1.0, device=SGD_DEVICE)
    opt.step()
    assert torch.equal(conv, before[0]) and torch.equal(half, before[1])
    assert not opt.state[conv]["momentum_buffer"].any() and not opt.state[half]["momentum_buffer"].any()
    opt.found_inf = torch.tensor(0.0, device=SGD_DEVICE)
    opt.step()
    assert len(release_sgd_launches) == 2
    expected = sgd_041_reference([t.double() for t in before], [0, 1, 0], [[conv.grad.double(), half.grad.double()]],
                                 0.1, 0.9, 0.05)
    torch.testing.assert_close(conv.detach().double(), expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(half.detach().double(), expected[1], rtol=1e-2, atol=1e-2)  # stored in bf16


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_fused_release_sgd_takes_a_gradient_and_a_buffer_of_another_layout(backend):
    """A gradient assigned by hand in another layout than its tensor (autograd's follow their tensor's), and a
    momentum buffer of another layout (a checkpoint of the other memory format): the fused kernels, which walk
    memory in order, get them in the tensor's, on both fused paths (the Triton kernel, torch's fused SGD)."""
    import advent_fast as af

    af.set_backend(backend)
    try:
        torch.manual_seed(0)
        conv = nn.Parameter(torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last))
        bias = nn.Parameter(torch.randn(3))
        start = [conv.detach().clone(), bias.detach().clone()]
        opt = ReleaseSGD([{"params": [conv, conv, bias], "lr": 0.1}], lr=0.1, momentum=0.9, weight_decay=0.05,
                         fused=True)
        conv.grad, bias.grad = torch.randn(4, 3, 2, 2), torch.randn(3)  # conv's contiguous
        grads = [conv.grad.clone(), bias.grad.clone()]
        opt.step()
        # A momentum buffer loaded from a run in another memory format (resumed across the fast-path switch).
        opt.state[conv]["momentum_buffer"] = opt.state[conv]["momentum_buffer"].contiguous()
        opt.step()
    finally:
        af.set_backend(None)
    assert torch.equal(conv.grad, grads[0]) and torch.equal(bias.grad, grads[1])
    expected = sgd_041_reference([t.double() for t in start], [0, 0, 1], [[g.double() for g in grads]] * 2, 0.1, 0.9,
                                 0.05)
    torch.testing.assert_close(conv.detach().double(), expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias.detach().double(), expected[1], rtol=1e-6, atol=1e-6)
    assert opt.state[conv]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)


# ---- init weights and checkpoints ----------------------------------------------------------

def test_load_caffe_init_strips_scale_and_skips_its_layer5(r101, tmp_path):
    source = backbone_items(r101)
    caffe = {f"Scale.{k}": v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    caffe["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(21, 2048, 3, 3)  # its own classifier
    caffe["Scale.layer5.conv2d_list.0.bias"] = torch.zeros(21)
    path = tmp_path / "DeepLab_resnet_pretrained_imagenet.pth"
    torch.save(caffe, path)

    torch.manual_seed(1)
    model = DeepLabV2ResNet101(19)
    heads = head_items(model)
    loaded = load_init_weights(model, path)
    assert len(loaded) == R101_ENTRIES - 16 - 104  # no heads, no num_batches_tracked
    state = model.state_dict()
    assert all(torch.equal(state[k[len("Scale."):]], v) for k, v in caffe.items() if ".layer5." not in k)
    assert_same_tensors(head_items(model), heads)

    torchvision_style = {k: v * 2 for k, v in source.items()}
    torchvision_style["fc.weight"] = torch.zeros(1000, 2048)
    torchvision_style["fc.bias"] = torch.zeros(1000)
    torch.save(torchvision_style, path.with_name("resnet101.pth"))
    load_init_weights(model, path.with_name("resnet101.pth"))
    assert_same_tensors(backbone_items(model), {k: v * 2 for k, v in source.items()})
    assert_same_tensors(head_items(model), heads)


def test_load_torchvision_vgg16_init(tmp_path):
    torch.manual_seed(0)
    model = DeepLabV2VGG16(19, multi_level=False)
    ours_to_torchvision = {i: i if i < 23 else i + 1 for i in range(29)}
    torchvision_vgg = {f"features.{ours_to_torchvision[i]}.{name}": torch.randn_like(t)
                       for i, m in enumerate(model.features[:29]) if isinstance(m, nn.Conv2d)
                       for name, t in m.state_dict().items()}
    torchvision_vgg.update({f"classifier.{i}.weight": torch.zeros(2, 2) for i in (0, 3, 6)})
    torch.save(torchvision_vgg, tmp_path / "vgg16.pth")
    fc6, head = model.features[29].weight.clone(), model.classifier.conv2d_list[0].weight.clone()
    load_init_weights(model, tmp_path / "vgg16.pth")
    assert torch.equal(model.features[23].weight, torchvision_vgg["features.24.weight"])  # conv5_1
    assert torch.equal(model.features[0].bias, torchvision_vgg["features.0.bias"])
    assert torch.equal(model.features[29].weight, fc6)
    assert torch.equal(model.classifier.conv2d_list[0].weight, head)


def test_init_weights_errors(meta_r101, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_init_weights(meta_r101, tmp_path / "nope.pth")
    assert "DeepLab_resnet_pretrained_imagenet.pth" in str(err.value)
    assert "github.com/valeoai/ADVENT" in str(err.value) and "download.pytorch.org" in str(err.value)

    bad = {"fc.weight": torch.zeros(1000, 2048), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: \(64, 64, 3, 3\) vs \(64, 64, 1, 1\)") as err:
        load_init_weights(meta_r101, tmp_path / "bad.pth")
    assert "missing" in str(err.value)

    with torch.device("meta"):
        vgg = DeepLabV2VGG16(19, multi_level=False)
    with pytest.raises(ValueError, match="torchvision_resnet101 file; deeplabv2_vgg16 takes torchvision_vgg16"):
        load_init_weights(vgg, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no ImageNet"):
        load_init_weights(DeepLabV2Small(19), tmp_path / "bad.pth")


def test_training_init_takes_a_whole_model_or_an_imagenet_backbone(r101, tmp_path):
    """model.init_weights: a released model or a release snapshot (plain state dicts), or this project's checkpoint,
    sets every weight, heads included (a warm start, as the release's RESTORE_FROM of a whole model); a torchvision
    ResNet-101, whose keys include the plain layout's signature but no heads, only the backbone."""
    torch.save(r101.state_dict(), tmp_path / "gta2cityscapes_minent_ER.pth")
    torch.save(checkpoint_dict(r101), tmp_path / "model_120000.pt")
    for name in ("gta2cityscapes_minent_ER.pth", "model_120000.pt"):
        torch.manual_seed(1)
        model = DeepLabV2ResNet101(19)
        load_training_init(model, tmp_path / name)
        assert_same_tensors(model.state_dict(), r101.state_dict())

    torchvision_style = {k: v * 2 for k, v in backbone_items(r101).items() if not k.endswith("num_batches_tracked")}
    torchvision_style |= {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torch.save(torchvision_style, tmp_path / "resnet101.pth")
    torch.manual_seed(1)
    model = DeepLabV2ResNet101(19)
    heads = head_items(model)
    load_training_init(model, tmp_path / "resnet101.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in torchvision_style.items() if not k.startswith("fc."))
    assert_same_tensors(head_items(model), heads)

    with torch.device("meta"):
        sixteen = DeepLabV2ResNet101(16)
    with pytest.raises(ValueError, match=r"do not fit this run: num_classes=19 \(this run: 16\)"):
        load_training_init(sixteen, tmp_path / "gta2cityscapes_minent_ER.pth")
    with pytest.raises(FileNotFoundError, match="DeepLab_resnet_pretrained_imagenet.pth"):
        load_training_init(sixteen, tmp_path / "missing.pth")


def test_release_plain_state_dict_loads_strictly(r101, tmp_path):
    path = tmp_path / "gta2cityscapes_advent.pth"
    torch.save(r101.state_dict(), path)
    model, meta = model_from_checkpoint(path)
    assert meta == {"arch": "deeplabv2_r101", "num_classes": 19, "multi_level": True}
    assert isinstance(model, DeepLabV2ResNet101)
    assert_same_tensors(model.state_dict(), r101.state_dict())


def test_release_plain_state_dict_inference_and_mismatch(r101):
    sd = r101.state_dict()
    sixteen = dict(sd)
    for i in range(4):
        sixteen[f"layer6.conv2d_list.{i}.weight"] = torch.zeros(16, 2048, 3, 3)
        sixteen[f"layer6.conv2d_list.{i}.bias"] = torch.zeros(16)
    with pytest.raises(ValueError, match=r"num_classes=16.*num_classes=19"):
        model_from_checkpoint(sixteen, num_classes=19)
    with pytest.raises(ValueError, match=r"deeplabv2_r101.*deeplabv2_small"):
        model_from_checkpoint(sd, arch="deeplabv2_small")
    single = {k: v for k, v in sd.items() if not k.startswith("layer5.")}
    model, meta = model_from_checkpoint(single)
    assert meta["multi_level"] is False and not model.multi_level


def test_project_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DeepLabV2Small(7, width=8)
    model(torch.randn(1, 3, 32, 32))  # move the running stats off their defaults
    path = tmp_path / "snapshot.pth"
    save_checkpoint(path, model, iteration=42)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "advent_fast/1" and raw["iteration"] == 42
    assert raw["meta"] == {"arch": "deeplabv2_small", "num_classes": 7, "multi_level": True, "width": 8}
    restored, meta = model_from_checkpoint(path, arch="deeplabv2_small", num_classes=7)
    assert meta == raw["meta"]
    assert_same_tensors(restored.state_dict(), model.state_dict())

    with pytest.raises(ValueError, match=r"arch='deeplabv2_small'.*arch='deeplabv2_r101'"):
        model_from_checkpoint(path, arch="deeplabv2_r101")
    with pytest.raises(ValueError, match=r"num_classes=7.*num_classes=19"):
        model_from_checkpoint(raw, num_classes=19)
    with pytest.raises(ValueError, match="reserved"):
        checkpoint_dict(model, model=1)
    with pytest.raises(ValueError, match="format"):
        model_from_checkpoint({**raw, "format": "other/2"})
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        model_from_checkpoint(tmp_path / "missing.pth")


def test_load_model_state_is_strict_with_a_clear_error():
    model = DeepLabV2Small(7, width=8)
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "layer6.conv2d_list.3.bias"}
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. layer6\.conv2d_list\.3\.bias\)"):
        load_model_state(model, missing)
    with pytest.raises(ValueError, match=r"1 unexpected \(e\.g\. extra\.weight\)"):
        load_model_state(model, {**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"stage1\.0\.weight: \(8, 3, 3, 1\) vs \(8, 3, 3, 3\)"):
        load_model_state(model, {**sd, "stage1.0.weight": torch.zeros(8, 3, 3, 1)})


# ---- frozen BatchNorm folded into convolutions ----------------------------------------------

def randomise_conv_and_bn(model, seed=0):
    """Unit-scale conv weights and non-trivial BN statistics, so that folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def folded_small_and_reference(seed=0):
    """(folded, unfolded deepcopy) DeepLabV2Small pair, both in train() mode with freeze_bn."""
    reference = randomise_conv_and_bn(DeepLabV2Small(5, freeze_bn=True, width=8), seed)
    folded = copy.deepcopy(reference)
    assert fold_frozen_batchnorm(folded) == 7  # stage1 1 + stages 2-4 2 each
    return folded.train(), reference.train()


def assert_close_rel(actual, expected, rel=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item())


def forward_backward(model, x, seed=1):
    """Both heads' outputs and (input grad, conv weight grads) of a random linear loss."""
    x = x.detach().clone().requires_grad_(True)
    aux, main = model(x)
    g = torch.Generator().manual_seed(seed)
    loss = (aux * torch.randn(aux.shape, generator=g)).sum() + (main * torch.randn(main.shape, generator=g)).sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return (aux, main), x.grad, grads


def test_fold_frozen_batchnorm_matches_unfolded_in_train_mode():
    folded, reference = folded_small_and_reference()
    x = torch.randn(2, 3, 32, 32)
    outs, x_grad, grads = forward_backward(folded, x)
    ref_outs, ref_x_grad, ref_grads = forward_backward(reference, x)
    for out, ref in zip(outs, ref_outs):
        assert_close_rel(out, ref)
    assert_close_rel(x_grad, ref_x_grad)
    assert grads.keys() == ref_grads.keys()
    assert sum(k.endswith(".0.weight") and k.startswith("stage") for k in grads) == 7  # every folded conv
    for k in ref_grads:
        assert_close_rel(grads[k], ref_grads[k])
    # Frozen BN: no statistics update in either; one SGD step keeps the two models equal.
    assert_same_tensors(folded.state_dict(), reference.state_dict())
    for model in (folded, reference):
        torch.optim.SGD(model.optim_parameters(0.1, grouping="clean"), lr=0.1, momentum=0.9).step()
    for k, v in reference.state_dict().items():
        assert_close_rel(folded.state_dict()[k], v)


def test_fold_frozen_batchnorm_keeps_parameters_state_dict_and_optimiser_groups():
    model = randomise_conv_and_bn(DeepLabV2Small(5, freeze_bn=True, width=8))
    before = copy.deepcopy(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    params = list(model.named_parameters())
    groups = model.optim_parameters(0.1, grouping="clean")
    optimiser = torch.optim.SGD(groups, lr=0.1)
    assert fold_frozen_batchnorm(model) == 7
    assert fold_frozen_batchnorm(model) == 0  # idempotent
    assert [n for n, _ in model.named_modules()] == names  # each BN listed once, same names
    after = model.state_dict()
    assert list(after) == list(before)
    assert_same_tensors(after, before)
    assert [(n, id(p), p.requires_grad) for n, p in model.named_parameters()] == \
        [(n, id(p), p.requires_grad) for n, p in params]
    for old, new, opt in zip(groups, model.optim_parameters(0.1, grouping="clean"), optimiser.param_groups):
        assert [id(p) for p in new["params"]] == [id(p) for p in old["params"]] == [id(p) for p in opt["params"]]
        assert new["lr"] == old["lr"]
    # deepcopy / .to(): the copy's conv applies the copy's BN, converted along with the model.
    clone = copy.deepcopy(model).to(torch.float64)
    assert clone.stage1[0]._folded_bn is clone.stage1[1]
    x = torch.randn(1, 3, 24, 24, dtype=torch.float64)
    reference = DeepLabV2Small(5, freeze_bn=True, width=8).to(torch.float64)
    reference.load_state_dict(clone.state_dict())
    assert_close_rel(clone(x)[1], reference(x)[1], rel=1e-12)


def test_fold_frozen_batchnorm_load_state_dict_after_folding_takes_effect():
    folded, reference = folded_small_and_reference(seed=0)
    other = randomise_conv_and_bn(DeepLabV2Small(5, freeze_bn=True, width=8), seed=2).state_dict()
    x = torch.randn(1, 3, 32, 32)
    before = folded(x)[1].detach()
    folded.load_state_dict(other)
    reference.load_state_dict(other)
    with torch.no_grad():
        out, ref = folded(x)[1], reference(x)[1]
    assert_close_rel(out, ref)
    assert not torch.allclose(out, before)
    # BN statistics alone (conv weights unchanged) reach the folded forward too.
    with torch.no_grad():
        for model in (folded, reference):
            model.stage4[1][1].running_var.mul_(4.0)
        assert_close_rel(folded(x)[1], reference(x)[1])


def test_fold_frozen_batchnorm_channels_last_and_bf16_autocast():
    folded, reference = folded_small_and_reference()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = reference(x)[1]
        assert_close_rel(folded.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))[1], ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            aux, main = folded(x)
            ref_aux, ref_main = reference(x)
    assert main.dtype == aux.dtype == torch.bfloat16
    assert_close_rel(main.float(), ref_main.float(), rel=3e-2)
    assert_close_rel(aux.float(), ref_aux.float(), rel=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        main = folded(x.requires_grad_(True))[1]
    main.float().sum().backward()
    assert torch.isfinite(folded.stage1[0].weight.grad).all() and torch.isfinite(x.grad).all()


def test_fold_frozen_batchnorm_needs_freeze_bn_and_eval_mode_batchnorm():
    with pytest.raises(ValueError, match="freeze_bn"):
        fold_frozen_batchnorm(DeepLabV2Small(5, width=8))
    folded, _ = folded_small_and_reference()
    folded.stage1.train()  # bypasses the model's train(): BN would use batch statistics
    with pytest.raises(RuntimeError, match="eval mode"):
        folded(torch.randn(1, 3, 16, 16))


class AtenOpCounts(TorchDispatchMode):
    """Counts the aten ops a block runs (each one a kernel the host issues on a GPU)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def forward_ops(model, x, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad(), AtenOpCounts() as ops:
        out = model(x)[1]
    return out, ops.counts


def test_fold_frozen_batchnorm_reuses_the_bn_affine_until_a_bn_tensor_changes():
    """The folded convs' BN scales and shifts are computed once, not every forward (five small kernels a
    conv), for all of them together (one rsqrt), and again when a BN tensor changes: in place, by
    load_state_dict or by .to()."""
    folded, reference = folded_small_and_reference()
    x = torch.randn(1, 3, 16, 16)
    _, first = forward_ops(folded, x)
    assert first["rsqrt"] == 1 and first["cat"] == 4  # gamma, beta, mean and var of the 7 BNs
    from advent_fast.models.deeplabv2 import _affine, _bn_tensors

    for conv in (m for m in folded.modules() if hasattr(m, "_folded_bn")):  # bit for bit each BN's own
        alone = _affine(_bn_tensors(conv._folded_bn), conv._folded_bn.eps)
        assert torch.equal(conv._affine_cache[3], alone[0]) and torch.equal(conv._affine_cache[4][None], alone[1])
    out, again = forward_ops(folded, x)
    ref, ref_ops = forward_ops(reference, x)
    assert_close_rel(out, ref)
    assert again["rsqrt"] == again["sub"] == 0 and again["mul"] == 7  # the weight times s, per folded conv
    assert again["convolution"] == ref_ops["convolution"] and "native_batch_norm" not in again
    # Under autocast the cached shift is in bf16 (no bias casts), and each folded conv's multiply writes
    # its scaled weight in bf16: 7 casts fewer than the unfolded model, which casts every weight.
    forward_ops(folded, x, autocast=True)
    out, again = forward_ops(folded, x, autocast=True)
    ref, ref_ops = forward_ops(reference, x, autocast=True)
    assert again["_to_copy"] == ref_ops["_to_copy"] - 7 and again["mul"] == 7 and again["rsqrt"] == 0
    assert_close_rel(out.float(), ref.float(), rel=3e-2)
    # Changes of the BN's tensors reach the next forward.
    with torch.no_grad():
        for model in (folded, reference):
            model.stage4[1][1].running_var.mul_(4.0)
    out, changed = forward_ops(folded, x)
    assert changed["rsqrt"] == 1
    assert_close_rel(out, forward_ops(reference, x)[0])
    other = randomise_conv_and_bn(DeepLabV2Small(5, freeze_bn=True, width=8), seed=3).state_dict()
    folded.load_state_dict(other)
    reference.load_state_dict(other)
    assert_close_rel(forward_ops(folded, x)[0], forward_ops(reference, x)[0])
    x64 = x.double()
    assert_close_rel(forward_ops(folded.double(), x64)[0], forward_ops(reference.double(), x64)[0], rel=1e-12)


class WeightOps(TorchDispatchMode):
    """Counts, by name, the multiplies and casts of each of the ``named`` tensors (found by storage): what
    makes a convolution's low-precision (or a folded frozen BN's scaled) weight."""

    def __init__(self, named):
        super().__init__()
        self.names = {t.data_ptr(): name for name, t in named}
        self.counts = {name: 0 for name, _ in named}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mul", "_to_copy") and args[0].data_ptr() in self.names:
            self.counts[self.names[args[0].data_ptr()]] += 1
        return func(*args, **(kwargs or {}))


def two_passes(model, xs, autocast):
    """A step's shape: a forward and backward per input, gradients accumulated; (outputs, grads, weight ops)."""
    model.zero_grad(set_to_none=True)
    outs = []
    weights = [(name, m.weight) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with WeightOps(weights) as ops:
        for i, x in enumerate(xs):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                aux, main = model(x)
            g = torch.Generator().manual_seed(i)
            (aux.float() * torch.randn(aux.shape, generator=g)).sum().backward()
            outs.append(main.detach())
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return outs, grads, sum(ops.counts.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_shared_scaled_weights_are_made_once_for_several_forwards_and_backwards(autocast):
    """Inside shared_scaled_weights a folded conv scales its weight once for two forwards, each with its
    own backward: the same outputs and accumulated gradients as scaling in each forward, bit for bit."""
    folded, reference = folded_small_and_reference()
    xs = [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)]
    per_forward = two_passes(folded, xs, autocast)
    with shared_scaled_weights():
        shared = two_passes(folded, xs, autocast)
        with shared_scaled_weights():  # nested: the outer block keeps them
            pass
        assert folded.stage1[0]._scaled_weight_cache is not None
    assert folded.stage1[0]._scaled_weight_cache is None  # dropped on leaving the block
    unfolded_convs = sum(type(m) is nn.Conv2d for m in folded.modules())  # the heads' convs
    casts = unfolded_convs * 2 if autocast else 0  # autocast casts them in each forward (no cache here)
    assert per_forward[2] == 7 * 2 + casts and shared[2] == 7 + casts
    for a, b in zip(per_forward[0], shared[0]):
        assert torch.equal(a, b)
    assert per_forward[1].keys() == shared[1].keys()
    for k in per_forward[1]:
        assert torch.equal(per_forward[1][k], shared[1][k]), k
    if not autocast:  # and the unfolded model's (bf16 rounds the two differently)
        _, ref_grads, _ = two_passes(reference, xs, autocast)
        for k in ref_grads:
            assert_close_rel(shared[1][k], ref_grads[k])
    # A weight changed in place (an optimiser step) inside the block is scaled again.
    with shared_scaled_weights():
        before = folded(xs[0])[1]
        with torch.no_grad():
            folded.stage4[1][0].weight.mul_(2.0)
            reference.stage4[1][0].weight.mul_(2.0)
        after = folded(xs[0])[1]
    assert not torch.equal(before, after)
    assert_close_rel(after.detach(), reference(xs[0])[1].detach())


class AffineAndWeightOps(TorchDispatchMode):
    """Counts the rsqrt ops (one per BN scale and shift made) and the ops that make a scaled weight."""

    def __init__(self, named):
        super().__init__()
        self.weights = {t.data_ptr() for _, t in named}
        self.affines = self.scaled_weights = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.affines += name == "rsqrt"
        self.scaled_weights += name == "mul" and args[0].data_ptr() in self.weights
        return func(*args, **(kwargs or {}))


def test_a_captured_step_makes_the_bn_affine_and_scaled_weights_once_in_its_block(monkeypatch):
    """While a CUDA graph captures (simulated here: the CPU cannot capture), a folded conv never reuses
    the scale and shift of an eager forward (their memory is not the graph's, and the replays must follow
    the BN tensors), computes them once in a shared_scaled_weights block (a step) and drops them on
    leaving it, as the scaled weights; the values are the eager ones, bit for bit."""
    from advent_fast.models import deeplabv2

    folded, _ = folded_small_and_reference()
    xs = [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)]
    weights = [(name, m.weight) for name, m in folded.named_modules() if isinstance(m, nn.Conv2d)]
    with shared_scaled_weights():
        eager = two_passes(folded, xs, autocast=True)  # also fills the eager affine cache
    monkeypatch.setattr(deeplabv2, "_capturing", lambda tensor: True)
    with AffineAndWeightOps(weights) as unshared:  # no block: every forward makes its own
        two_passes(folded, xs, autocast=True)
    assert (unshared.affines, unshared.scaled_weights) == (7 * 2, 7 * 2)
    with shared_scaled_weights(), AffineAndWeightOps(weights) as shared:
        captured = two_passes(folded, xs, autocast=True)
        assert all(conv._affine_cache[2] for conv in folded.modules() if hasattr(conv, "_folded_bn"))
    assert (shared.affines, shared.scaled_weights) == (1, 7)  # every conv's affine at once
    assert all(conv._affine_cache is None for conv in folded.modules() if hasattr(conv, "_folded_bn"))
    for a, b in zip(eager[0], captured[0]):
        assert torch.equal(a, b)
    for k in eager[1]:
        assert torch.equal(eager[1][k], captured[1][k]), k
    monkeypatch.setattr(deeplabv2, "_capturing", lambda tensor: False)
    with AffineAndWeightOps(weights) as after:  # eager again: made once, then kept across forwards
        forward_ops(folded, xs[0])
        forward_ops(folded, xs[0])
    assert after.affines == 1


def test_fold_frozen_batchnorm_counts_and_r101_equality():
    with torch.device("meta"):
        assert fold_frozen_batchnorm(DeepLabV2VGG16(19, multi_level=False, freeze_bn=True)) == 0  # no BN
    torch.manual_seed(0)
    model = randomise_conv_and_bn(DeepLabV2ResNet101(19, freeze_bn=True))
    x = torch.randn(1, 3, 33, 33)
    ref_outs, ref_x_grad, ref_grads = forward_backward(model, x)
    assert fold_frozen_batchnorm(model) == 1 + (3 + 4 + 23 + 3) * 3 + 4  # stem, bottlenecks, shortcuts
    outs, x_grad, grads = forward_backward(model.train(), x)
    for out, ref in zip(outs, ref_outs):
        assert_close_rel(out, ref)
    assert_close_rel(x_grad, ref_x_grad)
    for k in ("conv1.weight", "layer1.0.downsample.0.weight", "layer3.22.conv2.weight", "layer4.2.conv3.weight"):
        assert_close_rel(grads[k], ref_grads[k])


def test_batchnorm_counts_each_forward_with_one_multi_tensor_add():
    """Train-mode BatchNorm's num_batches_tracked: one _foreach_add_ a forward for every layer instead of an
    add_ each, the same counts: not again in activation checkpointing's recomputation, not in eval mode, not
    for a forward that fails; a layer without a momentum (its average needs the count) counts itself."""
    torch.manual_seed(0)
    model = DeepLabV2Small(5, width=8).train()
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(1, 3, 32, 32)

    def counts():
        return [int(m.num_batches_tracked) for m in layers]

    with AtenOpCounts() as ops:
        model(x)
    assert ops.counts["_foreach_add_"] == 1 and ops.counts["add_"] == 0 and counts() == [1] * len(layers)
    model.activation_checkpointing = True
    aux, main = model(x)
    (aux.sum() + main.sum()).backward()
    assert counts() == [2] * len(layers)
    model.eval()
    model(x)
    assert counts() == [2] * len(layers)
    model.train()
    layers[0].momentum = None
    before = layers[0].running_mean.clone()
    model(x)
    assert counts() == [3] * len(layers)
    assert not torch.equal(layers[0].running_mean, before)  # averaged with the count, 1/3
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 4, 32, 32))  # 4 channels: the first convolution refuses them
    assert counts() == [3] * len(layers) and all(m.num_batches_tracked is not None for m in layers)


# ---- activation checkpointing ---------------------------------------------------------------

def count_forward_calls(modules):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    return calls, [m.register_forward_hook(hook) for m in modules]


@pytest.mark.parametrize("build", [
    lambda: DeepLabV2Small(5, width=8),  # train-mode BatchNorm: statistics must update once
    lambda: DeepLabV2Small(5, freeze_bn=True, width=8),
    lambda: DeepLabV2ResNet101(19),
    lambda: DeepLabV2VGG16(19),
], ids=["small", "small_frozen_bn", "r101", "vgg16"])
def test_activation_checkpointing_gives_the_same_values_gradients_and_statistics(build):
    torch.manual_seed(0)
    reference = randomise_conv_and_bn(build())
    model = copy.deepcopy(reference)
    model.activation_checkpointing = True
    x = torch.randn(2, 3, 40, 40)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(o.shape, generator=g) for o in reference(x) if o is not None]
    reference.load_state_dict(model.state_dict())  # undo that forward's statistics update
    results = []
    for m in (reference, model):
        calls, hooks = count_forward_calls([mod for mod in m.modules() if isinstance(mod, (nn.Conv2d))])
        xr = x.clone().requires_grad_(True)
        outs = [o for o in m(xr) if o is not None]
        forward_calls = calls["n"]
        sum((o * u).sum() for o, u in zip(outs, upstream)).backward()
        results.append((outs, xr.grad, {k: p.grad for k, p in m.named_parameters() if p.grad is not None},
                        forward_calls, calls["n"] - forward_calls))
        for h in hooks:
            h.remove()
    (ref_outs, ref_x_grad, ref_grads, ref_calls, ref_recomputed), (outs, x_grad, grads, calls, recomputed) = results
    for out, ref in zip(outs, ref_outs):
        assert torch.equal(out, ref)
    assert_close_rel(x_grad, ref_x_grad, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        assert_close_rel(grads[k], ref_grads[k], rel=1e-6)
    # The backbone's convolutions ran again in the backward (heads and the R101 stem did not)...
    assert ref_recomputed == 0 and calls == ref_calls and 0 < recomputed < calls
    # ...and train-mode BatchNorm updated its running statistics and batch count once.
    assert_same_tensors(model.state_dict(), reference.state_dict())
    with torch.no_grad():  # no backward, nothing to recompute
        for out, ref in zip(model(x), reference(x)):
            if ref is not None:
                assert torch.equal(out, ref)


def test_activation_checkpointing_keeps_less_for_the_backward():
    def saved_bytes(model, x):
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor.detach()  # no cycle with the node that saves it: freed with the graph

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(x)
        return sum(storages.values())

    model = DeepLabV2ResNet101(19)
    x = torch.randn(1, 3, 64, 64)
    kept = saved_bytes(model, x)
    model.activation_checkpointing = True
    assert saved_bytes(model, x) < 0.2 * kept  # seen: 0.10 (the stem, block inputs, the heads)
