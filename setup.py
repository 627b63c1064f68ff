"""Build of the native extension cmhash._hamming; everything else is in pyproject.toml."""

import glob
import sys

from setuptools import Extension, setup

# No -march=native: the wheel must run on any x86-64. SIMD kernels carry their own
# target attributes and are chosen at run time from the CPU's features.
extra_compile_args = ["-O3", "-std=c11", "-pthread", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
if sys.platform == "win32":  # pragma: no cover - not a supported build platform yet
    extra_compile_args = ["/O2"]

setup(
    ext_modules=[
        Extension(
            "cmhash._hamming",
            sources=sorted(glob.glob("native/*.c")),
            depends=sorted(glob.glob("native/*.h")),
            include_dirs=["native"],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-pthread"],
        )
    ]
)
