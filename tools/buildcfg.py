"""Compile configuration of the C core, shared by setup.py (the extension) and tools/cbuild.py
(C tests, sanitizer builds, the C example). Run as a script it prints the values as shell words:
    python tools/buildcfg.py cflags|ldflags|sources|cuda
"""
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFLAGS = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-O3", "-fvisibility=default"]


def cuda_home():
    """The CUDA toolkit to build against, or None. TPLINEAR_CUDA=0|1 forces."""
    force = os.environ.get("TPLINEAR_CUDA", "").strip()
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    found = os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))
    if force == "0":
        return None
    if force == "1" and not found:
        raise SystemExit(f"TPLINEAR_CUDA=1 but no CUDA toolkit at {home} (set CUDA_HOME)")
    return home if found else None


def blas():
    import scipy_openblas32 as sob

    return sob.get_include_dir(), sob.get_lib_dir(), sob.get_library()


def config(link_blas=False, with_cuda=True):
    """link_blas: link OpenBLAS directly with an rpath (standalone C programs); the extension instead
    relies on scipy_openblas32 having loaded it globally. with_cuda=False builds the CPU-only core
    (the C tests: sanitizers and the CUDA runtime do not mix)."""
    inc, libdir, lib = blas()
    cuda = cuda_home() if with_cuda else None
    sources = []
    for part in ("core", "gemm", "comm", "layers"):
        sources += sorted(glob.glob(os.path.join("csrc", part, "*.c")))
    include_dirs = ["csrc/include", "csrc", inc]
    library_dirs, libraries, rpath, macros = [], [], [], [("BLAS_SYMBOL_PREFIX", "scipy_")]
    cuda_sources = sorted(s for s in glob.glob("csrc/cuda/*.c") if not s.endswith("stub.c"))
    if cuda and cuda_sources:
        sources += cuda_sources
        include_dirs.append(os.path.join(cuda, "include"))
        cudalib = os.path.join(cuda, "lib64")
        library_dirs.append(cudalib)
        libraries += ["cublasLt", "cublas", "nccl", "cudart"]
        rpath.append(cudalib)
        macros.append(("TPLINEAR_CUDA", "1"))
    else:
        sources.append("csrc/cuda/stub.c")
    ldflags = ["-lpthread"]
    if link_blas:
        library_dirs.append(libdir)
        libraries.append(lib)
        rpath.append(libdir)
    return {
        "sources": sources,
        "include_dirs": include_dirs,
        "library_dirs": library_dirs,
        "libraries": libraries,
        "runtime_library_dirs": rpath,
        "define_macros": macros,
        "cflags": CFLAGS,
        "ldflags": ldflags,
        "cuda": cuda if cuda_sources else None,
    }


def shell_words(kind):
    c = config(link_blas=True, with_cuda=False)
    if kind == "cflags":
        words = c["cflags"] + ["-I" + os.path.join(ROOT, i) for i in c["include_dirs"]] + [
            "-D%s=%s" % m for m in c["define_macros"]
        ]
    elif kind == "ldflags":
        words = ["-L" + d for d in c["library_dirs"]] + ["-l" + l for l in c["libraries"]]
        words += ["-Wl,-rpath," + d for d in c["runtime_library_dirs"]] + c["ldflags"] + ["-lm"]
    elif kind == "sources":
        words = [os.path.join(ROOT, src) for src in c["sources"]]
    elif kind == "cuda":
        words = [c["cuda"] or ""]
    else:
        raise SystemExit("usage: buildcfg.py cflags|ldflags|sources|cuda")
    return " ".join(words)


if __name__ == "__main__":
    os.chdir(ROOT)
    print(shell_words(sys.argv[1] if len(sys.argv) > 1 else ""))
