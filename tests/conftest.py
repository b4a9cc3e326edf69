"""Test session setup, and the tiny embedded dataset the trainer tests share.

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any test module
imports advent_fast (and with it triton): the Triton kernels then run on CPU tensors.
"""
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


def pytest_runtest_logreport(report):
    """With ADVENT_FAST_REPORT_FAILURES=1 (benchmarks/run_gpu.sh sets it), a failure's report is written
    at once: a run stopped by its time limit never reaches pytest's summary, and the GPU runs are short."""
    if report.failed and os.environ.get("ADVENT_FAST_REPORT_FAILURES") == "1":
        sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()
