"""advent_fast.predict: PNG predictions in the Cityscapes benchmark's format, against the protocol written out."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advent_fast import predict, reference
from advent_fast.data import ImageFolderDataset, embedded
from advent_fast.data.classes import NAME_TO_LABEL_ID, class_names, palette, train_id_to_label_id
from advent_fast.models import checkpoint_dict

from test_evaluate import tiny_model

INPUT = (64, 32)  # (width, height) the models see
NATIVE = (128, 64)  # the test split's images


def write_image(path, size, seed):
    rgb, _ = embedded.render_scene(seed, size, embedded.TARGET_STYLE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])


@pytest.fixture(scope="module")
def test_root(tmp_path_factory):
    """A Cityscapes root with a test split only (images, no gtFine), two cities."""
    root = tmp_path_factory.mktemp("cityscapes")
    for i, city in enumerate(("berlin", "bonn", "bonn")):
        write_image(root / "leftImg8bit" / "test" / city / f"{city}_{i:06d}_000019_leftImg8bit.png", NATIVE, (3, 1, i))
    return str(root)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for seed in (1, 2):
        paths.append(str(folder / f"model_{seed}.pth"))
        torch.save(checkpoint_dict(tiny_model(seed)), paths[-1])
    return paths


def expected_logits(models, weights, image_path):
    """The protocol written out: Pillow bicubic resize, BGR minus the Caffe mean, main head, each model's logits
    upsampled to the native size (align_corners=True), weighted and summed."""
    from PIL import Image

    with Image.open(image_path) as image:
        native = (image.height, image.width)
        rgb = np.asarray(image.convert("RGB").resize(INPUT, Image.BICUBIC), dtype=np.float32)
    bgr = rgb[:, :, ::-1] - np.array([104.00698793, 116.66876762, 122.67891434], dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None]
    total = 0
    with torch.no_grad():
        for model, weight in zip(models, weights):
            model.eval()
            total = total + weight * F.interpolate(model(x)[1], size=native, mode="bilinear", align_corners=True)
    return total


def cli(*args):
    return predict.main(["--input-size", *map(str, INPUT), "--workers", "0", "--quiet", *args])


def test_test_split_in_every_format_follows_the_protocol(test_root, checkpoints, tmp_path):
    out = tmp_path / "preds"
    result = cli("--checkpoint", checkpoints[0], "--checkpoint", checkpoints[1], "--weights", "0.3", "0.7",
                 "--root", test_root, "--out-dir", str(out), "--format", *predict.FORMATS, "--batch-size", "2")
    assert result["images"] == 3 and len(result["files"]) == 3 * len(predict.FORMATS)
    models, weights = [tiny_model(1), tiny_model(2)], [0.3, 0.7]
    label_ids = train_id_to_label_id(19)
    for name in ("berlin/berlin_000000_000019", "bonn/bonn_000001_000019", "bonn/bonn_000002_000019"):
        image_path = os.path.join(test_root, "leftImg8bit", "test", f"{name}_leftImg8bit.png")
        logits = expected_logits(models, weights, image_path)
        pred = logits.argmax(1)[0].numpy()
        files = {fmt: str(out / fmt / f"{name}_leftImg8bit.png") for fmt in predict.FORMATS}
        assert set(result["files"]) >= set(files.values())
        trainids = cv2.imread(files["trainids"], cv2.IMREAD_UNCHANGED)
        assert trainids.dtype == np.uint8 and trainids.shape == NATIVE[::-1]
        np.testing.assert_array_equal(trainids, pred)
        assert len(np.unique(pred)) > 1  # the check below compares more than one class
        np.testing.assert_array_equal(cv2.imread(files["labelids"], cv2.IMREAD_UNCHANGED), label_ids[pred])
        colour = cv2.imread(files["color"])[:, :, ::-1]
        np.testing.assert_array_equal(colour, palette(19)[pred])
        entropy = cv2.imread(files["entropy"], cv2.IMREAD_UNCHANGED)
        assert entropy.dtype == np.uint16
        # rounded to the nearest of the 65536 levels (half a level, and float rounding)
        np.testing.assert_allclose(entropy / 65535.0, reference.entropy_map(logits)[0].numpy(), rtol=0,
                                   atol=0.5 / 65535 + 5e-6)


def test_entropy_ranking_and_its_splits_are_list_files(test_root, checkpoints, tmp_path):
    out = tmp_path / "ranked"
    result = cli("--checkpoint", checkpoints[1], "--root", test_root, "--out-dir", str(out), "--format", "trainids",
                 "--entropy-ranking", "--easy-fraction", "0.9")
    model = tiny_model(2)
    expected = {}
    for name in result["mean_entropy"]:
        logits = expected_logits([model], [1.0], os.path.join(test_root, "leftImg8bit", "test", name))
        expected[name] = reference.entropy_map(logits).double().mean().item()
    assert sorted(expected) == sorted(result["mean_entropy"]) and len(expected) == 3
    assert result["mean_entropy"] == pytest.approx(expected, rel=1e-5)
    assert len(set(expected.values())) == 3  # a ranking, not a tie
    ranked = json.loads((out / "entropy_ranking.json").read_text())
    assert [r["name"] for r in ranked] == sorted(expected, key=expected.get)
    assert [r["mean_entropy"] for r in ranked] == sorted(result["mean_entropy"].values())
    easy, hard = ((out / f"{split}_split.txt").read_text().split() for split in ("easy", "hard"))
    assert easy == [r["name"] for r in ranked[:2]] and hard == [r["name"] for r in ranked[2:]]  # floor(0.9 * 3)
    assert result["ranking_files"] == [str(out / f) for f in ("entropy_ranking.json", "easy_split.txt",
                                                              "hard_split.txt")]
    # the hard split as a list file: the second-stage target set
    listed = cli("--checkpoint", checkpoints[1], "--root", test_root, "--list", str(out / "hard_split.txt"),
                 "--out-dir", str(tmp_path / "hard"), "--format", "trainids")
    assert list(listed["mean_entropy"]) == hard


def test_entropy_ranking_arguments_are_checked(checkpoints, tmp_path):
    for bad in (["--easy-fraction", "0.5"], ["--entropy-ranking", "--easy-fraction", "1"],
                ["--entropy-ranking", "--easy-fraction", "0"]):
        with pytest.raises(SystemExit):
            cli("--checkpoint", checkpoints[0], "--out-dir", str(tmp_path), *bad)
    with pytest.raises(ValueError, match="easy_fraction must be in"):
        predict.write_entropy_ranking({"a.png": 0.5}, str(tmp_path), easy_fraction=1.5)


def test_label_ids_are_the_cityscapes_ids_of_the_classes():
    for num_classes in (19, 16):
        table = train_id_to_label_id(num_classes)
        assert [table[i] for i in range(num_classes)] == [NAME_TO_LABEL_ID[n] for n in class_names(num_classes)]
        assert table[255] == 0  # ignore -> unlabeled
    assert train_id_to_label_id(19)[9] == 22 and train_id_to_label_id(16)[9] == 23  # terrain; sky (no terrain)


def test_image_folders_of_mixed_sizes_keep_their_names_and_native_sizes(checkpoints, tmp_path):
    photos = tmp_path / "photos"
    write_image(photos / "a.png", (96, 48), (4, 0, 0))
    write_image(photos / "street" / "b.jpg", (80, 60), (4, 0, 1))
    single = tmp_path / "single.png"
    write_image(single, (70, 50), (4, 0, 2))
    out = tmp_path / "preds"
    result = cli("--checkpoint", checkpoints[0], "--images", str(photos), str(single), "--out-dir", str(out),
                 "--format", "trainids", "--batch-size", "2")
    assert result["files"] == [str(out / "trainids" / n) for n in ("a.png", "street/b.png", "single.png")]
    model = tiny_model(1)
    for image_path, written in zip((photos / "a.png", photos / "street" / "b.jpg", single), result["files"]):
        pred = expected_logits([model], [1.0], str(image_path)).argmax(1)[0].numpy()
        np.testing.assert_array_equal(cv2.imread(written, cv2.IMREAD_UNCHANGED), pred)


def test_bad_inputs_are_named(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG or JPEG images found under .*empty"):
        ImageFolderDataset([str(tmp_path / "empty")])
    write_image(tmp_path / "x" / "same.png", (32, 16), (5, 0, 0))
    write_image(tmp_path / "y" / "same.png", (32, 16), (5, 0, 1))
    with pytest.raises(ValueError, match="two images are named 'same.png'"):
        ImageFolderDataset([str(tmp_path / "x"), str(tmp_path / "y")])
    with pytest.raises(SystemExit):  # a split and a folder at once
        cli("--checkpoint", checkpoints[0], "--root", str(tmp_path), "--images", str(tmp_path / "x"),
            "--out-dir", str(tmp_path / "o"))
    broken = tiny_model(1)
    with torch.no_grad():
        next(p for p in broken.parameters() if p.dim() == 4).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite logits .*same.png"):
        predict.predict_dataset([broken], [1.0], ImageFolderDataset([str(tmp_path / "x")], INPUT), 19,
                                str(tmp_path / "o"), ["trainids"])
    with pytest.raises(ValueError, match="formats must be among"):
        predict.predict_dataset([tiny_model(1)], [1.0], ImageFolderDataset([str(tmp_path / "x")], INPUT), 19,
                                str(tmp_path / "o"), ["jpeg"])
    with pytest.raises(ValueError, match="16 classes, the models have 19"):
        predict.predict_dataset([tiny_model(1)], [1.0], ImageFolderDataset([str(tmp_path / "x")], INPUT, 16), 19,
                                str(tmp_path / "o"), ["trainids"])
