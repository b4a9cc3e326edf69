"""train.fused_weight_casts: a step's 16-bit weights made by one autograd node (advent_fast.weight_casts), its
multi-tensor kernel (kernels/weight_cast.py) against torch, and the node against autocast's casts and
autograd's accumulation over a step's two backwards."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import advent_fast
from advent_fast.models import DeepLabV2Small, FCDiscriminator, fold_frozen_batchnorm
from advent_fast.weight_casts import castable_parameters, weights_cast_for_step

# The kernel tests: the Triton interpreter on CPU tensors (CI), compiled on CUDA tensors with a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


@pytest.fixture(params=["cpp", "triton"])
def backend(request):
    advent_fast.set_backend(request.param)
    yield request.param
    advent_fast.set_backend(None)


def test_cast_add_kernel_matches_torch(monkeypatch):
    """More tensors than a launch's slots, sizes around the block, channels_last and transposed ones,
    with and without the gradient so far; casts to float16 (bfloat16: below) and float32."""
    from advent_fast.kernels import weight_cast

    monkeypatch.setattr(weight_cast, "CAST_BLOCK", 16)
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (15,), (16,), (17,), (40,), (3, 5, 3, 3), (4, 6, 1, 1), (9, 7), (33,), (2,)]
    weights = [100 * torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    weights[5] = weights[5].contiguous(memory_format=torch.channels_last)
    weights[7] = weights[7].t().contiguous().t()  # column-major
    casts = [torch.empty_like(w, dtype=torch.float16) for w in weights]
    weight_cast.cast_add(weights, [None] * len(weights), casts)
    for w, c in zip(weights, casts):
        assert c.stride() == w.stride() and torch.equal(c, w.to(torch.float16))
    grads = [torch.randn(w.shape, generator=gen).to(DEVICE, torch.bfloat16) for w in weights]
    grads = [torch.empty_like(w, dtype=torch.bfloat16).copy_(g) for w, g in zip(weights, grads)]
    accs = [torch.randn(w.shape, generator=gen).to(DEVICE) if i % 2 else None for i, w in enumerate(weights)]
    accs = [None if a is None else torch.empty_like(w).copy_(a) for w, a in zip(weights, accs)]
    outs = [torch.empty_like(w) for w in weights]
    weight_cast.cast_add(grads, accs, outs)
    for g, a, out in zip(grads, accs, outs):
        assert torch.equal(out, g.float() if a is None else a + g.float())


def test_cast_add_kernel_casts_to_bfloat16_as_torch():
    """Compiled Triton rounds float32 to bfloat16 to nearest even, as torch; the interpreter (numpy has no
    bfloat16) truncates the mantissa: at most one bfloat16 step apart, towards zero."""
    from advent_fast.kernels import weight_cast

    w = torch.randn(3000, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = torch.empty_like(w, dtype=torch.bfloat16)
    weight_cast.cast_add([w], [None], [out])
    ref = w.to(torch.bfloat16)
    if DEVICE == "cuda":
        assert torch.equal(out, ref)
    else:
        step = ref.float().abs() * 2.0 ** -7
        assert ((out.float() - ref.float()).abs() <= step).all() and (out.float().abs() <= w.abs()).all()


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def two_passes(model, d, xs, fused: bool, dtype):
    """A step's pattern: G's two forwards and backwards (source, then target through a discriminator),
    under one autocast cache, as the trainer runs them."""
    ops = Ops()
    with torch.autocast("cpu", dtype=dtype, enabled=False):
        with weights_cast_for_step(model, dtype) if fused else torch.autocast("cpu", enabled=False):
            for i, x in enumerate(xs):
                with torch.autocast("cpu", dtype=dtype):
                    aux, main = model(x)
                    loss = main.float().square().mean() + aux.float().mean()
                    if i:  # D on the full-resolution map, as the trainer's
                        info = F.interpolate(main.float(), size=x.shape[-2:], mode="bilinear").softmax(1)
                        loss = loss + d(info).float().mean()
                if i:
                    with ops:
                        loss.backward()
                else:
                    loss.backward()
    return ops.names


@pytest.mark.parametrize("frozen", [False, True])
def test_one_node_gives_autocasts_weights_and_gradients_bit_for_bit(backend, frozen):
    """fp16 (the interpreter's float16 casts round as torch's); the second backward's accumulation taken as
    it is (no clone, no add a tensor); folded frozen BatchNorm's convolutions keep their own weights; the
    parameters are back in place after the step."""
    torch.manual_seed(0)
    model = DeepLabV2Small(19, width=4, freeze_bn=frozen).to(memory_format=torch.channels_last)
    if frozen:
        fold_frozen_batchnorm(model)
    d = FCDiscriminator(19, ndf=8).to(memory_format=torch.channels_last)
    xs = [torch.randn(1, 3, 32, 48).to(memory_format=torch.channels_last) for _ in range(2)]
    ref_model, ref_d = copy.deepcopy(model), copy.deepcopy(d)
    two_passes(ref_model, ref_d, xs, False, torch.float16)
    ops = two_passes(model, d, xs, True, torch.float16)
    castable = castable_parameters(model)
    assert len(castable) == (2 * 4 * 2 if frozen else 7 + 2 * 4 * 2)  # the heads' only, with folded convs
    for (name, p), (_, ref) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert type(p) is nn.Parameter, name
        assert (p.grad is None) == (ref.grad is None), name
        if p.grad is not None:
            assert p.grad.stride() == ref.grad.stride() and torch.equal(p.grad, ref.grad), name
    assert "clone" not in ops and ops.count("_to_copy") < len(castable)  # D's casts (frozen D: not ours)


def test_parameters_come_back_when_the_step_raises():
    model = DeepLabV2Small(19, width=4)
    before = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with weights_cast_for_step(model, torch.bfloat16):
            assert model.stage1[0].weight.dtype == torch.bfloat16
            raise RuntimeError("boom")
    assert dict(model.named_parameters()) == before
