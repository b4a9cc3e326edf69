"""Panels: palette, entropy colour map, layout, and the command line writing valid PNGs."""
import os
import pathlib

import cv2
import numpy as np
import pytest
import torch

from advent_fast import visualize
from advent_fast.data import PALETTE_16, PALETTE_19, embedded
from advent_fast.models import build_model, checkpoint_dict


def test_colorize_uses_the_cityscapes_palette_and_black_for_ignore():
    label = np.array([[0, 10, 18, 255]])
    rgb = visualize.colorize(label, 19)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0].tolist() == [[128, 64, 128], [70, 130, 180], [119, 11, 32], [0, 0, 0]]
    assert np.array_equal(visualize.colorize(np.arange(16)[None], 16)[0], PALETTE_16)
    assert np.array_equal(visualize.colorize(np.arange(19)[None], 19)[0], PALETTE_19)


def test_entropy_uses_viridis_dark_for_confident_bright_for_uncertain():
    rgb = visualize.entropy_to_rgb(np.linspace(0, 1, 11)[None])
    assert rgb[0, 0].tolist() == [68, 1, 84] and rgb[0, -1].tolist() == [253, 231, 37]
    luminance = rgb[0].astype(float) @ [0.299, 0.587, 0.114]
    assert (np.diff(luminance) > 0).all()


def test_panel_layout_input_and_predictions_over_truth_and_entropies():
    h, w = 40, 80
    image = np.full((h // 2, w // 2, 3), 200, np.uint8)  # smaller than the label: resized to the tile
    label = np.zeros((h, w), np.int64)
    preds = [np.full((h, w), 13), np.full((h, w), 10)]
    ents = [np.zeros((h, w)), np.ones((h, w))]
    panel = visualize.make_panel(image, label, preds, ents, ["a", "b"], 19)
    header = 10
    assert panel.shape == (2 * (h + header), 3 * w, 3)
    assert panel[header:h + header, :w].tolist() == image[:1, :1].repeat(h, 0).repeat(w, 1).tolist()
    assert panel[header + 5, w + 5].tolist() == [0, 0, 142]  # car, model a
    assert panel[header + 5, 2 * w + 5].tolist() == [70, 130, 180]  # sky, model b
    assert panel[2 * header + h + 5, 5].tolist() == [128, 64, 128]  # ground truth road
    assert panel[2 * header + h + 5, w + 5].tolist() == [68, 1, 84]  # zero entropy
    assert panel[2 * header + h + 5, 2 * w + 5].tolist() == [253, 231, 37]  # maximal entropy
    assert visualize.make_panel(image, label, preds[:1], ents[:1], ["a"], 19, tile_width=40).shape == (2 * 30, 80, 3)
    with pytest.raises(ValueError, match="one prediction"):
        visualize.make_panel(image, label, preds, ents[:1], ["a", "b"], 19)


def test_downscaled_label_and_prediction_tiles_show_only_palette_colours():
    # alternating road / car columns at 4x the tile width: averaging would show a colour of no class
    label = np.tile(np.array([0, 13]), (32, 64))
    panel = visualize.make_panel(np.zeros((32, 128, 3), np.uint8), label, [label], [np.zeros((32, 128))], ["a"],
                                 19, tile_width=32)
    header = 10
    tiles = {"truth": panel[2 * header + 8:, :32], "prediction": panel[header:header + 8, 32:]}
    allowed = {(128, 64, 128), (0, 0, 142)}
    for name, tile in tiles.items():
        assert {tuple(c) for c in tile.reshape(-1, 3).tolist()} <= allowed, name


def test_cli_writes_side_by_side_panels_of_the_expected_size(tmp_path):
    root = tmp_path / "cityscapes"
    for i in range(2):
        rgb, ids = embedded.render_scene((0, 2, i), (128, 64), embedded.TARGET_STYLE)
        stem = f"lindau_{i:06d}_000019"
        for folder, name, array in (("leftImg8bit", f"{stem}_leftImg8bit.png", rgb[:, :, ::-1]),
                                    ("gtFine", f"{stem}_gtFine_labelIds.png", ids)):
            os.makedirs(root / folder / "val" / "lindau", exist_ok=True)
            assert cv2.imwrite(str(root / folder / "val" / "lindau" / name), array)
    checkpoints = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        checkpoints += ["--checkpoint", str(tmp_path / f"m{seed}.pth")]
        torch.save(checkpoint_dict(build_model("deeplabv2_small", 19)), checkpoints[-1])
    written = visualize.main([*checkpoints, "--name", "source only", "--name", "adapted", "--root", str(root),
                              "--input-size", "64", "32", "--label-size", "128", "64", "--num-images", "5",
                              "--out-dir", str(tmp_path / "vis")])
    assert [os.path.basename(p) for p in written] == [
        "lindau_lindau_000000_000019_leftImg8bit.png", "lindau_lindau_000001_000019_leftImg8bit.png"]
    for path in written:
        panel = cv2.imread(path)
        assert panel is not None and panel.shape == (2 * (64 + 10), 3 * 128, 3)
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
