"""The benchmark scripts run end to end (smallest options) and write their JSON."""
import importlib
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny embedded set (generated in a second or two, then cached beside the full one when
# ADVENT_FAST_DATA names a shared cache): the benchmark's loader cycles over it.
TINY_COUNTS = ("6", "6", "1")


def run_script(name, *args, timeout=120):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return os.environ.get("ADVENT_FAST_DATA") or str(tmp_path_factory.mktemp("embedded"))


def test_bench_data(tmp_path, data_root):
    out = tmp_path / "bench_data.json"
    stdout = run_script("bench_data.py", "--quick", "--batches", "8", "--workers", "0", "2",
                        "--decode-images", "3", "--root", data_root, "--counts", *TINY_COUNTS,
                        "--json", str(out))
    assert "images/s" in stdout
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_count"] == os.cpu_count()
    rows = result["results"]
    assert {r["stream"] for r in rows} == {"source", "target"}
    assert {r["workers"] for r in rows} == ({0, 2} if (os.cpu_count() or 1) >= 2 else {0})
    assert {r["image_reader"] for r in rows} == {"pillow", "opencv"}
    for r in rows:
        assert r["images"] == 8 and r["images_per_s"] > 0 and r["ms_per_image"] > 0 and r["MB_per_s"] > 0
    assert {r["stream"] for r in result["decode"]} == {"source", "target"}
    for r in result["decode"]:
        assert r["decode_ms"] > 0 and r["item_ms"] > 0 and r["item_opencv_ms"] > 0


def test_bench_data_resized(tmp_path, data_root):
    out = tmp_path / "bench_data.json"
    run_script("bench_data.py", "--quick", "--batches", "2", "--workers", "0", "--streams", "target",
               "--size", "64", "32", "--decode-images", "2", "--root", data_root, "--counts", *TINY_COUNTS,
               "--json", str(out))
    result = json.loads(out.read_text())
    [row] = [r for r in result["results"] if r["image_reader"] == "pillow"]
    assert row["stream"] == "target" and row["size"] == [64, 32] and row["images_per_s"] > 0
    [decode] = result["decode"]
    assert decode["size"] == [64, 32] and decode["resize_ms"] > 0


def test_bench_eval(tmp_path):
    out = tmp_path / "bench_eval.json"
    stdout = run_script("bench_eval.py", "--quick", "--device", "cpu", "--images", "2", "--warmup", "1",
                        "--image-size", "64", "32", "--label-size", "128", "64", "--width", "8",
                        "--release-images", "1", "--json", str(out))
    assert "in memory" in stdout
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [(r["path"], r["precision"]) for r in rows] == [
        ("advent_fast", "fp32"), ("advent_fast", "bf16"), ("release (host argmax)", "fp32")]
    for r in rows:
        assert r["model"] == "deeplabv2_small" and r["images_per_s"] > 0 and r["s_per_image"] > 0
        assert r["projected_s_500"] == pytest.approx(500 * r["s_per_image"])
        assert r["peak_MiB"] is None


ADVENT_LOSSES = {"seg_main", "seg_aux", "adv_main", "adv_aux", "d_main", "d_aux"}


def test_bench_train_step(tmp_path):
    out = tmp_path / "bench_train_step.json"
    stdout = run_script("bench_train_step.py", "--device", "cpu", "--modes", "advent", "--variants", "release_fp32",
                        "fast", "--steps", "1", "--warmup", "1", "--source-size", "64", "32", "--target-size",
                        "64", "32", "--set", "model.width=4", "--track", "2", "--host-profile", "3", "--json", str(out))
    assert "ms/step" in stdout and "max rel. diff" in stdout and "all ops' self ms" in stdout
    result = json.loads(out.read_text())
    assert [(r["mode"], r["variant"]) for r in result["rows"]] == [("advent", "release_fp32"), ("advent", "fast")]
    for r in result["rows"]:
        assert r["ms_per_step"] > 0 and r["images_per_s"] > 0
        assert r["gpu_busy"] is r["gpu_ms"] is r["kernels_per_step"] is None  # profiled on GPUs only
        assert 0 < r["host_ms"] <= r["ms_per_step"]  # the host's part of each step
        assert len(r["host_profile"]["top"]) == 3 and r["host_profile"]["top"][0]["self_ms"] > 0
    release, fast = result["rows"]
    assert "fast path, fp32" in fast["settings"]
    # the first step of each from the same weights on the same batch: fp32 both on a CPU, so float rounding apart
    assert release["first_losses"].keys() == fast["first_losses"].keys() == ADVENT_LOSSES
    assert release["first_losses"] == pytest.approx(fast["first_losses"], rel=1e-4)
    assert "step-1 losses vs fast" in stdout  # in the rows printed after the fast one
    assert 0 < fast["ops_per_step"] < release["ops_per_step"]  # fused losses and optimisers: fewer ops to issue
    tracked = {(r["variant"], r["loss"]): r for r in result["track"]}
    losses = ADVENT_LOSSES
    assert set(tracked) == {(v, loss) for v in ("release_fp32", "fast", "fast_fp32") for loss in losses}
    # On a CPU the fast path runs in fp32: the losses agree to float rounding; the release step with itself exactly.
    assert max(r["max_rel_diff"] for r in tracked.values()) < 1e-4
    assert all(r["max_rel_diff"] == 0 for (variant, _), r in tracked.items() if variant == "release_fp32")


def test_bench_train_step_rows_say_how_far_a_levers_first_losses_are_from_the_default(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_train_step

    def row(variant, ms, seg, adv):
        return {"mode": "advent", "variant": variant, "ms_per_step": ms, "host_ms": ms, "images_per_s": 2e3 / ms,
                "warmup_s": 1.0, "peak_mib": None, "gpu_ms": None, "gpu_busy": None, "kernels_per_step": None,
                "ops_per_step": None, "settings": variant, "first_losses": {"seg_main": seg, "adv_main": adv}}

    fast, lever = row("fast", 40.0, 2.0, 0.5), row("fast_lever", 32.0, 2.0, 0.75)
    cells = [cell.strip() for cell in bench_train_step.format_row(lever, [fast, lever]).split("|")]
    assert cells[7] == "1.25" and cells[8] == "5.0e-01"  # x fast; the largest relative difference: adv_main's
    cells = [cell.strip() for cell in bench_train_step.format_row(fast, [fast, lever]).split("|")]
    assert cells[7] == "1.00" and cells[8] == "-"


def test_bench_train_step_tracks_losses_without_timing_when_given_no_variants(tmp_path):
    """run_gpu.sh's track_losses stage: ``--variants`` with no names times nothing and only tracks."""
    out = tmp_path / "track.json"
    stdout = run_script("bench_train_step.py", "--device", "cpu", "--modes", "minent", "--variants", "--track", "2",
                        "--track-variants", "fast", "--source-size", "64", "32", "--target-size", "64", "32",
                        "--set", "model.width=4", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["rows"] == [] and "ms/step" not in stdout
    assert {(r["variant"], r["loss"]) for r in result["track"]} == {("fast", "seg_main"), ("fast", "seg_aux"),
                                                                      ("fast", "ent_main"), ("fast", "ent_aux")}


def test_bench_train_step_keeps_the_rows_of_a_run_cut_short(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_train_step

    real, calls = bench_train_step.time_variant, []

    def interrupted_after_one(*args, **kwargs):
        calls.append(args[2])
        if len(calls) > 1:
            raise KeyboardInterrupt  # a stage's time limit
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_train_step, "time_variant", interrupted_after_one)
    out = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        bench_train_step.main(["--device", "cpu", "--modes", "minent", "--variants", "release_fp32", "fast",
                               "--steps", "1", "--warmup", "1", "--source-size", "64", "32", "--target-size", "64",
                               "32", "--set", "model.width=4", "--json", str(out)])
    assert "| minent | release_fp32 |" in capsys.readouterr().out
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["release_fp32"]


def test_bench_train_step_variants_after_a_deterministic_one_run_without_its_switches(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_train_step

    real, switched = bench_train_step.build_trainer, []

    def recording(*args, **kwargs):
        trainer = real(*args, **kwargs)
        switched.append((args[2], torch.are_deterministic_algorithms_enabled()))
        return trainer

    monkeypatch.setattr(bench_train_step, "build_trainer", recording)
    try:
        bench_train_step.main(["--device", "cpu", "--modes", "minent", "--variants", "fast_deterministic",
                               "release_fp32", "--steps", "1", "--warmup", "1", "--source-size", "64", "32",
                               "--target-size", "64", "32", "--set", "model.width=4",
                               "--json", str(tmp_path / "d.json")])
    finally:
        torch.use_deterministic_algorithms(False)
    assert switched == [("fast_deterministic", True), ("release_fp32", False)]
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert "deterministic algorithms" in rows[0]["settings"] and "error" not in rows[0]


def test_gpu_busy_counts_overlapping_kernels_once(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from bench_train_step import covered_length

    # a copy on its own stream overlapping two kernels, a nested kernel, a gap, then a touching one
    assert covered_length([(5, 9), (0, 4), (3, 6), (1, 2), (12, 14), (14, 15)]) == 9 + 3
    assert covered_length([]) == 0


def test_gpu_profile_ranks_kernels_by_device_time_per_step(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from bench_train_step import kernel_totals

    spans = [("conv", 0, 3000), ("relu", 3000, 3500), ("conv", 4000, 6000), ("bn", 6000, 7000), ("x" * 120, 0, 1)]
    assert kernel_totals(spans, 2, 2) == [{"kernel": "conv", "ms": 2.5, "calls": 1.0},
                                         {"kernel": "bn", "ms": 0.5, "calls": 0.5}]
    assert kernel_totals(spans, 1, 9)[-1] == {"kernel": "x" * 100, "ms": 0.001, "calls": 1.0}
    assert kernel_totals(spans, 1, 0) == []


@pytest.mark.parametrize("name, kind", [
    ("void at::native::batch_norm_collect_statistics_channels_last_kernel<c10::BFloat16, float, float, 4>",
     "BatchNorm"),
    ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1, true>", "BatchNorm"),
    ("_target_loop_fwd_kernel", "advent_fast loss kernels"),
    ("_upsampled_target_bwd_kernel", "advent_fast loss kernels"),
    ("_cast_add_kernel", "advent_fast weight casts"),
    ("_batch_norm_grad_input_kernel", "advent_fast BatchNorm kernels"),
    ("_release_sgd_kernel", "optimisers"),
    ("triton_red_fused_native_batch_norm_backward_relu_0", "torch.compile Triton kernels"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64",
     "convolution input gradient"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1",
     "convolution forward"),
    ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x256x64",
     "convolution weight gradient"),
    ("void cudnn::detail::wgrad_alg0_engine<float, 128, 6, 7, 3, 3, 5, false, 512>", "convolution weight gradient"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "convolution, GEMM (pass not named)"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>",
     "layout transposes (cuDNN)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<3>, at::native::(anonymous namespace)::FusedSgdMathFunctor<float, 3>>", "optimisers"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::launch_clamp_scalar"
     "(at::TensorIteratorBase&, c10::Scalar, c10::Scalar)::{lambda(c10::BFloat16)#1}>", "ReLU and its backward"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
     "::{lambda(float)#1}>", "copies, casts"),
    ("Memcpy HtoD (Pinned -> Device)", "copies, casts"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "fills"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "other elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>",
     "reductions"),
    ("some_new_kernel", "other"),
])
def test_gpu_profile_sorts_kernels_by_kind(monkeypatch, name, kind):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from bench_train_step import kernel_kind

    assert kernel_kind(name) == kind


def test_gpu_profile_totals_every_kernel_by_kind(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from bench_train_step import kernel_kinds

    spans = [("sm90_xmma_fprop", 0, 3000), ("batch_norm_transform_input_kernel", 3000, 3500),
             ("cutlass_conv", 4000, 6000), ("welford", 6000, 7000), ("mystery", 0, 10)]
    assert kernel_kinds(spans, 2) == [{"kind": "convolution forward", "ms": 1.5, "calls": 0.5},
                                      {"kind": "convolution, GEMM (pass not named)", "ms": 1.0, "calls": 0.5},
                                      {"kind": "BatchNorm", "ms": 0.75, "calls": 1.0},
                                      {"kind": "other", "ms": 0.005, "calls": 0.5}]


def test_gpu_profile_tables(monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from bench_train_step import kernel_kinds, kernel_totals, print_gpu_profiles

    spans = [("sm90_xmma_fprop", 0, 3000), ("batch_norm_stats", 3000, 4000), ("a|b", 4000, 5000)]
    profile = {"kernels": kernel_totals(spans, 1, 2), "kinds": kernel_kinds(spans, 1)}
    print_gpu_profiles([{"mode": "advent", "variant": "fast", "gpu_ms": 5.0, "gpu_profile": profile},
                        {"mode": "advent", "variant": "fast_eager", "gpu_ms": 9.0}])
    out = capsys.readouterr().out
    assert "| advent | fast | 5.0 | convolution forward | 1 | 3.00 | 60% |" in out
    assert "| | | | other | 1 | 1.00 | 20% |" in out
    assert "| advent | fast | 5.0 | `sm90_xmma_fprop` | 1 | 3.00 | 60% |" in out
    assert "| | | | `batch_norm_stats` | 1 | 1.00 | 20% |" in out and "fast_eager" not in out
    print_gpu_profiles([{"mode": "advent", "variant": "fast", "gpu_ms": 5.0}])
    assert capsys.readouterr().out == ""


def test_kernel_resources_sees_the_spills_of_an_oversized_tile(tmp_path):
    """--set compiles with other launch parameters: 8K-element tiles on 4 warps do not fit in registers."""
    out = tmp_path / "kernel_resources.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py"), "--set",
                           "TILE_ELEMENTS=8192", "--set", "NUM_WARPS=4", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"] == {"TILE_ELEMENTS": 8192, "NUM_WARPS": 4}
    pixel = [r for r in result["rows"] if r["kernel"] in ("_target_fwd_kernel", "_target_bwd_kernel")]
    assert pixel and all(r["num_warps"] == 4 for r in pixel)
    assert max(r["stack_bytes"] for r in pixel) > 256


def test_bench_activations(tmp_path):
    out = tmp_path / "bench_activations.json"
    stdout = run_script("bench_activations.py", "--device", "cpu", "--model", "deeplabv2_small", "--width", "4",
                        "--sizes", "256x128", "128x64", "--precisions", "fp32", "--json", str(out))
    assert "saved MiB" in stdout
    rows = {(r["bn"], r["checkpointing"], r["input"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(bn, c, size) for bn in ("train", "folded") for c in ("off", "on")
                         for size in ("256x128", "128x64")}
    for bn in ("train", "folded"):  # saved activations grow with the input; checkpointing keeps less
        for c in ("off", "on"):
            assert rows[bn, c, "256x128"]["saved_MiB"] > rows[bn, c, "128x64"]["saved_MiB"] > 0
        assert rows[bn, "on", "256x128"]["saved_MiB"] < rows[bn, "off", "256x128"]["saved_MiB"]
    assert rows["train", "off", "256x128"]["saved_MiB"] > rows["folded", "off", "256x128"]["saved_MiB"]


def test_bench_host(tmp_path):
    out = tmp_path / "bench_host.json"
    stdout = run_script("bench_host.py", "--reps", "3", "--warmup", "1", "--json", str(out))
    assert "host us" in stdout
    rows = {r["call"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 9 and all(r["host_us"] > 0 for r in rows.values())
    # The Triton launches a call issues: forward, finishing kernel, backward (ranking: the four radix passes
    # and the kept sum).
    assert rows["MinEnt"]["launches"] == 3 and rows["MinEnt+ER (0.3)"]["launches"] == 8
    assert rows["self-information"]["launches"] == 2  # no scalar loss: no finishing kernel


def test_bench_entropy(tmp_path):
    out = tmp_path / "bench_entropy.json"
    stdout = run_script("bench_entropy.py", "--shapes", "1x19x8x16", "--dtypes", "fp32", "bf16", "--no-compile",
                        "--quick", "--json", str(out))
    assert "peak / logits" in stdout
    rows = json.loads(out.read_text())["results"]
    cases = ("minent", "minent_er", "self_info", "class_prior", "target_fused")
    assert {(r["case"], r["dtype"], r["impl"]) for r in rows} == {
        (c, d, i) for c in cases for d in ("fp32", "bf16") for i in ("eager", "fused")}
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0 and r["GBps"] > 0 and r["x_compile"] is None
        assert r["peak_MiB"] is r["peak_x_logits"] is r["graph_ms"] is r["host_ms"] is None  # CUDA only
        assert r["floor_ms"] is None  # the C++ backend's: the floor column is the Triton kernels'


def test_launch_cost_calls_each_launch_once(monkeypatch):
    """bench_entropy's launch costs (GPU only) time these calls: each runs, under the interpreter here."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import torch
    from bench_common import launch_calls

    x = torch.zeros(1)
    calls = launch_calls(x)
    for name, call in calls.items():
        call()
    assert list(calls) == ["torch_op", "triton_1_arg", "triton_28_args"] and x.item() == 3


def test_bench_entropy_triton_floor(tmp_path, monkeypatch):
    """With the Triton backend the fused rows carry the kernels' floor: the bytes they move at the
    measured copy bandwidth (MinEnt: the logits read twice and the gradient written once)."""
    monkeypatch.setenv("ADVENT_FAST_BACKEND", "triton")
    out = tmp_path / "bench_entropy.json"
    run_script("bench_entropy.py", "--shapes", "1x19x8x16", "--dtypes", "fp32", "--no-compile", "--quick",
               "--cases", "minent", "minent_er", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["machine"]["backend"] == "triton"
    floors = {r["case"]: r["floor_ms"] for r in result["results"] if r["impl"] == "fused"}
    logits_bytes, pixels = 19 * 8 * 16 * 4, 8 * 16
    assert floors["minent"] == pytest.approx(3 * logits_bytes / result["machine"]["copy_GBps"] / 1e6)
    ranking_bytes = (4 + 5 * 4 + 1 + 1) * pixels  # entropy map written, read by 5 passes; keep mask written, read
    copy_bytes_per_ms = result["machine"]["copy_GBps"] * 1e6
    assert floors["minent_er"] == pytest.approx((3 * logits_bytes + ranking_bytes) / copy_bytes_per_ms)
    assert all(r["floor_ms"] is None for r in result["results"] if r["impl"] == "eager")


def test_bench_upsampled(tmp_path):
    out = tmp_path / "bench_upsampled.json"
    stdout = run_script("bench_upsampled.py", "--quick", "--no-compile", "--json", str(out))
    assert "release" in stdout
    rows = json.loads(out.read_text())["results"]
    assert {(r["case"], r["impl"]) for r in rows} == {
        ("source_ce", "release"), ("source_ce", "fused"),
        *((case, impl) for case in ("advent", "minent") for impl in ("release", "interp+fused", "fused"))}
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["x_release"] > 0 and r["peak_MiB"] is r["graph_ms"] is r["host_ms"] is None


def test_bench_batchnorm(tmp_path):
    out = tmp_path / "bench_batchnorm.json"
    stdout = run_script("bench_batchnorm.py", "--quick", "--no-compile", "--json", str(out))
    assert "| layer3 bn2 | 1x256x23x40 | train | BN + ReLU | bf16 | fused |" in stdout
    assert "| layer3 bn3 | 1x1024x23x40 | train | BN + residual + ReLU | bf16 | aten |" in stdout
    assert "| layer3 bn3 | 1x1024x23x40 | folded | shift + residual + ReLU | bf16 | fused |" in stdout
    assert "the fused rows fall back to ATen's ops here" in stdout  # the cpp backend: no kernels to time
    rows = json.loads(out.read_text())["results"]
    assert [(r["kind"], r["case"], r["impl"]) for r in rows] == [
        (kind, case, impl) for kind in ("train", "folded") for case in ("layer3 bn2", "layer3 bn3")
        for impl in ("aten", "fused")]
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["GBps"] > 0 and r["x_aten"] > 0 and r["peak_MiB"] is r["graph_ms"] is None


def test_bench_class_channels(tmp_path):
    out = tmp_path / "bench_class_channels.json"
    stdout = run_script("bench_class_channels.py", "--quick", "--dtypes", "fp32", "--json", str(out))
    assert "| classifier | main, small | 256x12x20 | fp32 | 24 |" in stdout
    assert "| discriminator | conv1, small | 19x48x80 | fp32 | 32 |" in stdout
    rows = json.loads(out.read_text())["results"]
    assert [(r["kind"], r["multiple"], r["channels"]) for r in rows] == [
        (kind, m, c) for kind in ("classifier", "discriminator") for m, c in ((1, 19), (8, 24), (16, 32), (32, 32))]
    assert rows[0]["x_unpadded"] == rows[4]["x_unpadded"] == 1.0
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["TFLOPs"] > 0 and r["x_unpadded"] > 0 and r["graph_ms"] is None


def test_bench_dilated_convs(tmp_path):
    out = tmp_path / "bench_dilated_convs.json"
    stdout = run_script("bench_dilated_convs.py", "--quick", "--dtypes", "fp32", "--json", str(out))
    assert "| layer3, small | 32x11x21 | 2 | fp32 | space to batch |" in stdout
    assert "# fp32, per training step (each case x its count, fwd+bwd): dilated " in stdout
    rows = json.loads(out.read_text())["results"]
    assert [(r["case"], r["impl"]) for r in rows] == [
        (case, impl) for case in ("layer3, small", "layer4, small")
        for impl in ("dilated", "space to batch", "undilated")]
    assert rows[0]["x_dilated"] == rows[3]["x_dilated"] == 1.0
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["TFLOPs"] > 0 and r["graph_ms"] is None


def test_tune_kernels(tmp_path):
    """Under the interpreter: two candidates a family, the same gradients as the defaults' (no error rows)."""
    out = tmp_path / "tune_kernels.json"
    stdout = run_script("tune_kernels.py", "--quick", "--dtypes", "fp32", "--reps", "1", "--limit", "2",
                        "--json", str(out))
    assert "Best candidate per family" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    for family, cases in (("pixel", {"minent fp32", "minent_er fp32", "self_info fp32"}),
                          ("cell", {"up_self_info fp32", "up_minent fp32", "source_ce fp32"}),
                          ("loop", {"minent fp32", "minent_er fp32", "self_info fp32", "class_prior fp32",
                                    "target_fused fp32"})):
        family_rows = [r for r in rows if r["family"] == family]
        assert len({tuple(r["config"].items()) for r in family_rows}) == 2
        assert {r["case"] for r in family_rows} == cases and all(r["ms"] > 0 for r in family_rows)
    # the class-loop kernels and, second, the general ones as the same-run baseline
    loop = list(dict.fromkeys(r["config"]["MAX_LOOP_CLASSES"] for r in rows if r["family"] == "loop"))
    assert loop[0] >= 19 and loop[1] == 0


@pytest.mark.parametrize("script", ["run_gpu.sh", "gpu_wheels.sh"])
def test_gpu_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


STUB_PYTHON = """#!/bin/sh
# run_gpu.sh's python3, for its plumbing only: installs and imports succeed; a benchmark or test prints a
# table row and writes its --json file
[ "$1" = -c ] && exit 0  # version, dependency and import probes
[ "$1" = -m ] && [ "$2" = pip ] && exit 0  # installs
[ -n "$STUB_LOG" ] && { printf '%s\037' "$@"; printf '\n'; } >>"$STUB_LOG"  # the arguments, one call a line
echo "| stub | $* |"
while [ $# -gt 1 ]; do [ "$1" = --json ] && echo '{}' > "$2"; shift; done
"""


def run_gpu(env):
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=300)


def test_run_gpu_brings_everything_back_in_three_files(tmp_path):
    """The device tool returns at most 8 files from $OUT (names of letters, digits, '.', '_', '-'): every
    stage's table, log and JSON travel in results.tgz, repacked after each stage."""
    stub = tmp_path / "python3"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = dict(os.environ, PYTHON=str(stub), OUT=str(out), LOGS=str(logs), ADVENT_FAST_DATA=str(tmp_path / "data"))
    proc = run_gpu(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["results.tgz", "stages.txt", "summary.md"]
    with tarfile.open(out / "results.tgz") as tar:
        packed = {os.path.basename(name) for name in tar.getnames()}
    stages = [line.split()[1].rstrip(":") for line in (out / "stages.txt").read_text().splitlines()
              if line.startswith("== ") and "exit 0" in line]
    assert "bench_entropy" in stages and "tune_batchnorm" in stages and len(stages) == 25
    assert {f"{name}.md" for name in stages} | {f"{name}.err" for name in stages} <= packed
    assert {"bench_entropy.json", "bench_train_step.json", "track_losses.json", "summary.md", "gpu.txt"} <= packed
    assert "| stub | benchmarks/bench_entropy.py" in proc.stdout.split("-- bench_entropy")[-1]

    # ONLY= runs just the stages named; the archive holds the new call's results
    env.update(ONLY="bench_eval", OUT=str(tmp_path / "again"), LOGS=str(tmp_path / "logs_again"))
    proc = run_gpu(env)
    assert proc.returncode == 0
    ran = [line for line in (tmp_path / "again" / "stages.txt").read_text().splitlines() if "exit" in line]
    assert len(ran) == 1 and ran[0].startswith("== bench_eval: exit 0")


def test_run_gpu_stages_ask_only_what_their_scripts_and_tests_take(tmp_path, monkeypatch, parses_only):
    """Every stage's command line parses with its script's own parser, every pytest stage selects tests, the
    training stage's settings resolve: a typo would otherwise show only on a GPU, as a stage lost."""
    stub, calls_log = tmp_path / "python3", tmp_path / "calls"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), OUT=str(tmp_path / "out"), LOGS=str(tmp_path / "logs"),
               ADVENT_FAST_DATA=str(tmp_path / "data"), STUB_LOG=str(calls_log))
    assert run_gpu(env).returncode == 0
    calls = [line.split("\x1f")[:-1] for line in calls_log.read_text().splitlines()]
    scripts = [c for c in calls if c[0].startswith("benchmarks/")]
    pytests = [c[2:] for c in calls if c[:2] == ["-m", "pytest"]]
    trainings = [c[2:] for c in calls if c[:2] == ["-m", "advent_fast.train"]]
    assert len(scripts) + len(pytests) + len(trainings) == len(calls) == 25
    from advent_fast import train

    for args in trainings:
        assert train.main([*args, "--print-config"]) == 0, args
    for args in pytests:
        if "-n" in args:  # pytest-xdist's processes (the GPU machine gets it from .gpu-wheels): not needed here
            del args[args.index("-n"):args.index("-n") + 2]
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{args} selects no test:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    for script, *args in scripts:
        parses_only(importlib.import_module(os.path.splitext(os.path.basename(script))[0]).main, args)


@pytest.mark.parametrize("asked", [True, False])
def test_failures_are_reported_at_once_when_asked(tmp_path, asked):
    """ADVENT_FAST_REPORT_FAILURES=1 (run_gpu.sh) writes a failing test's report to stderr as it fails:
    a stage stopped by its limit never reaches pytest's summary."""
    started = tmp_path / "second_test_started"
    (tmp_path / "test_demo.py").write_text(
        "import pathlib, time\n\n\ndef test_fails():\n    assert 1 + 1 == 3, 'the reason'\n\n\n"
        f"def test_hangs():\n    pathlib.Path({str(started)!r}).touch()\n    time.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"), ADVENT_FAST_REPORT_FAILURES="1" if asked else "0")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                             str(tmp_path / "test_demo.py")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()  # while the second test runs, as a stage's time limit stops pytest
    _, err = proc.communicate()
    assert started.exists()
    assert ("FAILED test_demo.py::test_fails (call)" in err and "the reason" in err) == asked


@pytest.mark.parametrize("build", ["1", "0"])
def test_setup_builds_the_cpu_ops_unless_told_not_to(build):
    """run_gpu.sh installs with ADVENT_FAST_BUILD_CPU_OPS=0 (no compiler needed, no build time)."""
    probe = ("import runpy, setuptools\n"
             "setuptools.setup = lambda **kw: print(sorted(e.name for e in kw['ext_modules']))\n"
             "runpy.run_path('setup.py', run_name='__main__')\n")
    env = dict(os.environ, ADVENT_FAST_BUILD_CPU_OPS=build)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("['advent_fast._C']" if build == "1" else "[]")
