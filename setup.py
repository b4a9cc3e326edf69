"""Build and install advent_fast.

The Triton kernels live in the top-level ``kernels/`` folder and install as
``advent_fast.kernels``. The CPU ops in ``csrc/`` are compiled with torch's
cpp_extension (ninja); install with ``pip install --no-build-isolation -e .`` so the
build uses the torch that is already installed instead of fetching another one.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
# ADVENT_FAST_BUILD_CPU_OPS=0 skips the C++ ops: they run CPU tensors only, so a GPU machine without a
# compiler (or in a hurry: benchmarks/run_gpu.sh) can do without; CPU tensors then run the reference.
BUILD_CPU_OPS = os.environ.get("ADVENT_FAST_BUILD_CPU_OPS", "1") != "0"


def cpu_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    return CppExtension(
        name="advent_fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="advent_fast",
    version="0.1.0",
    description="Fast, faithful ADVENT (entropy-based UDA for semantic segmentation) with fused kernels",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["advent_fast", "advent_fast.*"]) + ["advent_fast.kernels"],
    package_dir={"advent_fast.kernels": "kernels"},
    package_data={"advent_fast": ["configs/*.yaml"]},
    ext_modules=[cpu_extension()] if BUILD_CPU_OPS else [],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)} if BUILD_CPU_OPS else {},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "opencv-python-headless",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "ninja", "pybind11"],
        "tensorboard": ["tensorboard"],
    },
)
