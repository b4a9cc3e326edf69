"""Test session setup, and the tiny embedded dataset the trainer tests share.

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any test module
imports advent_fast (and with it triton): the Triton kernels then run on CPU tensors.
"""
import argparse
import os
import sys

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Four source, four target-train and two target-val images in the real GTA5/Cityscapes layouts."""
    from advent_fast.data import ensure_embedded_data

    root = tmp_path_factory.mktemp("embedded")
    return ensure_embedded_data(str(root), num_source=4, num_target_train=4, num_target_val=2,
                                workers=1, progress=False)


@pytest.fixture
def parses_only(monkeypatch):
    """``parses_only(main, args)``: ``main(args)`` parses ``args`` with its own argparse parser (a bad argument
    exits there) and stops: nothing else runs."""

    class Parsed(Exception):
        pass

    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real_parse(self, args, namespace)
        raise Parsed

    def check(main, args):
        with monkeypatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
            with pytest.raises(Parsed):
                main(args)

    return check


def pytest_runtest_logreport(report):
    """With ADVENT_FAST_REPORT_FAILURES=1 (benchmarks/run_gpu.sh sets it), a failure's report is written
    at once: a run stopped by its time limit never reaches pytest's summary, and the GPU runs are short."""
    if report.failed and os.environ.get("ADVENT_FAST_REPORT_FAILURES") == "1":
        sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()


@pytest.fixture(scope="session")
def synthia_data(tmp_path_factory):
    """Four 128x76 scenes in the SYNTHIA-RAND-CITYSCAPES layout: ``RGB/*.png`` and 16-bit ``GT/LABELS/*.png``
    with the SYNTHIA class id in the red channel. Returns (root, the 16-class train ids of each label)."""
    import cv2
    import numpy as np

    from advent_fast.data import embedded
    from advent_fast.data.classes import SYNTHIA_ID_TO_TRAIN_ID_16, cityscapes_id_to_train_id, lookup_table

    root = tmp_path_factory.mktemp("synthia")
    (root / "RGB").mkdir()
    (root / "GT" / "LABELS").mkdir(parents=True)
    train_id_16 = lookup_table(cityscapes_id_to_train_id(16))
    synthia_id = np.zeros(256, dtype=np.uint16)  # 0: void, not a class
    for sid, tid in SYNTHIA_ID_TO_TRAIN_ID_16.items():
        synthia_id[tid] = sid
    train_ids = []
    for i in range(4):
        rgb, label_ids = embedded.render_scene((7, 0, i), (128, 76), embedded.SOURCE_STYLE)
        train_ids.append(train_id_16[label_ids])
        label = np.zeros((*label_ids.shape, 3), dtype=np.uint16)
        label[:, :, 2] = synthia_id[train_ids[-1]]  # red, in OpenCV's BGR order
        assert cv2.imwrite(str(root / "RGB" / f"{i:07d}.png"), rgb[:, :, ::-1])
        assert cv2.imwrite(str(root / "GT" / "LABELS" / f"{i:07d}.png"), label)
    return str(root), train_ids
