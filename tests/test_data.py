"""Readers on small files in the real formats, their errors, the embedded generator, the class prior and the
dataset check (verify)."""
import json
import os
import pathlib
import pickle
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from advent_fast.data import (
    CAFFE_MEAN_BGR,
    CityscapesDataset,
    DatasetError,
    GTA5Dataset,
    SynthiaDataset,
    compute_prior,
    ensure_embedded_data,
    load_prior,
)
from advent_fast.data import classes, embedded, prior, verify
from advent_fast.metrics import ConfusionMatrix

RNG = np.random.default_rng(0)


def write_rgb(path, width, height):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def write_paletted(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8))
    img.putpalette(classes.label_id_palette())
    img.save(path)


def write_gta5(root, names=("00001.png", "00002.png"), size=(40, 34)):
    for name in names:
        write_rgb(os.path.join(root, "images", name), *size)
        write_paletted(os.path.join(root, "labels", name), RNG.integers(0, 34, (size[1], size[0])))


def write_cityscapes(root, split, cities=("b_city", "a_city"), per_city=2, size=(32, 16), labels=True):
    for city in cities:
        for k in range(per_city):
            stem = f"{city}_{k:06d}_000019"
            write_rgb(os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"), *size)
            if labels:
                path = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                cv2.imwrite(path, RNG.integers(0, 34, (size[1], size[0]), dtype=np.uint8))


def release_preprocess(path, size):
    """The release's image transform, written out independently."""
    img = Image.open(path).convert("RGB").resize(size, Image.BICUBIC)
    arr = np.asarray(img, np.float32)[:, :, ::-1] - np.array(CAFFE_MEAN_BGR, np.float32)
    return arr.transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------ tables


def test_class_tables_are_consistent():
    assert len(classes.CLASS_NAMES_19) == 19 and classes.PALETTE_19.shape == (19, 3)
    assert tuple(classes.PALETTE_19[0]) == (128, 64, 128) and tuple(classes.PALETTE_19[18]) == (119, 11, 32)
    assert classes.LABEL_ID_TO_TRAIN_ID_19 == {
        7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
        27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
    }
    assert set(classes.CLASS_NAMES_19) - set(classes.CLASS_NAMES_16) == {"terrain", "truck", "train"}
    assert set(classes.CLASS_NAMES_16) - {classes.CLASS_NAMES_16[i] for i in classes.CLASSES_13_OF_16} == {
        "wall", "fence", "pole"}
    assert sorted(classes.SYNTHIA_ID_TO_TRAIN_ID_16.values()) == list(range(16))
    # SYNTHIA and Cityscapes agree on the 16-class train ids: SYNTHIA 3 is road, 19 bus.
    assert classes.SYNTHIA_ID_TO_TRAIN_ID_16[3] == classes.LABEL_ID_TO_TRAIN_ID_16[7] == 0
    assert classes.SYNTHIA_ID_TO_TRAIN_ID_16[19] == classes.LABEL_ID_TO_TRAIN_ID_16[28] == 13
    assert [classes.CLASS_NAMES_19[i] for i in classes.CLASSES_13_OF_19] == [
        classes.CLASS_NAMES_16[i] for i in classes.CLASSES_13_OF_16]


# ------------------------------------------------------------------------------------------ readers


def test_gta5_reads_palette_indices_for_every_label_id_and_preprocesses_like_the_release(tmp_path):
    root = str(tmp_path / "gta5")
    write_rgb(os.path.join(root, "images", "00001.png"), 40, 34)
    ids = np.repeat(np.arange(34, dtype=np.uint8)[:, None], 40, axis=1)  # row r holds label id r
    write_paletted(os.path.join(root, "labels", "00001.png"), ids)
    # Ids 0..4 share black: decoding colours (as OpenCV does) could not recover them.
    assert cv2.imread(os.path.join(root, "labels", "00001.png")).ndim == 3

    native = GTA5Dataset(root, size=None)[0]
    expected = np.array([classes.LABEL_ID_TO_TRAIN_ID_19.get(r, 255) for r in range(34)])
    assert native["label"].dtype == torch.int64
    assert np.array_equal(native["label"].numpy(), np.repeat(expected[:, None], 40, axis=1))

    resized = GTA5Dataset(root, size=(20, 17))[0]
    assert resized["image"].dtype == torch.float32 and resized["image"].shape == (3, 17, 20)
    np.testing.assert_array_equal(resized["image"].numpy(), release_preprocess(
        os.path.join(root, "images", "00001.png"), (20, 17)))
    nearest = np.asarray(Image.open(os.path.join(root, "labels", "00001.png")).resize((20, 17), Image.NEAREST))
    lut = classes.lookup_table(classes.LABEL_ID_TO_TRAIN_ID_19)
    assert np.array_equal(resized["label"].numpy(), lut[nearest])
    assert resized["name"] == "00001.png"


def test_opencv_image_reader_decodes_the_same_pixels_and_resizes_close_to_pillow(tmp_path):
    root = str(tmp_path / "gta5")
    write_gta5(root, names=("00001.png",), size=(64, 48))
    # Smooth content: the two resizes differ in their filters, not by aliasing noise.
    smooth = cv2.resize(RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8), (64, 48), interpolation=cv2.INTER_CUBIC)
    Image.fromarray(smooth).save(os.path.join(root, "images", "00001.png"))
    native = {r: GTA5Dataset(root, size=None, image_reader=r)[0] for r in ("pillow", "opencv")}
    assert torch.equal(native["opencv"]["image"], native["pillow"]["image"])  # lossless decode: identical
    assert torch.equal(native["opencv"]["label"], native["pillow"]["label"])
    for size in ((32, 24), (96, 72)):  # shrinking (area) and enlarging (bicubic)
        pillow, opencv = (GTA5Dataset(root, size=size, image_reader=r)[0] for r in ("pillow", "opencv"))
        assert opencv["image"].shape == pillow["image"].shape == (3, size[1], size[0])
        assert opencv["image"].dtype == torch.float32 and torch.equal(opencv["label"], pillow["label"])
        difference = (opencv["image"] - pillow["image"]).abs()
        stats = (size, difference.mean(), difference.max())
        assert 0 < difference.mean() < 1.0 and difference.max() <= 8, stats  # seen 0.6, 4
    with pytest.raises(ValueError, match="image_reader"):
        GTA5Dataset(root, image_reader="turbojpeg")
    with open(os.path.join(root, "images", "00001.png"), "wb") as f:
        f.write(b"not a png at all")
    with pytest.raises(DatasetError, match=r"images.00001\.png"):
        GTA5Dataset(root, image_reader="opencv")[0]


def test_to_rgb_undoes_the_preprocessing(tmp_path):
    root = str(tmp_path / "gta5")
    write_gta5(root, names=("00001.png",))
    ds = GTA5Dataset(root, size=None)
    original = np.asarray(Image.open(os.path.join(root, "images", "00001.png")).convert("RGB"))
    assert np.array_equal(ds.to_rgb(ds[0]["image"]), original)


def test_synthia_reads_the_red_channel_of_16_bit_labels(tmp_path):
    root = str(tmp_path / "synthia")
    write_rgb(os.path.join(root, "RGB", "0000000.png"), 24, 8)
    red = np.zeros((8, 24), np.uint16)
    red[:, :23] = np.arange(23)  # every SYNTHIA id 0..22
    red[:, 23] = 1000  # beyond 8 bits: unmapped
    bgr = np.stack([RNG.integers(0, 65536, red.shape), RNG.integers(0, 65536, red.shape), red], -1)
    os.makedirs(os.path.join(root, "GT", "LABELS"))
    assert cv2.imwrite(os.path.join(root, "GT", "LABELS", "0000000.png"), bgr.astype(np.uint16))

    label = SynthiaDataset(root, size=None)[0]["label"].numpy()
    expected = [classes.SYNTHIA_ID_TO_TRAIN_ID_16.get(i, 255) for i in range(23)] + [255]
    assert np.array_equal(label, np.tile(np.array(expected), (8, 1)))
    assert SynthiaDataset(root).num_classes == 16


def test_cityscapes_layout_label_ids_16_class_mode_and_target_without_labels(tmp_path):
    root = str(tmp_path / "cityscapes")
    write_cityscapes(root, "val")
    write_cityscapes(root, "train", labels=False)
    val = CityscapesDataset(root, "val", size=(16, 8), label_size=None)
    assert [item[2] for item in val.items] == sorted(item[2] for item in val.items)
    assert val.items[0][2] == "a_city/a_city_000000_000019_leftImg8bit.png"
    ids = cv2.imread(val.items[0][1], cv2.IMREAD_UNCHANGED)
    item = val[0]
    assert item["image"].shape == (3, 8, 16) and item["label"].shape == (16, 32)  # native label size
    lut19 = classes.lookup_table(classes.LABEL_ID_TO_TRAIN_ID_19)
    lut16 = classes.lookup_table(classes.LABEL_ID_TO_TRAIN_ID_16)
    assert np.array_equal(item["label"].numpy(), lut19[ids])
    assert np.array_equal(CityscapesDataset(root, "val", (16, 8), None, num_classes=16)[0]["label"].numpy(), lut16[ids])
    assert lut16[22] == 255 and lut16[27] == 255 and lut16[31] == 255 and lut16[28] == 13

    train = CityscapesDataset(root, "train", size=(16, 8), labels=False)
    assert len(train) == 4 and "label" not in train[0]
    with pytest.raises(FileNotFoundError, match="no label for image"):
        CityscapesDataset(root, "train")

    list_file = tmp_path / "val.txt"
    list_file.write_text("b_city/b_city_000001_000019_leftImg8bit.png\n")
    listed = CityscapesDataset(root, "val", list_path=str(list_file))
    assert len(listed) == 1 and listed[0]["label"].shape == (1024, 2048)  # release label size by default


def test_datasets_pickle_and_load_in_worker_processes(tmp_path):
    root = str(tmp_path / "gta5")
    write_gta5(root, names=[f"{i:05d}.png" for i in range(1, 5)])
    ds = pickle.loads(pickle.dumps(GTA5Dataset(root, size=(20, 16))))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["image"].shape == (2, 3, 16, 20) and batches[0]["label"].shape == (2, 16, 20)


# ------------------------------------------------------------------------------------------ errors


def test_missing_root_and_image_without_label_name_the_paths(tmp_path):
    missing = str(tmp_path / "nowhere")
    for make in (lambda: GTA5Dataset(missing), lambda: SynthiaDataset(missing), lambda: CityscapesDataset(missing)):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            make()
    root = str(tmp_path / "gta5")
    write_gta5(root)
    os.remove(os.path.join(root, "labels", "00002.png"))
    with pytest.raises(FileNotFoundError, match=r"images.00002\.png"):
        GTA5Dataset(root)
    assert len(GTA5Dataset(root, labels=False)) == 2


def test_unreadable_and_truncated_files_name_themselves(tmp_path):
    root = str(tmp_path / "gta5")
    write_gta5(root, names=("00001.png", "00002.png", "00003.png"))
    ds = GTA5Dataset(root, size=None)
    with open(ds.items[0][0], "wb") as f:
        f.write(b"not a png at all")
    with pytest.raises(DatasetError, match=r"images.00001\.png"):
        ds[0]
    label_path = ds.items[1][1]
    data = pathlib.Path(label_path).read_bytes()
    with open(label_path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"labels.00002\.png"):
        ds[1]
    image_path = ds.items[2][0]
    data = pathlib.Path(image_path).read_bytes()
    with open(image_path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"images.00003\.png"):
        ds[2]

    synthia = str(tmp_path / "synthia")
    write_rgb(os.path.join(synthia, "RGB", "0000000.png"), 16, 8)
    os.makedirs(os.path.join(synthia, "GT", "LABELS"))
    cv2.imwrite(os.path.join(synthia, "GT", "LABELS", "0000000.png"), RNG.integers(0, 30, (8, 16, 3)).astype(np.uint16))
    path = os.path.join(synthia, "GT", "LABELS", "0000000.png")
    data = pathlib.Path(path).read_bytes()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"LABELS.0000000\.png"):
        SynthiaDataset(synthia)[0]


def test_image_label_size_mismatch_is_resized_like_the_release_or_named(tmp_path):
    """GTA5 has pairs whose image and label differ in size: the release resizes each to its training
    size; a label kept at its native size cannot be aligned, and the error names both files."""
    root = str(tmp_path / "gta5")
    for name in ("00001.png", "00002.png"):
        write_rgb(os.path.join(root, "images", name), 40, 30)
        write_paletted(os.path.join(root, "labels", name), np.full((31, 40), 7))  # road
    dataset = GTA5Dataset(root, size=(20, 16))
    with pytest.warns(UserWarning, match=r"images.00001\.png.*40x30.*labels.00001\.png.*40x31.*resized"):
        item = dataset[0]
    assert item["image"].shape == (3, 16, 20) and item["label"].shape == (16, 20)
    assert (item["label"] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per dataset
        assert dataset[1]["label"].shape == (16, 20)
    # Evaluation keeps Cityscapes labels at their native size.
    cityscapes = str(tmp_path / "cityscapes")
    write_cityscapes(cityscapes, "val", cities=("a_city",), per_city=1, size=(32, 16))
    label = os.path.join(cityscapes, "gtFine", "val", "a_city", "a_city_000000_000019_gtFine_labelIds.png")
    cv2.imwrite(label, np.zeros((17, 32), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"a_city_000000_000019_leftImg8bit\.png is 32x16 but label "
                                           r".*_gtFine_labelIds\.png is 32x17.*native size"):
        CityscapesDataset(cityscapes, "val", size=(16, 8), label_size=None)[0]


def test_colour_label_is_rejected(tmp_path):
    root = str(tmp_path / "gta5")
    write_rgb(os.path.join(root, "images", "00001.png"), 8, 8)
    write_rgb(os.path.join(root, "labels", "00001.png"), 8, 8)
    with pytest.raises(DatasetError, match=r"labels.00001\.png.*mode 'RGB'"):
        GTA5Dataset(root)[0]


# ------------------------------------------------------------------------------------------ embedded


def test_scenes_are_a_function_of_the_seed():
    a_rgb, a_ids = embedded.render_scene((0, 0, 3), (96, 54), embedded.SOURCE_STYLE)
    b_rgb, b_ids = embedded.render_scene((0, 0, 3), (96, 54), embedded.SOURCE_STYLE)
    c_rgb, c_ids = embedded.render_scene((1, 0, 3), (96, 54), embedded.SOURCE_STYLE)
    assert np.array_equal(a_rgb, b_rgb) and np.array_equal(a_ids, b_ids)
    assert not np.array_equal(a_rgb, c_rgb) and not np.array_equal(a_ids, c_ids)


def _tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name != "manifest.json":
                path = os.path.join(folder, name)
                out[os.path.relpath(path, root)] = pathlib.Path(path).read_bytes()
    return out


def test_embedded_data_real_formats_determinism_and_cache(tmp_path, monkeypatch):
    counts = dict(num_source=3, num_target_train=3, num_target_val=2, progress=False)
    data = ensure_embedded_data(str(tmp_path / "a"), seed=5, workers=1, **counts)
    assert data.num_classes == 19 and data.label_size == (512, 256)
    source = GTA5Dataset(data.source_root, size=data.source_size)
    with Image.open(source.items[0][1]) as label:
        assert len(source) == 3 and label.mode == "P"
    assert source[0]["image"].shape == (3, data.source_size[1], data.source_size[0])
    val = CityscapesDataset(data.target_root, "val", data.target_size, data.label_size)
    assert len(val) == 2 and val[0]["label"].shape == (256, 512)
    assert set(np.unique(val[0]["label"].numpy())) - {255} <= set(range(19))
    train = CityscapesDataset(data.target_root, "train", data.target_size, labels=False)
    assert len(train) == 3 and not os.path.exists(os.path.join(data.target_root, "gtFine", "train"))

    # Worker processes give the same bytes as one process; another seed gives other images.
    again = ensure_embedded_data(str(tmp_path / "b"), seed=5, workers=2, **counts)
    assert _tree(again.root) == _tree(data.root)
    other = ensure_embedded_data(str(tmp_path / "c"), seed=6, workers=1, **counts)
    assert _tree(other.root) != _tree(data.root)

    # Cached: a second call does not generate, and no temporary folder is left behind.
    monkeypatch.setattr(embedded, "generate_embedded_data", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_embedded_data(str(tmp_path / "a"), seed=5, **counts) == data
    assert os.listdir(tmp_path / "a") == [os.path.basename(data.root)]


def test_failed_generation_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken(out_dir, *args):
        open(os.path.join(out_dir, "partial"), "w").close()
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "generate_embedded_data", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_embedded_data(str(tmp_path), seed=0, num_source=1, num_target_train=1, num_target_val=1)
    assert os.listdir(tmp_path) == []


def test_default_cache_root_follows_the_environment(monkeypatch):
    monkeypatch.setenv("ADVENT_FAST_DATA", "/some/where")
    assert embedded.default_cache_root() == "/some/where"
    monkeypatch.delenv("ADVENT_FAST_DATA")
    assert embedded.default_cache_root().endswith(os.path.join(".cache", "advent_fast", "embedded-v1"))


def test_the_domain_gap_is_real():
    """A per-pixel colour classifier fitted on the source does far worse on the target."""
    lut = classes.lookup_table(classes.LABEL_ID_TO_TRAIN_ID_19)

    def pixels(part, style, size, indices):
        rgb, ids = zip(*(embedded.render_scene((0, part, i), size, style) for i in indices))
        colours = np.concatenate([r.reshape(-1, 3) for r in rgb]).astype(np.float32)
        return colours, lut[np.concatenate([i.ravel() for i in ids])]

    fit_x, fit_y = pixels(0, embedded.SOURCE_STYLE, (128, 72), range(12))
    means = np.stack([fit_x[fit_y == c].mean(0) if (fit_y == c).any() else np.full(3, 1e6) for c in range(19)])

    def miou(x, y):
        pred = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        cm = ConfusionMatrix(19)
        cm.update(torch.from_numpy(pred), torch.from_numpy(y.astype(np.int64)))
        return cm.miou()

    source = miou(*pixels(0, embedded.SOURCE_STYLE, (128, 72), range(100, 106)))
    target = miou(*pixels(2, embedded.TARGET_STYLE, (128, 64), range(6)))
    assert source > 2 * target and source - target > 8, (source, target)


# ------------------------------------------------------------------------------------------ prior


def test_prior_is_the_normalised_label_histogram(tmp_path):
    root = str(tmp_path / "gta5")
    write_gta5(root, names=("00001.png", "00002.png", "00003.png"))
    ds = GTA5Dataset(root, size=None)
    lut = classes.lookup_table(classes.LABEL_ID_TO_TRAIN_ID_19)
    counts = np.zeros(19)
    for _, label_path, _ in ds.items:
        train_ids = lut[np.asarray(Image.open(label_path))]
        for c in range(19):
            counts[c] += (train_ids == c).sum()
    np.testing.assert_allclose(compute_prior(ds, progress=False), counts / counts.sum())

    out = str(tmp_path / "prior.json")
    result = prior.main(["--dataset", "gta5", "--root", root, "--out", out, "--workers", "2"])
    assert result["pixels"] == counts.astype(int).tolist()
    loaded = load_prior(out, 19)
    assert loaded.dtype == torch.float32
    np.testing.assert_allclose(loaded.numpy(), counts / counts.sum(), rtol=1e-6)


# ------------------------------------------------------------------------------------------ verify


@pytest.mark.parametrize("workers", [0, 2])
def test_verify_names_broken_files_and_warns_of_mismatches(tmp_path, workers):
    root = str(tmp_path / "gta5")
    names = ("00001.png", "00002.png", "00003.png", "00004.png", "00005.png")
    write_gta5(root, names=names)
    with open(os.path.join(root, "images", "00002.png"), "r+b") as f:  # truncated
        f.truncate(os.path.getsize(f.name) // 2)
    write_paletted(os.path.join(root, "labels", "00003.png"), RNG.integers(0, 34, (30, 40)))  # not 40x34
    write_paletted(os.path.join(root, "labels", "00004.png"), np.zeros((34, 40), np.int64))  # id 0: ignored
    report = verify.main(["--dataset", "gta5", "--root", root, "--workers", str(workers), "--quiet",
                          "--json", str(tmp_path / "report.json")])
    assert report["counts"] == {"unreadable": 1, "size mismatch": 1, "no labelled pixel": 1} and not report["ok"]
    found = {(p["name"], p["kind"]) for p in report["problems"]}
    assert found == {("00002.png", "unreadable"), ("00003.png", "size mismatch"), ("00004.png", "no labelled pixel")}
    assert "00002.png" in next(p["message"] for p in report["problems"] if p["kind"] == "unreadable")
    assert json.loads((tmp_path / "report.json").read_text())["problems"] == report["problems"]


def test_verify_exit_status_and_image_only_splits(tmp_path, capsys):
    root = str(tmp_path / "cityscapes")
    write_cityscapes(root, "test", labels=False)
    report = verify.main(["--dataset", "cityscapes", "--root", root, "--split", "test", "--no-labels",
                          "--workers", "0", "--quiet"])
    assert report["ok"] and report["items"] == 4 and sum(report["counts"].values()) == 0
    with pytest.raises(SystemExit):  # the test split has no labels: a usage error naming the first image
        verify.main(["--dataset", "cityscapes", "--root", root, "--split", "test", "--workers", "0"])
    assert "no label for image" in capsys.readouterr().err
    os.truncate(os.path.join(root, "leftImg8bit", "test", "a_city", "a_city_000000_000019_leftImg8bit.png"), 10)
    proc = subprocess.run([sys.executable, "-m", "advent_fast.data.verify", "--dataset", "cityscapes", "--root", root,
                           "--split", "test", "--no-labels", "--workers", "0", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "unreadable: a_city/a_city_000000_000019_leftImg8bit.png" in proc.stdout
    assert "4 images decoded; unreadable: 1, size mismatch: 0" in proc.stdout


@pytest.mark.parametrize(
    "values, message",
    [
        ([0.5, 0.5], "has 2 classes"),
        ([1.5, -0.5, 0.0], "negative"),
        ([float("nan"), 0.5, 0.5], "non-finite"),
        ([0.2, 0.2, 0.2], "sums to"),
        (["a", 0.5, 0.5], "list of numbers"),
    ],
)
def test_load_prior_validates(tmp_path, values, message):
    path = tmp_path / "prior.json"
    path.write_text(json.dumps({"prior": values}))
    with pytest.raises(ValueError, match=message):
        load_prior(str(path), 3)


def test_load_prior_accepts_a_plain_list_and_names_a_missing_file(tmp_path):
    path = tmp_path / "prior.json"
    path.write_text(json.dumps([0.25, 0.75]))
    assert load_prior(str(path), 2).tolist() == [0.25, 0.75]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_prior(str(tmp_path / "missing.json"), 2)


def test_load_prior_reads_npy_vectors_and_names_what_it_cannot_read(tmp_path):
    np.save(tmp_path / "prior.npy", np.array([0.25, 0.75], np.float32))
    assert load_prior(str(tmp_path / "prior.npy"), 2).tolist() == [0.25, 0.75]
    np.save(tmp_path / "matrix.npy", np.full((2, 2), 0.25))
    with pytest.raises(ValueError, match=r"matrix.npy: expected a vector of numbers.*\(2, 2\)"):
        load_prior(str(tmp_path / "matrix.npy"), 2)
    np.save(tmp_path / "negative.npy", np.array([1.5, -0.5]))
    with pytest.raises(ValueError, match="negative"):
        load_prior(str(tmp_path / "negative.npy"), 2)
    os.replace(tmp_path / "prior.npy", tmp_path / "prior.bin")  # binary, not JSON
    with pytest.raises(ValueError, match="prior.bin is not JSON"):
        load_prior(str(tmp_path / "prior.bin"), 2)
