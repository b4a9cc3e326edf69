"""The Triton backend (kernels/) against a float64 implementation of docs/backend_contract.md.

Runs on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with
TRITON_INTERPRET=0 and a GPU the same tests run the compiled kernels on CUDA tensors.
"""
import importlib
import math
import os

import pytest
import torch

try:
    from advent_fast import kernels
except ImportError:  # not installed: the top-level folder itself (PYTHONPATH=repo root)
    import kernels

target_forward, target_backward = kernels.target_forward, kernels.target_backward

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
OUTPUTS = ("info", "emap", "ent", "cp", "thresh", "kept", "cmean", "keep")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol as a fraction of the largest reference magnitude) for outputs stored in x.dtype:
# fp32 is the kernels' own arithmetic error, fp16/bf16 about two roundings of the output.
STORED_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}
# float32 outputs (emap, ent, cp, cmean) are computed in float32 from the (exact) stored logits
F32_TOL = dict(rtol=1e-4, atol=1e-5)
N, S = 2, 300  # S: several pixel blocks for C = 19 (128 a block), not a multiple of one
S_WIDE = 2100  # several blocks for every C (C = 2: 2048 a block)


# ------------------------------------------------------------------------------------------------
# float64 reference of the contract
# ------------------------------------------------------------------------------------------------
def reference(x, prior=None, mu=0.5, keep=None):
    """Contract outputs in float64 from (N, C, S) logits; `keep` (N, S) bool turns on ranking."""
    x = x.double()
    lp = torch.log_softmax(x, dim=1)
    p = lp.exp()
    # p * where(p == 0, 0, lp): the contract's guarded p log p, with a 0 (not NaN) autograd
    # gradient for -inf logits.
    info = -p * torch.where(p == 0, 0.0, lp) / math.log(x.shape[1])
    emap = info.sum(dim=1)
    if keep is None:
        ent = emap.mean()
    else:
        ent = (torch.where(keep, emap, 0.0).sum(dim=1) / keep.sum(dim=1)).mean()
    out = {"info": info, "emap": emap, "ent": ent}
    if prior is not None:
        cmean = p.mean(dim=2)
        gap = mu * prior.double() - cmean
        out.update(cmean=cmean, cp=torch.where(gap < 0, 0.0, gap).sum(dim=1).mean())
    return out


def forward(x, prior=None, k=0, mu=0.5, info=True, emap=True, ent=True):
    return dict(zip(OUTPUTS, target_forward(x, prior, k, mu, info, emap, ent, prior is not None)))


def kept_mask(emap, thresh):
    return (emap >= thresh[:, None]) | emap.isnan()


def make_logits(C, dtype=torch.float32, scale=3.0, n=N, s=S, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, C, s, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def make_prior(C, seed=1):
    gen = torch.Generator().manual_seed(seed)
    prior = torch.rand(C, generator=gen) + 0.1
    return (prior / prior.sum()).to(DEVICE)


def assert_close(actual, expected, rtol, atol_frac, scale=None):
    """atol = atol_frac * scale (default max|expected|) + the subnormal spacing of actual's dtype
    (fp16 gradients of the mean losses are ~1e-5: subnormal there)."""
    expected = expected.to(actual.device)
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    finfo = torch.finfo(actual.dtype)
    atol = atol_frac * scale + finfo.tiny * finfo.eps
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def check_forward(x, prior=None, k=0, mu=0.5):
    """Forward outputs of the kernels vs the float64 reference (ranking: the kernel's own selection)."""
    out = forward(x, prior, k, mu)
    keep = kept_mask(out["emap"], out["thresh"]) if k else None
    ref = reference(x, prior, mu, keep)
    rtol, atol = STORED_TOL[x.dtype]
    assert out["info"].dtype == x.dtype and out["info"].shape == x.shape
    assert_close(out["info"], ref["info"], rtol, atol)
    for name in ("emap", "ent") + (("cp", "cmean") if prior is not None else ()):
        assert out[name].dtype == torch.float32
        torch.testing.assert_close(out[name].double(), ref[name].to(out[name].device), **F32_TOL)
    return out


def upstream_grads(x, sources, seed=2):
    """Random upstream gradients for the named outputs; the others None."""
    gen = torch.Generator().manual_seed(seed)
    n, c, s = x.shape

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    return {
        "info": rand(n, c, s).to(x.dtype) if "info" in sources else None,
        "emap": rand(n, s) if "emap" in sources else None,
        "ent": rand(()) if "ent" in sources else None,
        "cp": rand(()) if "cp" in sources else None,
    }


def upstream_scale(x, grads, kept=None):
    """The largest |dL/dI_c| or |dL/dE| of a pixel: the size of the float32 terms whose difference is
    the softmax gradient. Near one-hot pixels that gradient cancels to far below its terms, and only
    an absolute error relative to the terms is meaningful."""
    n, _, s = x.shape
    denominators = {"info": 1.0, "emap": 1.0, "ent": n * (s if kept is None else kept.min().item()), "cp": n * s}
    return sum(g.abs().max().item() / denominators[name] for name, g in grads.items() if g is not None)


def check_backward(x, sources, prior=None, k=0, mu=0.5, grads=None, one_hot=False):
    """target_backward vs autograd of the float64 reference, for upstream grads of `sources`.
    one_hot: the pixels are near one-hot, the atol is relative to the upstream gradients."""
    out = forward(x, prior, k, mu)
    grads = grads or upstream_grads(x, sources)
    keep = kept_mask(out["emap"], out["thresh"]) if k else None
    leaf = x.detach().double().requires_grad_()
    ref = reference(leaf, prior, mu, keep)
    loss = sum(
        (ref[name] * grads[name].double()).sum() for name in ("info", "emap", "ent", "cp") if grads[name] is not None
    )
    (expected,) = torch.autograd.grad(loss, leaf)
    ranked = k > 0
    grad_x = target_backward(
        x,
        grads["info"],
        grads["emap"],
        grads["ent"],
        grads["cp"],
        out["keep"] if ranked else None,
        out["kept"] if ranked else None,
        out["cmean"] if prior is not None else None,
        prior,
        mu,
    )
    assert grad_x.dtype == x.dtype and grad_x.shape == x.shape
    rtol, atol = STORED_TOL[x.dtype]
    scale = upstream_scale(x, grads, out["kept"] if ranked else None) if one_hot else None
    assert_close(grad_x, expected, rtol, atol, scale)
    return grad_x, expected


# ------------------------------------------------------------------------------------------------
# forward values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [2, 16, 19, 21])
def test_forward_values(C, dtype):
    check_forward(make_logits(C, dtype, s=S_WIDE), make_prior(C))


@pytest.mark.parametrize("C", [2, 19])
def test_forward_agrees_with_release_reference(C):
    """The contract's float64 formulas agree with the release-style reference module."""
    reference_module = pytest.importorskip("advent_fast.reference")
    x = make_logits(C)
    prior = make_prior(C)
    out = forward(x, prior, k=reference_module.ranked_pixel_count(0.3, S))
    x64 = x.double().cpu()
    torch.testing.assert_close(out["info"].double().cpu(), reference_module.self_information(x64), **F32_TOL)
    torch.testing.assert_close(out["emap"].double().cpu(), reference_module.entropy_map(x64), **F32_TOL)
    torch.testing.assert_close(out["ent"].double().cpu(), reference_module.entropy_loss(x64, top_k=0.3), **F32_TOL)
    torch.testing.assert_close(
        out["cp"].double().cpu(), reference_module.class_prior_loss(x64, prior.double().cpu()), **F32_TOL
    )


def test_entropy_is_never_negative_zero():
    """One-hot pixels have E = +0.0 (the ranking keys order the sign bit as negative)."""
    x = make_logits(19)
    x[:, 0, :150] = 1e4
    emap = forward(x)["emap"]
    assert (emap[:, :150] == 0).all()
    assert not torch.signbit(emap).any()


@pytest.mark.parametrize(
    "want",
    [
        dict(info=True, emap=False, ent=False),
        dict(info=False, emap=True, ent=False),
        dict(info=False, emap=False, ent=True),
        dict(info=False, emap=False, ent=True, k=5),
        dict(info=False, emap=False, ent=False, prior=True),
    ],
    ids=["info", "emap", "ent", "ent-ranked", "cp"],
)
def test_only_requested_outputs(want):
    want = dict(want)
    C = 19
    prior = make_prior(C) if want.pop("prior", False) else None
    k = want.pop("k", 0)
    x = make_logits(C)
    out = forward(x, prior, k, **want)
    ranked = want["ent"] and k > 0
    requested = {
        "info": want["info"],
        "emap": want["emap"],  # ranking selects on a temporary map and keeps a uint8 mask for the backward
        "ent": want["ent"],
        "cp": prior is not None,
        "thresh": ranked,
        "kept": ranked,
        "cmean": prior is not None,
        "keep": ranked,
    }
    for name, is_requested in requested.items():
        assert (out[name] is not None) == is_requested, name  # the custom ops turn None into empty tensors
    if ranked:
        assert out["keep"].dtype == torch.uint8 and out["keep"].shape == (x.shape[0], x.shape[2])
        assert torch.equal(out["kept"], out["keep"].sum(dim=1).float())
    ref = reference(x, prior, keep=out["keep"].bool() if ranked else None)
    for name in ("info", "emap", "ent", "cp", "cmean"):
        if requested[name]:
            torch.testing.assert_close(out[name].double(), ref[name], **F32_TOL)


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------
def layout_view(kind, C, dtype=torch.float32, seed=0):
    """(N, C, S) logits in the given memory layout, with values of make_logits."""
    base = make_logits(C, dtype, seed=seed)
    if kind == "contiguous":
        return base
    if kind == "channels_last":  # a (N, C, H, W) channels_last tensor flattened: strides (S*C, 1, C)
        x4 = base.reshape(N, C, 15, 20).contiguous(memory_format=torch.channels_last)
        x = x4.reshape(N, C, S)
        assert x.stride() == (S * C, 1, C)
        return x
    if kind == "class_outer":  # (C, N, S) storage: strides (S, N*S, 1)
        return base.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    if kind == "strided_pixels":  # every other pixel of a wider tensor: pixel stride 2
        wide = torch.zeros(N, C, 2 * S, dtype=dtype, device=DEVICE)
        wide[..., ::2] = base
        return wide[..., ::2]
    raise ValueError(kind)


LAYOUTS = ["contiguous", "channels_last", "class_outer", "strided_pixels"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_forward_and_backward(layout):
    C = 19
    x = layout_view(layout, C)
    prior = make_prior(C)
    out = check_forward(x, prior)
    grads = upstream_grads(x, ("info", "emap", "ent", "cp"))
    # upstream info gradient in a layout of its own (transposed storage)
    grads["info"] = grads["info"].transpose(1, 2).contiguous().transpose(1, 2)
    grad_x, _ = check_backward(x, (), prior, grads=grads)
    if layout != "strided_pixels":  # dense layouts are kept
        assert out["info"].stride() == x.stride()
        assert grad_x.stride() == x.stride()


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("source", ["info", "emap", "ent", "cp", "ent-ranked"])
def test_backward_each_source(source, dtype):
    """Each upstream gradient alone (their scales differ by orders of magnitude)."""
    C = 19
    x = make_logits(C, dtype)
    k = 70 if source == "ent-ranked" else 0
    check_backward(x, (source.split("-")[0],), make_prior(C), k=k)


@pytest.mark.parametrize("C", [2, 16, 19, 21])
@pytest.mark.parametrize("k", [0, 333])
def test_backward_all_sources(C, k):
    check_backward(make_logits(C, s=S_WIDE), ("info", "emap", "ent", "cp"), make_prior(C), k=k)


@pytest.mark.parametrize("n, s", [(1, S), (3, 1)])
def test_one_image_and_one_pixel(n, s):
    """N = 1 and S = 1 (Triton specialises integer arguments equal to 1)."""
    C = 21
    x = make_logits(C, n=n, s=s)
    prior = make_prior(C)
    for k in (0, 1, s):
        check_forward(x, prior, k=k)
        check_backward(x, ("info", "emap", "ent", "cp"), prior, k=k)


def test_backward_no_upstream_gradient_is_zero():
    x = make_logits(19)
    grad_x = target_backward(x, None, None, None, None, None, None, None, None, 0.5)
    assert torch.equal(grad_x, torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------
# non-finite and extreme logits
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 100])
def test_minus_inf_logits_are_masked_classes(k):
    """-inf logits: p = 0, finite results equal to the reference, exactly 0 gradient."""
    C = 19
    x = make_logits(C)
    x[:, 3, :] = float("-inf")  # a class masked everywhere
    x[0, 7, ::5] = float("-inf")  # and scattered ones
    prior = make_prior(C)
    out = check_forward(x, prior, k=k)
    for name in ("info", "emap", "ent", "cp", "cmean"):
        assert out[name].isfinite().all(), name
    masked = x == float("-inf")
    assert (out["info"][masked] == 0).all()
    grad_x, expected = check_backward(x, ("info", "emap", "ent", "cp"), prior, k=k)
    assert (expected[masked] == 0).all()
    assert (grad_x[masked] == 0).all()
    assert grad_x.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logits(dtype):
    C = 19
    x = make_logits(C, dtype, scale=1e4)
    prior = make_prior(C)
    check_forward(x, prior, k=100)
    for sources in (("info",), ("emap",), ("ent",), ("cp",)):
        check_backward(x, sources, prior, one_hot=True)
    check_backward(x, ("ent",), prior, k=100, one_hot=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf - inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("k", [0, 1, 100])
def test_non_finite_logit_propagates(bad, k):
    """A NaN or +inf logit makes its pixel NaN and every loss NaN; the other pixels stay exact."""
    C = 19
    x = make_logits(C)
    x[1, 5, 17] = bad
    prior = make_prior(C)
    out = forward(x, prior, k=k)
    assert out["emap"][1, 17].isnan()
    assert out["info"][1, :, 17].isnan().all()
    for name in ("ent", "cp"):
        assert out[name].isnan(), name
    finite = torch.ones_like(out["emap"], dtype=torch.bool)
    finite[1, 17] = False
    ref = reference(x.masked_fill(x.isnan() | x.isinf(), 0.0))  # the bad pixel replaced by finite logits
    torch.testing.assert_close(out["emap"][finite].double(), ref["emap"][finite], **F32_TOL)
    if k:
        # NaN counts as the largest: with k = 1 the threshold is NaN and only the NaN pixel is kept
        assert out["thresh"][1].isnan() == (k == 1)
        assert out["kept"][1] == kept_mask(out["emap"], out["thresh"])[1].sum()
        assert torch.equal(out["keep"].bool(), kept_mask(out["emap"], out["thresh"]))
    grads = upstream_grads(x, ("info", "emap", "ent", "cp"))
    grad_x = target_backward(
        x, grads["info"], grads["emap"], grads["ent"], grads["cp"],
        out["keep"] if k else None, out["kept"] if k else None, out["cmean"], prior, 0.5,
    )  # fmt: skip
    assert grad_x[1, :, 17].isnan().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: -inf - -inf
def test_all_minus_inf_pixel_is_nan():
    x = make_logits(19)
    x[0, :, 42] = float("-inf")
    out = forward(x)
    assert out["emap"][0, 42].isnan()
    assert out["ent"].isnan()
    assert out["emap"][0, :42].isfinite().all() and out["emap"][1].isfinite().all()


# ------------------------------------------------------------------------------------------------
# entropy ranking
# ------------------------------------------------------------------------------------------------
def near_tie_logits(C):
    """Logits whose entropies share their high bits: the select needs all four radix digits."""
    x = make_logits(C, scale=1e-3)
    x[:, 0] += 0.5
    return x


@pytest.mark.parametrize("values", ["random", "near_ties"])
@pytest.mark.parametrize("k", [1, 2, 77, S - 1, S])
def test_ranking_threshold_is_topk_kth_value(k, values):
    C = 19
    x = make_logits(C) if values == "random" else near_tie_logits(C)
    out = check_forward(x, k=k)
    emap = out["emap"]
    assert torch.equal(out["thresh"], emap.topk(k, dim=1).values[:, -1])
    keep = kept_mask(emap, out["thresh"])
    assert torch.equal(out["keep"].bool(), keep)
    assert torch.equal(out["kept"], keep.sum(dim=1).float())
    expected = (torch.where(keep, emap.double(), 0.0).sum(dim=1) / keep.sum(dim=1)).mean()
    torch.testing.assert_close(out["ent"].double(), expected, rtol=1e-6, atol=0.0)
    if values == "near_ties":  # the entropies really differ only in their low bits
        bits = emap.view(torch.int32)
        assert (bits >> 16).unique().numel() <= 2 < (bits & 0xFFFF).unique().numel()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])  # class-loop / general main kernel
@pytest.mark.parametrize("C", [16, 19])  # 4 and 2 pixels a thread in the class loop (with the info map)
def test_ranking_k_equals_S_is_plain_mean(C, layout):
    """k = S keeps every pixel: the histograms count each pixel once (on an H200 the class-loop kernel's
    fused radix pass 0, since removed, counted keys that were not there: kept said S with fewer pixels kept)."""
    x = layout_view(layout, C)
    ranked, plain = forward(x, k=S), forward(x, k=0)
    assert torch.equal(ranked["kept"], torch.full((N,), float(S), device=DEVICE))
    assert ranked["keep"].bool().all()
    torch.testing.assert_close(ranked["ent"], plain["ent"], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("k", [10, 150])
def test_ranking_keeps_all_ties(k):
    """A region of identical logits has one entropy value: when it holds the k-th, all of it is kept."""
    C = 19
    x = make_logits(C, scale=1.0)
    x[:, :, :100] = 0.0  # uniform pixels: E = 1, the largest
    x[:, :, 100:200] = torch.linspace(0, 2, C, dtype=x.dtype, device=DEVICE)[:, None]  # a second tie block
    out = forward(x, k=k)
    emap = out["emap"]
    tie_value = emap[:, 0] if k <= 100 else emap[:, 100]
    assert torch.equal(out["thresh"], tie_value)
    expected_kept = (emap >= tie_value[:, None]).sum(dim=1)
    assert (expected_kept > k).all()
    assert torch.equal(out["kept"], expected_kept.float())
    keep = kept_mask(emap, out["thresh"])
    torch.testing.assert_close(out["ent"].double(), reference(x, keep=keep)["ent"], **F32_TOL)


# ------------------------------------------------------------------------------------------------
# several pixel blocks per program (the programs cap) and several chunks per ranking program
# ------------------------------------------------------------------------------------------------
def test_programs_loop_over_several_blocks(monkeypatch):
    C = 19
    x = make_logits(C, s=1000, seed=3)
    prior = make_prior(C)
    one_block_each = [forward(x, prior, k=k) for k in (0, 600)]
    monkeypatch.setattr(kernels.softmax_entropy, "MAX_PROGRAMS", 2 * N)  # 2 programs an image
    monkeypatch.setattr(kernels.entropy_ranking, "BLOCK_R", 128)
    for k, expected in zip((0, 600), one_block_each):
        out = forward(x, prior, k=k)
        for name in ("ent", "cp", "cmean", "thresh", "kept", "emap", "info"):
            torch.testing.assert_close(out[name], expected[name], rtol=1e-6, atol=1e-7)
        check_forward(x, prior, k=k)


# ------------------------------------------------------------------------------------------------
# pixel-contiguous logits, C <= 24: the class-loop kernels (kernels/class_loop.py)
# ------------------------------------------------------------------------------------------------
def launched_kernels(monkeypatch, kernel) -> list:
    """The names of the Triton kernels launched from now on (the JIT or interpreter class of ``kernel``)."""
    names, run = [], type(kernel).run

    def spy(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(type(kernel), "run", spy)
    return names


def masked_pixels(x):
    """A masked class, a pixel with one finite class, one with only its last class."""
    C = x.shape[1]
    x[0, 1, 5] = float("-inf")
    x[1, :, 7] = float("-inf")
    x[1, C - 1, 7] = 2.0
    x[0, : C - 1, 9] = float("-inf")
    return x


# forward outputs asked for (info, emap, ent, cp; k) and the upstream gradients of the backward
LOOP_MODES = {
    "all": (dict(info=True, emap=True, ent=True, cp=True, k=0), ("info", "emap", "ent", "cp")),
    "all-ranked": (dict(info=True, emap=True, ent=True, cp=True, k=300), ("info", "emap", "ent", "cp")),
    "ent": (dict(info=False, emap=False, ent=True, cp=False, k=0), ("ent",)),
    "ent-ranked": (dict(info=False, emap=False, ent=True, cp=False, k=300), ("ent",)),
    "cp": (dict(info=False, emap=False, ent=False, cp=True, k=0), ("cp",)),
    "info": (dict(info=True, emap=False, ent=False, cp=False, k=0), ("info",)),
    "emap": (dict(info=False, emap=True, ent=False, cp=False, k=0), ("emap",)),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: 0 * -inf, masked
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode, C, dtype", [  # 16-bit logits: the modes with every output
    (mode, C, dtype) for mode in LOOP_MODES
    for C, dtype in [(2, torch.float32), (19, torch.float32), (24, torch.float32), (16, torch.float16),
                     (21, torch.bfloat16)]
    if dtype == torch.float32 or mode in ("all", "all-ranked")], ids=str)
def test_pixel_contiguous_logits_loop_over_the_classes(mode, C, dtype, layout, monkeypatch):
    """Every mode of the forward and backward takes the class-loop kernels on pixel-contiguous logits
    and the general tile kernels on channels_last ones (ranking: the radix passes after either): both
    against float64, with masked classes and a one-hot
    pixel (exact 0 gradients), over several pixel blocks (a partial one last) at 4 and 2 pixels a thread,
    several blocks a program."""
    want, sources = LOOP_MODES[mode]
    class_loop = importlib.import_module(f"{kernels.__name__}.class_loop")
    monkeypatch.setattr(kernels.softmax_entropy, "MAX_PROGRAMS", N)  # one program an image: it loops
    s = 2 * class_loop.LOOP_VEC * 32 * class_loop.LOOP_NUM_WARPS + 77
    x = masked_pixels(make_logits(C, dtype, s=s))
    if layout == "channels_last":
        x = x.reshape(N, C, s, 1).contiguous(memory_format=torch.channels_last).reshape(N, C, s)
    # mu = 1: the hinges of some classes active (mu prior_c above the class mean), of others not
    prior, k, mu = make_prior(C) if want["cp"] else None, want["k"], 1.0
    names = launched_kernels(monkeypatch, class_loop._target_loop_fwd_kernel)
    out = dict(zip(OUTPUTS, target_forward(x, prior, k, mu, want["info"], want["emap"], want["ent"], want["cp"])))
    grads = upstream_grads(x, sources)
    grad_x = target_backward(x, grads["info"], grads["emap"], grads["ent"], grads["cp"], out["keep"], out["kept"],
                             out["cmean"], prior, mu)
    main = {"_target_loop_fwd_kernel", "_target_loop_bwd_kernel", "_target_fwd_kernel", "_target_bwd_kernel"}
    expected_main = (["_target_loop_fwd_kernel", "_target_loop_bwd_kernel"] if layout == "contiguous"
                     else ["_target_fwd_kernel", "_target_bwd_kernel"])
    assert [n for n in names if n in main] == expected_main
    assert names.count("_rank_pass_kernel") == (5 if k else 0)  # the 4 radix passes and the kept sum

    keep = out["keep"].bool() if k else None
    leaf = x.detach().double().requires_grad_()
    ref = reference(leaf, prior, mu, keep)
    rtol, atol = STORED_TOL[dtype]
    if want["cp"]:
        assert out["cp"] > 0 and ((mu * prior > out["cmean"]).sum(dim=1) < C).all()
    if want["info"]:
        assert out["info"].dtype == dtype and out["info"].stride() == x.stride()
        assert_close(out["info"], ref["info"].detach(), rtol, atol)
    for name in ("emap", "ent", "cp", "cmean"):
        if out[name] is not None:
            torch.testing.assert_close(out[name].double(), ref[name].detach().to(out[name].device), **F32_TOL)
    if k:
        assert torch.equal(out["kept"], out["keep"].sum(dim=1).float())
        if want["emap"]:  # the kernel's own entropies: the exact k-th largest, the kept set
            assert torch.equal(out["thresh"], out["emap"].topk(k, dim=1).values[:, -1])
            assert torch.equal(keep, kept_mask(out["emap"], out["thresh"]))
        ref_thresh = ref["emap"].detach().topk(k, dim=1).values[:, -1]
        torch.testing.assert_close(out["thresh"].double(), ref_thresh.to(out["thresh"].device), **F32_TOL)
    loss = sum((ref[name] * grads[name].double()).sum() for name in sources)
    (expected,) = torch.autograd.grad(loss, leaf)
    assert grad_x.dtype == dtype and grad_x.stride() == x.stride()
    assert_close(grad_x, expected, rtol, atol)
    assert (grad_x[x == float("-inf")] == 0).all() and (grad_x[1, :, 7] == 0).all()  # p = 0, one-hot: exact 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf - inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_minent_alone_non_finite_logits(bad):
    """A NaN or +inf logit, or a pixel of -inf logits only, makes MinEnt alone (the class-loop kernels) NaN;
    the gradient is NaN on that pixel only."""
    x = make_logits(19, s=S)
    if bad == float("-inf"):
        x[1, :, 17] = bad
    else:
        x[1, 4, 17] = bad
    assert target_forward(x, None, 0, 0.5, False, False, True, False)[2].isnan()
    grad_x = target_backward(x, None, None, torch.ones((), device=DEVICE), None, None, None, None, None, 0.5)
    assert grad_x[1, :, 17].isnan().all()
    finite = torch.ones(S, dtype=torch.bool)
    finite[17] = False
    assert torch.isfinite(grad_x[0]).all() and torch.isfinite(grad_x[1][:, finite]).all()


# ------------------------------------------------------------------------------------------------
# what the kernels cannot address: a clear error, not wrapped 32-bit offsets
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,message", [((1, 2, 2**30), "spans 2147483648 elements"),
                                           ((1, 19, 2**27), "spans"), ((65536, 2, 1), "65536 images")])
def test_launchers_refuse_what_they_cannot_address(shape, message):
    x = torch.empty(shape, device="meta")  # the checks read shapes and strides only
    with pytest.raises(ValueError, match=message):
        target_forward(x, None, 0, 0.5, False, False, True, False)
    with pytest.raises(ValueError, match=message):
        target_backward(x, None, None, torch.empty((), device="meta"), None, None, None, None, None, 0.5)


def test_mean_entropy_of_more_than_2_to_the_31_pixels():
    """The finishing kernel's mean over N * S pixels: N * S in int32 would wrap (N = 2, S = 2**30 gave a
    negative loss). Its partial sums say every pixel has entropy 0.5 (the main kernel, which would need
    8 GB of logits here, is left out)."""
    n, s = 2, 2**30
    x = torch.empty((n, 2, 1), device=DEVICE)  # read for N, C and the device only
    ent_part = torch.full((n, 1), 0.5 * s, device=DEVICE)
    finish = importlib.import_module(f"{kernels.__name__}.target_forward").finish_target_forward
    out = finish(x, None, None, ent_part, ent_part[:, :, None], None, 0, 0.5, False, True, False, s, 1, 1, 2, 1)
    assert out[2].item() == 0.5


def test_backward_refuses_a_gradient_it_cannot_address():
    x = torch.empty((1, 2, 2**29), device="meta")  # fits; every 4th element of a wider gradient does not
    grad_info = torch.empty((1, 2, 2**31), device="meta")[:, :, ::4]
    with pytest.raises(ValueError, match="self-information gradient"):
        target_backward(x, grad_info, None, None, None, None, None, None, None, 0.5)


# ------------------------------------------------------------------------------------------------
# compilation for the GPU, without one
# ------------------------------------------------------------------------------------------------
# The interpreter runs the kernels as Python, so it misses what only the compiler checks (loop-carried
# types, layouts, constexpr specialisation of arguments equal to 1). benchmarks/kernel_resources.py
# compiles, without launching, every kernel variant the launchers produce for an H100 (sm_90), an A100 (sm_80)
# or a V100 (sm_70: the oldest GPU the Triton backend takes, advent_fast.backend) with the installed Triton and
# its bundled ptxas, and reports each one's registers and spills.
CANNOT_COMPILE_HERE = 77  # the script's exit code when this Triton cannot target NVIDIA GPUs here
SPILL_BUDGET = 32  # stack bytes a thread (spilled registers) tolerated in any kernel variant


@pytest.mark.skipif(not INTERPRET, reason="the GPU runs the compiled kernels already")
@pytest.mark.parametrize("arch", [90, 80, 70])
def test_kernels_compile_without_large_spills(tmp_path, arch):
    import json
    import subprocess
    import sys

    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=path)
    out = tmp_path / "kernel_resources.json"
    done = subprocess.run([sys.executable, os.path.join(repo_root, "benchmarks", "kernel_resources.py"),
                           "--arch", str(arch), "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode == CANNOT_COMPILE_HERE:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rows = json.loads(out.read_text())["rows"]
    kernel_names = {r["kernel"] for r in rows}
    assert {"_target_fwd_kernel", "_target_bwd_kernel", "_target_finish_kernel", "_rank_pass_kernel",
            "_upsampled_ce_fwd_kernel", "_ce_finish_kernel", "_combine_taps_kernel",
            "_upsampled_target_fwd_kernel", "_upsampled_target_bwd_kernel", "_target_loop_fwd_kernel",
            "_target_loop_bwd_kernel", "_cast_add_kernel"} <= kernel_names
    # A spill moves registers through device memory. ptxas spills a few on its own well below the
    # register limit (seen: 16-24 bytes a thread in 3 of the 70 variants, different ones with Triton 3.6
    # and 3.9); a tile too large for its warps spills hundreds (1,000 bytes with 1 warp instead of 8).
    spilled = [(r["kernel"], r["first_case"], r["stack_bytes"]) for r in rows if r["stack_bytes"] > SPILL_BUDGET]
    assert not spilled, spilled
    # The entropies that ranking compares are computed without multiply-add contraction (softmax_entropy.py,
    # "Ties"): with it, the same two logits in swapped classes get entropies an ulp apart on a GPU.
    fused = {r["kernel"] for r in rows if r["fp_fusion"]}
    assert not fused & {"_target_fwd_kernel", "_target_loop_fwd_kernel", "_upsampled_target_fwd_kernel"}, fused
