"""Test session setup.

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any test module
imports advent_fast (and with it triton): the Triton kernels then run on CPU tensors.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_logreport(report):
    """With ADVENT_FAST_REPORT_FAILURES=1 (benchmarks/run_gpu.sh sets it), a failure's report is written
    at once: a run stopped by its time limit never reaches pytest's summary, and the GPU runs are short."""
    if report.failed and os.environ.get("ADVENT_FAST_REPORT_FAILURES") == "1":
        sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()
