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
    if not found:  # no toolkit: NVIDIA's wheels (nvidia-cuda-runtime, nvidia-cublas, nvidia-nccl-cu13) will do
        wheel = next((d for d in _wheel_dirs("include") if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))), None)
        if wheel:
            home, found = os.path.dirname(wheel), True
    if force == "1" and not found:
        raise SystemExit(f"TPLINEAR_CUDA=1 but no CUDA toolkit at {home} (set CUDA_HOME)")
    return home if found else None


CUDA_LIBS = ["cublasLt", "cublas", "nccl", "cudart"]
CUDA_HEADERS = {"cuda_runtime_api.h": "cudart", "cublasLt.h": "cublas", "nccl.h": "nccl"}


def _wheel_dirs(kind):
    """include/ or lib/ folders of NVIDIA's PyPI wheels (nvidia-nccl-cu13, nvidia-cublas, ...)."""
    out = []
    for base in sys.path:
        for pattern in (os.path.join(base, "nvidia", "*", kind), os.path.join(base, "nvidia", "*", "*", kind)):
            out += sorted(glob.glob(pattern))
    return out


def _relative_to_site(path):
    """nvidia/nccl/lib for a folder inside some sys.path entry's nvidia/ package, else None."""
    for base in sys.path:
        if base and path.startswith(os.path.join(base, "nvidia") + os.sep):
            return os.path.relpath(path, base)
    return None


def cuda_link(home):
    """Where the CUDA headers and libraries come from: the toolkit first, then NVIDIA's wheels.
    Returns (include_dirs, library_dirs, libraries, rpath); fails naming what is missing."""
    inc_dirs = [os.path.join(home, "include")] + _wheel_dirs("include")
    lib_dirs = [os.path.join(home, d) for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
    lib_dirs = [d for d in lib_dirs if os.path.isdir(d)] + _wheel_dirs("lib")
    includes, libdirs, libs, missing, rpath = [], [], [], [], []
    for header in CUDA_HEADERS:
        where = next((d for d in inc_dirs if os.path.isfile(os.path.join(d, header))), None)
        if where is None:
            missing.append(header)
        elif where not in includes:
            includes.append(where)
    for name in CUDA_LIBS:
        found = None
        for d in lib_dirs:
            if os.path.exists(os.path.join(d, f"lib{name}.so")):
                found = (d, name)
            else:  # wheels ship only the versioned name (libnccl.so.2)
                versioned = sorted(glob.glob(os.path.join(d, f"lib{name}.so.[0-9]*")), key=len)
                if versioned:
                    found = (d, ":" + os.path.basename(versioned[0]))
            if found:
                break
        if found is None:
            missing.append(f"lib{name}.so")
            continue
        if found[0] not in libdirs:
            libdirs.append(found[0])
            # a wheel's folder relative to the extension (site-packages/tplinear/_C.so), as torch does,
            # so the build environment's path is not baked in; then the absolute one
            rel = _relative_to_site(found[0])
            if rel:
                rpath.append("$ORIGIN/../" + rel)
            rpath.append(found[0])
        libs.append(found[1])
    if missing:
        raise SystemExit(f"CUDA toolkit at {home} but {', '.join(missing)} not found there nor in NVIDIA's wheels "
                         "(pip install nvidia-nccl-cu13 nvidia-cublas); TPLINEAR_CUDA=0 builds without the GPU path")
    return includes, libdirs, libs, rpath


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
        cinc, cdirs, clibs, crpath = cuda_link(cuda)
        include_dirs += cinc
        library_dirs += cdirs
        libraries += clibs
        rpath += crpath
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
