"""Collectives against the memory-bandwidth limit (issue 16): all_reduce, reduce_scatter and all_gather of
4 KB .. 64 MB (float32) at 2 and 4 ranks, tplinear's shm backend against OpenMPI (mpi4py), torch gloo and
DeepSpeed's shm all-reduce, next to a STREAM copy / triad bandwidth measured in the same run; and tplinear's
mpi backend against mpi4py on the same MPI (issue 14: within 5 % at every size).

    python benchmarks/allreduce.py [--json out.json] [--md out.md] [--plot out.png] [--nproc 2 4]
                                   [--rounds 2] [--dtype float32 bfloat16 float16]
                                   [--contenders tplinear,tplinear-copying,mpi4py,gloo,deepspeed,tplinear-mpi]

Contenders, each started as its own subprocess world, interleaved round by round:
    tplinear          tplinear.distributed (`python -m tplinear.run`), algorithms chosen by size (single copy
                      where the kernel allows process_vm_readv/writev)
    tplinear-copying  the same with TPLINEAR_SHM_CMA=0: the copying algorithms (main's before issue 16, and
                      the fallback where the kernel refuses single-copy access)
    mpi4py            OpenMPI (`mpirun`): Allreduce(IN_PLACE), Reduce_scatter_block, Allgather on NumPy arrays
    tplinear-mpi      tplinear.distributed started by the same `mpirun`: the mpi backend (chosen automatically
                      under an MPI launcher) on the same libmpi as mpi4py. benchmarks/mpi_allreduce.py times
                      the two all-reduces alternating inside one world, the finer instrument for the 5 %
    gloo              torch.distributed with the gloo backend (torchrun): all_reduce, reduce_scatter_tensor,
                      all_gather_into_tensor on CPU tensors
    deepspeed         DeepSpeed's shared-memory all-reduce for CPUs: deepspeed.comm.inference_all_reduce after
                      deepspeed.init_distributed("gloo") on the CPU accelerator (torchrun, LOCAL_SIZE set: the
                      op is compiled on first use, the `deepspeed_shm_comm` extension). All-reduce only.
A contender that cannot run (or a collective it lacks) is reported as skipped with the reason.

dtypes (issue 27): every world runs each --dtype in turn at every size (the same bytes, size / itemsize
elements); bytes/s of a half dtype over float32's at the same size, same world, are among the derived ratios.
mpi4py: float32 only (MPI has no bfloat16 datatype).

Sizes are nccl-tests' "size": the all-reduce's buffer, the reduce-scatter's input (p blocks), the
all-gather's output (p blocks). Each rank times back-to-back calls (after 3 warm-up calls and an agreed
number of timed calls, about --budget seconds per size); a cell's time is the slowest rank's median; with
--rounds N the round with the lowest time counts (noise from other processes only adds time) and every
round's value is kept in the JSON.

STREAM: in the tplinear world, before its collectives, the ranks run the STREAM copy (c = a) and triad
(a = b + s*c) kernels on their own arrays of the collective's size, one rank per core at the same time (a
tiny C loop compiled here with `cc`; NumPy's copy when there is no compiler); their summed bandwidth
divided by p is what each rank gets (counted as STREAM does: 2 / 3 arrays per element, no write-allocate).
Fraction of STREAM = the bytes an ideal collective must move per rank (all-reduce: read every input's
share, write every output's: 2 x size; reduce-scatter: size + size/p; all-gather: 2 x size) / time /
STREAM bandwidth.
"""
import argparse
import ctypes
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from linear import (add_dtype_arg, children_cpu_s, cores, cpu_busy_s, free_port, machine_info, mpirun_cmd,  # noqa: E402
                    np_dtype, save_report)

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20, 64 << 20]  # 32 MB: a row output
COLLS = ["all_reduce", "reduce_scatter", "all_gather"]
CONTENDERS = ["tplinear", "tplinear-copying", "mpi4py", "gloo", "deepspeed", "tplinear-mpi"]
LABEL = {"tplinear": "tplinear", "tplinear-copying": "tplinear copying (CMA=0)", "mpi4py": "OpenMPI (mpi4py)",
         "gloo": "torch gloo", "deepspeed": "DeepSpeed shm", "tplinear-mpi": "tplinear mpi backend"}
MPI_TARGET = 1.05  # issue 14: tplinear mpi time / mpi4py time at every size
STREAM_C = r"""
#include <stddef.h>
/* reps passes in one call, so that small arrays are not timed as the cost of a call from Python */
void stream_copy(float *restrict c, const float *restrict a, size_t n, int reps)
{
    for (int r = 0; r < reps; r++) {
        for (size_t i = 0; i < n; i++) c[i] = a[i];
        __asm__ volatile("" ::: "memory");
    }
}
void stream_triad(float *restrict a, const float *restrict b, const float *restrict c, float s, size_t n, int reps)
{
    for (int r = 0; r < reps; r++) {
        for (size_t i = 0; i < n; i++) a[i] = b[i] + s * c[i];
        __asm__ volatile("" ::: "memory");
    }
}
"""


def ideal_bytes(coll, size, p):
    """Bytes one rank must read + write at least (STREAM counting) for a collective of `size`."""
    return {"all_reduce": 2 * size, "reduce_scatter": size + size // p, "all_gather": 2 * size}[coll]


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ================================================================================== workers


def zeros(np, n, dtype="float32"):
    """Zeros (float32 unless dtype) in memory of their own: written, so that no page is the kernel's shared zero page (an
    untouched np.zeros array reads as if it were in cache); sums of zeros stay zeros."""
    a = np.empty(n, np_dtype(dtype))
    a.fill(0)
    return a


class Api:
    """What the timing loop needs from a framework: arrays, the collectives, a barrier, a max over ranks."""
    r = p = 0
    skip = {}  # collective -> reason it cannot run
    half = None  # the reason it cannot run bfloat16 / float16

    def barrier(self):
        raise NotImplementedError

    def max_all(self, x):
        raise NotImplementedError

    def sum_all(self, x):
        raise NotImplementedError

    def collective(self, coll, size, dtype):
        """A no-argument function running one `coll` of `size` bytes of `dtype` on preallocated arrays."""
        raise NotImplementedError


class NumpyApi(Api):
    """Frameworks on NumPy arrays: the subclass gives ar(buf), rs(send, recv), ag(send, recv)."""

    def collective(self, coll, size, dtype):
        import numpy as np
        n = size // np_dtype(dtype).itemsize
        if coll == "all_reduce":
            buf = zeros(np, n, dtype)
            return lambda: self.ar(buf)
        small = zeros(np, n // self.p, dtype)
        big = zeros(np, small.size * self.p, dtype)
        if coll == "reduce_scatter":
            return lambda: self.rs(big, small)
        return lambda: self.ag(small, big)


class TplinearApi(NumpyApi):
    def __init__(self, backend=None):
        import numpy as np
        import tplinear.distributed as dist
        dist.init_process_group(timeout=300)
        if backend and dist.get_backend() != backend:
            raise SystemExit(f"SKIP: tplinear chose the {dist.get_backend()} backend, not {backend} (built without MPI?)")
        self.np, self.dist, self.r, self.p = np, dist, dist.get_rank(), dist.get_world_size()

    def barrier(self):
        self.dist.barrier()

    def max_all(self, x, op="max"):
        a = self.np.array([x], self.np.float64)
        self.dist.all_reduce(a, op=op)
        return float(a[0])

    def sum_all(self, x):
        return self.max_all(x, op="sum")

    def ar(self, buf):
        self.dist.all_reduce(buf)

    def rs(self, send, recv):
        self.dist.reduce_scatter_tensor(recv, send)

    def ag(self, send, recv):
        self.dist.all_gather_into_tensor(recv, send)


class MpiApi(NumpyApi):
    def __init__(self):
        import numpy as np
        from mpi4py import MPI
        self.np, self.MPI, self.comm = np, MPI, MPI.COMM_WORLD
        self.r, self.p = self.comm.Get_rank(), self.comm.Get_size()
        self.half = "MPI has no bfloat16 / float16 datatype"

    def barrier(self):
        self.comm.Barrier()

    def max_all(self, x):
        return self.comm.allreduce(x, op=self.MPI.MAX)

    def sum_all(self, x):
        return self.comm.allreduce(x, op=self.MPI.SUM)

    def ar(self, buf):
        self.comm.Allreduce(self.MPI.IN_PLACE, buf)

    def rs(self, send, recv):
        self.comm.Reduce_scatter_block(send, recv)

    def ag(self, send, recv):
        self.comm.Allgather(send, recv)


class TorchApi(Api):
    def __init__(self, deepspeed):
        import torch
        import torch.distributed as tdist
        self.torch, self.tdist, self.ds = torch, tdist, None
        torch.set_num_threads(1)
        if deepspeed:
            import deepspeed as ds
            import deepspeed.comm as dscomm
            import deepspeed.comm.comm as dsimpl
            ds.init_distributed(dist_backend="gloo")
            ok = hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_")
            level = getattr(dsimpl.cdb, "shm_vector_kernel_level", 0)
            if not ok or level < 1:  # the same test inference_all_reduce makes before it falls back to gloo
                raise SystemExit(f"SKIP: DeepSpeed's shm all-reduce op is not available (op loaded: {ok}, vector "
                                 f"kernel level {level}): inference_all_reduce would fall back to gloo")
            self.ds = dscomm
            self.skip = {c: "DeepSpeed's shm op is an all-reduce only (its other collectives are torch's, i.e. "
                            "the gloo column)" for c in ("reduce_scatter", "all_gather")}
        else:
            tdist.init_process_group("gloo")
        self.r, self.p = tdist.get_rank(), tdist.get_world_size()

    def barrier(self):
        self.tdist.barrier()

    def max_all(self, x, op=None):
        t = self.torch.tensor([x], dtype=self.torch.float64)
        self.tdist.all_reduce(t, op=op or self.tdist.ReduceOp.MAX)
        return float(t[0])

    def sum_all(self, x):
        return self.max_all(x, self.tdist.ReduceOp.SUM)

    def collective(self, coll, size, dtype):
        torch, tdist = self.torch, self.tdist
        dt = getattr(torch, dtype)
        n = size // dt.itemsize
        if coll == "all_reduce":
            buf = torch.zeros(n, dtype=dt)
            if self.ds is not None:
                return lambda: self.ds.inference_all_reduce(buf)
            return lambda: tdist.all_reduce(buf)
        small = torch.zeros(n // self.p, dtype=dt)
        big = torch.zeros(small.numel() * self.p, dtype=dt)
        if coll == "reduce_scatter":
            return lambda: tdist.reduce_scatter_tensor(small, big)
        return lambda: tdist.all_gather_into_tensor(big, small)


def stream_kernels(tmp):
    """(copy, triad, how): STREAM kernels on NumPy float32 arrays; triad None when there is no C compiler."""
    import numpy as np
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        src, lib = os.path.join(tmp, "stream.c"), os.path.join(tmp, "stream.so")
        with open(src, "w") as f:
            f.write(STREAM_C)
        for flags in (["-O3", "-march=native"], ["-O3"]):
            if subprocess.run([cc, *flags, "-shared", "-fPIC", src, "-o", lib], capture_output=True).returncode == 0:
                so = ctypes.CDLL(lib)
                ptr = ctypes.c_void_p

                def copy(a, c, reps, so=so):
                    so.stream_copy(ptr(c.ctypes.data), ptr(a.ctypes.data), ctypes.c_size_t(a.size), reps)

                def triad(a, b, c, reps, so=so):
                    so.stream_triad(ptr(a.ctypes.data), ptr(b.ctypes.data), ptr(c.ctypes.data),
                                    ctypes.c_float(3.0), ctypes.c_size_t(a.size), reps)
                return copy, triad, f"C loop ({os.path.basename(cc)} {' '.join(flags)})"

    def numpy_copy(a, c, reps):
        for _ in range(reps):
            np.copyto(c, a)
    return numpy_copy, None, "numpy.copyto (no C compiler: no triad)"


def stream(api, size, copy, triad, budget):
    """STREAM copy / triad bandwidth (bytes/s) per rank on arrays of `size` bytes: as many ranks as there are
    cores stream at once, and their sum is shared by the p ranks (with more ranks than cores the ranks
    time-share the cores, and with them the memory bandwidth)."""
    import numpy as np
    active = api.r < cores()
    n = size // 4
    a, b, c = np.ones(n, np.float32), np.full(n, 2.0, np.float32), np.zeros(n, np.float32)
    inner = max(1, (256 << 10) // size)  # passes per timed call: at least 256 KB of traffic per call
    out = {}
    for name, fn, nbytes in (("copy", copy and (lambda: copy(a, c, inner)), 2 * size),
                             ("triad", triad and (lambda: triad(a, b, c, inner)), 3 * size)):
        if fn is None:
            out[name] = None
            continue
        fn()
        reps = int(api.max_all(max(5, min(2000, budget / 2 / max(1e-7, inner * nbytes / 10e9)))))
        api.barrier()
        ts = []
        for _ in range(reps if active else 0):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = api.sum_all(inner * nbytes / median(ts) if active else 0.0) / api.p
    return out


def run_worker(args):
    kind = args.worker
    if kind in ("tplinear", "tplinear-copying", "tplinear-mpi"):
        api = TplinearApi("mpi" if kind == "tplinear-mpi" else None)
    elif kind == "mpi4py":
        api = MpiApi()
    else:
        api = TorchApi(deepspeed=(kind == "deepspeed"))
    rows, streams = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        kernels = stream_kernels(tmp) if args.stream else None
        for size in SIZES:
            if kernels:
                streams[size] = dict(stream(api, size, kernels[0], kernels[1], args.budget), how=kernels[2])
            for coll, dtype in [(c, d) for c in COLLS for d in args.dtype]:
                why = api.skip.get(coll) or (api.half if dtype != "float32" else None)
                if why:
                    rows.append({"coll": coll, "bytes": size, "dtype": dtype, "skipped": why})
                    continue
                try:
                    fn = api.collective(coll, size, dtype)
                    for _ in range(3):
                        fn()
                except Exception as exc:  # e.g. a backend without this collective
                    rows.append({"coll": coll, "bytes": size, "dtype": dtype,
                                 "skipped": f"{type(exc).__name__}: {exc}"[:300]})
                    api.barrier()
                    continue
                t0 = time.perf_counter()
                fn()
                est = api.max_all(time.perf_counter() - t0)
                reps = int(max(5, min(3000, args.budget / max(est, 1e-7))))
                api.barrier()
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                rows.append({"coll": coll, "bytes": size, "dtype": dtype, "reps": reps, "median_s": api.max_all(median(ts)),
                             "rank_median_s": median(ts)})
    if api.r == 0:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "stream": {str(k): v for k, v in streams.items()}}, f)


# ================================================================================== driver


def python_has(py, code):
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def world_cmd(who, p, args, out):
    """(command, environment, None) for one world, or (None, None, reason) when it cannot run here."""
    me = os.path.abspath(__file__)
    wargs = [me, "--worker", who, "--out", out, "--budget", str(args.budget), "--dtype"] + args.dtype
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if who.startswith("tplinear"):
        why = python_has(args.python, "import tplinear.distributed, tplinear.run")
        if why:
            return None, None, f"tplinear not importable: {why}"
    if who in ("mpi4py", "tplinear-mpi"):
        mpirun = mpirun_cmd(p)
        if mpirun is None:
            return None, None, "mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"
        why = python_has(args.python, "import mpi4py.MPI") if who == "mpi4py" else None
        if why:
            return None, None, f"mpi4py not importable: {why}"
        return mpirun + [args.python] + wargs, env, None
    if who.startswith("tplinear"):
        if who == "tplinear-copying":
            env["TPLINEAR_SHM_CMA"] = "0"
        else:
            wargs.append("--stream")
        return [args.python, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(p)] + wargs, env, None
    why = python_has(args.torch_python, "import torch.distributed" + (", deepspeed.comm" if who == "deepspeed" else ""))
    if why:
        return None, None, f"{'torch/deepspeed' if who == 'deepspeed' else 'torch'} not importable with " \
                           f"{args.torch_python}: {why}"
    if who == "deepspeed":
        env.update(LOCAL_SIZE=str(p), DS_ACCELERATOR="cpu")  # LOCAL_SIZE: DeepSpeed's shm op checks it
    env["MASTER_PORT"] = str(free_port())
    return [args.torch_python, "-m", "torch.distributed.run", "--nproc-per-node", str(p), "--master-addr",
            "127.0.0.1", "--master-port", env["MASTER_PORT"]] + wargs, env, None


def remove_deepspeed_segments(port):
    """DeepSpeed 0.19's shm op leaves its buffers (66 MB per rank) in /dev/shm when the process exits; they
    are named after the world's address and port."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def run_world(who, p, args, tmp):
    out = os.path.join(tmp, f"{who}-p{p}.json")
    cmd, env, why = world_cmd(who, p, args, out)
    if why:
        return {"status": "skipped: " + why}
    t0, busy0, ours0 = time.time(), cpu_busy_s(), children_cpu_s()
    load0 = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=tmp)
    except subprocess.TimeoutExpired:
        if who == "deepspeed":
            remove_deepspeed_segments(env["MASTER_PORT"])
        return {"status": f"skipped: timed out after {args.timeout} s", "command": " ".join(cmd)}
    wall = time.time() - t0
    if who == "deepspeed":
        remove_deepspeed_segments(env["MASTER_PORT"])
    foreign = max(0.0, (cpu_busy_s() - busy0) - (children_cpu_s() - ours0))
    noise = {"foreign_cpu_frac": round(foreign / (wall * cores()), 3), "loadavg_before": load0,
             "loadavg_after": os.getloadavg()[0]}
    if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        reason = next((ln for ln in tail if ln.startswith("SKIP: ")), None) or next(
            (ln for ln in reversed(tail) if "Error" in ln and "ChildFailedError" not in ln), tail[-1] if tail else "?")
        return {"status": f"skipped: the world failed (exit {proc.returncode}): {reason[:300]}",
                "command": " ".join(cmd), "stderr_tail": "\n".join(tail[-30:])}
    with open(out) as f:
        res = json.load(f)
    return dict(res, status="ok", wall_s=round(wall, 1), noise=noise, command=" ".join(cmd))


def merge(rounds):
    """Per cell the round with the lowest time; every round's time kept."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if not ok:
        return {"status": rounds[-1]["status"], "cells": {}}
    cells = {}
    for r in ok:
        for row in r["rows"]:
            key = cell_key(row["coll"], row["bytes"], row.get("dtype", "float32"))
            cell = cells.setdefault(key, dict(row, rounds_s=[]))
            if "median_s" in row:
                cell["rounds_s"].append(row["median_s"])
                if row["median_s"] < cell["median_s"]:
                    cell.update(row, rounds_s=cell["rounds_s"])
    stream = {}
    for r in ok:
        for size, v in r.get("stream", {}).items():
            best = stream.setdefault(size, dict(v, rounds=[]))
            best["rounds"].append({k: v[k] for k in ("copy", "triad")})
            for k in ("copy", "triad"):
                if v.get(k) and (best.get(k) is None or v[k] > best[k]):
                    best[k] = v[k]
    return {"status": "ok", "cells": cells, "stream": stream, "noise": [r["noise"] for r in ok],
            "command": ok[0]["command"]}


def cell_key(coll, size, dtype):
    """A cell's name: float32's keeps its name from before the dtype axis."""
    return f"{coll}/{size}" + ("" if dtype == "float32" else f"/{dtype}")


def cell(report, who, p, coll, size, dtype="float32"):
    return report["results"].get(who, {}).get(str(p), {}).get("cells", {}).get(cell_key(coll, size, dtype), {})


def fmt_us(s):
    if s is None:
        return "—"
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} µs"


def fmt_size(b):
    return f"{b >> 20} MB" if b >= 1 << 20 else f"{b >> 10} KB"


def derive(report):
    """Fractions of STREAM, ratios to the baselines, and the issue's targets."""
    res, out = report["results"], {"cells": [], "targets": {}}
    for p in report["config"]["nproc"]:
        st = res.get("tplinear", {}).get(str(p), {}).get("stream", {})
        for coll in COLLS:
            for size in SIZES:
                c = cell(report, "tplinear", p, coll, size)
                if "median_s" not in c:
                    continue
                row = {"p": p, "coll": coll, "bytes": size, "tplinear_s": c["median_s"]}
                bw = ideal_bytes(coll, size, p) / c["median_s"]
                s = st.get(str(size), {})
                row["frac_stream_copy"] = bw / s["copy"] if s.get("copy") else None
                row["frac_stream_triad"] = bw / s["triad"] if s.get("triad") else None
                for who in CONTENDERS[1:]:
                    o = cell(report, who, p, coll, size)
                    row[f"speedup_vs_{who}"] = o["median_s"] / c["median_s"] if "median_s" in o else None
                out["cells"].append(row)
    t = out["targets"]
    by = {(x["p"], x["coll"], x["bytes"]): x for x in out["cells"]}
    if out["cells"]:  # issue 16's targets: tplinear's shm backend was a contender
        for size in (16 << 20, 64 << 20):
            x = by.get((2, "all_reduce", size))
            v = x and x["speedup_vs_mpi4py"]
            t[f"all_reduce_{size >> 20}MB_2ranks_speedup_vs_openmpi"] = {"value": v, "target": ">= 1.25",
                                                                          "met": v is not None and v >= 1.25}
        slower = [f"{fmt_size(s)} (vs {who}: {by[(2, 'all_reduce', s)][f'speedup_vs_{who}']:.2f}x)"
                  for s in SIZES for who in ("mpi4py", "deepspeed")
                  if (2, "all_reduce", s) in by and (by[(2, "all_reduce", s)].get(f"speedup_vs_{who}") or 9) < 1.0]
        t["all_reduce_2ranks_no_size_slower_than_openmpi_or_deepspeed"] = {"slower": slower, "met": not slower}
        x = by.get((2, "all_reduce", 4 << 10))
        t["all_reduce_4KB_2ranks_us"] = {"value": x and x["tplinear_s"] * 1e6, "target": "<= 4",
                                         "met": bool(x) and x["tplinear_s"] <= 4e-6}
    out["dtypes"] = []  # tplinear's bytes/s in a half dtype over float32's, same size, same world
    for p, coll, size, dtype in [(p, c, s, d) for p in report["config"]["nproc"] for c in COLLS for s in SIZES
                                 for d in report["config"].get("dtypes", ["float32"]) if d != "float32"]:
        a, b = cell(report, "tplinear", p, coll, size), cell(report, "tplinear", p, coll, size, dtype)
        if "median_s" in a and "median_s" in b:
            out["dtypes"].append({"p": p, "coll": coll, "bytes": size, "dtype": dtype, "float32_s": a["median_s"],
                                  "dtype_s": b["median_s"], "bytes_per_s_over_float32": a["median_s"] / b["median_s"]})
    for x in out["dtypes"]:
        if (x["p"], x["coll"], x["bytes"], x["dtype"]) == (2, "all_reduce", 16 << 20, "bfloat16"):
            v = x["bytes_per_s_over_float32"]
            t["all_reduce_16MB_2ranks_bfloat16_bytes_per_s_over_float32"] = {"value": v, "target": ">= 0.9",
                                                                             "met": v >= 0.9}
    out["mpi"] = []
    for p in report["config"]["nproc"]:
        for coll in COLLS:
            for size in SIZES:
                a, b = cell(report, "tplinear-mpi", p, coll, size), cell(report, "mpi4py", p, coll, size)
                if "median_s" in a and "median_s" in b:
                    out["mpi"].append({"p": p, "coll": coll, "bytes": size, "tplinear_mpi_s": a["median_s"],
                                       "mpi4py_s": b["median_s"], "ratio": a["median_s"] / b["median_s"]})
    ar = [x for x in out["mpi"] if x["coll"] == "all_reduce"]
    if ar:
        over = [f"{fmt_size(x['bytes'])} at {x['p']} ranks: {x['ratio']:.2f}" for x in ar if x["ratio"] > MPI_TARGET]
        t["all_reduce_mpi_backend_within_5pct_of_mpi4py"] = {"slower": over, "met": not over}
    return out


def markdown(report):
    d, lines = report["derived"], []
    lines.append(f"Command: `{report['command']}`  \nDate: {report['date']}  \n"
                 f"Machine: {report['machine'].get('Model name', '?')}, {report['machine']['cores']} cores; "
                 f"{', '.join(report['config'].get('dtypes', ['float32']))}; slowest rank's median of back-to-back "
                 f"calls; best of {report['config']['rounds']} "
                 f"round(s).\n")
    for who, per in report["results"].items():
        for p, r in per.items():
            if r["status"] != "ok":
                lines.append(f"- {LABEL[who]} p={p}: {r['status']}")
    noise = [n["foreign_cpu_frac"] for per in report["results"].values() for r in per.values()
             for n in r.get("noise", [])]
    loads = [n["loadavg_before"] for per in report["results"].values() for r in per.values()
             for n in r.get("noise", [])]
    if noise:
        lines.append(f"\nNoise: other processes used {min(noise):.0%}–{max(noise):.0%} of the CPUs while the worlds "
                     f"ran; 1-minute load average {min(loads):.1f}–{max(loads):.1f} before them.\n")
    whos = [w for w in CONTENDERS if w in report["results"]]
    for p in report["config"]["nproc"]:
        st = report["results"].get("tplinear", {}).get(str(p), {}).get("stream", {})
        for coll in COLLS:
            lines.append(f"\n#### {coll}, {p} ranks\n")
            lines.append("| size | " + " | ".join(LABEL[w] for w in whos) +
                         " | STREAM copy / triad per rank | tplinear: fraction of STREAM copy / triad | "
                         "tplinear vs OpenMPI |")
            lines.append("|---" * (len(whos) + 4) + "|")
            for size in SIZES:
                cells = []
                for w in whos:
                    c = cell(report, w, p, coll, size)
                    cells.append(fmt_us(c.get("median_s")) if "median_s" in c else ("n/a" if c else "—"))
                x = next((y for y in d["cells"] if (y["p"], y["coll"], y["bytes"]) == (p, coll, size)), {})
                s = st.get(str(size), {})
                sb = (f"{s['copy'] / 1e9:.1f} / {s['triad'] / 1e9:.1f} GB/s" if s.get("copy") and s.get("triad")
                      else (f"{s['copy'] / 1e9:.1f} GB/s / —" if s.get("copy") else "—"))
                fr = (f"{x['frac_stream_copy']:.2f} / {x['frac_stream_triad']:.2f}"
                      if x.get("frac_stream_copy") and x.get("frac_stream_triad") else "—")
                sp = x.get("speedup_vs_mpi4py")
                lines.append(f"| {fmt_size(size)} | " + " | ".join(cells) + f" | {sb} | {fr} | "
                             + (f"{sp:.2f}x" if sp else "—") + " |")
    skipped = sorted({f"{LABEL[w]}: {c['skipped']}" for w in whos for p in report["config"]["nproc"] for coll in COLLS
                      for size in SIZES if "skipped" in (c := cell(report, w, p, coll, size))})
    if skipped:
        lines.append("\nn/a: " + "; ".join(skipped))
    half = d.get("dtypes", [])
    for p in report["config"]["nproc"]:
        rows = {(x["coll"], x["bytes"], x["dtype"]): x for x in half if x["p"] == p}
        dts = [dt for dt in report["config"].get("dtypes", []) if dt != "float32"]
        if not rows:
            continue
        lines.append(f"\n#### tplinear in {', '.join(dts)}: bytes/s over float32's (same size in bytes, same world), "
                     f"{p} ranks\n")
        lines.append("| size | " + " | ".join(f"{c} {dt}" for c in COLLS for dt in dts) + " |")
        lines.append("|---" * (len(COLLS) * len(dts) + 1) + "|")
        for size in SIZES:
            lines.append(f"| {fmt_size(size)} | " + " | ".join(
                f"{rows[(c, size, dt)]['bytes_per_s_over_float32']:.2f} ({fmt_us(rows[(c, size, dt)]['dtype_s'])})"
                if (c, size, dt) in rows else "—" for c in COLLS for dt in dts) + " |")
    mpi = d.get("mpi", [])
    for p in report["config"]["nproc"]:
        rows = {(x["coll"], x["bytes"]): x for x in mpi if x["p"] == p}
        if not rows:
            continue
        lines.append(f"\n#### tplinear's mpi backend / mpi4py on the same MPI, {p} ranks (time ratio; target "
                     f"all_reduce <= {MPI_TARGET})\n")
        lines.append("| size | " + " | ".join(COLLS) + " |")
        lines.append("|---" * (len(COLLS) + 1) + "|")
        for size in SIZES:
            lines.append(f"| {fmt_size(size)} | " + " | ".join(
                f"{rows[(c, size)]['ratio']:.2f} ({fmt_us(rows[(c, size)]['tplinear_mpi_s'])} / "
                f"{fmt_us(rows[(c, size)]['mpi4py_s'])})" if (c, size) in rows else "—" for c in COLLS) + " |")
    lines.append("\nTargets (issue 16, 2 ranks; issue 14, the mpi backend; issue 27, bfloat16):\n")
    for k, v in d["targets"].items():
        val = v.get("value")
        shown = f"{val:.2f}" if isinstance(val, float) else (", ".join(v["slower"]) or "none") if "slower" in v else "—"
        lines.append(f"- {k}: {shown}" + (f" (target {v['target']})" if "target" in v else "")
                     + (" — **met**" if v["met"] else " — **missed**"))
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nps = report["config"]["nproc"]
    fig, axes = plt.subplots(len(nps), len(COLLS), figsize=(5 * len(COLLS), 4 * len(nps)), squeeze=False)
    marks = dict(zip(CONTENDERS, "os^vDx"))
    for i, p in enumerate(nps):
        st = report["results"].get("tplinear", {}).get(str(p), {}).get("stream", {})
        for j, coll in enumerate(COLLS):
            ax = axes[i][j]
            for who, dt in [(w, d) for w in CONTENDERS for d in report["config"].get("dtypes", ["float32"])]:
                pts = [(s, ideal_bytes(coll, s, p) / c["median_s"] / 1e9) for s in SIZES
                       if "median_s" in (c := cell(report, who, p, coll, s, dt))]
                if pts:
                    ax.plot([s for s, _ in pts], [b for _, b in pts], marker=marks[who],
                            ls="-" if dt == "float32" else "--", label=LABEL[who] + ("" if dt == "float32" else f" {dt}"))
            for kind, ls in (("copy", "--"), ("triad", ":")):
                pts = [(s, st[str(s)][kind] / 1e9) for s in SIZES if st.get(str(s), {}).get(kind)]
                if pts:
                    ax.plot([s for s, _ in pts], [b for _, b in pts], "k" + ls, lw=1, label=f"STREAM {kind} per rank")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{coll}, {p} ranks", fontsize=9)
            ax.set_xlabel("size (bytes)")
            ax.set_ylabel("GB/s per rank (ideal bytes / time)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"collectives vs STREAM, {', '.join(report['config'].get('dtypes', ['float32']))}, "
                 f"{report['machine'].get('Model name', '')}, "
                 f"{report['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--md", help="write the Markdown tables here")
    ap.add_argument("--plot", help="write the PNG plot here")
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--rounds", type=int, default=2, help="worlds run this many times, interleaved; best counts")
    ap.add_argument("--budget", type=float, default=0.15, help="seconds of timed calls per collective and size")
    ap.add_argument("--python", default=sys.executable, help="Python with tplinear, NumPy and mpi4py")
    ap.add_argument("--torch-python", default=os.environ.get("TPLINEAR_BENCH_TORCH_PYTHON", sys.executable),
                    help="Python with torch (gloo) and deepspeed")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per world")
    ap.add_argument("--nice", type=int, default=0,
                    help="scheduling niceness of the whole benchmark, the same for every contender (e.g. -5 on a "
                         "shared box)")
    add_dtype_arg(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)
    contenders = args.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    report = {"command": " ".join(["python", os.path.relpath(__file__, os.getcwd())] + sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine_info(args), "uptime_before": open("/proc/loadavg").read().strip(),
              "config": {"nproc": args.nproc, "sizes": SIZES, "rounds": args.rounds, "budget_s": args.budget,
                         "contenders": contenders, "nice": args.nice, "dtypes": args.dtype}, "results": {}}
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every world
    runs = {}
    with tempfile.TemporaryDirectory(prefix="tplinear-ar-") as tmp:
        for rnd in range(args.rounds):
            for p in args.nproc:
                for who in contenders:
                    t0 = time.time()
                    r = run_world(who, p, args, tmp)
                    runs.setdefault(who, {}).setdefault(str(p), []).append(r)
                    print(f"[allreduce] round {rnd + 1}/{args.rounds} {who:16s} p={p}: {r['status'][:160]} "
                          f"({time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    report["uptime_after"] = open("/proc/loadavg").read().strip()
    report["results"] = {who: {p: merge(rs) for p, rs in per.items()} for who, per in runs.items()}
    report["raw_rounds"] = runs
    report["derived"] = derive(report)
    save_report(report, markdown(report), plot, args, "allreduce")


if __name__ == "__main__":
    main()
