"""Builds the C library libtplinear.a from csrc/{core,device,gemm,comm,layers} and the extension
tplinear._C (csrc/python/) that links it.

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
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import buildcfg  # noqa: E402  (tools/buildcfg.py: one place for sources and flags, shared with the C tests)

cfg = buildcfg.config()


class BuildExtWithLibrary(build_ext):
    """Compiles the library's sources into libtplinear.a with the extension's compiler and flags, then
    links the extension against the archive (ahead of the CUDA libraries it needs)."""

    def build_extensions(self):
        out = os.path.join(self.build_temp, "libtplinear")
        objects = self.compiler.compile(cfg["sources"], output_dir=out, macros=cfg["define_macros"],
                                        include_dirs=cfg["include_dirs"], extra_postargs=cfg["cflags"],
                                        depends=cfg["headers"])
        self.compiler.create_static_lib(objects, "tplinear", output_dir=out)
        library = self.compiler.library_filename("tplinear", output_dir=out)
        for ext in self.extensions:
            ext.extra_objects = [library] + [o for o in ext.extra_objects if o != library]
        super().build_extensions()


setup(
    cmdclass={"build_ext": BuildExtWithLibrary},
    ext_modules=[
        Extension(
            "tplinear._C",
            sources=sorted(glob.glob("csrc/python/*.c")),
            depends=cfg["sources"] + cfg["headers"],
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
