"""Builds the extension tplinear._C from csrc/.

BLAS: the PyPI package scipy-openblas32 (headers, library, `scipy_` symbol prefix), as NumPy builds
against it. The extension is linked without a DT_NEEDED entry for OpenBLAS: `import tplinear` first
imports scipy_openblas32, which loads the library with RTLD_GLOBAL, so no LD_LIBRARY_PATH or absolute
rpath into a (possibly temporary, isolated) build environment is needed.

CUDA: the GPU sources build when a toolkit is found (CUDA_HOME, else /usr/local/cuda);
TPLINEAR_CUDA=0 or 1 forces either way (1 without a toolkit is an error).
"""
import glob
import os
import sys

from setuptools import Extension, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import buildcfg  # noqa: E402  (tools/buildcfg.py: one place for compile flags, shared with the C tests)

cfg = buildcfg.config()
setup(
    ext_modules=[
        Extension(
            "tplinear._C",
            sources=cfg["sources"] + sorted(glob.glob("csrc/python/*.c")),
            include_dirs=cfg["include_dirs"],
            library_dirs=cfg["library_dirs"],
            libraries=cfg["libraries"],
            runtime_library_dirs=cfg["runtime_library_dirs"],
            define_macros=cfg["define_macros"],
            extra_compile_args=cfg["cflags"],
            extra_link_args=cfg["ldflags"],
        )
    ],
)
