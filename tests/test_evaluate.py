"""Evaluation end to end on a tiny model and data set: the protocol, ensembles, sweeps, DDP sharding, CLI."""
import contextlib
import json
import math
import os
import pathlib
import shutil
import threading
import time
import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from advent_fast import evaluate
from advent_fast.data import CityscapesDataset, embedded
from advent_fast.data.classes import CLASSES_13_OF_16, LABEL_ID_TO_TRAIN_ID_19, lookup_table
from advent_fast.metrics import ConfusionMatrix
from advent_fast.models import build_model, checkpoint_dict

INPUT, LABELS = (64, 32), (128, 64)  # (width, height): labels at twice the input, as in the protocol


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    """Three Cityscapes-layout val images (native = label size) from the embedded target style."""
    root = str(tmp_path_factory.mktemp("cityscapes"))
    for i in range(3):
        rgb, ids = embedded.render_scene((0, 2, i), LABELS, embedded.TARGET_STYLE)
        stem = f"lindau_{i:06d}_000019"
        for folder, name, array in (("leftImg8bit", f"{stem}_leftImg8bit.png", rgb[:, :, ::-1]),
                                    ("gtFine", f"{stem}_gtFine_labelIds.png", ids)):
            path = os.path.join(root, folder, "val", "lindau", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            assert cv2.imwrite(path, array)
    return root


def tiny_model(seed):
    """A deeplabv2_small whose predictions vary from pixel to pixel (He-initialised convs)."""
    torch.manual_seed(seed)
    model = build_model("deeplabv2_small", 19)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                torch.nn.init.kaiming_normal_(p)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        paths[name] = str(folder / f"{name}.pth")
        torch.save(checkpoint_dict(tiny_model(seed)), paths[name])
    paths["plain"] = str(folder / "plain.pth")
    torch.save(tiny_model(1).state_dict(), paths["plain"])  # a release-style plain state dict
    return paths


def dataset(root, label_size=LABELS):
    return CityscapesDataset(root, "val", size=INPUT, label_size=label_size)


def reference_iou(models, weights, root):
    """The release's eval_single loop, written out: per image, numpy argmax and histogram."""
    lut = lookup_table(LABEL_ID_TO_TRAIN_ID_19)
    hist = np.zeros((19, 19))
    data = dataset(root)
    for (_, label_path, _), item in zip(data.items, data):
        label = lut[cv2.imread(label_path, cv2.IMREAD_UNCHANGED)]
        output = None
        for model, weight in zip(models, weights):
            with torch.no_grad():
                main = model.eval()(item["image"][None])[1]
            up = F.interpolate(main, size=label.shape, mode="bilinear", align_corners=True)[0].numpy()
            output = weight * up if output is None else output + weight * up
        pred = output.transpose(1, 2, 0).argmax(2)
        keep = label < 19
        hist += np.bincount(19 * label[keep].astype(int) + pred[keep], minlength=361).reshape(19, 19)
    with np.errstate(invalid="ignore"):
        return np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))


def test_evaluate_model_follows_the_release_protocol_and_restores_train_mode(val_root):
    model = tiny_model(1)
    model.train()
    running_mean = model.stage1[1].running_mean.clone()
    inputs = []
    model.register_forward_hook(lambda m, args, out: inputs.append(tuple(args[0].shape)))
    result = evaluate.evaluate_model(model, dataset(val_root), 19, "cpu")
    np.testing.assert_allclose(result["iou"], reference_iou([tiny_model(1)], [1.0], val_root), equal_nan=True)
    assert result["miou"] == pytest.approx(np.nanmean(result["iou"]) * 100)
    assert result["num_images"] == 3 and len(result["class_names"]) == 19 and "miou13" not in result
    assert inputs == [(1, 3, 32, 64)] * 3
    # Evaluated in eval mode (train-mode BatchNorm would update its statistics), then restored.
    assert torch.equal(model.stage1[1].running_mean, running_mean)
    assert model.training and all(m.training for m in model.modules())


def test_input_and_label_sizes_are_applied_on_the_device(val_root):
    model = tiny_model(1)
    inputs = []
    model.register_forward_hook(lambda m, args, out: inputs.append(tuple(args[0].shape)))
    native = CityscapesDataset(val_root, "val", size=None, label_size=None)
    evaluate.evaluate_model(model, native, 19, "cpu", input_size=INPUT, batch_size=3)
    assert inputs == [(3, 3, 32, 64)]
    # Labels resized on the device pick the same pixels as the dataset's (Pillow) nearest resize.
    native_labels = CityscapesDataset(val_root, "val", INPUT, label_size=None)
    resized = evaluate.evaluate_model(model, native_labels, 19, "cpu", label_size=(64, 32))
    expected = evaluate.evaluate_model(model, CityscapesDataset(val_root, "val", INPUT, (64, 32)), 19, "cpu")
    assert resized["iou"] == pytest.approx(expected["iou"], nan_ok=True)
    assert resized["iou"] != pytest.approx(evaluate.evaluate_model(model, native_labels, 19, "cpu")["iou"], nan_ok=True)


def test_ensemble_sums_weighted_upsampled_logits(val_root):
    a, b = tiny_model(1), tiny_model(2)
    result = evaluate.evaluate_ensemble([a, b], [0.3, 0.7], dataset(val_root), 19, "cpu", batch_size=2)
    np.testing.assert_allclose(result["iou"], reference_iou([a, b], [0.3, 0.7], val_root), equal_nan=True)
    only_a = evaluate.evaluate_ensemble([a, b], [1.0, 0.0], dataset(val_root), 19, "cpu")
    assert only_a["iou"] == pytest.approx(evaluate.evaluate_model(a, dataset(val_root), 19, "cpu")["iou"], nan_ok=True)
    with pytest.raises(ValueError, match="weights"):
        evaluate.evaluate_ensemble([a, b], [1.0], dataset(val_root), 19, "cpu")


def test_sixteen_class_models_report_miou16_and_miou13(val_root):
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 16)
    data = CityscapesDataset(val_root, "val", INPUT, LABELS, num_classes=16)
    result = evaluate.evaluate_model(model, data, 16, "cpu")
    iou = np.array(result["iou"], dtype=float)
    assert len(iou) == 16 and result["miou16"] == pytest.approx(result["miou"], nan_ok=True)
    subset = iou[list(CLASSES_13_OF_16)]
    assert (math.isnan(result["miou13"]) and np.isnan(subset).all()) or result["miou13"] == pytest.approx(
        np.nanmean(subset) * 100)


def test_distributed_ranks_share_the_images_and_sum_their_matrices(val_root, monkeypatch):
    """Under torch.distributed each rank takes every world_size-th image, then all-reduces (the
    all-reduce itself runs across real processes in test_metrics)."""
    model = tiny_model(1)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    reduced = []
    monkeypatch.setattr(ConfusionMatrix, "all_reduce", lambda cm: reduced.append(cm.matrix.clone()) or cm)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        evaluate.evaluate_model(model, dataset(val_root), 19, "cpu")
    assert len(seen) == 3  # images 0 and 2 on rank 0, image 1 on rank 1
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    evaluate.evaluate_model(model, dataset(val_root), 19, "cpu")
    assert torch.equal(reduced[0] + reduced[1], reduced[2]) and reduced[0].sum() > reduced[1].sum() > 0


def cli(root, *args):
    return evaluate.main(["--dataset", "cityscapes", "--root", root, "--input-size", *map(str, INPUT),
                          "--label-size", *map(str, LABELS), "--workers", "0", "--batch-size", "1", "--quiet",
                          *args])


def test_cli_single_ensemble_and_release_state_dict(val_root, checkpoints, tmp_path, capsys):
    out = tmp_path / "single.json"
    single = cli(val_root, "--checkpoint", checkpoints["a"], "--json", str(out))
    written = json.loads(out.read_text())
    expected = reference_iou([tiny_model(1)], [1.0], val_root)
    assert written["iou"] == [None if math.isnan(v) else pytest.approx(v) for v in expected]
    assert written["miou"] == pytest.approx(np.nanmean(expected) * 100)
    assert "road" in capsys.readouterr().out
    assert written["protocol"]["precision"] == "fp32"  # the release's, also on GPUs unless asked otherwise

    ensemble = cli(val_root, "--checkpoint", checkpoints["a"], "--checkpoint", checkpoints["b"],
                   "--weights", "0.5", "0.5")
    expected = reference_iou([tiny_model(1), tiny_model(2)], [0.5, 0.5], val_root)
    np.testing.assert_allclose(ensemble["iou"], expected, equal_nan=True)
    assert ensemble["weights"] == [0.5, 0.5]

    plain = cli(val_root, "--checkpoint", checkpoints["plain"], "--arch", "deeplabv2_small")
    assert plain["iou"] == pytest.approx(single["iou"], nan_ok=True)
    with pytest.raises(SystemExit):
        cli(val_root, "--checkpoint", checkpoints["a"], "--weights", "0.5", "0.5")


def test_what_the_command_line_names_and_cannot_use_is_a_usage_error(val_root, checkpoints, tmp_path, capsys):
    """A missing or unreadable checkpoint, dataset folder or image: the message after the usage, exit status 2, no
    traceback (evaluate, predict and visualize share this)."""
    from advent_fast import predict, visualize

    (tmp_path / "config.yaml").write_text("train:\n  lr: 0.1\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    missing = str(tmp_path / "missing.pth")
    make_snapshots(tmp_path / "snapshots", checkpoints)
    cases = [
        (lambda: cli(val_root, "--checkpoint", missing), f"checkpoint not found: {missing}"),
        (lambda: cli(val_root, "--checkpoint", str(tmp_path / "config.yaml")),
         "cannot read checkpoint " + str(tmp_path / "config.yaml") + ": not a file written by torch.save"),
        (lambda: cli(val_root, "--checkpoint", str(tmp_path / "tensor.pt")),
         f"{tmp_path / 'tensor.pt'} holds a Tensor, not a checkpoint"),
        (lambda: cli(str(tmp_path / "nowhere"), "--checkpoint", checkpoints["a"]), "Cityscapes root not found"),
        (lambda: cli(str(tmp_path / "nowhere"), "--sweep", str(tmp_path / "snapshots")), "Cityscapes root not found"),
        (lambda: predict.main(["--checkpoint", checkpoints["a"], "--images", missing, "--out-dir", str(tmp_path)]),
         f"image file or folder not found: {missing}"),
        (lambda: visualize.main(["--checkpoint", missing, "--out-dir", str(tmp_path)]), "checkpoint not found"),
    ]
    for command, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            command()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error: " + message in err and "Traceback" not in err, err


def test_cli_save_vis_writes_panels(val_root, checkpoints, tmp_path):
    cli(val_root, "--checkpoint", checkpoints["a"], "--save-vis", "2", "--vis-dir", str(tmp_path / "vis"))
    files = sorted(os.listdir(tmp_path / "vis"))
    assert files == ["lindau_lindau_000000_000019_leftImg8bit.png", "lindau_lindau_000001_000019_leftImg8bit.png"]
    panel = cv2.imread(str(tmp_path / "vis" / files[0]))
    assert panel.shape == (2 * (LABELS[1] + 10), 2 * LABELS[0], 3)


def make_snapshots(folder, checkpoints):
    os.makedirs(folder, exist_ok=True)
    shutil.copy(checkpoints["a"], os.path.join(folder, "model_100.pth"))
    shutil.copy(checkpoints["b"], os.path.join(folder, "model_200.pth"))
    torch.save({"0.weight": torch.zeros(1)}, os.path.join(folder, "model_200_D_main.pth"))  # not a snapshot
    data = pathlib.Path(checkpoints["a"]).read_bytes()
    with open(os.path.join(folder, "model_300.pth"), "wb") as f:
        f.write(data[: len(data) // 2])  # half-written


def test_cli_sweep_reports_every_snapshot_and_the_best_and_caches(val_root, checkpoints, tmp_path, monkeypatch):
    folder = str(tmp_path / "snapshots")
    make_snapshots(folder, checkpoints)
    out = tmp_path / "sweep.json"
    result = cli(val_root, "--sweep", folder, "--json", str(out))
    assert [s["iteration"] for s in result["snapshots"]] == [100, 200]
    expected = [np.nanmean(reference_iou([tiny_model(seed)], [1.0], val_root)) * 100 for seed in (1, 2)]
    assert [s["miou"] for s in result["snapshots"]] == pytest.approx(expected)
    assert result["best"]["iteration"] == (100 if expected[0] >= expected[1] else 200)
    assert list(result["errors"]) == [os.path.join(folder, "model_300.pth")]
    assert json.loads(out.read_text())["best"]["checkpoint"] == result["best"]["checkpoint"]

    # The results cache beside the snapshots spares re-evaluating them.
    monkeypatch.setattr(evaluate, "load_models", lambda *a, **k: pytest.fail("re-evaluated a cached snapshot"))
    os.remove(os.path.join(folder, "model_300.pth"))
    again = cli(val_root, "--sweep", folder)
    assert [s["miou"] for s in again["snapshots"]] == pytest.approx(expected)


def release_experiment(tmp_path, val_root, test_section, name="experiment.yml", top=()):
    """A release experiment file (advent/scripts/configs/*.yml) for the tiny val set, with this TEST section."""
    text = (f"SOURCE: GTA\nTARGET: Cityscapes\nNUM_WORKERS: 0\nDATA_DIRECTORY_TARGET: {val_root}\n"
            + "".join(f"{line}\n" for line in top) + "TEST:\n"
            f"  INPUT_SIZE_TARGET: [{INPUT[0]}, {INPUT[1]}]\n  OUTPUT_SIZE_TARGET: [{LABELS[0]}, {LABELS[1]}]\n"
            + "".join(f"  {line}\n" for line in test_section))
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_the_release_experiment_file_evaluates_as_its_test_script(val_root, checkpoints, tmp_path):
    """TEST.MODE single: the TEST.RESTORE_FROM models weighted by TEST.MODEL_WEIGHT; best: the sweep of
    TEST.SNAPSHOT_DIR up to TEST.SNAPSHOT_MAXITER (without waiting: TEST.WAIT_MODEL False)."""
    single = release_experiment(tmp_path, val_root, [
        "MODE: single", "MODEL: [DeepLabv2, DeepLabv2]", f"RESTORE_FROM: ['{checkpoints['a']}', '{checkpoints['b']}']",
        "MODEL_WEIGHT: [0.3, 0.7]"])
    result = evaluate.main(["--config", single, "--quiet"])
    np.testing.assert_allclose(result["iou"], reference_iou([tiny_model(1), tiny_model(2)], [0.3, 0.7], val_root),
                               equal_nan=True)
    assert result["weights"] == [0.3, 0.7]
    assert evaluate.main(["--config", single, "--quiet", "--weights", "0.5", "0.5"])["weights"] == [0.5, 0.5]

    folder = tmp_path / "snapshots"
    make_snapshots(folder, checkpoints)
    best = release_experiment(tmp_path, val_root, [
        "MODE: best", f"SNAPSHOT_DIR: ['{folder}']", "SNAPSHOT_MAXITER: 200", "WAIT_MODEL: False"], "best.yml")
    swept = evaluate.main(["--config", best, "--quiet", "--cache", "none"])
    assert [s["iteration"] for s in swept["snapshots"]] == [100, 200]
    expected = [np.nanmean(reference_iou([tiny_model(seed)], [1.0], val_root)) * 100 for seed in (1, 2)]
    assert [s["miou"] for s in swept["snapshots"]] == pytest.approx(expected)

    # Without TEST.SNAPSHOT_DIR: the snapshots of the run this file trains (EXP_ROOT_SNAPSHOT/EXP_NAME/snapshots);
    # a TEST.SNAPSHOT_DIR that is a run folder of this project: its snapshots/.
    run = tmp_path / "experiments" / "GTA2Cityscapes_run"
    make_snapshots(run / "snapshots", checkpoints)
    for name, test_section, top in (
            ("derived.yml", [], [f"EXP_ROOT_SNAPSHOT: {run.parent}", "EXP_NAME: GTA2Cityscapes_run"]),
            ("run_folder.yml", [f"SNAPSHOT_DIR: ['{run}']"], [])):
        path = release_experiment(tmp_path, val_root, ["MODE: best", "SNAPSHOT_MAXITER: 200", "WAIT_MODEL: False",
                                                       *test_section], name, top)
        found = evaluate.main(["--config", path, "--quiet", "--cache", "none"])
        assert [s["checkpoint"] for s in found["snapshots"]] == [
            str(run / "snapshots" / f"model_{i}.pth") for i in (100, 200)], name


def test_options_on_the_command_line_win_over_the_release_experiment_file(val_root, tmp_path):
    path = release_experiment(tmp_path, val_root, ["MODE: best", "SNAPSHOT_DIR: ['snaps']", "SNAPSHOT_MAXITER: 400"])
    _, args = evaluate._parse_args(["--config", path])
    assert (args.sweep, args.until, args.timeout, args.workers, args.input_size) == ("snaps", 400, math.inf, 0,
                                                                                     list(INPUT))
    _, args = evaluate._parse_args(["--config", path, "--timeout", "0", "--workers", "2", "--sweep", "other"])
    assert (args.sweep, args.timeout, args.workers) == ("other", 0.0, 2)  # even the parser's own default, given
    # a run of this project stops at its train.stop_iter: waiting for the release's SNAPSHOT_MAXITER would not end
    run = tmp_path / "exp" / "run"
    (run / "snapshots").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  stop_iter: 90000\n")
    derived = release_experiment(tmp_path, val_root, ["MODE: best"], "derived.yml",
                                 [f"EXP_ROOT_SNAPSHOT: {run.parent}", "EXP_NAME: run"])
    _, args = evaluate._parse_args(["--config", derived])
    assert (args.sweep, args.until, args.timeout) == (str(run / "snapshots"), 90_000, math.inf)
    one = release_experiment(tmp_path, val_root, ["MODE: single", "MODEL: DeepLabv2", "RESTORE_FROM: a.pth",
                                                  "BATCH_SIZE_TARGET: 3"], "one.yml")
    _, args = evaluate._parse_args(["--config", one])
    assert (args.checkpoint, args.weights, args.batch_size) == (["a.pth"], [1.0], 3)  # one value, not a list


def test_a_release_experiment_file_needs_the_target_root_and_its_own_format(val_root, checkpoints, tmp_path, capsys):
    no_root = tmp_path / "no_root.yml"
    no_root.write_text(f"SOURCE: GTA\nTEST:\n  MODE: single\n  RESTORE_FROM: ['{checkpoints['a']}']\n")
    ours = tmp_path / "ours.yml"
    ours.write_text("train:\n  lr: 0.1\n")
    two = release_experiment(tmp_path, val_root, ["MODE: best", "MODEL: [DeepLabv2, DeepLabv2]"], "two.yml")
    size = tmp_path / "size.yml"
    size.write_text(f"DATA_DIRECTORY_TARGET: {val_root}\nTEST:\n  INPUT_SIZE_TARGET: 512\n")
    for path, message in ((no_root, "--root: " + str(no_root) + " has no DATA_DIRECTORY_TARGET"),
                          (ours, "is not the release's experiment file"),
                          (two, "TEST.MODE best takes one model"),
                          (size, "'TEST.INPUT_SIZE_TARGET' in " + str(size) + " must be [width, height], got 512")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--config", str(path), "--quiet"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_snapshot_listing_reads_the_whole_iteration_number_and_skips_discriminators(tmp_path):
    names = ["model_2000.pth", "model_012000.pt", "120000.pth", "9.pth", "GTA5_4000.pth",
             "model_2000_D_main.pth", "GTA5_2000_D1.pth", "GTA5_2000_D.pth", ".model_100.pth", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    found = [(i, os.path.basename(p)) for i, p in evaluate.list_snapshots(str(tmp_path))]
    assert found == [(9, "9.pth"), (2000, "model_2000.pth"), (4000, "GTA5_4000.pth"), (12000, "model_012000.pt"),
                     (120000, "120000.pth")]


def test_unreadable_sweep_cache_is_ignored_and_replaced(val_root, checkpoints, tmp_path, capsys):
    folder = str(tmp_path / "snapshots")
    os.makedirs(folder)
    shutil.copy(checkpoints["a"], os.path.join(folder, "model_100.pth"))
    cache = os.path.join(folder, "sweep_eval.json")
    with open(cache, "w") as f:
        f.write('{"protocol": {"spl')  # a write cut short
    result = cli(val_root, "--sweep", folder)
    assert [s["iteration"] for s in result["snapshots"]] == [100]
    assert "ignoring the unreadable sweep cache" in capsys.readouterr().err
    stored = json.loads(pathlib.Path(cache).read_text())
    assert list(stored["results"]) == ["model_100.pth"]
    assert not [n for n in os.listdir(folder) if ".tmp" in n]


def test_sweep_waits_for_new_snapshots_but_not_forever(val_root, checkpoints, tmp_path):
    folder = str(tmp_path / "snapshots")
    os.makedirs(folder)
    shutil.copy(checkpoints["a"], os.path.join(folder, "model_100.pth"))

    def trainer_writes_later():
        time.sleep(1.0)
        shutil.copy(checkpoints["b"], os.path.join(folder, ".tmp"))
        os.replace(os.path.join(folder, ".tmp"), os.path.join(folder, "model_200.pth"))

    writer = threading.Thread(target=trainer_writes_later)
    writer.start()
    start = time.monotonic()
    result = cli(val_root, "--sweep", folder, "--timeout", "60", "--poll", "0.2", "--until", "200", "--cache", "none")
    writer.join()
    assert [s["iteration"] for s in result["snapshots"]] == [100, 200]
    assert time.monotonic() - start < 30  # --until ended it, not the timeout

    start = time.monotonic()
    result = evaluate.sweep_snapshots(folder, lambda path: {"miou": 1.0}, timeout=0.5, poll=0.1)
    assert len(result["snapshots"]) == 2 and time.monotonic() - start < 5


def test_embedded_default_uses_the_embedded_sizes(tmp_path, monkeypatch):
    data = embedded.ensure_embedded_data(str(tmp_path), num_source=1, num_target_train=1, num_target_val=2,
                                         workers=1, progress=False)
    monkeypatch.setattr(evaluate, "ensure_embedded_data", lambda: data)
    val = evaluate.build_dataset("cityscapes", None, 19)
    assert val.size == data.target_size and val.label_size == data.label_size and len(val) == 2
    source = evaluate.build_dataset("gta5", None, 19)
    assert source.size == data.source_size and source.root == data.source_root


def test_a_gpu_the_machine_lacks_is_named():
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"--device {missing} asked for, but this machine has"):
        evaluate.inference_device(missing)


def test_precision_auto_follows_the_gpu(monkeypatch):
    from advent_fast import backend

    assert isinstance(evaluate._autocast(torch.device("cpu"), "auto"), contextlib.nullcontext)
    assert isinstance(evaluate._autocast(torch.device("cuda"), "fp32"), contextlib.nullcontext)
    gpu = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU build of torch: autocast for cuda is made, disabled
        for capability, expected in (((8, 0), torch.bfloat16), ((7, 5), torch.float16), ((6, 0), None)):
            monkeypatch.setattr(backend, "_capabilities", {gpu: capability})
            autocast = evaluate._autocast(gpu, "auto")
            if expected is None:  # no tensor cores: fp32
                assert isinstance(autocast, contextlib.nullcontext)
            else:
                assert autocast.fast_dtype == expected
            assert evaluate._autocast(gpu, "bf16").fast_dtype == torch.bfloat16
            assert evaluate._autocast(gpu, "fp16").fast_dtype == torch.float16  # asked for, on any GPU
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, auto"):
        evaluate._autocast(gpu, "fp8")