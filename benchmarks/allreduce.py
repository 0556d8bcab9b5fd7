"""All-reduce latency and algorithm bandwidth of the shm backend, 4 KB .. 64 MB at 2 and 4 ranks,
against a memcpy of the same size measured in the same run (rank 0, just before the all-reduces).

    python benchmarks/allreduce.py [--json out.json] [--nproc 2 4] [--dtype float32]

Algorithm bandwidth = bytes / median time of one all-reduce (nccl-tests' "algbw").
Targets (issue 3): 4 KB median <= 10 us at 2 ranks; 16 MB algbw >= 0.35 x memcpy bandwidth."""
import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def measure(fn, min_time, min_iters, max_iters):
    """Per-call times (s) of fn: at least min_iters calls and about min_time seconds."""
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def worker(args):
    import numpy as np
    import tplinear.distributed as dist

    dist.init_process_group(timeout=120)
    r, p = dist.get_rank(), dist.get_world_size()
    dt = np.dtype(args.dtype)
    rows = []
    for nbytes in SIZES:
        n = nbytes // dt.itemsize
        buf = np.zeros(n, dt)
        # warm up (first touch of the segment and the buffer), then agree on an iteration count
        for _ in range(3):
            dist.all_reduce(buf)
        iters = np.zeros(1, np.int64)
        if r == 0:
            iters[0] = max(20, min(2000, int(0.4 / max(1e-6, nbytes / 2e9 + 20e-6))))
        dist.broadcast(iters, src=0)
        mem = None
        if r == 0:
            src, dst = np.ones(n, dt), np.zeros(n, dt)
            np.copyto(dst, src)
            mem = median(measure(lambda: np.copyto(dst, src), 0.05, 10, int(iters[0])))
        dist.barrier()
        times = [0.0] * int(iters[0])
        for i in range(int(iters[0])):
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times[i] = time.perf_counter() - t0
        med = np.array([median(times)])
        dist.all_reduce(med, op="max")  # the slowest rank's median
        if r == 0:
            rows.append({
                "nproc": p, "bytes": nbytes, "dtype": dt.name, "iters": int(iters[0]),
                "median_us": med[0] * 1e6, "algbw_GBps": nbytes / med[0] / 1e9,
                "memcpy_us": mem * 1e6, "memcpy_GBps": nbytes / mem / 1e9,
                "ratio_to_memcpy": (nbytes / med[0]) / (nbytes / mem),
            })
    if r == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(nproc, argv):
    """Through the launcher when it is installed, else plain subprocesses with torchrun's variables."""
    me = os.path.abspath(__file__)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    if importlib.util.find_spec("tplinear.run") is not None:
        cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(nproc), me] + argv
        subprocess.run(cmd, env=env, check=True, timeout=900)
        return
    port = free_port()
    procs = []
    for r in range(nproc):
        e = dict(env, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, me] + argv, env=e))
    rcs = [p.wait(timeout=900) for p in procs]
    if any(rcs):
        raise SystemExit(f"benchmark world of {nproc} failed: exit codes {rcs}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            out = os.path.join(tmp, f"w{n}.json")
            run_world(n, ["--worker", "--out", out, "--dtype", args.dtype])
            with open(out) as f:
                rows += json.load(f)
    print(f"{'ranks':>5} {'bytes':>9} {'median us':>10} {'algbw GB/s':>11} {'memcpy GB/s':>12} {'ratio':>6}")
    for x in rows:
        print(f"{x['nproc']:>5} {x['bytes']:>9} {x['median_us']:>10.1f} {x['algbw_GBps']:>11.2f} "
              f"{x['memcpy_GBps']:>12.2f} {x['ratio_to_memcpy']:>6.2f}")
    lat = [x for x in rows if x["nproc"] == 2 and x["bytes"] == 4096]
    bw = [x for x in rows if x["bytes"] == 16 << 20]
    targets = {
        "latency_4KB_2ranks_us": lat[0]["median_us"] if lat else None,
        "latency_4KB_2ranks_ok": bool(lat and lat[0]["median_us"] <= 10.0),
        "algbw_16MB_ratio": {str(x["nproc"]): x["ratio_to_memcpy"] for x in bw},
        "algbw_16MB_ok": {str(x["nproc"]): x["ratio_to_memcpy"] >= 0.35 for x in bw},
    }
    print(json.dumps(targets, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "allreduce", "cpus": os.cpu_count(), "results": rows, "targets": targets}, f,
                      indent=1)


if __name__ == "__main__":
    main()
