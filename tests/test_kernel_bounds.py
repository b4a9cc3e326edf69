"""Memory safety of the Triton launchers, checked under the interpreter: every kernel reads and writes
only elements of its tensors and writes every element of what it returns.

The interpreter does not trap an out-of-bounds access (a GPU faults or corrupts memory; the interpreter
silently reads or writes whatever lies there). So each case runs a launcher twice with every tensor (the
inputs, and the outputs and temporaries the launchers allocate) placed in a larger buffer whose other
elements (guard bands either side, the gaps of strided views) hold poison, a different poison each run,
and with every load, store and atomic of the interpreter checked against the addresses of those
tensors' elements (an access with its mask off is no access). The two runs must return equal results
(an element never written differs between them) and leave every poisoned element as it was.
"""
import contextlib
import importlib
import os

import numpy as np
import pytest
import torch
from triton.runtime.interpreter import InterpreterBuilder

try:
    from advent_fast import kernels
except ImportError:  # not installed: the top-level folder itself (PYTHONPATH=repo root)
    import kernels

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the interpreter's check (on a GPU: compute-sanitizer)")

GUARD = 97  # poisoned elements either side of every tensor
# (floating, integer, uint8) poison of the two runs: an element left unwritten differs between them
# (labels: a class, then the ignore index; the keep mask: 0, then 1)
POISONS = ((float("nan"), 3, 0), (1.5, 255, 1))
ORIGINAL = {name: getattr(torch, name) for name in ("empty", "empty_like", "zeros")}


class Poisoned:
    """Hands out tensors that are views into poisoned buffers and checks the poison afterwards."""

    def __init__(self, run):
        self.floating, self.integer, self.mask = POISONS[run]
        self.buffers = []  # (buffer, bool mask of the elements outside every view of it)
        self.elements = []  # (byte addresses of a tensor's elements, element size)
        self.valid = None  # every byte of every tensor's elements, sorted

    def poison_for(self, dtype):
        if dtype.is_floating_point:
            return self.floating
        return self.mask if dtype == torch.uint8 else self.integer

    def place(self, shape, stride, dtype, values=None):
        """A tensor of this shape, strides and dtype inside a buffer poisoned everywhere else."""
        span = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        buffer = ORIGINAL["empty"](span + 2 * GUARD, dtype=dtype)
        buffer.fill_(self.poison_for(dtype))
        view = buffer.as_strided(shape, stride, GUARD)
        footprint = torch.arange(buffer.numel()).as_strided(shape, stride, GUARD).reshape(-1)
        outside = torch.ones(buffer.numel(), dtype=torch.bool)
        outside[footprint] = False
        self.buffers.append((buffer, outside))
        size = buffer.element_size()
        self.elements.append((buffer.data_ptr() + size * footprint.numpy().astype(np.uint64), size))
        self.valid = None
        if values is not None:
            view.copy_(values)
        return view

    def like(self, t, values=None):
        return self.place(tuple(t.shape), t.stride(), t.dtype, t if values is None else values)

    @contextlib.contextmanager
    def allocations(self):
        """torch.empty / empty_like / zeros, as the launchers call them, give poisoned placements."""
        def empty(*args, **kwargs):
            t = ORIGINAL["empty"](*args, **kwargs)
            return self.place(tuple(t.shape), t.stride(), t.dtype)

        def empty_like(*args, **kwargs):
            t = ORIGINAL["empty_like"](*args, **kwargs)
            return self.place(tuple(t.shape), t.stride(), t.dtype)

        def zeros(*args, **kwargs):
            t = ORIGINAL["zeros"](*args, **kwargs)
            return self.place(tuple(t.shape), t.stride(), t.dtype, t)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "empty", empty)
            mp.setattr(torch, "empty_like", empty_like)
            mp.setattr(torch, "zeros", zeros)
            yield

    def check_access(self, kind, ptrs, mask=None):
        """Every byte that the interpreter's access of ptrs (where mask holds) touches is an element's."""
        if self.valid is None:
            self.valid = np.unique(np.concatenate(
                [(starts[:, None] + np.arange(size, dtype=np.uint64)).ravel() for starts, size in self.elements]))
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        touched = (addresses.reshape(-1, 1) + np.arange(size, dtype=np.uint64)).ravel()
        found = np.minimum(np.searchsorted(self.valid, touched), len(self.valid) - 1)
        outside = self.valid[found] != touched
        assert not outside.any(), f"out-of-bounds {kind}: {int(outside.sum())} bytes outside every tensor"

    @contextlib.contextmanager
    def address_checks(self):
        """The interpreter's loads, stores and atomics check their addresses first (create_load and
        create_store go through the masked versions)."""
        def checked(name, kind, ptr_at, mask_at):
            original = getattr(InterpreterBuilder, name)

            def method(builder, *args, **kwargs):
                self.check_access(kind, args[ptr_at], None if mask_at is None else args[mask_at])
                return original(builder, *args, **kwargs)
            return method

        with pytest.MonkeyPatch.context() as mp:
            for name, kind, ptr_at, mask_at in (("create_masked_load", "load", 0, 1),
                                                 ("create_masked_store", "store", 0, 2),
                                                 ("create_atomic_rmw", "atomic", 1, 3),
                                                 ("create_atomic_cas", "atomic", 0, None)):
                mp.setattr(InterpreterBuilder, name, checked(name, kind, ptr_at, mask_at))
            yield

    def assert_untouched(self):
        for buffer, outside in self.buffers:
            rest, poison = buffer[outside], self.poison_for(buffer.dtype)
            intact = rest.isnan() if poison != poison else rest == poison
            assert intact.all(), f"out-of-bounds write: {int((~intact).sum())} poisoned {buffer.dtype} elements changed"


def same(a, b):
    if a is None or b is None:  # an output not asked for
        return a is b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.dtype.is_floating_point else torch.equal(a, b)


def run_twice(case):
    """case(p: Poisoned) -> outputs; run under both poisons, compared and guard-checked."""
    results = []
    for run in range(2):
        poisoned = Poisoned(run)
        torch.manual_seed(0)  # the same input values in both runs
        with poisoned.allocations(), poisoned.address_checks():
            out = case(poisoned)
        poisoned.assert_untouched()
        results.append(out if isinstance(out, tuple) else (out,))
    for i, (a, b) in enumerate(zip(*results)):
        assert same(a, b), f"output {i} depends on poison: an out-of-bounds read or an unwritten element"


def logits(p, n, c, s, dtype, layout):
    """(N, C, S) logits with -inf and large entries, placed with the layout's strides."""
    values = torch.randn(n, c, s) * 4
    values[0, 1, ::7] = float("-inf")
    values[-1, 0, ::5] = 1e4
    if layout == "channels_last":
        stride = (s * c, 1, c)
    elif layout == "strided":  # every other element of a wider tensor: gaps of poison between them
        stride = (2 * c * s, 2 * s, 2)
    else:
        stride = (c * s, s, 1)
    return p.place((n, c, s), stride, dtype, values.to(dtype))


PIXEL_CASES = [
    (2, 19, 300, torch.float32, "contiguous"),
    (2, 19, 300, torch.bfloat16, "channels_last"),
    (1, 21, 130, torch.float16, "strided"),
    (1, 2, 1, torch.float32, "contiguous"),
]


@pytest.mark.parametrize("n,c,s,dtype,layout", PIXEL_CASES)
@pytest.mark.parametrize("ranked", [False, True], ids=["mean", "ranked"])
def test_per_pixel_kernels_stay_in_bounds(n, c, s, dtype, layout, ranked):
    k = max(1, s // 3) if ranked else 0

    def case(p):
        x = logits(p, n, c, s, dtype, layout)
        scalar = p.place((), (), torch.float32, torch.tensor(0.7))
        alone = ()
        if not ranked:  # MinEnt alone: on pixel-contiguous logits, the class-loop kernels
            alone = (kernels.target_forward(x, None, 0, 0.5, False, False, True, False)[2],
                     kernels.target_backward(x, None, None, scalar, None, None, None, None, None, 0.5))
        prior = p.place((c,), (1,), torch.float32, torch.rand(c))
        info, emap, ent, cp, thresh, kept, cmean, keep = kernels.target_forward(x, prior, k, 0.5, True, True,
                                                                                True, True)
        grad_info = p.like(info, torch.randn(info.shape).to(dtype))
        grad_emap = p.place((n, s), (s, 1), torch.float32, torch.randn(n, s))
        saved = (keep, kept) if ranked else (None, None)
        grad_x = kernels.target_backward(x, grad_info, grad_emap, scalar, scalar, *saved, cmean, prior, 0.5)
        return info, emap, ent, cp, thresh, kept, cmean, keep, grad_x, *alone

    run_twice(case)


UPSAMPLED_CASES = [
    (2, 16, (9, 17), (33, 67), torch.float16, "contiguous"),
    (1, 19, (5, 7), (17, 41), torch.bfloat16, "channels_last"),
    (1, 2, (1, 1), (3, 4), torch.float32, "contiguous"),
]


def low_res_logits(p, n, c, h, w, dtype, layout):
    values = torch.randn(n, c, h, w) * 4
    values[0, 1, 0, :] = float("-inf")
    stride = (h * w * c, 1, w * c, c) if layout == "channels_last" else (c * h * w, h * w, w, 1)
    return p.place((n, c, h, w), stride, dtype, values.to(dtype))


@pytest.mark.parametrize("n,c,low,size,dtype,layout", UPSAMPLED_CASES)
def test_upsampled_cross_entropy_stays_in_bounds(n, c, low, size, dtype, layout):
    ce = importlib.import_module(f"{kernels.__name__}.upsampled_cross_entropy")
    (h, w), (H, W) = low, size

    def case(p):
        x = low_res_logits(p, n, c, h, w, dtype, layout)
        labels = torch.randint(0, c, (n, H, W))
        labels[:, ::3, ::2] = 255
        labels = p.place((n, H, W), (H * W, W, 1), torch.int64, labels)
        loss, count, parts = ce.upsampled_cross_entropy_forward(x, labels, 255, True)
        grad_x = ce.upsampled_cross_entropy_backward(x, parts, count, p.place((), (), torch.float32,
                                                                              torch.tensor(0.7)))
        return loss, count, grad_x

    run_twice(case)


@pytest.mark.parametrize("n,c,low,size,dtype,layout", UPSAMPLED_CASES)
@pytest.mark.parametrize("ranked", [False, True], ids=["mean", "ranked"])
def test_upsampled_target_kernels_stay_in_bounds(n, c, low, size, dtype, layout, ranked):
    up = importlib.import_module(f"{kernels.__name__}.upsampled_target")
    (h, w), (H, W) = low, size
    k = max(1, H * W // 3) if ranked else 0

    def case(p):
        x = low_res_logits(p, n, c, h, w, dtype, layout)
        prior = p.place((c,), (1,), torch.float32, torch.rand(c))
        info, emap, ent, cp, thresh, kept, cmean, keep = up.upsampled_target_forward(x, H, W, prior, k, 0.5, True,
                                                                                     True, True, True)
        grad_info = p.like(info, torch.randn(info.shape).to(dtype))
        grad_emap = p.place((n, H, W), (H * W, W, 1), torch.float32, torch.randn(n, H, W))
        scalar = p.place((), (), torch.float32, torch.tensor(0.7))
        saved = (keep, kept) if ranked else (None, None)
        grad_x = up.upsampled_target_backward(x, H, W, grad_info, grad_emap, scalar, scalar, *saved, cmean, prior,
                                              0.5)
        return info, emap, ent, cp, thresh, kept, cmean, keep, grad_x

    run_twice(case)


@pytest.mark.parametrize("n,c,h,w,dtype", [(2, 19, 5, 7, torch.float32), (1, 70, 3, 3, torch.bfloat16),
                                           (1, 3, 2, 1, torch.float16)])
@pytest.mark.parametrize("relu,add", [(False, False), (True, False), (True, True), (False, True)],
                         ids=["bn", "bn_relu", "bn_add_relu", "bn_add"])
def test_batch_norm_kernels_stay_in_bounds(monkeypatch, n, c, h, w, dtype, relu, add):
    bn = importlib.import_module(f"{kernels.__name__}.batch_norm")
    monkeypatch.setattr(bn, "BN_REDUCE_PROGRAMS", 3)  # row ranges of several row blocks, the last one short
    monkeypatch.setattr(bn, "BN_FINISH_PARTS", 2)  # and summed two at a time
    monkeypatch.setattr(bn, "BN_BLOCK_ROWS", 4)
    channels_last = (h * w * c, 1, w * c, c)

    def case(p):
        x = p.place((n, c, h, w), channels_last, dtype, torch.randn(n, c, h, w).to(dtype))
        residual = p.place((n, c, h, w), channels_last, dtype, torch.randn(n, c, h, w).to(dtype)) if add else None
        weight, bias, mean, var = (p.place((c,), (1,), torch.float32, torch.rand(c) + 0.5) for _ in range(4))
        y, batch_mean, invstd, scale = bn.batch_norm_forward(x, weight, bias, mean, var, 0.1, 1e-5, relu, residual)
        grad_y = p.place((n, c, h, w), channels_last, dtype, torch.randn(n, c, h, w).to(dtype))
        grad_x, grad_residual = bn.batch_norm_backward(grad_y, x, bias, batch_mean, invstd, scale, relu,
                                                       y if relu and add else None, want_residual_grad=add)
        return y, batch_mean, invstd, scale, mean.clone(), var.clone(), grad_x, grad_residual

    run_twice(case)


@pytest.mark.parametrize("n,c,h,w,dtype", [(2, 19, 3, 5, torch.float32), (1, 70, 3, 3, torch.bfloat16)])
@pytest.mark.parametrize("relu,add", [(False, False), (True, False), (True, True)], ids=["shift", "relu", "add_relu"])
def test_folded_batch_norm_shift_kernel_stays_in_bounds(monkeypatch, n, c, h, w, dtype, relu, add):
    bn = importlib.import_module(f"{kernels.__name__}.batch_norm")
    monkeypatch.setattr(bn, "BN_BLOCK_ROWS", 4)  # rows not a multiple of the block; C over one channel block
    channels_last = (h * w * c, 1, w * c, c)

    def case(p):
        x = p.place((n, c, h, w), channels_last, dtype, torch.randn(n, c, h, w).to(dtype))
        residual = p.place((n, c, h, w), channels_last, dtype, torch.randn(n, c, h, w).to(dtype)) if add else None
        shift = p.place((c,), (1,), torch.float32, torch.randn(c))
        return (bn.shift_forward(x, shift, relu, residual),)

    run_twice(case)


def test_weight_cast_kernel_stays_in_bounds(monkeypatch):
    cast = importlib.import_module(f"{kernels.__name__}.weight_cast")
    monkeypatch.setattr(cast, "CAST_BLOCK", 8)  # tensors of 1 to 3 blocks, the last one partial

    def case(p):
        sizes = [1, 5, 8, 19, 3, 11, 2, 7, 13, 4]  # more tensors than a launch's slots
        weights = [p.place((n,), (1,), torch.float32, torch.randn(n)) for n in sizes]
        casts = [p.place((n,), (1,), torch.bfloat16) for n in sizes]
        cast.cast_add(weights, [None] * len(sizes), casts)
        grads = [p.place((n,), (1,), torch.bfloat16, torch.randn(n).to(torch.bfloat16)) for n in sizes]
        accs = [p.place((n,), (1,), torch.float32, torch.randn(n)) if i % 2 else None for i, n in enumerate(sizes)]
        outs = [p.place((n,), (1,), torch.float32) for n in sizes]
        cast.cast_add(grads, accs, outs)
        return (*casts, *outs)

    run_twice(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_sgd_kernel_stays_in_bounds(monkeypatch, dtype):
    sgd = importlib.import_module(f"{kernels.__name__}.release_sgd")
    monkeypatch.setattr(sgd, "SGD_BLOCK", 8)  # tensors of 1 to 3 blocks, the last one partial

    def case(p):
        sizes = [1, 5, 8, 19, 3, 11, 2, 7, 13, 4]  # more tensors than a launch's slots
        params = [p.place((n,), (1,), dtype, torch.randn(n).to(dtype)) for n in sizes]
        grads = [p.place((n,), (1,), dtype, torch.randn(n).to(dtype)) for n in sizes]
        buffers = [p.place((n,), (1,), dtype, torch.randn(n).to(dtype)) for n in sizes]
        lr, found_inf = (p.place((), (), torch.float32, torch.tensor(v)) for v in (0.1, 0.0))
        sgd.release_sgd_update(params, grads, buffers, [1, 2, 3, 4] * 2 + [2, 2], lr, 0.9, 0.05, found_inf)
        return (*params, *buffers)

    run_twice(case)

