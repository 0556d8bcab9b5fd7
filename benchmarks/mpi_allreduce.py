"""All-reduce of tplinear's mpi backend against mpi4py on the same MPI, 4 KB .. 64 MB, in the same run
(issue 14: the wrapper must cost nothing; target: tplinear within 5 % of mpi4py at every size).

    python benchmarks/mpi_allreduce.py [--nproc 2 4] [--rounds 11] [--launches 3]
                                       [--json out.json] [--md table.md] [--plot plot.png]

Each world is started with mpirun (OpenMPI: --oversubscribe --bind-to none, allowed to run as root); in it
every rank runs both contenders on the same float32 buffer, in place:
  - tplinear: tplinear.distributed.all_reduce(buf) on the world (backend mpi, chosen automatically);
  - mpi4py:   MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf) (MPI's own tuned collective).
The two alternate in rounds (a block of one, then a block of the other, ROUNDS times) so that a busy
machine slows both alike; a block's time per call is its median; a contender's time is the median over
its blocks of the slowest rank's block median. A world's speed also depends on the launch: at 1 MB on 2 ranks
one launch runs tplinear at 200 us in every block and the next at 250 us (mpi4py: 175-220 us from launch to
launch), so each world is launched --launches times and a size's ratio is the median of the launches'
ratios (every launch's ratio is kept). Both load one libmpi (checked: the process maps a single
libmpi.so, and mpi4py's MPI.Get_library_version() is recorded). benchmarks/allreduce.py
--contenders mpi4py,tplinear-mpi runs the same two as separate worlds, for all three collectives.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from linear import mpirun_cmd  # noqa: E402

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
ROUNDS = 7
TARGET = 1.05  # tplinear time / mpi4py time


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def contender_mpi4py():
    """(name, all_reduce(buf), barrier()) of mpi4py's in-place Allreduce on COMM_WORLD."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return "mpi4py", lambda buf: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), comm.Barrier


def contender_tplinear_mpi():
    """(name, all_reduce(buf), barrier()) of tplinear's world, which must be on the mpi backend."""
    import tplinear.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(timeout=300)
    if dist.get_backend() != "mpi":
        raise SystemExit(f"tplinear chose backend {dist.get_backend()!r}, not mpi (built without MPI?)")
    return "tplinear mpi", dist.all_reduce, dist.barrier


def libmpi_mapped():
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if "libmpi.so" in line})


def worker(args):
    import numpy as np
    from mpi4py import MPI

    contenders = [contender_tplinear_mpi(), contender_mpi4py()]
    comm = MPI.COMM_WORLD
    r, p = comm.Get_rank(), comm.Get_size()
    rows = []
    for nbytes in args.sizes:
        n = nbytes // 4
        buf = np.zeros(n, np.float32)
        for _, fn, _ in contenders:  # warm up both (first touch, MPI connections)
            for _ in range(3):
                fn(buf)
        iters = np.array([max(3, min(500, int(0.15 / max(1e-6, nbytes / 1e9 + 10e-6))))], np.int64)
        comm.Bcast(iters, root=0)
        blocks = {name: [] for name, _, _ in contenders}
        for _ in range(args.rounds):
            for name, fn, barrier in contenders:
                barrier()
                times = []
                for _ in range(int(iters[0])):
                    t0 = time.perf_counter()
                    fn(buf)
                    times.append(time.perf_counter() - t0)
                slowest = comm.allreduce(median(times), op=MPI.MAX)
                blocks[name].append(slowest)
        if r == 0:
            t = {name: median(v) for name, v in blocks.items()}
            rows.append({"nproc": p, "bytes": nbytes, "iters": int(iters[0]), "rounds": args.rounds,
                         "tplinear_us": t["tplinear mpi"] * 1e6, "mpi4py_us": t["mpi4py"] * 1e6,
                         "ratio": t["tplinear mpi"] / t["mpi4py"],
                         "tplinear_blocks_us": [x * 1e6 for x in blocks["tplinear mpi"]],
                         "mpi4py_blocks_us": [x * 1e6 for x in blocks["mpi4py"]]})
    if r == 0:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "mpi": MPI.Get_library_version().strip(), "libmpi": libmpi_mapped()}, f)


def write_md(path, res):
    lines = ["| ranks | bytes | tplinear mpi (us) | mpi4py (us) | ratio (median of launches) | each launch | within 5 % |",
             "|---|---|---|---|---|---|---|"]
    for x in res["results"]:
        lines.append(f"| {x['nproc']} | {x['bytes']} | {x['tplinear_us']:.1f} | {x['mpi4py_us']:.1f} | "
                     f"{x['ratio']:.3f} | {' '.join(f'{r:.2f}' for r in x['launch_ratios'])} | "
                     f"{'yes' if x['ratio'] <= TARGET else 'no'} |")
    lines.append("")
    lines.append(f"MPI: {res['mpi']}; libmpi mapped: {', '.join(res['libmpi'])}; {res['cpus']} CPUs.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n in sorted({x["nproc"] for x in res["results"]}):
        xs = [x for x in res["results"] if x["nproc"] == n]
        lo = [x["ratio"] - min(x.get("launch_ratios", [x["ratio"]])) for x in xs]
        hi = [max(x.get("launch_ratios", [x["ratio"]])) - x["ratio"] for x in xs]
        ax.errorbar([x["bytes"] for x in xs], [x["ratio"] for x in xs], yerr=[lo, hi], marker="o", capsize=3,
                    label=f"{n} ranks (median of launches; bars: every launch)")
    ax.axhline(TARGET, color="red", linestyle="--", label="target (1.05)")
    ax.axhline(1.0, color="gray", linewidth=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes (float32)")
    ax.set_ylabel("tplinear mpi time / mpi4py time")
    ax.set_title("all-reduce on the same MPI: tplinear mpi backend vs mpi4py")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--md", help="write a Markdown table here")
    ap.add_argument("--plot", help="write a PNG of the ratios here (needs matplotlib)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="bytes (default 4 KB .. 64 MB)")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="alternating blocks per contender (default %(default)s)")
    ap.add_argument("--launches", type=int, default=3, help="independent mpirun launches per world size; a ratio is "
                    "the median of theirs (default %(default)s)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if shutil.which("mpirun") is None:
        raise SystemExit("skipped: no mpirun (apt-get install openmpi-bin libopenmpi-dev)")
    res = {"benchmark": "mpi_allreduce", "cpus": os.cpu_count(), "target_ratio": TARGET, "results": []}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    launches = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            for k in range(args.launches):
                out = os.path.join(tmp, f"w{n}-{k}.json")
                cmd = mpirun_cmd(n) + [sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--rounds",
                                       str(args.rounds), "--sizes"] + [str(b) for b in args.sizes]
                subprocess.run(cmd, env=env, check=True, timeout=1800)
                with open(out) as f:
                    got = json.load(f)
                for row in got["rows"]:
                    launches.setdefault((row["nproc"], row["bytes"]), []).append(row)
                res["mpi"], res["libmpi"] = got["mpi"], got["libmpi"]
    for (n, nbytes), rows in sorted(launches.items()):
        res["results"].append({"nproc": n, "bytes": nbytes, "launches": len(rows),
                               "tplinear_us": median([x["tplinear_us"] for x in rows]),
                               "mpi4py_us": median([x["mpi4py_us"] for x in rows]),
                               "ratio": median([x["ratio"] for x in rows]),
                               "launch_ratios": [x["ratio"] for x in rows], "launch_rows": rows})
    print(f"{'ranks':>5} {'bytes':>9} {'tplinear us':>12} {'mpi4py us':>10} {'ratio':>6}  per launch")
    for x in res["results"]:
        print(f"{x['nproc']:>5} {x['bytes']:>9} {x['tplinear_us']:>12.1f} {x['mpi4py_us']:>10.1f} {x['ratio']:>6.3f}  "
              + " ".join(f"{r:.3f}" for r in x["launch_ratios"]))
    res["within_target"] = all(x["ratio"] <= TARGET for x in res["results"])
    print(f"MPI: {res['mpi']}\nlibmpi: {res['libmpi']}\nwithin {TARGET}x at every size: {res['within_target']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.md:
        write_md(args.md, res)
    if args.plot:
        plot(args.plot, res)


if __name__ == "__main__":
    main()
