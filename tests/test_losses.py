"""Public fused losses against the naive reference, per backend (C++ and Triton interpreter).

The reference is ``advent_fast.reference`` evaluated in float64 on the same (dtype-rounded)
logits; values and gradients (random upstream gradients) must agree within per-dtype tolerances.
"""
import math

import pytest
import torch

import advent_fast as af
from advent_fast import reference as ref
from advent_fast.backend import cpp_available

BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not cpp_available(), reason="advent_fast._C not built")),
    "triton",
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (value tolerance of outputs stored in the dtype, relative gradient tolerance)
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}


@pytest.fixture(params=BACKENDS)
def backend(request):
    af.set_backend(request.param)
    yield request.param
    af.set_backend(None)


def make_logits(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def make_prior(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(c, generator=g) ** 3
    return p / p.sum()


def run_both(fn_fused, fn_ref, logits, upstream_seed=3):
    """Values and logits-gradients of a fused op and its float64 reference."""
    x = logits.detach().clone().requires_grad_(True)
    x64 = logits.detach().double().requires_grad_(True)
    out, out64 = fn_fused(x), fn_ref(x64)
    g = torch.Generator().manual_seed(upstream_seed)
    up = torch.randn(out64.shape, generator=g, dtype=torch.float64)
    (out.double() * up).sum().backward()
    (out64 * up).sum().backward()
    return out, out64, x.grad, x64.grad


def assert_close_rel(actual, expected, rtol, name):
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.double() - expected).abs().max()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} x {scale:.3g}"


CASES = {
    "entropy_loss": (af.entropy_loss, ref.entropy_loss),
    "entropy_loss_er": (lambda x: af.entropy_loss(x, top_k=0.3), lambda x: ref.entropy_loss(x, top_k=0.3)),
    "entropy_map": (af.entropy_map, ref.entropy_map),
    "self_information": (af.self_information, ref.self_information),
    "class_prior": (lambda x: af.class_prior_loss(x, make_prior(x.shape[1]).to(x.device)),
                    lambda x: ref.class_prior_loss(x, make_prior(x.shape[1]).double())),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_gradients(backend, case, dtype):
    fused, naive = CASES[case]
    logits = make_logits((2, 19, 7, 9), dtype)
    out, out64, grad, grad64 = run_both(fused, naive, logits)
    vtol, gtol = TOL[dtype]
    expected_dtype = dtype if case == "self_information" else torch.float32
    assert out.dtype == expected_dtype
    assert out.shape == out64.shape
    # Outputs stored in fp32 (losses, entropy map) are exact to fp32 whatever the logits' dtype.
    assert_close_rel(out, out64, 1e-5 if out.dtype == torch.float32 else vtol, case)
    assert grad.dtype == dtype
    assert_close_rel(grad, grad64, gtol, case + " grad")


@pytest.mark.parametrize("shape", [(1, 2, 5, 3), (2, 16, 33, 1), (1, 21, 3, 37), (2, 19, 11), (1, 19, 2, 3, 5)],
                         ids=str)
def test_shapes_and_class_counts(backend, shape):
    logits = make_logits(shape)
    prior = make_prior(shape[1])
    for fused, naive in [(lambda x: af.entropy_loss(x, 0.5), lambda x: ref.entropy_loss(x, 0.5)),
                         (af.self_information, ref.self_information),
                         (lambda x: af.class_prior_loss(x, prior, 0.9),
                          lambda x: ref.class_prior_loss(x, prior.double(), 0.9))]:
        out, out64, grad, grad64 = run_both(fused, naive, logits)
        assert_close_rel(out, out64, 1e-5, str(shape))
        assert_close_rel(grad, grad64, 1e-4, f"{shape} grad")


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_memory_layouts(backend, layout):
    base = make_logits((2, 19, 12, 10))
    if layout == "channels_last":
        logits = base.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        logits = make_logits((3, 23, 14, 12))[::2, 2:21, 1:13:1, ::1]  # strided batch and classes
    else:
        logits = base.transpose(2, 3)  # spatial dims that cannot flatten into one stride
    assert not logits.is_contiguous()
    for case in ("entropy_loss_er", "self_information", "class_prior"):
        fused, naive = CASES[case]
        out, out64, grad, grad64 = run_both(fused, naive, logits)
        assert_close_rel(out, out64, 1e-5, f"{layout} {case}")
        assert_close_rel(grad, grad64, 1e-4, f"{layout} {case} grad")
    if layout == "channels_last":
        x = logits.detach().requires_grad_(True)
        info = af.self_information(x)
        info.sum().backward()
        assert info.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_masked_classes_give_finite_results_and_zero_gradient(backend):
    logits = make_logits((2, 19, 5, 7))
    logits[:, 3] = -math.inf
    logits[0, 7, 2] = -math.inf
    x = logits.clone().requires_grad_(True)
    res = af.target_losses(x, self_information=True, entropy=True, top_k=0.4, prior=make_prior(19))
    (res.self_information.sum() + res.entropy_loss + res.class_prior_loss).backward()
    assert torch.isfinite(res.self_information).all()
    assert res.self_information[:, 3].eq(0).all()
    assert torch.isfinite(res.entropy_loss) and torch.isfinite(res.class_prior_loss)
    assert torch.isfinite(x.grad).all()
    assert x.grad[:, 3].eq(0).all() and x.grad[0, 7, 2].eq(0).all()
    expected = ref.entropy_loss(logits.double(), top_k=0.4)
    assert abs(res.entropy_loss.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_logits_are_stable(backend, dtype):
    logits = (make_logits((1, 19, 6, 6), scale=1.0).sign() * 1e4).to(dtype)
    logits += make_logits((1, 19, 6, 6), scale=1.0).to(dtype)  # break exact ties
    out, out64, grad, grad64 = run_both(af.entropy_loss, ref.entropy_loss, logits)
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    assert_close_rel(out, out64, 1e-5, "large logits")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_propagate(backend, bad):
    logits = make_logits((2, 19, 4, 5))
    logits[1, 4, 2, 3] = bad
    prior = make_prior(19)
    res = af.target_losses(logits, self_information=True, entropy=True, prior=prior, entropy_map=True)
    assert not torch.isfinite(res.entropy_loss)
    assert not torch.isfinite(res.class_prior_loss)
    assert not torch.isfinite(res.entropy_map[1, 2, 3])
    assert torch.isfinite(res.entropy_map[0]).all()  # other images untouched
    assert not torch.isfinite(af.entropy_loss(logits, top_k=0.1))
    assert not torch.isfinite(af.entropy_loss(logits, top_k=1.0))


def test_empty_inputs_return_documented_results(backend):
    for shape in [(0, 19, 4, 4), (2, 19, 0, 4)]:
        x = torch.zeros(shape, requires_grad=True)
        res = af.target_losses(x, self_information=True, entropy=True, prior=make_prior(19), entropy_map=True)
        assert res.self_information.shape == shape
        assert res.entropy_map.shape == (shape[0],) + shape[2:]
        assert torch.isnan(res.entropy_loss) and torch.isnan(res.class_prior_loss)
        res.entropy_loss.backward()
        assert x.grad.shape == shape


def test_ranking_edge_cases(backend):
    logits = make_logits((2, 19, 6, 7))
    plain = af.entropy_loss(logits)
    assert torch.allclose(af.entropy_loss(logits, top_k=1.0), plain, rtol=1e-6, atol=0)
    # k = 1: the largest entropy of each image.
    emap = ref.entropy_map(logits.double()).flatten(1)
    smallest_ratio = 1.0 / emap.shape[1]
    expected = emap.max(dim=1).values.mean()
    assert abs(af.entropy_loss(logits, top_k=smallest_ratio).item() - expected.item()) < 1e-5
    # Ties at the threshold are all kept: image of 42 pixels, two entropy levels.
    tied = torch.zeros(1, 19, 6, 7)
    tied[:, 0, :3] = 5.0  # 21 confident pixels (low entropy), 21 uniform pixels (max entropy)
    for ratio, expected_loss in [(0.1, 1.0), (0.5, 1.0)]:
        assert abs(af.entropy_loss(tied, top_k=ratio).item() - expected_loss) < 1e-6
    low = ref.entropy_map(tied.double())[0, 0, 0].item()
    assert abs(af.entropy_loss(tied, top_k=0.51).item() - (21 + 21 * low) / 42) < 1e-6


def swapped_class_logits(dtype, width, device="cpu"):
    """(1, 2, 16, width) logits whose rows 8-15 are rows 0-7 with the two classes swapped."""
    torch.manual_seed(0)
    a = (torch.randn(1, 2, 8, width, device=device) * 4).to(dtype)
    return torch.cat([a, a.flip(1)], dim=2)


def assert_swapped_classes_tie(x):
    """The swapped rows of :func:`swapped_class_logits` have bitwise the entropies of the others, and
    entropy ranking keeps such ties whole, as the float64 reference does."""
    emap = af.entropy_map(x)
    assert torch.equal(emap[:, :8], emap[:, 8:])
    for top_k in (0.1, 0.3, 0.7):
        torch.testing.assert_close(af.entropy_loss(x, top_k), ref.entropy_loss(x.double(), top_k).float(),
                                   rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_classes_have_one_entropy_and_rank_as_a_tie(backend, dtype):
    """Two classes in either order give bitwise the same entropy, so ranking keeps such ties whole, as the
    release and the float64 reference do (with a multiply-add in the class sum they were an ulp apart:
    the CUDA twin of this test, in test_losses_cuda.py, is where that happened)."""
    assert_swapped_classes_tie(swapped_class_logits(dtype, 30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranking_saves_a_keep_mask_not_the_entropy_map(backend, dtype):
    """What entropy ranking keeps for its backward: the logits and a one-byte (N, H, W) mask, no float
    (N, H, W) map, so that a forward and backward peak at about the gradient's size (issue 2: 1.05x)."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    logits = make_logits((2, 19, 6, 7), dtype).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = af.entropy_loss(logits, top_k=0.3)
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert len(masks) == 1 and masks[0].numel() == 2 * 6 * 7
    assert not [t for t in saved if t.is_floating_point() and t.numel() == 2 * 6 * 7]
    logits_storage = logits.untyped_storage().data_ptr()
    extra = sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() != logits_storage)
    assert extra <= 0.05 * logits.numel() * logits.element_size()  # seen: 1/76 (fp32), 1/38 (bf16) + 2 floats
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_class_prior_hinges(backend):
    logits = make_logits((2, 5, 4, 4))
    mean_p = torch.softmax(logits.double(), 1).flatten(2).mean(2)
    inactive = torch.zeros(5)  # mu * prior = 0 below every class mean: loss 0, gradient 0
    x = logits.clone().requires_grad_(True)
    loss = af.class_prior_loss(x, inactive)
    loss.backward()
    assert loss.item() == 0 and x.grad.abs().max() == 0
    # Hinges of classes 0 and 2 active in every image, the others never. (With every hinge active
    # the gradient would vanish: the class means always sum to 1.)
    partly = torch.zeros(5)
    partly[[0, 2]] = (mean_p.max(0).values[[0, 2]] * 1.5 / 0.5).float()
    out, out64, grad, grad64 = run_both(lambda x: af.class_prior_loss(x, partly),
                                        lambda x: ref.class_prior_loss(x, partly.double()), logits)
    assert out.item() > 0 and grad.abs().max() > 0
    assert_close_rel(out, out64, 1e-5, "active")
    assert_close_rel(grad, grad64, 1e-4, "active grad")


def test_class_prior_hinge_exactly_at_zero_has_zero_gradient(backend):
    """relu'(0) = 0, as the reference's: uniform logits give class means of exactly 1/4, and mu * prior
    = 1/4 for two classes (gap exactly 0), 0 for the others (inactive)."""
    x = torch.zeros(1, 4, 2, 2, requires_grad=True)
    prior = torch.tensor([0.5, 0.5, 0.0, 0.0])
    loss = af.class_prior_loss(x, prior, mu=0.5)
    loss.backward()
    x64 = torch.zeros(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    ref.class_prior_loss(x64, prior.double(), 0.5).backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(x64.grad, torch.zeros_like(x64))


def test_fused_call_equals_separate_ops(backend):
    logits = make_logits((2, 19, 5, 6))
    prior = make_prior(19)
    res = af.target_losses(logits, self_information=True, entropy=True, top_k=0.3, prior=prior,
                           entropy_map=True)
    torch.testing.assert_close(res.self_information, af.self_information(logits), rtol=0, atol=0)
    torch.testing.assert_close(res.entropy_loss, af.entropy_loss(logits, top_k=0.3), rtol=0, atol=0)
    torch.testing.assert_close(res.class_prior_loss, af.class_prior_loss(logits, prior), rtol=0, atol=0)
    torch.testing.assert_close(res.entropy_map, af.entropy_map(logits), rtol=0, atol=0)
    torch.testing.assert_close(res.entropy_map, res.self_information.float().sum(1), rtol=1e-6, atol=1e-6)
    assert af.target_losses(logits, self_information=False) == (None, None, None, None)


def test_opcheck(backend):
    x = make_logits((2, 19, 4, 5)).reshape(2, 19, 20).requires_grad_(True)
    prior = make_prior(19)
    torch.library.opcheck(torch.ops.advent_fast.target_forward.default,
                          (x, prior, 6, 0.5, True, True, True, True))
    torch.library.opcheck(torch.ops.advent_fast.target_forward.default,
                          (x, None, 0, 0.5, False, False, True, False))
    torch.library.opcheck(torch.ops.advent_fast.target_forward.default,  # ranking without the map
                          (x, prior, 6, 0.5, False, False, True, False))
    info, emap, ent, cp, thresh, kept, cmean, keep = torch.ops.advent_fast.target_forward(
        x.detach(), prior, 6, 0.5, True, True, True, True)
    torch.library.opcheck(torch.ops.advent_fast.target_backward.default,
                          (x.detach(), torch.randn_like(info), torch.randn_like(emap), torch.tensor(1.0),
                           torch.tensor(2.0), keep, kept, cmean, prior, 0.5))


def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    prior = make_prior(19)

    def step(x):
        res = af.target_losses(x, self_information=True, entropy=True, top_k=0.3, prior=prior)
        return res.self_information.float().mean() + res.entropy_loss + res.class_prior_loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    logits = make_logits((1, 19, 4, 6))
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    compiled(x1).backward()
    step(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_compiled_graphs_trace_the_custom_op_with_the_automatic_backend():
    """Eager calls skip the dispatcher (advent_fast.eager_ops); a compiled graph holds the custom op
    (also when the backend is chosen automatically) and gives the eager values and gradients."""
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    calls = []

    def recording(gm, example_inputs):
        calls.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return aot_eager(gm, example_inputs)

    def step(x):
        res = af.target_losses(x, self_information=True, entropy=True)
        return res.self_information.float().square().mean() + res.entropy_loss

    logits = make_logits((2, 19, 5, 6))
    x1, x2 = (logits.clone().requires_grad_(True) for _ in range(2))
    compiled = torch.compile(step, fullgraph=True, backend=recording)
    torch.testing.assert_close(compiled(x1), step(x2), rtol=0, atol=0)
    assert "advent_fast.target_forward.default" in calls
    compiled(x1).backward()
    step(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda: af.entropy_loss(torch.randn(19, 8)), ValueError, "logits must have shape"),
    (lambda: af.entropy_loss(torch.zeros(1, 19, 4, 4, dtype=torch.int64)), TypeError, "logits must be float"),
    (lambda: af.entropy_loss(torch.randn(1, 19, 4, 4).double()), TypeError, "logits must be float"),
    (lambda: af.entropy_loss(torch.randn(1, 1, 4, 4)), ValueError, "C >= 2"),
    (lambda: af.entropy_loss([1.0, 2.0]), TypeError, "logits must be a torch.Tensor"),
    (lambda: af.entropy_loss(torch.randn(1, 19, 4, 4), top_k=0.0), ValueError, "top_k"),
    (lambda: af.entropy_loss(torch.randn(1, 19, 4, 4), top_k=1.5), ValueError, "top_k"),
    (lambda: af.entropy_loss(torch.randn(1, 19, 4, 4), top_k=math.nan), ValueError, "top_k"),
    (lambda: af.entropy_loss(torch.randn(1, 19, 4, 4), top_k="0.3"), TypeError, "top_k"),
    (lambda: af.class_prior_loss(torch.randn(1, 19, 4, 4), torch.ones(16) / 16), ValueError, "prior must have shape"),
    (lambda: af.class_prior_loss(torch.randn(1, 3, 4, 4), [0.5, -0.1, 0.6]), ValueError, "non-negative"),
    (lambda: af.class_prior_loss(torch.randn(1, 3, 4, 4), [0.5, math.nan, 0.5]), ValueError, "finite"),
    (lambda: af.class_prior_loss(torch.randn(1, 3, 4, 4), None), ValueError, "prior"),
    (lambda: af.class_prior_loss(torch.randn(1, 3, 4, 4), [0.2, 0.3, 0.5], mu=math.inf), ValueError, "mu"),
    (lambda: af.class_prior_loss(torch.randn(1, 3, 4, 4), torch.ones(3, device="meta")), ValueError, "prior is on"),
])
def test_bad_input_raises(backend, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_backend_selection(monkeypatch):
    af.set_backend(None)
    monkeypatch.delenv("ADVENT_FAST_BACKEND", raising=False)
    assert af.get_backend(torch.device("cpu")) == ("cpp" if cpp_available() else "reference")
    assert af.get_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("ADVENT_FAST_BACKEND", "reference")
    assert af.get_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("ADVENT_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="ADVENT_FAST_BACKEND"):
        af.get_backend(torch.device("cpu"))
    af.set_backend("triton")  # the setter wins over the environment
    try:
        assert af.get_backend(torch.device("cpu")) == "triton"
        with pytest.raises(ValueError, match="backend"):
            af.set_backend("cuda")
    finally:
        af.set_backend(None)
    monkeypatch.setenv("ADVENT_FAST_BACKEND", "cpp")
    with pytest.raises(ValueError, match="CPU tensors only"):
        af.get_backend(torch.device("cuda"))


def test_gpus_older_than_triton_supports_run_the_reference(monkeypatch):
    """Triton compiles for compute capability 7.0 on: a P100 or GTX 10xx runs the reference, with a warning;
    forcing triton there is an error. precision auto: bf16 from 8.0, fp16 on 7.x, fp32 below."""
    from advent_fast import backend

    af.set_backend(None)
    monkeypatch.delenv("ADVENT_FAST_BACKEND", raising=False)
    gpus = {torch.device("cuda", 0): (9, 0), torch.device("cuda", 1): (7, 5), torch.device("cuda", 2): (6, 1)}
    monkeypatch.setattr(backend, "_capabilities", dict(gpus))  # what each device would answer
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="cuda:2 has compute capability 6.1, older than Triton compiles for"):
        assert [af.get_backend(d) for d in gpus] == ["triton", "triton", "reference"]
    assert [backend.auto_precision(d) for d in gpus] == ["bf16", "fp16", "fp32"]
    assert backend.auto_precision(torch.device("cpu")) == "bf16"  # nothing to ask: the trainer decides
    monkeypatch.setenv("ADVENT_FAST_BACKEND", "triton")
    assert af.get_backend(torch.device("cuda", 1)) == "triton"
    with pytest.raises(ValueError, match="compute capability 7.0 or newer; cuda:2 has 6.1"):
        af.get_backend(torch.device("cuda", 2))


def test_reference_backend_is_the_naive_code():
    af.set_backend("reference")
    try:
        logits = make_logits((1, 19, 4, 4))
        assert torch.equal(af.entropy_loss(logits), ref.entropy_loss(logits))
        assert torch.equal(af.self_information(logits), ref.self_information(logits))
    finally:
        af.set_backend(None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_backend_computes_16_bit_logits_in_float32(dtype):
    """The fallback backend: a -inf logit (a masked class) and a confident pixel stay finite in float16,
    where the naive code's 1e-30 epsilon underflows (0 * -inf = NaN)."""
    logits = torch.tensor([[0.0, 0.0], [-20.0, -math.inf]]).reshape(1, 2, 2, 1).to(dtype)
    x = logits.clone().requires_grad_(True)
    af.set_backend("reference")
    try:
        res = af.target_losses(x, self_information=True, entropy=True, entropy_map=True)
        (res.self_information.float().sum() + res.entropy_loss).backward()
    finally:
        af.set_backend(None)
    assert res.self_information.dtype == x.grad.dtype == dtype
    for t in (res.self_information, res.entropy_loss, res.entropy_map, x.grad):
        assert torch.isfinite(t).all()
    assert torch.equal(res.entropy_loss, ref.entropy_loss(logits.float()))


def test_second_derivatives_raise_instead_of_being_zero(backend):
    """The kernels give first derivatives only: asking for a second one is an error (through the eager
    path as through the custom op), not a silent zero."""
    x = make_logits((1, 3, 4, 4)).requires_grad_(True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(af.entropy_loss(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):  # the custom op, as torch.compile calls it
        (grad,) = torch.autograd.grad(torch.ops.advent_fast.target_forward.default(
            x.flatten(2), None, 0, 0.5, False, False, True, False)[2], x, create_graph=True)
        grad.sum().backward()


def test_ranked_pixel_count_is_exact():
    assert ref.ranked_pixel_count(0.3, 10) == 3  # 0.3 * 10 == 3.0000000000000004 in floats
    assert ref.ranked_pixel_count(1.0, 7) == 7
    assert ref.ranked_pixel_count(1e-9, 7) == 1
    assert ref.ranked_pixel_count(0.5, 7) == 4
