"""The C++ CPU ops ``torch.ops.advent_fast_C.target_forward/backward`` against the contract
(docs/backend_contract.md), called directly (no Python layer).

The reference is ``advent_fast.reference`` evaluated with autograd in float64 on the same
dtype-rounded logits; gradients are checked per upstream gradient (self-information map, entropy
map, entropy loss, class prior), each with random values, so that a wrong term cannot hide behind
a larger one.
"""
import pytest
import torch

from advent_fast import reference as ref

try:
    import advent_fast._C  # noqa: F401  (registers torch.ops.advent_fast_C)
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"advent_fast._C is not built ({exc}); build it with "
                "`pip install --no-build-isolation -e .`", allow_module_level=True)

OPS = torch.ops.advent_fast_C
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance (to the largest reference value) of outputs stored in x's dtype: info, grad_x.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Outputs that are float32 whatever x's dtype (computed in fp32 from the rounded logits).
FP32_TOL = 2e-5
UPSTREAMS = ("info", "emap", "ent", "cp")


def make_logits(n, c, h, w, dtype=torch.float32, scale=3.0, seed=0, layout="contiguous"):
    """(N, C, S) logits as the Python layer passes them: contiguous NCHW, channels_last
    flattened, or a strided view that is neither."""
    g = torch.Generator().manual_seed(seed)
    x4 = (torch.randn(n, c, h, w, generator=g) * scale).to(dtype)
    if layout == "contiguous":
        x = x4.reshape(n, c, h * w)
        assert x.stride() == (c * h * w, h * w, 1)
    elif layout == "channels_last":
        x = x4.contiguous(memory_format=torch.channels_last).reshape(n, c, h * w)
        assert x.stride() == (h * w * c, 1, c)
    elif layout == "classes_padded":  # classes contiguous, pixel stride > C
        padded = torch.cat([x4, x4[:, :3]], 1).permute(0, 2, 3, 1).contiguous()
        x = padded.reshape(n, h * w, c + 3)[..., :c]
        x = x.transpose(1, 2)
        assert x.stride(1) == 1 and x.stride(2) == c + 3
    elif layout == "strided":  # neither classes nor pixels contiguous
        x = torch.stack([x4, x4], -1).reshape(n, c, h * w * 2)[:, :, ::2]
        assert x.stride(1) > 1 and x.stride(2) == 2
    else:
        raise ValueError(layout)
    return x


def make_prior(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(c, generator=g) ** 3
    return p / p.sum()


def forward(x, prior=None, k=0, mu=0.5, info=True, emap=True, ent=True, cp=None):
    cp = prior is not None if cp is None else cp
    names = ("info", "emap", "ent", "cp", "thresh", "kept", "cmean", "keep")
    return dict(zip(names, OPS.target_forward(x, prior, k, mu, info, emap, ent, cp)))


def backward(x, out, prior=None, mu=0.5, grad_info=None, grad_emap=None, grad_ent=None,
             grad_cp=None):
    ranked = out["keep"].numel() > 0
    return OPS.target_backward(
        x, grad_info, grad_emap, grad_ent, grad_cp,
        out["keep"] if ranked else None, out["kept"] if ranked else None,
        out["cmean"] if out["cmean"].numel() else None, prior, mu)


def reference(x, prior=None, top_k=None, mu=0.5):
    """float64 outputs of the reference on the (dtype-rounded) logits, with autograd."""
    x64 = x.detach().double().requires_grad_(True)
    out = {"info": ref.self_information(x64), "emap": ref.entropy_map(x64),
           "ent": ref.entropy_loss(x64, top_k)}
    if prior is not None:
        out["cp"] = ref.class_prior_loss(x64, prior.double(), mu)
    return x64, out


def random_upstream(name, x, seed):
    """A random upstream gradient for output `name`: (kernel argument, float64 reference value)."""
    g = torch.Generator().manual_seed(seed)
    n, c, s = x.shape
    if name == "info":
        # Stored in x's dtype, with a layout of its own: pixel-major.
        grad = torch.randn(n, s, c, generator=g).to(x.dtype).transpose(1, 2)
        return grad, grad.double()
    if name == "emap":
        grad = torch.randn(n, s, generator=g)
        return grad, grad.double()
    # Scalars, scaled by N * S so that their per-pixel share is O(1) like the maps'.
    grad = torch.randn((), generator=g) * n * s
    return grad, grad.double()


def assert_close_rel(actual, expected, rtol, name, floor=1e-30):
    """|actual - expected| <= rtol * max(max|expected|, floor) everywhere."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().clamp_min(floor)
    err = (actual.double() - expected).abs().max()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} x {scale:.3g}"


def check_gradients(x, out, ref_x, ref_out, upstreams, prior=None, mu=0.5, seed=10):
    """Each upstream gradient alone, then all together: kernel backward vs float64 autograd."""
    tol = TOL[x.dtype]
    grads = {name: random_upstream(name, x, seed + i) for i, name in enumerate(upstreams)}
    for chosen in [(name,) for name in upstreams] + [tuple(upstreams)]:
        kwargs = {f"grad_{name}": grads[name][0] for name in chosen}
        grad_x = backward(x, out, prior, mu, **kwargs)
        assert grad_x.dtype == x.dtype and grad_x.shape == x.shape
        loss = sum((ref_out[name] * grads[name][1]).sum() for name in chosen)
        (expected,) = torch.autograd.grad(loss, ref_x, retain_graph=True)
        # Upstream gradients are O(1) per pixel: where the true gradient is ~0 (one-hot or
        # uniform pixels) fp32 cancellation still leaves ~1e-8, so measure against at least 1e-2.
        assert_close_rel(grad_x, expected, tol, f"grad_x from {'+'.join(chosen)}", floor=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [2, 16, 19, 21])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_values_and_gradients(dtype, c, layout):
    # S = 41 * 61 = 2501: several 1024-pixel chunks, a partial last chunk and a partial last block.
    x = make_logits(2, c, 41, 61, dtype, layout=layout, seed=c)
    prior = make_prior(c)
    out = forward(x, prior)
    ref_x, ref_out = reference(x, prior)
    assert out["info"].dtype == dtype and out["info"].stride() == x.stride()
    assert_close_rel(out["info"], ref_out["info"], TOL[dtype], "info")
    assert out["emap"].dtype == torch.float32 and out["emap"].shape == (2, 2501)
    assert_close_rel(out["emap"], ref_out["emap"], FP32_TOL, "emap")
    assert_close_rel(out["ent"], ref_out["ent"], FP32_TOL, "ent")
    assert_close_rel(out["cp"], ref_out["cp"], FP32_TOL, "cp")
    class_mean = torch.softmax(x.double(), 1).mean(2)
    assert_close_rel(out["cmean"], class_mean, FP32_TOL, "cmean")
    check_gradients(x, out, ref_x, ref_out, UPSTREAMS, prior)


@pytest.mark.parametrize("layout", ["classes_padded", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_views(layout, dtype):
    x = make_logits(2, 19, 23, 45, dtype, layout=layout, seed=5)
    prior = make_prior(19)
    out = forward(x, prior)
    ref_x, ref_out = reference(x, prior)
    assert_close_rel(out["info"], ref_out["info"], TOL[dtype], "info")
    assert_close_rel(out["emap"], ref_out["emap"], FP32_TOL, "emap")
    check_gradients(x, out, ref_x, ref_out, UPSTREAMS, prior)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "classes_padded"])
def test_half_outputs_are_fp32_results_rounded_to_nearest_even(dtype, layout):
    # The kernel works in fp32: on 16-bit logits it computes what it computes on the same values in
    # fp32, then rounds like torch's .to(dtype) (subnormal fp16 values included). 1.2M outputs
    # hold exact rounding ties (about 1 in 2^16 for bf16), which round to even.
    x = make_logits(2, 19, 160, 200, dtype, layout=layout, seed=16)
    x32 = x.float()
    grad_info = random_upstream("info", x, 17)[0]
    out, out32 = forward(x), forward(x32)
    assert torch.equal(out["emap"], out32["emap"]) and torch.equal(out["ent"], out32["ent"])
    assert torch.equal(out["info"], out32["info"].to(dtype))
    grad_x = backward(x, out, grad_info=grad_info, grad_ent=torch.tensor(5.0))
    grad_x32 = backward(x32, out32, grad_info=grad_info.float(), grad_ent=torch.tensor(5.0))
    assert torch.equal(grad_x, grad_x32.to(dtype))


def test_unrequested_outputs_are_empty_and_ranking_keeps_a_mask_not_the_map():
    x = make_logits(2, 19, 9, 11)
    out = forward(x, info=False, emap=False, ent=True)
    assert [out[k].numel() for k in ("info", "emap", "cp", "thresh", "kept", "cmean", "keep")] == [0] * 7
    assert out["ent"].dim() == 0 and out["ent"].dtype == torch.float32
    ranked = forward(x, k=10, info=False, emap=False, ent=True)
    assert ranked["emap"].numel() == 0 and ranked["thresh"].shape == (2,)
    assert ranked["keep"].shape == (2, 99) and ranked["keep"].dtype == torch.uint8
    assert ranked["kept"].shape == (2,) and ranked["cmean"].numel() == 0
    emap = forward(x)["emap"]
    assert torch.equal(ranked["keep"].bool(), emap >= ranked["thresh"][:, None])
    assert torch.equal(ranked["kept"], ranked["keep"].sum(1).float())


def test_masked_classes_give_zero_probability_and_exact_zero_gradient():
    x = make_logits(2, 19, 17, 31, seed=3)
    masked = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.3
    masked[:, 0] = False  # every pixel keeps a class
    x = x.masked_fill(masked, float("-inf"))
    prior = make_prior(19)
    out = forward(x, prior)
    for name in ("info", "emap", "ent", "cp", "cmean"):
        assert torch.isfinite(out[name]).all(), name
    assert (out["info"][masked] == 0).all()
    ref_x, ref_out = reference(x, prior)
    assert_close_rel(out["info"], ref_out["info"], TOL[x.dtype], "info")
    assert_close_rel(out["emap"], ref_out["emap"], FP32_TOL, "emap")
    check_gradients(x, out, ref_x, ref_out, UPSTREAMS, prior)
    grads = {name: random_upstream(name, x, 20 + i)[0] for i, name in enumerate(UPSTREAMS)}
    grad_x = backward(x, out, prior, **{f"grad_{k}": v for k, v in grads.items()})
    assert torch.isfinite(grad_x).all()
    assert (grad_x[masked] == 0).all()


def test_one_hot_pixels_have_positive_zero_entropy():
    # The winning class has p = 1, log p = 0, the others are masked: E = +0, not -0.
    x = torch.full((1, 5, 7), float("-inf"))
    x[0, 2] = 1.0
    out = forward(x)
    assert (out["emap"] == 0).all() and not torch.signbit(out["emap"]).any()
    assert (out["info"] == 0).all() and out["ent"] == 0


def test_all_masked_pixel_is_nan_like_naive_softmax():
    x = make_logits(1, 19, 4, 8, seed=6)
    x[0, :, 5] = float("-inf")
    out = forward(x)
    assert torch.isnan(out["emap"][0, 5]) and torch.isnan(out["info"][0, :, 5]).all()
    others = torch.ones(32, dtype=torch.bool)
    others[5] = False
    assert torch.isfinite(out["emap"][0, others]).all()
    assert torch.isnan(out["ent"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_are_stable(dtype):
    # Magnitude 1e4 (exp overflows without the max shift): pixels 0-9 differ by a few units on a
    # 1e4 base (soft in fp32; fp16 / bf16 round them to ties or big gaps), pixels 10-19 tie in
    # every class (E = 1), the rest are 1e4 apart (one-hot).
    x = make_logits(2, 19, 13, 17, scale=1e4, seed=7)
    x[:, :, :10] = 1e4 + make_logits(2, 19, 1, 10, scale=2.0, seed=8).flatten(2)
    x[:, :, 10:20] = -1e4
    x = x.to(dtype)
    prior = make_prior(19)
    out = forward(x, prior)
    ref_x, ref_out = reference(x, prior)
    for name in ("info", "emap", "ent", "cp"):
        assert torch.isfinite(out[name]).all(), name
    assert torch.allclose(out["emap"][:, 10:20], torch.ones(2, 10))
    assert_close_rel(out["emap"], ref_out["emap"], FP32_TOL, "emap")
    assert_close_rel(out["info"], ref_out["info"], TOL[dtype], "info")
    check_gradients(x, out, ref_x, ref_out, UPSTREAMS, prior)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_logits_propagate(bad):
    x = make_logits(2, 19, 8, 8, seed=8)
    x[1, 4, 9] = bad
    prior = make_prior(19)
    out = forward(x, prior)
    assert torch.isnan(out["emap"][1, 9]) and torch.isnan(out["info"][1, :, 9]).all()
    assert torch.isfinite(out["emap"][0]).all() and torch.isfinite(out["emap"][1, :9]).all()
    assert torch.isnan(out["ent"]) and torch.isnan(out["cp"]) and torch.isnan(out["cmean"][1]).all()
    ranked = forward(x, k=5)
    assert torch.isnan(ranked["ent"])
    grad_x = backward(x, out, prior, grad_emap=torch.ones(2, 64))
    assert torch.isnan(grad_x[1, :, 9]).all()
    assert torch.isfinite(grad_x[0]).all()


def test_ranked_values_and_gradients_match_reference():
    x = make_logits(3, 19, 37, 41, seed=9)
    top_k = 0.3
    k = ref.ranked_pixel_count(top_k, 37 * 41)
    out = forward(x, k=k)
    ref_x, ref_out = reference(x, top_k=top_k)
    assert_close_rel(out["ent"], ref_out["ent"], FP32_TOL, "ent")
    emap = out["emap"]
    assert torch.equal(out["thresh"], emap.topk(k, dim=1).values[:, -1])
    assert torch.equal(out["kept"], (emap >= out["thresh"][:, None]).sum(1).float())
    assert torch.equal(out["keep"].bool(), emap >= out["thresh"][:, None])
    check_gradients(x, out, ref_x, ref_out, ("emap", "ent"))


def test_ranking_k1_and_k_equals_s():
    x = make_logits(2, 19, 15, 21, seed=11)
    s = 15 * 21
    plain = forward(x)
    top1 = forward(x, k=1)
    assert torch.equal(top1["thresh"], plain["emap"].max(1).values)
    assert torch.equal(top1["kept"], torch.ones(2))
    assert torch.allclose(top1["ent"], plain["emap"].max(1).values.mean())
    everything = forward(x, k=s)
    assert torch.equal(everything["thresh"], plain["emap"].min(1).values)
    assert torch.equal(everything["kept"], torch.full((2,), float(s)))
    assert torch.allclose(everything["ent"], plain["ent"], rtol=1e-6, atol=0)
    grad = torch.tensor(3.0)
    assert torch.equal(backward(x, everything, grad_ent=grad), backward(x, plain, grad_ent=grad))


def test_ranking_keeps_all_ties_at_the_threshold():
    # 7 distinct pixels repeated 9 times: ties everywhere; k = 10 falls inside the second-largest
    # group, so K = 18 pixels are kept.
    base = make_logits(1, 19, 1, 7, seed=12)
    x = base.repeat(1, 1, 9)
    out = forward(x, k=10)
    emap = out["emap"][0]
    order = emap[:7].sort(descending=True).values
    assert out["thresh"][0] == order[1] and out["kept"][0] == 18
    assert torch.equal(out["keep"][0].bool(), emap >= order[1])
    ref_x, ref_out = reference(x, top_k=10 / 63)
    assert ref.ranked_pixel_count(10 / 63, 63) == 10
    assert_close_rel(out["ent"], ref_out["ent"], FP32_TOL, "ent")
    check_gradients(x, out, ref_x, ref_out, ("ent",))


def test_ranking_counts_nan_as_largest():
    x = make_logits(2, 19, 5, 9, seed=13)
    x[0, 3, 4] = float("nan")
    x[0, 1, 40] = float("nan")
    out = forward(x, k=5)
    # Image 0: the two NaN pixels are ranked first, t is the 3rd largest of the rest.
    finite = out["emap"][0][~out["emap"][0].isnan()]
    assert out["thresh"][0] == finite.topk(3).values[-1] and out["kept"][0] == 5
    assert torch.isnan(out["ent"])
    # Image 1 is unaffected; with k <= #NaN, t is NaN and only the NaN pixels are kept.
    assert out["thresh"][1] == out["emap"][1].topk(5).values[-1]
    only_nan = forward(x[:1], k=2)
    assert torch.isnan(only_nan["thresh"][0]) and only_nan["kept"][0] == 2
    assert torch.equal(only_nan["keep"][0].bool(), only_nan["emap"][0].isnan())
    grad_x = backward(x, out, grad_ent=torch.tensor(1.0))
    assert torch.isnan(grad_x[0, :, 4]).all() and torch.isfinite(grad_x[1]).all()


def test_class_prior_hinge_active_and_inactive():
    x = make_logits(2, 7, 19, 23, seed=14)
    # Class 3 far above its mean probability (active hinge), the others at zero (inactive).
    prior = torch.zeros(7)
    prior[3] = 1.0
    out = forward(x, prior, mu=0.9)
    ref_x, ref_out = reference(x, prior, mu=0.9)
    assert out["cp"] > 0
    assert_close_rel(out["cp"], ref_out["cp"], FP32_TOL, "cp")
    check_gradients(x, out, ref_x, ref_out, ("cp",), prior, mu=0.9)
    # All hinges inactive: zero loss and an exactly zero gradient.
    inactive = forward(x, torch.full((7,), 1e-3), mu=0.5)
    assert inactive["cp"] == 0
    grad_x = backward(x, inactive, torch.full((7,), 1e-3), grad_cp=torch.tensor(1.0))
    assert (grad_x == 0).all()


def test_results_do_not_depend_on_thread_count():
    x = make_logits(2, 19, 64, 80, seed=15)
    prior = make_prior(19)
    grads = dict(grad_info=random_upstream("info", x, 1)[0], grad_emap=torch.randn(2, 5120),
                 grad_ent=torch.tensor(2.0), grad_cp=torch.tensor(3.0))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = forward(x, prior)
            ranked = forward(x, k=1000)
            results.append([out["ent"], out["cp"], out["cmean"], ranked["ent"],
                            backward(x, out, prior, **grads)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
