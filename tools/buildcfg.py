"""Compile configuration of the C library libtplinear.a, shared by setup.py (the extension links it),
tools/ctest.py (the C tests, plain and under sanitizers) and examples/c/Makefile. Run as a script:
    python tools/buildcfg.py cflags|ldflags|sources|cuda   the values as shell words (CPU-only library)
    python tools/buildcfg.py lib [plain|asan]              builds build/c/<flavour>/libtplinear.a, prints its path

The library is compiled with -fvisibility=hidden: only the functions tplinear.h marks TP_API are
exported from a shared object that links it (the extension).
"""
import concurrent.futures
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFLAGS = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-O3", "-fvisibility=hidden"]

# The library's folders, bottom floor first (tools/check_layout.py checks that includes follow them).
LIBRARY_FOLDERS = ("core", "device", "gemm", "comm", "layers")
# Sources compiled only with CUDA, and the bottom floor's answer of a build without it.
CUDA_SOURCES = ("csrc/device/cuda.c", "csrc/gemm/cublas.c", "csrc/comm/nccl.c")
NO_CUDA_SOURCES = ("csrc/device/none.c",)
# Sources compiled only with an MPI.
MPI_SOURCES = ("csrc/comm/mpi.c",)
MPI_HINT = "apt-get install libopenmpi-dev (or libmpich-dev), or set MPI_HOME"

# Build flavours of the standalone library (the C tests and the C example; CPU-only: sanitizers and the
# CUDA runtime do not mix).
FLAVOURS = {
    "plain": {"cflags": ["-O2", "-g"], "ldflags": []},
    "asan": {
        "cflags": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                   "-fno-sanitize-recover=undefined"],
        "ldflags": ["-fsanitize=address,undefined"],
    },
}


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


def _words(cmd):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.split() if proc.returncode == 0 else None


def mpi_link():
    """The MPI to build the mpi backend against, as (include_dirs, library_dirs, libraries), or None.
    MPI_HOME (include/mpi.h, lib/libmpi.so) first, then the compiler wrapper: OpenMPI's `mpicc -showme:*`,
    MPICH's `mpicc -show`. TPLINEAR_MPI=0|1 forces (1 without an MPI is an error saying how to get one)."""
    force = os.environ.get("TPLINEAR_MPI", "").strip()
    if force == "0":
        return None
    found = None
    home = os.environ.get("MPI_HOME")
    if home and os.path.isfile(os.path.join(home, "include", "mpi.h")):
        libdir = next((os.path.join(home, d) for d in ("lib", "lib64") if os.path.isdir(os.path.join(home, d))), None)
        found = ([os.path.join(home, "include")], [libdir] if libdir else [], ["mpi"])
    if found is None:
        mpicc = os.environ.get("MPICC", "mpicc")
        inc, libdirs, libs = (_words([mpicc, f"-showme:{k}"]) for k in ("incdirs", "libdirs", "libs"))
        if inc is not None and libs:
            found = (inc, libdirs or [], libs)
        else:  # MPICH: one line of compiler flags
            words = _words([mpicc, "-show"]) or []
            inc = [w[2:] for w in words if w.startswith("-I")]
            libs = [w[2:] for w in words if w.startswith("-l")]
            if inc and libs:
                found = (inc, [w[2:] for w in words if w.startswith("-L")], libs)
    if found and not any(os.path.isfile(os.path.join(d, "mpi.h")) for d in found[0]):
        found = None
    if force == "1" and found is None:
        raise SystemExit(f"TPLINEAR_MPI=1 but no MPI found ({MPI_HINT})")
    return found


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


def config(link_blas=False, with_cuda=True, with_mpi=True):
    """link_blas: link OpenBLAS directly with an rpath (standalone C programs); the extension instead
    relies on scipy_openblas32 having loaded it globally. with_cuda=False / with_mpi=False build the core
    without GPUs / MPI (the C tests: sanitizers and the CUDA runtime do not mix, and MPI needs a launcher)."""
    inc, libdir, lib = blas()
    cuda = cuda_home() if with_cuda else None
    mpi = mpi_link() if with_mpi else None
    sources = []
    for part in LIBRARY_FOLDERS:
        sources += sorted(glob.glob(os.path.join("csrc", part, "*.c")))
    skip = (NO_CUDA_SOURCES if cuda else CUDA_SOURCES) + (() if mpi else MPI_SOURCES)
    sources = [src for src in sources if src not in skip]
    include_dirs = ["csrc/include", inc]
    library_dirs, libraries, rpath = [], [], []
    macros = [("BLAS_SYMBOL_PREFIX", "scipy_")]
    if cuda:  # TPLINEAR_CUDA is defined (to 1) only in CUDA builds: `#if TPLINEAR_CUDA` and `#ifdef` agree
        macros.append(("TPLINEAR_CUDA", "1"))
        cinc, cdirs, clibs, crpath = cuda_link(cuda)
        include_dirs += cinc
        library_dirs += cdirs
        libraries += clibs
        rpath += crpath
    if mpi:  # TPLINEAR_MPI is defined (to 1) only in MPI builds, as TPLINEAR_CUDA
        macros.append(("TPLINEAR_MPI", "1"))
        include_dirs += mpi[0]
        library_dirs += mpi[1]
        libraries += mpi[2]
        rpath += mpi[1]
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
        "cuda": cuda,
        "mpi": mpi,
        "headers": sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)),
    }


def run_command(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def _replace(tmp, path):
    os.replace(tmp, path)  # atomic: a concurrent build never sees half a file
    return path


def build_library(flavour="plain"):
    """Compiles the CPU-only library for a flavour into build/c/<flavour>/libtplinear.a (objects rebuilt
    when their source, any header or the flags changed); returns (library path, config)."""
    cfg = config(link_blas=True, with_cuda=False, with_mpi=False)
    out = os.path.join(ROOT, "build", "c", flavour)
    os.makedirs(out, exist_ok=True)
    cflags = [f for f in cfg["cflags"] if not f.startswith("-O")] + FLAVOURS[flavour]["cflags"]
    args = cflags + ["-I" + (i if os.path.isabs(i) else os.path.join(ROOT, i)) for i in cfg["include_dirs"]]
    args += ["-D%s=%s" % m for m in cfg["define_macros"]]
    stamp = max(os.path.getmtime(os.path.join(ROOT, h)) for h in cfg["headers"])
    flags = os.path.join(out, "flags.txt")  # a change of compiler or flags rebuilds every object
    if not os.path.exists(flags) or open(flags).read() != " ".join(args):
        tmp = f"{flags}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(" ".join(args))
        _replace(tmp, flags)
    stamp = max(stamp, os.path.getmtime(flags))

    def compile_one(src):
        obj = os.path.join(out, src.replace("/", "_")[:-2] + ".o")
        path = os.path.join(ROOT, src)
        if not os.path.exists(obj) or os.path.getmtime(obj) < max(stamp, os.path.getmtime(path)):
            tmp = f"{obj}.{os.getpid()}.tmp"
            run_command(["cc", *args, "-c", path, "-o", tmp])
            _replace(tmp, obj)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, cfg["sources"]))
    lib = os.path.join(out, "libtplinear.a")
    if not os.path.exists(lib) or os.path.getmtime(lib) < max(os.path.getmtime(o) for o in objs) or \
            _archive_members(lib) != sorted(os.path.basename(o) for o in objs):
        tmp = f"{lib}.{os.getpid()}.tmp"
        run_command(["ar", "rcs", tmp, *objs])
        _replace(tmp, lib)
    return lib, cfg


def _archive_members(lib):
    proc = subprocess.run(["ar", "t", lib], capture_output=True, text=True)
    return sorted(proc.stdout.split()) if proc.returncode == 0 else None


def link_words(cfg):
    """What a program linking libtplinear.a adds after it: BLAS, CUDA (if any), threads, libm."""
    words = ["-L" + d for d in cfg["library_dirs"]] + ["-l" + l for l in cfg["libraries"]]
    return words + ["-Wl,-rpath," + d for d in cfg["runtime_library_dirs"]] + cfg["ldflags"] + ["-lm"]


def shell_words(kind):
    c = config(link_blas=True, with_cuda=False, with_mpi=False)
    if kind == "cflags":
        words = c["cflags"] + ["-I" + os.path.join(ROOT, i) for i in c["include_dirs"]] + [
            "-D%s=%s" % m for m in c["define_macros"]
        ]
    elif kind == "ldflags":
        words = link_words(c)
    elif kind == "sources":
        words = [os.path.join(ROOT, src) for src in c["sources"]]
    elif kind == "cuda":
        words = [c["cuda"] or ""]
    else:
        raise SystemExit("usage: buildcfg.py cflags|ldflags|sources|cuda|lib [flavour]")
    return " ".join(words)


if __name__ == "__main__":
    os.chdir(ROOT)
    if len(sys.argv) > 1 and sys.argv[1] == "lib":
        print(build_library(sys.argv[2] if len(sys.argv) > 2 else "plain")[0])
    else:
        print(shell_words(sys.argv[1] if len(sys.argv) > 1 else ""))
