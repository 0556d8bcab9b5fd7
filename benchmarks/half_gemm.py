"""The host bfloat16 / float16 GEMMs (issue 27): tplinear's convert-to-float32 + OpenBLAS sgemm against
tplinear's own float32 and against oneDNN's matmul in bfloat16, one rank's GEMMs, one thread.

    python benchmarks/half_gemm.py [--onednn /path/to/libdnnl.so] [--reps 5] [--shapes decode,train]
                                   [--json out.json]

Shapes: one rank's Llama-7B MLP at p = 2 (gate+up fused [11008, 4096], down [4096, 5504]); `decode`: 8
tokens, `train`: 128 tokens. Each case times the forward (Y = X W^T for both layers) and the forward +
backward (Y, dX = dY W, dW = dY^T X assigned, for both layers); median over --reps after one warm-up, the
contenders taking turns within each repetition (the same load for all).

oneDNN: the C API through ctypes (no Python binding is needed). The PyPI `onednn` wheel (2026.x) links TBB,
SYCL and Intel's compiler runtime; `onednn-cpu-gomp` (2023.2, GNU OpenMP) loads alone:
    pip download onednn-cpu-gomp --no-deps -d /tmp/dnnl && unzip -o /tmp/dnnl/*.whl -d /tmp/dnnl
    python benchmarks/half_gemm.py --onednn /tmp/dnnl/onednn_cpu_gomp-2023.2.0.data/data/lib/libdnnl.so.3
Its matmul computes dst[M, N] = src[M, K] . weights[K, N]; the transposes are given as strides. oneDNN 3.2
has no bfloat16 or float16 matmul on a CPU without AVX512 / AVX2-VNNI-2 (its primitive descriptor returns
dnnl_unimplemented): the script then says so and times it in float32 only.
"""
import argparse
import ctypes
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tplinear import _C  # noqa: E402

LAYERS = [(11008, 4096), (4096, 5504)]  # [out, in] of one rank's MLP at p = 2 (Llama-7B)
TOKENS = {"decode": 8, "train": 128}


class OneDNN:
    """oneDNN's matmul (C API v3) through ctypes: dst = src . weights with strided descriptions."""

    F16, BF16, F32 = 1, 2, 3
    ARG_SRC, ARG_DST, ARG_WEIGHTS = 1, 17, 33

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.engine, self.stream = ctypes.c_void_p(), ctypes.c_void_p()
        self._ok(self.lib.dnnl_engine_create(ctypes.byref(self.engine), 1, ctypes.c_size_t(0)), "engine")
        self._ok(self.lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, 1), "stream")
        self.cache = {}

    @staticmethod
    def _ok(status, what):
        if status != 0:
            raise RuntimeError(f"oneDNN {what}: status {status}")

    def _md(self, dims, strides, dt):
        md = ctypes.c_void_p()
        d = (ctypes.c_int64 * 12)(*dims)
        s = (ctypes.c_int64 * 12)(*strides)
        self._ok(self.lib.dnnl_memory_desc_create_with_strides(ctypes.byref(md), 2, d, dt, s), "memory desc")
        return md

    def _prim(self, key, dt):
        if key not in self.cache:
            (m, k, n), (sa, sb), _ = key
            src = self._md((m, k), sa, dt)
            wei = self._md((k, n), sb, dt)
            dst = self._md((m, n), (n, 1), dt)
            pd, prim = ctypes.c_void_p(), ctypes.c_void_p()
            self._ok(self.lib.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), self.engine, src, wei, None, dst,
                                                                None), "matmul desc")
            self._ok(self.lib.dnnl_primitive_create(ctypes.byref(prim), pd), "primitive")
            self.cache[key] = (prim, src, wei, dst)
        return self.cache[key]

    def matmul(self, a, a_strides, b, b_strides, c, dt=BF16):
        """c[m, n] = a[m, k] . b[k, n]; a, b, c: torch tensors; strides in elements."""
        m, n = c.shape
        k = a.shape[1] if a_strides[1] == 1 else a.shape[0]
        prim, src, wei, dst = self._prim(((m, k, n), (tuple(a_strides), tuple(b_strides)), dt), dt)
        mems = []
        for md, t in ((src, a), (wei, b), (dst, c)):
            mem = ctypes.c_void_p()
            self._ok(self.lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine, ctypes.c_void_p(t.data_ptr())),
                     "memory")
            mems.append(mem)

        class Arg(ctypes.Structure):
            _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]

        args = (Arg * 3)(Arg(self.ARG_SRC, mems[0]), Arg(self.ARG_WEIGHTS, mems[1]), Arg(self.ARG_DST, mems[2]))
        self._ok(self.lib.dnnl_primitive_execute(prim, self.stream, 3, args), "execute")
        self._ok(self.lib.dnnl_stream_wait(self.stream), "wait")
        for mem in mems:
            self.lib.dnnl_memory_destroy(mem)


def make(m, dt):
    g = torch.Generator().manual_seed(0)
    layers = []
    for out, inp in LAYERS:
        layers.append({
            "x": torch.randn(m, inp, generator=g).to(dt), "w": (torch.randn(out, inp, generator=g) / 64).to(dt),
            "dy": torch.randn(m, out, generator=g).to(dt), "y": torch.empty(m, out, dtype=dt),
            "dx": torch.empty(m, inp, dtype=dt), "dw": torch.empty(out, inp, dtype=dt),
        })
    return layers


def tplinear_step(layers, backward):
    for L in layers:
        _C.linear_forward(L["x"], L["w"], None, L["y"])
        if backward:
            _C.linear_backward(L["dy"], L["x"], L["w"], L["dx"], L["dw"], None, True)


def onednn_step(dnnl, layers, backward, dt):
    for L in layers:
        (m, k), n = L["x"].shape, L["w"].shape[0]
        dnnl.matmul(L["x"], (k, 1), L["w"], (1, k), L["y"], dt)  # Y = X W^T: W read [in, out] column-major
        if backward:
            dnnl.matmul(L["dy"], (n, 1), L["w"], (k, 1), L["dx"], dt)  # dX = dY W
            dnnl.matmul(L["dy"], (1, n), L["x"], (k, 1), L["dw"], dt)  # dW = dY^T X: dY read transposed


def torch_step(layers, backward):
    for L in layers:
        torch.matmul(L["x"], L["w"].t(), out=L["y"])
        if backward:
            torch.matmul(L["dy"], L["w"], out=L["dx"])
            torch.matmul(L["dy"].t(), L["x"], out=L["dw"])


def median_times(fns, reps):
    """{name: median seconds}; the contenders take turns within each repetition, so that a change of the
    machine's load reaches all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onednn", default=os.environ.get("TPLINEAR_ONEDNN_LIB"), help="path of libdnnl.so")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="decode,train")
    ap.add_argument("--torch", action="store_true", help="also time torch.matmul in the same dtypes")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _C.set_num_threads(1)
    dnnl = OneDNN(args.onednn) if args.onednn else None
    rows = []
    for shape in args.shapes.split(","):
        m = TOKENS[shape]
        sets = {name: make(m, dt) for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                                   ("float16", torch.float16))}
        for backward in (False, True):
            case = f"{shape} MLP [{m} tokens] {'fwd+bwd' if backward else 'fwd'}"
            fns = {f"tplinear {name}": (lambda L=L: tplinear_step(L, backward)) for name, L in sets.items()}
            if dnnl is not None:
                for name, code in (("float32", OneDNN.F32), ("bfloat16", OneDNN.BF16)):
                    try:
                        onednn_step(dnnl, sets[name], backward, code)
                        fns[f"oneDNN {name}"] = lambda L=sets[name], c=code: onednn_step(dnnl, L, backward, c)
                    except RuntimeError as exc:
                        print(f"oneDNN {name}: {exc} (3: unimplemented on this CPU)", flush=True)
            if args.torch:
                for name in ("float32", "bfloat16"):
                    fns[f"torch {name}"] = lambda L=sets[name]: torch_step(L, backward)
            res = median_times(fns, args.reps)
            rows.append({"case": case, "median_s": res})
            base = res["tplinear float32"]
            print(case + ": " + ", ".join(f"{k} {v * 1e3:.1f} ms ({base / v:.2f}x)" for k, v in res.items()),
                  flush=True)
        del sets
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": LAYERS, "tokens": TOKENS, "threads": 1, "reps": args.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
