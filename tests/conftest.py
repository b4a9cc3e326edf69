"""Test session setup.

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any test module
imports advent_fast (and with it triton): the Triton kernels then run on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
