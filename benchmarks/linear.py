"""CPU benchmark of tplinear's tensor-parallel linear layers against the alternatives (issue 6).

    python benchmarks/linear.py --json out.json --md table.md --plot plot.png [--dtype float32 bfloat16 float16]

Cases (float32, or each --dtype for tplinear; B tokens, weights [out, in]):
    row_fwd        LinearAllreduce forward   x[2048, 4096/p] . W[4096, 4096/p]^T, all-reduce, + b
    col_fwd        LinearLayer forward       x[2048, 4096]   . W[4096/p, 4096]^T + b_r
    mlp_fwdbwd     column 4096->16384, GELU (tanh, NumPy), row 16384->4096: forward + backward
    dec_row_fwd, dec_col_fwd, dec_mlp_fwdbwd   the same at the decode shape x[8, 4096]
    dec_row_gemm   the row layer's GEMM alone on this rank's shard (no collective), decode shape:
                   communication overhead = dec_row_fwd - dec_row_gemm
    row_gemm       the same at the big shape
    ar_dec, ar_big all-reduce alone of the row output ([8, 4096] and [2048, 4096] float32)

dtypes (issue 27): tplinear runs every --dtype (its own world per dtype; weights, inputs and outputs in that
dtype, the NumPy GELU between the layers in float32, cast on the way in and out); its half-dtype results are
the contenders "tplinear-bfloat16" / "tplinear-float16", with their speed-ups over tplinear's float32 of the
same run among the ratios. The other contenders run float32 only (NumPy has no half-precision BLAS).

Contenders, each in its own subprocess world, all in this run:
    numpy     single process, full (unsplit) layers in NumPy, all cores: the machine's compute limit
    tplinear  tplinear layers, world sizes 1, 2, 4 via `python -m tplinear.run` (BLAS threads: tplinear's own
              choice, cores / local ranks unless OMP_NUM_THREADS is set)
    mpi4py    the same TP math written plainly with mpi4py + NumPy (Allreduce on NumPy buffers) under
              `mpirun`, OPENBLAS_NUM_THREADS = cores / ranks
    deepspeed DeepSpeed's LinearAllreduce / LinearLayer (training mode: gloo all_reduce) on CPU torch
              under torchrun, torch threads = cores / ranks

Timing: before every step all ranks meet at a barrier of their own framework; each rank times the step
(time.perf_counter, CLOCK_MONOTONIC: one clock for all processes of the host); the step's time is from the
first rank leaving the barrier to the last rank finishing (for ranks that start together this is the max over
ranks of their own times, which is also kept: median_max_rank_s); the reported number is the median over the
timed steps (after warm-up steps). Every rank writes its raw step times; the driver aggregates.
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

B_BIG, B_DEC, H, FF = 2048, 8, 4096, 16384

# name: (batch, kind, warmup, reps) ; kind picks the step builder
CASES = {
    "row_fwd": (B_BIG, "row_fwd", 2, 7),
    "col_fwd": (B_BIG, "col_fwd", 2, 7),
    "mlp_fwdbwd": (B_BIG, "mlp", 1, 3),
    "row_gemm": (B_BIG, "row_gemm", 1, 5),
    "ar_big": (B_BIG, "allreduce", 2, 10),
    "dec_row_fwd": (B_DEC, "row_fwd", 20, 200),
    "dec_col_fwd": (B_DEC, "col_fwd", 20, 200),
    "dec_mlp_fwdbwd": (B_DEC, "mlp", 3, 20),
    "dec_row_gemm": (B_DEC, "row_gemm", 20, 200),
    "dec_row_pair": (B_DEC, "row_pair", 20, 300),
    "row_pair": (B_BIG, "row_pair", 1, 7),
    "mlp_gelu": (B_BIG, "gelu", 1, 5),
    "ar_dec": (B_DEC, "allreduce", 20, 300),
}
MAIN_CASES = ["row_fwd", "col_fwd", "mlp_fwdbwd", "dec_row_fwd", "dec_col_fwd", "dec_mlp_fwdbwd"]
AUX_CASES = ["mlp_gelu", "row_gemm", "dec_row_gemm", "dec_row_pair_gemm", "dec_row_pair_fwd", "dec_row_pair_overhead", "row_pair_gemm", "row_pair_fwd", "row_pair_overhead", "ar_big",
             "ar_dec"]
# small cases first, the big MLP last (freeing its GiBs can disturb whatever is timed right after it)
RUN_ORDER = ["dec_row_pair", "dec_row_gemm", "dec_row_fwd", "dec_col_fwd", "ar_dec", "row_pair", "row_gemm", "row_fwd",
             "col_fwd", "ar_big",
             "mlp_gelu", "dec_mlp_fwdbwd", "mlp_fwdbwd"]
LABELS = {
    "row_fwd": "row fwd [2048x4096]·[4096→4096]",
    "col_fwd": "column fwd [2048x4096]·[4096→4096]",
    "mlp_fwdbwd": "MLP fwd+bwd [2048x4096]·[4096→16384→4096]",
    "dec_row_fwd": "decode row fwd [8x4096]·[4096→4096]",
    "dec_col_fwd": "decode column fwd [8x4096]·[4096→4096]",
    "dec_mlp_fwdbwd": "decode MLP fwd+bwd [8x4096]·[4096→16384→4096]",
    "row_gemm": "row GEMM only (shard, no comm) [2048x4096/p]",
    "dec_row_gemm": "decode row GEMM only (shard, no comm) [8x4096/p]",
    "row_pair_gemm": "row GEMM only, paired steps",
    "row_pair_fwd": "row fwd, paired steps",
    "row_pair_overhead": "row fwd − GEMM only, median of paired differences",
    "mlp_gelu": "GELU fwd+bwd alone on [2048x16384/p] (part of the MLP)",
    "dec_row_pair_gemm": "decode row GEMM only, paired steps",
    "dec_row_pair_fwd": "decode row fwd, paired steps",
    "dec_row_pair_overhead": "decode row fwd − GEMM only, median of paired differences",
    "ar_big": "all-reduce alone, 2048x4096 fp32 (32 MiB)",
    "ar_dec": "all-reduce alone, 8x4096 fp32 (128 KiB)",
}
CONTENDERS = ["numpy", "tplinear", "mpi4py", "deepspeed"]
DTYPES = ("float32", "bfloat16", "float16")
GELU_C, GELU_K = math.sqrt(2.0 / math.pi), 0.044715


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def add_dtype_arg(ap):
    """--dtype: the dtypes to measure side by side (shared by the benchmarks that have the dtype axis)."""
    ap.add_argument("--dtype", nargs="+", choices=DTYPES, default=["float32"],
                    help="dtypes measured side by side in one run (default: float32)")


def np_dtype(name):
    """The NumPy dtype of a --dtype name (bfloat16: ml_dtypes')."""
    import numpy as np
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_key(who, dtype):
    """The results' name of a contender in a dtype: float32 keeps the plain name (older result files)."""
    return who if dtype == "float32" else f"{who}-{dtype}"


# ================================================================================== NumPy helpers (workers)


def gelu_fwd(np, z):
    """GELU, tanh approximation, in place where possible; returns (a, t) with t = tanh(...) kept for backward."""
    t = np.multiply(z, z)
    t *= GELU_K
    t += 1.0
    t *= z
    t *= GELU_C
    np.tanh(t, out=t)
    a = t + 1.0
    a *= z
    a *= 0.5
    return a, t


def gelu_bwd(np, dh, z, t):
    """dz = dh * 0.5 * (1 + t + C z (1 + 3K z^2)(1 - t^2))."""
    g = np.multiply(z, z)
    g *= 3.0 * GELU_K
    g += 1.0
    g *= GELU_C
    g *= z
    s = np.multiply(t, t)
    np.subtract(1.0, s, out=s)
    g *= s
    g += 1.0
    g += t
    g *= 0.5
    g *= dh
    return g


def numpy_gelu_step(np, z, dh):
    def step():
        a, t = gelu_fwd(np, z)
        return gelu_bwd(np, dh, z, t)
    return step


# ================================================================================== contenders (workers)


class NumpyTP:
    """The TP layers written plainly with NumPy; allreduce is a function (mpi4py's, or nothing at p=1).
    prealloc: single-layer outputs go to preallocated buffers (np.matmul(out=)), as the compute-limit
    baseline does; the mpi4py version allocates like a plain script."""

    def __init__(self, p, r, allreduce, barrier, prealloc=False):
        import numpy as np
        self.np, self.p, self.r, self.prealloc = np, p, r, prealloc
        self.allreduce, self.barrier = allreduce, barrier
        self.rng = np.random.default_rng(1234 + r)

    def _w(self, out, inn):
        np = self.np
        return (self.rng.random((out, inn), dtype=np.float32) - 0.5) * (2.0 / math.sqrt(inn))

    def _x(self, b, n):
        return self.rng.standard_normal((b, n), dtype=self.np.float32)

    def build(self, case):
        np, p = self.np, self.p
        b, kind, _, _ = CASES[case]
        if kind == "row_fwd" or kind == "row_gemm":
            w, bias, x = self._w(H, H // p), np.zeros(H, np.float32), self._x(b, H // p)
            if self.prealloc:
                return self._prealloc_linear(x, w, bias, kind == "row_fwd")
            reduce = self.allreduce if kind == "row_fwd" else (lambda a: None)

            def step():                          # row_gemm: the same without the all-reduce
                y = x @ w.T
                reduce(y)
                y += bias
                return y
            return step
        if kind == "col_fwd":
            w, bias, x = self._w(H // p, H), np.zeros(H // p, np.float32), self._x(b, H)
            if self.prealloc:
                return self._prealloc_linear(x, w, bias, False)
            return lambda: x @ w.T + bias
        if kind == "allreduce":
            buf = self._x(b, H)
            return lambda: self.allreduce(buf)
        if kind == "gelu":
            return numpy_gelu_step(np, self._x(b, FF // p), self._x(b, FF // p))
        if kind == "mlp":
            w1, b1 = self._w(FF // p, H), np.zeros(FF // p, np.float32)
            w2, b2 = self._w(H, FF // p), np.zeros(H, np.float32)
            g1, gb1, g2, gb2 = (np.zeros_like(a) for a in (w1, b1, w2, b2))
            x, dy = self._x(b, H), self._x(b, H)

            def step():
                z = x @ w1.T + b1                    # column forward
                a, t = gelu_fwd(np, z)
                y = a @ w2.T                         # row forward
                self.allreduce(y)
                y += b2
                da = dy @ w2                         # row backward (no collective)
                np.add(g2, dy.T @ a, out=g2)
                np.add(gb2, dy.sum(axis=0), out=gb2)
                dz = gelu_bwd(np, da, z, t)
                dx = dz @ w1                         # column backward: all-reduce dX
                self.allreduce(dx)
                np.add(g1, dz.T @ x, out=g1)
                np.add(gb1, dz.sum(axis=0), out=gb1)
                return y, dx
            return step
        raise ValueError(case)

    def build_pair(self, b):
        """(GEMM alone, row forward) on the same weight and input."""
        np, p = self.np, self.p
        w, bias, x = self._w(H, H // p), np.zeros(H, np.float32), self._x(b, H // p)
        if self.prealloc:
            return self._prealloc_linear(x, w, bias, False), self._prealloc_linear(x, w, bias, True)

        def make(reduce):
            def step():
                y = x @ w.T
                reduce(y)
                y += bias
                return y
            return step
        return make(lambda a: None), make(self.allreduce)

    def _prealloc_linear(self, x, w, bias, reduce):
        np = self.np
        y = np.empty((x.shape[0], w.shape[0]), np.float32)
        wt = w.T

        def step():
            np.matmul(x, wt, out=y)
            if reduce:
                self.allreduce(y)
            np.add(y, bias, out=y)
            return y
        return step


class TplinearTP:
    def __init__(self, dtype="float32"):
        import numpy as np
        import tplinear as tp
        import tplinear.distributed as dist
        self.np, self.tp, self.dist = np, tp, dist
        self.dtype, self.dt = dtype, np_dtype(dtype)
        tp.set_training_mode(True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ:
            dist.init_process_group()
        self.p, self.r = dist.get_world_size(), dist.get_rank()
        self.rng = np.random.default_rng(1234 + self.r)
        self.barrier = dist.barrier
        self._check()

    def _x(self, b, n):
        return self.rng.standard_normal((b, n), dtype=self.np.float32).astype(self.dt, copy=False)

    def _check(self):
        """Untimed sanity check at the decode shape: the TP row and column layers equal the full layer."""
        np, tp, p, r, dt = self.np, self.tp, self.p, self.r, self.dtype
        x = np.random.default_rng(7).standard_normal((B_DEC, H), dtype=np.float32).astype(self.dt)
        full = tp.Linear(H, H, seed=3, dtype=dt)

        def f64(a):
            return np.asarray(a).astype(np.float64)
        ref = f64(x) @ f64(full.weight.data).T + f64(full.bias.data)
        row = tp.LinearAllreduce.from_init(H, H, seed=3, dtype=dt)
        y = f64(row(np.ascontiguousarray(x[:, r * H // p:(r + 1) * H // p])))
        col = tp.LinearLayer.from_init(H, H, seed=3, dtype=dt)
        yc = f64(col(x))
        e1 = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        refc = ref[:, r * H // p:(r + 1) * H // p]
        e2 = np.linalg.norm(yc - refc) / np.linalg.norm(refc)
        tol = 1e-5 if dt == "float32" else 1e-2  # half: the output's rounding, <= 2^-8 (a lost shard errs by O(1))
        if not (e1 < tol and e2 < tol):
            raise RuntimeError(f"tplinear result check failed: row rel err {e1:.2e}, column rel err {e2:.2e}")

    def build(self, case):
        np, tp, dist, p, dt = self.np, self.tp, self.dist, self.p, self.dtype
        f32, half = np.float32, self.dt  # float32: every astype(..., copy=False) below is a no-op
        b, kind, _, _ = CASES[case]
        if kind == "row_fwd":
            layer, x = tp.LinearAllreduce.from_init(H, H, seed=0, dtype=dt), self._x(b, H // p)
            return lambda: layer(x)
        if kind == "row_gemm":
            lin, x = tp.Linear(H // p, H, seed=0, dtype=dt), self._x(b, H // p)
            return lambda: lin(x)
        if kind == "col_fwd":
            layer, x = tp.LinearLayer.from_init(H, H, seed=0, dtype=dt), self._x(b, H)
            return lambda: layer(x)
        if kind == "allreduce":
            buf = self._x(b, H)
            return lambda: dist.all_reduce(buf)
        if kind == "gelu":
            z, dh = self._x(b, FF // p), self._x(b, FF // p)

            def gelu():  # half: in float32, cast in and out, as in the MLP
                z32 = z.astype(f32, copy=False)
                a, t = gelu_fwd(np, z32)
                return a.astype(half, copy=False), gelu_bwd(np, dh.astype(f32, copy=False), z32, t).astype(half, copy=False)
            return gelu
        if kind == "mlp":
            col = tp.LinearLayer.from_init(H, FF, seed=1, dtype=dt)
            row = tp.LinearAllreduce.from_init(FF, H, seed=2, dtype=dt)
            x, dy = self._x(b, H), self._x(b, H)

            def step():
                z = col(x).astype(f32, copy=False)
                a, t = gelu_fwd(np, z)
                y = row(a.astype(half, copy=False))
                da = row.backward(dy).astype(f32, copy=False)
                dz = gelu_bwd(np, da, z, t)
                dx = col.backward(dz.astype(half, copy=False))
                return y, dx
            return step
        raise ValueError(case)

    def build_pair(self, b):
        """(GEMM alone, row forward) on the same weight and input: a plain Linear sharing the shard."""
        tp = self.tp
        layer, x = tp.LinearAllreduce.from_init(H, H, seed=0, dtype=self.dtype), self._x(b, H // self.p)
        lin = tp.Linear(H // self.p, H, seed=0, dtype=self.dtype)
        lin.weight.data, lin.bias.data = layer.weight.data, layer.bias.data
        return (lambda: lin(x)), (lambda: layer(x))

    def close(self):
        if self.p > 1:
            self.dist.destroy_process_group()


class DeepSpeedTP:
    def __init__(self, threads):
        import torch
        torch.set_num_threads(threads)
        import deepspeed
        from deepspeed.module_inject import layers as L
        import deepspeed.comm as dscomm
        self.torch, self.L = torch, L
        L.set_autotp_mode(training=True)       # training mode: dist.all_reduce over the process group (gloo)
        deepspeed.init_distributed(dist_backend="gloo")
        self.p, self.r = torch.distributed.get_world_size(), torch.distributed.get_rank()
        self.group = dscomm.new_group(list(range(self.p))) if self.p > 1 else None
        self.gen = torch.Generator().manual_seed(1234 + self.r)
        self.barrier = torch.distributed.barrier
        self.versions = {"torch": torch.__version__, "deepspeed": deepspeed.__version__}

    def _linear(self, inn, out):
        torch = self.torch
        lin = torch.nn.utils.skip_init(torch.nn.Linear, inn, out)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(inn)
            lin.weight.uniform_(-bound, bound, generator=self.gen)
            lin.bias.uniform_(-bound, bound, generator=self.gen)
        return lin

    def _x(self, b, n):
        return self.torch.randn((b, n), generator=self.gen)

    def build(self, case):
        torch, L, p = self.torch, self.L, self.p
        b, kind, _, _ = CASES[case]
        if kind == "row_fwd":
            layer, x = L.LinearAllreduce(self._linear(H, H), self.group), self._x(b, H // p)

            def step():
                with torch.no_grad():
                    return layer(x)
            return step
        if kind == "row_gemm":
            lin, x = self._linear(H // p, H), self._x(b, H // p)

            def step():
                with torch.no_grad():
                    return lin(x)
            return step
        if kind == "col_fwd":
            layer, x = L.LinearLayer(self._linear(H, H), self.group), self._x(b, H)

            def step():
                with torch.no_grad():
                    return layer(x)
            return step
        if kind == "allreduce":
            buf = self._x(b, H)
            if p == 1:
                return lambda: buf
            return lambda: torch.distributed.all_reduce(buf, group=self.group)
        if kind == "gelu":
            z = self._x(b, FF // p).requires_grad_(True)
            dh = self._x(b, FF // p)

            def step():
                a = torch.nn.functional.gelu(z, approximate="tanh")
                a.backward(dh)
                z.grad = None
                return a
            return step
        if kind == "mlp":
            col = L.LinearLayer(self._linear(H, FF), self.group)
            row = L.LinearAllreduce(self._linear(FF, H), self.group)
            x = self._x(b, H).requires_grad_(True)
            dy = self._x(b, H)
            gelu = torch.nn.functional.gelu

            def step():
                y = row(gelu(col(x), approximate="tanh"))
                y.backward(dy)
                return y
            return step
        raise ValueError(case)

    def build_pair(self, b):
        """(GEMM alone, row forward) on the same weight and input."""
        torch, F = self.torch, self.torch.nn.functional
        layer, x = self.L.LinearAllreduce(self._linear(H, H), self.group), self._x(b, H // self.p)

        def gemm():
            with torch.no_grad():
                return F.linear(x, layer.weight, layer.bias)

        def fwd():
            with torch.no_grad():
                return layer(x)
        return gemm, fwd

    def close(self):
        self.torch.distributed.destroy_process_group()


def run_worker(args):
    """One rank: build each case, warm up, time steps (barrier before each), write raw times."""
    n = cores()
    meta = {"pid": os.getpid()}
    if args.worker == "numpy":
        impl = NumpyTP(1, 0, lambda a: None, lambda: None, prealloc=True)
        meta["ws"], meta["rank"] = 1, 0
    elif args.worker == "mpi4py":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD

        def allreduce(a):
            comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        impl = NumpyTP(comm.size, comm.rank, allreduce, comm.Barrier)
        meta["ws"], meta["rank"] = comm.size, comm.rank
        meta["mpi"] = MPI.Get_library_version().splitlines()[0]
    elif args.worker == "tplinear":
        impl = TplinearTP(args.dtype[0])
        meta["ws"], meta["rank"] = impl.p, impl.r
        meta["blas_threads_tplinear"] = impl.tp.get_num_threads()
        meta["backend"] = impl.dist.get_backend() if impl.p > 1 else "single"
    elif args.worker == "deepspeed":
        ws = int(os.environ.get("WORLD_SIZE", "1"))
        impl = DeepSpeedTP(max(1, n // ws))
        meta["ws"], meta["rank"] = impl.p, impl.r
        meta["torch_threads"] = impl.torch.get_num_threads()
        meta.update(impl.versions)
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    try:
        from threadpoolctl import threadpool_info
        meta["threadpools"] = [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
                               for d in threadpool_info()]
    except Exception:  # noqa: BLE001 - threadpoolctl is optional
        pass
    scale = args.reps_scale
    out = {"meta": meta, "cases": {}, "starts": {}}
    for case in args.cases.split(","):
        if impl.p == 1 and case.startswith("ar_"):
            continue
        _, _, warm, reps = CASES[case]
        reps = max(2, int(round(reps * scale)))
        if CASES[case][1] == "row_pair":
            # GEMM alone and the full row forward alternately, each after a barrier: the per-step
            # difference is the communication overhead, free of slow drifts on a shared machine
            b = CASES[case][0]
            fg, ff = impl.build_pair(b)
            tg, tf, sg, sf = [], [], [], []
            for i in range(warm + reps):
                for f, acc, st in ((fg, tg, sg), (ff, tf, sf)):
                    impl.barrier()
                    t0 = time.perf_counter()
                    f()
                    if i >= warm:
                        acc.append(time.perf_counter() - t0)
                        st.append(t0)
            out["cases"][case + "_gemm"], out["cases"][case + "_fwd"] = tg, tf
            out["starts"][case + "_gemm"], out["starts"][case + "_fwd"] = sg, sf
            del fg, ff
            gc.collect()
            continue
        step = impl.build(case)
        for _ in range(warm):
            impl.barrier()
            step()
        times, starts = [], []
        for _ in range(reps):
            impl.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            starts.append(t0)
        out["cases"][case], out["starts"][case] = times, starts
        del step
        gc.collect()
    impl.barrier()
    path = os.path.join(args.outdir, f"{args.worker}-ws{meta['ws']}-r{meta['rank']}.json")
    with open(path, "w") as f:
        json.dump(out, f)
    if hasattr(impl, "close"):
        impl.close()


# ================================================================================== driver


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux >= 4.0: clear_refs 5); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mpirun_cmd(nproc):
    """`mpirun -np nproc` with Open MPI's flags for a small shared box (ranks may outnumber the cores, are
    not pinned, and may run as root), or None when there is no mpirun."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return None
    cmd = [mpirun, "-np", str(nproc)]
    if "Open MPI" in subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout:
        cmd += ["--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return cmd


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_cmd(contender, ws, args, outdir, dtype="float32"):
    """The command line and environment of one subprocess world, or (None, reason) when unavailable."""
    me = os.path.abspath(__file__)
    wargs = ["--worker", contender, "--outdir", outdir, "--cases", args.cases, "--reps-scale", str(args.reps_scale),
             "--dtype", dtype]
    env = dict(os.environ)
    n = cores()
    threads = str(max(1, n // ws))
    if contender == "numpy":
        return [args.python, me] + wargs, env, None
    if contender == "tplinear":
        probe = subprocess.run([args.python, "-c", "import tplinear, tplinear.distributed"], capture_output=True,
                               text=True, env=env)
        if probe.returncode != 0:
            return None, None, "skipped: tplinear not importable: " + probe.stderr.strip().splitlines()[-1]
        if ws == 1:
            return [args.python, me] + wargs, env, None
        has_run = subprocess.run([args.python, "-c", "import tplinear.run"], capture_output=True, env=env)
        if has_run.returncode != 0:
            return None, None, "skipped: tplinear.run (the launcher) is not available in this build"
        env["MASTER_PORT"] = str(free_port())
        return [args.python, "-m", "tplinear.run", "--nproc-per-node", str(ws),
                "--master-port", env["MASTER_PORT"], me] + wargs, env, None
    if contender == "mpi4py":
        mpirun = mpirun_cmd(ws)
        if mpirun is None:
            return None, None, "skipped: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"
        probe = subprocess.run([args.python, "-c", "import mpi4py.MPI"], capture_output=True, text=True)
        if probe.returncode != 0:
            return None, None, "skipped: mpi4py not importable: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
        env["OPENBLAS_NUM_THREADS"] = threads
        return mpirun + ["-x", "OPENBLAS_NUM_THREADS", args.python, me] + wargs, env, None
    if contender == "deepspeed":
        py = args.ds_python
        if not py or not os.path.exists(py):
            return None, None, f"skipped: no Python with deepspeed (--ds-python {py!r} not found)"
        probe = subprocess.run([py, "-c", "import torch, deepspeed.module_inject.layers"], capture_output=True,
                               text=True, env=env)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return None, None, f"skipped: torch/deepspeed not importable with {py}: {last}"
        env["OMP_NUM_THREADS"] = threads
        env.setdefault("DS_ACCELERATOR", "cpu")
        return [py, "-m", "torch.distributed.run", "--nproc-per-node", str(ws), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), me] + wargs, env, None
    raise ValueError(contender)


def cpu_busy_s():
    """Non-idle CPU seconds of the whole machine so far (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_world(contender, ws, args, tmp, dtype="float32"):
    outdir = os.path.join(tmp, f"{dtype_key(contender, dtype)}-ws{ws}")
    os.makedirs(outdir, exist_ok=True)
    cmd, env, skip = worker_cmd(contender, ws, args, outdir, dtype)
    if skip:
        return {"status": skip}
    t0 = time.time()
    busy0, ours0 = cpu_busy_s(), children_cpu_s()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=tmp)
    except subprocess.TimeoutExpired as exc:
        return {"status": f"failed: timed out after {args.timeout} s", "command": " ".join(cmd),
                "stderr_tail": (exc.stderr or "")[-2000:] if isinstance(exc.stderr, str) else ""}
    wall = time.time() - t0
    # CPU time other processes on this machine used while the world ran (a noise indicator)
    foreign = max(0.0, (cpu_busy_s() - busy0) - (children_cpu_s() - ours0))
    noise = {"foreign_cpu_s": round(foreign, 1), "foreign_cpu_frac": round(foreign / (wall * cores()), 3),
             "loadavg_after": os.getloadavg()[0]}
    ranks = []
    for r in range(ws):
        path = os.path.join(outdir, f"{contender}-ws{ws}-r{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                ranks.append(json.load(f))
    if proc.returncode != 0 or len(ranks) != ws:
        tail = (proc.stderr or proc.stdout or "")[-3000:]
        return {"status": f"failed: exit {proc.returncode}, {len(ranks)}/{ws} ranks wrote results",
                "command": " ".join(cmd), "stderr_tail": tail}
    res = {"status": "ok", "wall_s": round(wall, 1), "command": " ".join(cmd), "noise": noise,
           "meta": [rk["meta"] for rk in ranks], "cases": {}}
    for case in ranks[0]["cases"]:
        per_rank = [rk["cases"][case] for rk in ranks]
        # the step's time: from the first rank leaving the barrier to the last rank finishing (perf_counter is
        # CLOCK_MONOTONIC, one clock for every process of the host). With more ranks than cores a rank can
        # be descheduled right after the barrier, so its own duration alone would miss that wait.
        starts = [rk.get("starts", {}).get(case) for rk in ranks]
        max_rank = [max(vals) for vals in zip(*per_rank)]
        if all(starts):
            steps = [max(t + d for t, d in zip(ts, ds)) - min(ts)
                     for ts, ds in zip(zip(*starts), zip(*per_rank))]
        else:
            steps = max_rank
        res["cases"][case] = dict(stats(steps), steps_s=steps, median_max_rank_s=stats(max_rank)["median_s"])
    for pair in ("dec_row_pair", "row_pair"):
        pg, pf = res["cases"].get(pair + "_gemm"), res["cases"].get(pair + "_fwd")
        if pg and pf:
            diffs = [f - g for f, g in zip(pf["steps_s"], pg["steps_s"])]
            res["cases"][pair + "_overhead"] = dict(stats(diffs), steps_s=diffs)
    return res


def stats(steps):
    srt = sorted(steps)
    n = len(srt)
    return {"median_s": srt[n // 2] if n % 2 else 0.5 * (srt[n // 2 - 1] + srt[n // 2]), "min_s": srt[0],
            "max_s": srt[-1], "reps": n}


def merge_rounds(rounds):
    """Several rounds of one world: per case, the round with the lowest median (the least disturbed by other
    processes on the machine); every round's median is kept."""
    ok = [r for r in rounds if r.get("status") == "ok"]
    if not ok:
        return rounds[0]
    out = dict(ok[0])
    out["rounds"] = len(rounds)
    out["noise"] = [r.get("noise") for r in rounds]
    out["cases"] = {}
    for case in ok[0]["cases"]:
        if case.endswith("_overhead"):  # a difference, not a time: pool the steps of every round
            steps = [v for r in ok if case in r["cases"] for v in r["cases"][case]["steps_s"]]
            out["cases"][case] = dict(stats(steps), steps_s=steps,
                                      round_medians_s=[r["cases"][case]["median_s"] for r in ok if case in r["cases"]])
            continue
        best = min((r["cases"][case] for r in ok if case in r["cases"]), key=lambda c: c["median_s"])
        out["cases"][case] = dict(best, round_medians_s=[r["cases"][case]["median_s"] for r in ok if case in r["cases"]])
    return out


def machine_info(args):
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cores": cores()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache",
                             "L3 cache", "Hypervisor vendor"):
                info[k.strip()] = v.strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["MemTotal"] = f.readline().split(":")[1].strip()
    except OSError:
        pass
    probe = subprocess.run([args.python, "-c", "import scipy_openblas32, numpy; "
                            "print(scipy_openblas32.get_openblas_config()); print(numpy.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        lines = probe.stdout.strip().splitlines()
        info["tplinear_openblas"] = lines[0]
        info["numpy"] = lines[-1]
    probe = subprocess.run([args.python, "-c", "from threadpoolctl import threadpool_info; import numpy; "
                            "print([d['version'] + ' ' + str(d.get('architecture')) for d in threadpool_info()])"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        info["numpy_openblas"] = probe.stdout.strip()
    info["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                                   "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return info


def fmt_t(s):
    if s is None:
        return "—"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def med(results, contender, ws, case):
    r = results.get(contender, {}).get(str(ws), {})
    c = r.get("cases", {}).get(case) if r.get("status") == "ok" else None
    return None if c is None else c["median_s"]


def derive(results, world_sizes):
    """The issue's targets, as ratios from this run."""
    d = {}
    base_row = med(results, "numpy", 1, "row_fwd")
    tp_row1 = med(results, "tplinear", 1, "row_fwd")
    tp_row2 = med(results, "tplinear", 2, "row_fwd")
    if base_row and tp_row2:
        d["row_fwd_2ranks_over_numpy_full"] = {"value": tp_row2 / base_row, "target": "<= 1.15",
                                               "met": tp_row2 / base_row <= 1.15}
    if tp_row1 and tp_row2:
        d["row_fwd_2ranks_over_tplinear_1rank"] = {"value": tp_row2 / tp_row1, "target": "(info: same BLAS)"}
    for who in ("tplinear", "mpi4py", "deepspeed"):
        o = med(results, who, 2, "row_pair_overhead")
        if o is not None:
            d[f"row_fwd_comm_overhead_2ranks_{who}"] = {"value_us": o * 1e6, "paired_us": o * 1e6}
    for key in results:  # issue 27: tplinear's half dtypes over its float32, same run, 2 ranks
        dt = key[len("tplinear-"):] if key.startswith("tplinear-") else None
        for case in MAIN_CASES if dt else []:
            t32, th = med(results, "tplinear", 2, case), med(results, key, 2, case)
            if t32 and th:
                item = {"value": t32 / th, "target": "(info: float32 time / this time)"}
                if case == "dec_mlp_fwdbwd" and dt == "bfloat16":
                    item.update(target=">= 1.7", met=t32 / th >= 1.7)
                d[f"{case}_2ranks_{dt}_speedup_over_float32"] = item
    tp_mlp2 = med(results, "tplinear", 2, "mlp_fwdbwd")
    ds_mlp2 = med(results, "deepspeed", 2, "mlp_fwdbwd")
    mpi_mlp2 = med(results, "mpi4py", 2, "mlp_fwdbwd")
    if tp_mlp2 and ds_mlp2:
        d["mlp_2ranks_speedup_over_deepspeed"] = {"value": ds_mlp2 / tp_mlp2, "target": ">= 2", "met": ds_mlp2 / tp_mlp2 >= 2}
    if tp_mlp2 and mpi_mlp2:
        d["mlp_2ranks_speedup_over_mpi4py"] = {"value": mpi_mlp2 / tp_mlp2, "target": ">= 1.5",
                                               "met": mpi_mlp2 / tp_mlp2 >= 1.5}
    for who in ("tplinear", "mpi4py", "deepspeed"):
        f, g = med(results, who, 2, "dec_row_fwd"), med(results, who, 2, "dec_row_gemm")
        paired = med(results, who, 2, "dec_row_pair_overhead")
        ar = med(results, who, 2, "ar_dec")
        if (f and g) or paired is not None:
            item = {}
            if f and g:
                item.update(diff_of_medians_us=(f - g) * 1e6, row_fwd_us=f * 1e6, gemm_only_us=g * 1e6)
            if paired is not None:
                item["paired_us"] = paired * 1e6
            if ar:
                item["allreduce_alone_us"] = ar * 1e6
            item["value_us"] = item.get("paired_us", item.get("diff_of_medians_us"))
            if who == "tplinear":
                item.update(target="<= 50 µs", met=item["value_us"] <= 50)
            d[f"decode_comm_overhead_2ranks_{who}"] = item
    return d


def markdown(report):
    res, wss = report["results"], report["config"]["world_sizes"]
    lines = [f"Command: `{report['command']}`  ", f"Date: {report['date']}  ",
             f"Machine: {report['machine'].get('Model name', '?')}, {report['machine']['cores']} cores; "
             f"dtypes: {', '.join(report['config'].get('dtypes', ['float32']))}; "
             "median over steps of (last rank done − first rank out of the barrier).", ""]
    head = "| case | contender | " + " | ".join(f"p={w}" for w in wss) + " |"
    lines += [head, "|" + "---|" * (2 + len(wss))]
    for case in MAIN_CASES + AUX_CASES:
        if not any(case in r.get("cases", {}) for per in res.values() for r in per.values()):
            continue
        for who in res:
            cells = []
            for w in wss:
                if who == "numpy" and w != 1:
                    cells.append("")
                    continue
                r = res[who].get(str(w))
                if r is None:
                    cells.append("")
                elif r.get("status") != "ok":
                    cells.append("skip" if r["status"].startswith("skipped") else "fail")
                else:
                    cells.append(fmt_t(med(res, who, w, case)) if case in r["cases"] else "")
            if any(cells):
                name = "numpy (full layer, 1 process)" if who == "numpy" else who
                lines.append(f"| {LABELS[case]} | {name} | " + " | ".join(cells) + " |")
    notes = []
    for who in res:
        for w, r in sorted(res[who].items()):
            if r.get("status") != "ok":
                notes.append(f"- {who} p={w}: {r['status']}")
    if notes:
        lines += ["", "Not measured:", ""] + notes
    fr = [n.get("foreign_cpu_frac", 0) for per in res.values() for r in per.values() if r.get("status") == "ok"
          for n in (r["noise"] if isinstance(r.get("noise"), list) else [r.get("noise") or {}]) if n]
    if fr:
        lines += ["", f"Noise: other processes on the machine used {min(fr):.0%}–{max(fr):.0%} of the CPUs while the "
                  f"worlds ran (median {sorted(fr)[len(fr) // 2]:.0%}); rounds: {report['config']['rounds']}, "
                  f"nice: {report['config']['nice']}."]
    lines += ["", "Targets (issue 6 item 3; issue 27 item 5: half dtypes over float32):", ""]
    for k, v in report["derived"].items():
        if "value" in v:
            s = f"- {k}: {v['value']:.2f} (target {v['target']})"
        else:
            parts = []
            if "paired_us" in v:
                parts.append(f"median of paired per-step differences {v['paired_us']:.0f} µs")
            if "diff_of_medians_us" in v:
                parts.append(f"row fwd {v['row_fwd_us']:.0f} µs − GEMM only {v['gemm_only_us']:.0f} µs = "
                             f"{v['diff_of_medians_us']:.0f} µs")
            if "allreduce_alone_us" in v:
                parts.append(f"all-reduce alone {v['allreduce_alone_us']:.0f} µs")
            s = (f"- {k}: {v['value_us']:.0f} µs ({'; '.join(parts)})"
                 + (f" (target {v['target']})" if "target" in v else ""))
        if "met" in v:
            s += " — **met**" if v["met"] else " — **missed**"
        lines.append(s)
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res, wss = report["results"], report["config"]["world_sizes"]
    cases = [c for c in MAIN_CASES if c in report["config"]["cases"]]
    cols = 3
    rows = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    style = {"tplinear": ("C0", "o"), "mpi4py": ("C1", "s"), "deepspeed": ("C2", "^"),
             "tplinear-bfloat16": ("C3", "D"), "tplinear-float16": ("C4", "v")}
    for ax, case in zip(axes.flat, cases):
        for who, (color, marker) in style.items():
            pts = [(w, med(res, who, w, case)) for w in wss]
            pts = [(w, t * 1e3) for w, t in pts if t]
            if pts:
                ax.plot([w for w, _ in pts], [t for _, t in pts], marker=marker, color=color, label=who)
        base = med(res, "numpy", 1, case)
        if base:
            ax.axhline(base * 1e3, color="k", ls="--", lw=1, label="NumPy full layer, 1 proc")
        ax.set_title(LABELS[case], fontsize=9)
        ax.set_xlabel("world size (ranks)")
        ax.set_ylabel("ms (median step)")
        ax.set_xticks(wss)
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.suptitle(f"tplinear vs alternatives, {', '.join(report['config'].get('dtypes', ['float32']))}, "
                 f"{report['machine'].get('Model name', '')}, "
                 f"{report['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the full report (medians, raw steps, ratios) here")
    ap.add_argument("--md", help="write the Markdown table here")
    ap.add_argument("--plot", help="write the PNG plot here")
    ap.add_argument("--world-sizes", default="1,2,4")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--cases", default=",".join(RUN_ORDER))
    ap.add_argument("--reps-scale", type=float, default=1.0, help="multiply every case's timed step count")
    ap.add_argument("--python", default=sys.executable, help="Python with tplinear, numpy, mpi4py")
    ap.add_argument("--ds-python", default=os.environ.get("TPLINEAR_BENCH_DS_PYTHON", "/tmp/venv-ds/bin/python"),
                    help="Python with torch + deepspeed (a separate environment)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every world this many times, interleaved; per case the least disturbed round counts")
    ap.add_argument("--nice", type=int, default=0, help="scheduling niceness of the benchmark (e.g. -5 on a shared box)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per subprocess world")
    add_dtype_arg(ap)
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(CASES)}")
    if args.worker:
        return run_worker(args)

    wss = [int(w) for w in args.world_sizes.split(",")]
    contenders = args.contenders.split(",")
    report = {"command": " ".join(["python", os.path.relpath(__file__, os.getcwd())] + sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine_info(args),
              "config": {"world_sizes": wss, "cases": args.cases.split(","), "reps_scale": args.reps_scale,
                         "dtypes": args.dtype,
                         "rounds": args.rounds, "nice": args.nice,
                         "case_defs": {k: {"batch": v[0], "kind": v[1], "warmup": v[2], "reps": v[3]}
                                       for k, v in CASES.items()}},
              "results": {}}
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every world; same for all contenders
    runs = {}
    with tempfile.TemporaryDirectory(prefix="tplinear-bench-") as tmp:
        for rnd in range(args.rounds):
            for who in contenders:
                # mpi4py at p=1 is the NumPy row (same code, no collective); it is not run again
                for ws, dt in [(ws, dt) for ws in ([1] if who == "numpy" else
                                                   [w for w in wss if not (who == "mpi4py" and w == 1)])
                               for dt in (args.dtype if who == "tplinear" else ["float32"])]:
                    t0 = time.time()
                    r = run_world(who, ws, args, os.path.join(tmp, f"round{rnd}"), dt)
                    runs.setdefault(dtype_key(who, dt), {}).setdefault(str(ws), []).append(r)
                    noise = r.get("noise", {})
                    print(f"[bench] round {rnd + 1}/{args.rounds} {dtype_key(who, dt):9s} p={ws}: {r['status']} "
                          f"({time.time() - t0:.0f} s, other processes used {noise.get('foreign_cpu_frac', 0):.0%}"
                          " of the CPUs)", file=sys.stderr, flush=True)
                    if r["status"].startswith("failed"):
                        print(r.get("stderr_tail", ""), file=sys.stderr)
    report["results"] = {who: {ws: merge_rounds(rs) for ws, rs in per.items()} for who, per in runs.items()}
    report["derived"] = derive(report["results"], wss)
    save_report(report, markdown(report), plot, args, "bench")


def save_report(report, md, plot_fn, args, tag):
    """Prints the Markdown and writes what --json / --md / --plot ask for (no plot without matplotlib)."""
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.plot:
        try:
            plot_fn(report, args.plot)
        except ImportError as exc:
            print(f"[{tag}] no plot: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
