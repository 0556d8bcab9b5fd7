"""Checkpoint save and load of a ~2 GB float32 model at 2 ranks: tplinear (sharded and consolidated
safetensors) against torch.distributed.checkpoint (DCP, gloo, DTensor shards) and torch.save of a gathered
state dict, all in one run. Seconds per operation (barrier to barrier, the slowest rank) and peak RSS per
rank during the operation (VmHWM, reset before each one), with the RSS before it.

    python benchmarks/checkpoint.py [--size-gb 2] [--nproc 2] [--repeats 2] [--reshard 1 3] [--dir /tmp]
                                    [--json out.json] [--md out.md] [--plot out.png]

--reshard: tplinear's two checkpoints, saved at --nproc ranks, are also loaded at these group sizes.

The model: blocks of a column layer H -> 4H and a row layer 4H -> H (float32, with biases), training-mode
split, enough blocks for --size-gb. Every contender holds the same shards (torch tensors share the NumPy
layers' memory) and loads into them in place. Files go to a fresh folder under --dir and are removed
after each contender; the page cache stays warm (the machine is shared), so loads read from memory.
A contender that cannot run (torch missing) is skipped with the reason.

Target (issue 13): sharded save and load >= 2x faster than DCP, with lower peak memory."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from linear import free_port, reset_peak_rss, save_report  # noqa: E402

CONTENDERS = ["tplinear-sharded", "tplinear-consolidated", "dcp", "torch.save-gathered"]


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _Sampler:
    """Peak anonymous and file-backed RSS during an operation, sampled every 2 ms on a thread (VmHWM
    counts both: a memory-mapped file's pages that a rank has read are in its RSS until unmapped)."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            for k in self.peak:
                self.peak[k] = max(self.peak[k], _status(k))
            self.stop.wait(0.002)

    def done(self):
        self.stop.set()
        self.thread.join()
        return self.peak


def worker(args):
    import numpy as np

    import tplinear as tp
    import tplinear.distributed as dist

    dist.init_process_group(timeout=600)
    r, p = dist.get_rank(), dist.get_world_size()
    tp.set_training_mode(True)
    h = args.hidden
    per_block = 2 * 4 * h * h * 4
    nblocks = max(1, round(args.size_gb * 2**30 / per_block))
    layers = {}
    for b in range(nblocks):
        layers[f"blocks.{b}.fc1"] = tp.LinearLayer.from_init(h, 4 * h, seed=2 * b, name=f"blocks.{b}.fc1")
        layers[f"blocks.{b}.fc2"] = tp.LinearAllreduce.from_init(4 * h, h, seed=2 * b + 1, name=f"blocks.{b}.fc2")
    total = sum(getattr(layer, k).data.nbytes * (p if k == "weight" or isinstance(layer, tp.LinearLayer) else 1)
                for layer in layers.values() for k in ("weight", "bias"))
    torch, why = None, None
    try:
        import torch
        import torch.distributed as tdist
        from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // p))
        port = np.zeros(1, np.int64)
        if r == 0:
            port[0] = free_port()
        dist.broadcast(port, 0)
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{int(port[0])}", rank=r, world_size=p)
        mesh = init_device_mesh("cpu", (p,))
    except Exception as exc:  # noqa: BLE001 - reported as the reason the torch contenders are skipped
        why = f"torch.distributed unavailable: {type(exc).__name__}: {exc}"
        torch = None

    def torch_params():
        """name -> (torch tensor sharing the layer's memory, split dim or None)."""
        out = {}
        for name, layer in layers.items():
            for k in ("weight", "bias"):
                param = getattr(layer, k)
                dim = layer._dim_of(param) if layer._is_sharded(param) else None
                out[f"{name}.{k}"] = (torch.from_numpy(param.data), dim)
        return out

    def dcp_state():
        return {k: DTensor.from_local(t, mesh, [Replicate() if d is None else Shard(d)], run_check=False)
                for k, (t, d) in torch_params().items()}

    def gather_full():
        full = {}
        for k, (t, d) in torch_params().items():
            if d is None:
                full[k] = t.clone()
                continue
            parts = [torch.empty_like(t) for _ in range(p)]
            tdist.all_gather(parts, t.contiguous())
            full[k] = torch.cat(parts, dim=d)
            del parts
        return full

    def tsave(path):
        full = gather_full()
        if r == 0:
            with open(path, "wb") as f:
                torch.save(full, f)
                f.flush()
                os.fsync(f.fileno())
        del full

    def tload(path):
        full = torch.load(path, weights_only=True)
        for k, (t, d) in torch_params().items():
            src = full[k]
            if d is not None:
                src = src.chunk(p, dim=d)[r]
            t.copy_(src)
        del full

    ops = {
        "tplinear-sharded": (lambda d: tp.save_checkpoint(d, layers, layout="sharded", progress=False),
                             lambda d: tp.load_checkpoint(d, layers, progress=False)),
        "tplinear-consolidated": (lambda d: tp.save_checkpoint(d, layers, progress=False),
                                  lambda d: tp.load_checkpoint(d, layers, progress=False)),
    }
    if torch is not None:
        import torch.distributed.checkpoint as dcp

        ops["dcp"] = (lambda d: dcp.save(dcp_state(), checkpoint_id=d),
                      lambda d: dcp.load(dcp_state(), checkpoint_id=d))
        ops["torch.save-gathered"] = (lambda d: tsave(os.path.join(d, "model.pt")),
                                      lambda d: tload(os.path.join(d, "model.pt")))

    def timed(fn, path):
        dist.barrier()
        reset = reset_peak_rss()
        before, anon_before = _status("VmRSS"), _status("RssAnon")
        sampler = _Sampler()
        t0 = time.perf_counter()
        fn(path)
        dist.barrier()
        dt = time.perf_counter() - t0
        peak = sampler.done()
        stats = np.array([dt, _status("VmHWM") if reset else -1, before, peak["RssAnon"], anon_before,
                          peak["RssFile"]], dtype=np.float64)
        every = np.zeros(len(stats) * p, dtype=np.float64)
        dist.all_gather_into_tensor(every, stats)
        every = every.reshape(p, len(stats))
        mib = lambda col: [round(v / 2**20) for v in every[:, col]]  # noqa: E731
        return {"seconds": float(every[:, 0].max()), "peak_rss_mib": mib(1), "rss_before_mib": mib(2),
                "peak_anon_mib": mib(3), "anon_before_mib": mib(4), "peak_file_mib": mib(5)}

    results = {}
    check = {k: getattr(layers[k.rsplit(".", 1)[0]], k.rsplit(".", 1)[1]).data[:2, :2].copy()
             for k in ("blocks.0.fc1.weight", f"blocks.{nblocks - 1}.fc2.weight")}

    def load_checked(name, load, path):
        for layer in layers.values():  # the load must really fill the shards
            layer.weight.data[:2, :2] = 0
        lo = timed(load, path)
        for k, v in check.items():
            got = getattr(layers[k.rsplit(".", 1)[0]], k.rsplit(".", 1)[1]).data[:2, :2]
            assert np.array_equal(got, v), f"{name}: the load did not restore {k}"
        return lo

    if args.reshard_from:  # load what a world of another size saved (the same from_init values)
        for name in CONTENDERS[:2]:
            path = os.path.join(args.reshard_from, name)
            results[name] = {"status": "ok", "runs": [{"load": load_checked(name, ops[name][1], path)}
                                                      for _ in range(args.repeats)]}
        if r == 0:
            with open(args.out, "w") as f:
                json.dump({"nproc": p, "results": results}, f)
        dist.destroy_process_group()
        return
    for name in CONTENDERS:
        if name not in ops:
            results[name] = {"status": f"skipped: {why}"}
            continue
        save, load = ops[name]
        runs = []
        for i in range(args.repeats):
            path = os.path.join(args.dir, name)
            if r == 0:
                os.makedirs(path, exist_ok=True)
            dist.barrier()
            s = timed(save, path)
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if r == 0 else 0
            lo = load_checked(name, load, path)
            dist.barrier()
            if r == 0 and not (name.startswith("tplinear") and i == args.repeats - 1):  # kept for --reshard
                shutil.rmtree(path)
            runs.append({"save": s, "load": lo, "bytes_on_disk": size})
        results[name] = {"status": "ok", "runs": runs}
    if r == 0:
        with open(args.out, "w") as f:
            json.dump({"nproc": p, "model_bytes": total, "blocks": nblocks, "hidden": h,
                       "shard_bytes_per_rank": total // p, "results": results}, f)
    if torch is not None:
        tdist.destroy_process_group()
    dist.destroy_process_group()


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def summarize(raw):
    rows = {}
    for name, res in raw["results"].items():
        if res.get("status") != "ok":
            rows[name] = {"status": res.get("status")}
            continue
        row = {"status": "ok", "bytes_on_disk": res["runs"][-1]["bytes_on_disk"]}
        for op in ("save", "load"):
            row[f"{op}_s"] = median([run[op]["seconds"] for run in res["runs"]])
            row[f"{op}_peak_rss_mib"] = [max(run[op]["peak_rss_mib"][i] for run in res["runs"])
                                         for i in range(raw["nproc"])]
            row[f"{op}_rss_before_mib"] = res["runs"][0][op]["rss_before_mib"]
            row[f"{op}_peak_anon_mib"] = [max(run[op]["peak_anon_mib"][i] for run in res["runs"])
                                          for i in range(raw["nproc"])]
            row[f"{op}_anon_before_mib"] = res["runs"][0][op]["anon_before_mib"]
        rows[name] = row
    return rows


def markdown(report):
    rows, raw = report["summary"], report["raw"]
    gb = raw["model_bytes"] / 2**30
    out = [f"Checkpoint of a {gb:.2f} GiB float32 model ({raw['blocks']} blocks of H={raw['hidden']} -> 4H -> H) "
           f"at {raw['nproc']} ranks ({raw['shard_bytes_per_rank'] / 2**30:.2f} GiB of shards per rank); "
           f"median of {report['repeats']} runs, warm page cache, shared machine.", "",
           "Peak RSS is VmHWM (it counts the pages of memory-mapped files a rank has read); peak anon is "
           "RssAnon sampled every 2 ms (the process's own memory). Per rank, rank 0 / rank 1 / ...", "",
           "| contender | save s | load s | save peak RSS (MiB) | load peak RSS (MiB) | RSS before (MiB) | "
           "save peak anon (MiB) | load peak anon (MiB) | anon before (MiB) | on disk (MiB) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name in CONTENDERS:
        row = rows.get(name, {})
        if row.get("status") != "ok":
            out.append(f"| {name} | {row.get('status', 'not run')} | | | | | | | | |")
            continue
        j = lambda v: " / ".join(map(str, v))  # noqa: E731
        out.append(f"| {name} | {row['save_s']:.2f} | {row['load_s']:.2f} | {j(row['save_peak_rss_mib'])} | "
                   f"{j(row['load_peak_rss_mib'])} | {j(row['load_rss_before_mib'])} | {j(row['save_peak_anon_mib'])} | "
                   f"{j(row['load_peak_anon_mib'])} | {j(row['load_anon_before_mib'])} | "
                   f"{row['bytes_on_disk'] / 2**20:.0f} |")
    if raw.get("reshard"):
        out += ["", f"tplinear's checkpoints saved at {raw['nproc']} ranks, loaded at another group size (each rank "
                    "reads its own pieces):", "",
                "| layout | load at | load s | peak RSS (MiB) | RSS before (MiB) | peak anon (MiB) | anon before (MiB) |",
                "|---|---|---|---|---|---|---|"]
        for n, res in sorted(raw["reshard"].items(), key=lambda kv: int(kv[0])):
            for name, r in res.items():
                loads = [run["load"] for run in r["runs"]]
                j = lambda key: " / ".join(str(max(ld[key][i] for ld in loads)) for i in range(int(n)))  # noqa: E731
                out.append(f"| {name} | {n} | {median([ld['seconds'] for ld in loads]):.2f} | {j('peak_rss_mib')} | "
                           f"{' / '.join(map(str, loads[0]['rss_before_mib']))} | {j('peak_anon_mib')} | "
                           f"{' / '.join(map(str, loads[0]['anon_before_mib']))} |")
    dcp = rows.get("dcp", {})
    mine = rows.get("tplinear-sharded", {})
    if dcp.get("status") == "ok" and mine.get("status") == "ok":
        out += ["", f"tplinear-sharded against DCP: save {dcp['save_s'] / mine['save_s']:.2f}x faster, load "
                    f"{dcp['load_s'] / mine['load_s']:.2f}x faster; peak RSS (max over ranks) save "
                    f"{max(mine['save_peak_rss_mib'])} vs {max(dcp['save_peak_rss_mib'])} MiB, load "
                    f"{max(mine['load_peak_rss_mib'])} vs {max(dcp['load_peak_rss_mib'])} MiB; peak anon save "
                    f"{max(mine['save_peak_anon_mib'])} vs {max(dcp['save_peak_anon_mib'])} MiB, load "
                    f"{max(mine['load_peak_anon_mib'])} vs {max(dcp['load_peak_anon_mib'])} MiB "
                    "(target: >= 2x faster, lower peak memory)."]
    return "\n".join(out) + "\n"


def plot(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)
        return
    rows = {k: v for k, v in report["summary"].items() if v.get("status") == "ok"}
    names = [n for n in CONTENDERS if n in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(names))
    for i, op in enumerate(("save", "load")):
        a.bar([v + 0.4 * i for v in x], [rows[n][f"{op}_s"] for n in names], width=0.4, label=op)
        b.bar([v + 0.4 * i for v in x], [max(rows[n][f"{op}_peak_rss_mib"]) for n in names], width=0.4, label=op)
    for ax, title in ((a, "seconds (lower is better)"), (b, "peak RSS per rank, MiB (max over ranks)")):
        ax.set_xticks([v + 0.2 for v in x])
        ax.set_xticklabels(names, rotation=15)
        ax.set_title(title)
        ax.legend()
    base = report["raw"]["shard_bytes_per_rank"] / 2**20
    b.axhline(base, color="gray", linestyle="--", linewidth=1)
    b.text(0, base, " shards per rank", va="bottom", fontsize=8)
    fig.suptitle(f"checkpoint of a {report['raw']['model_bytes'] / 2**30:.2f} GiB model at {report['raw']['nproc']} ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the checkpoints go (a fresh folder inside it)")
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--plot")
    ap.add_argument("--reshard", type=int, nargs="*", default=[1, 3],
                    help="also load tplinear's checkpoints at these group sizes")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reshard-from", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    work = tempfile.mkdtemp(prefix="tplinear-ckpt-bench-", dir=args.dir)
    try:
        raw_path = os.path.join(work, "raw.json")
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(args.nproc),
               os.path.abspath(__file__), "--worker", "--out", raw_path, "--dir", work, "--size-gb",
               str(args.size_gb), "--hidden", str(args.hidden), "--repeats", str(args.repeats)]
        subprocess.run(cmd, env=env, check=True, timeout=3600)
        with open(raw_path) as f:
            raw = json.load(f)
        raw["reshard"] = {}
        for n in args.reshard:
            out = os.path.join(work, f"reshard{n}.json")
            cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(n),
                   os.path.abspath(__file__), "--worker", "--out", out, "--dir", work, "--reshard-from", work,
                   "--size-gb", str(args.size_gb), "--hidden", str(args.hidden), "--repeats", str(args.repeats)]
            subprocess.run(cmd, env=env, check=True, timeout=3600)
            with open(out) as f:
                raw["reshard"][str(n)] = json.load(f)["results"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"command": " ".join(sys.argv), "repeats": args.repeats, "raw": raw, "summary": summarize(raw)}
    save_report(report, markdown(report), plot, args, "checkpoint")


if __name__ == "__main__":
    sys.exit(main())
