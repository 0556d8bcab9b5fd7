"""One copy of each CUDA library per process, shared with torch.

A CUDA build of the extension links libnccl.so.2, libcublas(Lt).so.N and libcudart.so.N from the toolkit
it was built against. torch's wheels ship their own copies as NVIDIA's PyPI packages (``nvidia/nccl/lib``,
``nvidia/cu13/lib``, ...), and the dynamic loader keeps one library per name: whichever is loaded first
serves both. If tplinear comes first, torch gets the toolkit's (older) NCCL and fails to import
(``libtorch_cuda.so: undefined symbol: ncclCommResume``). So, before the extension loads, the libraries it
needs that NVIDIA's packages provide are loaded from there, as torch's own ``__init__`` does: tplinear and
torch then share torch's copies, in either import order. Nothing happens in a build without CUDA, or
where no such package is installed.
"""
import ctypes
import glob
import importlib.util
import os
import sys


def _needed(path):
    """The CUDA sonames the extension names (read from the file: loading it would load them)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    names = ("libnccl.so.", "libcudart.so.", "libcublasLt.so.", "libcublas.so.")
    out = []
    for prefix in names:
        at = data.find(prefix.encode())
        if at >= 0:
            end = data.index(b"\0", at)
            out.append(data[at:end].decode())
    return out


def preload_cuda_libraries():
    spec = importlib.util.find_spec("tplinear._C")
    if spec is None or not spec.origin:
        return
    for soname in _needed(spec.origin):
        for base in sys.path:
            hits = glob.glob(os.path.join(base or ".", "nvidia", "*", "lib", soname))
            if hits:
                try:
                    ctypes.CDLL(hits[0], mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass  # a broken wheel: the extension's own link resolves it, as without this step
                break
