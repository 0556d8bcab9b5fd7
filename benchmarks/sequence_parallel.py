"""Sequence parallelism and the vocab-parallel loss (issue 15): per-rank activation memory of a 2-block
decoder, and what overlapping the sequence all-gather with the GEMMs buys.

    python benchmarks/sequence_parallel.py [--nproc 1 2 4] [--json out.json] [--md out.md] [--png out.png]
        [--tokens 2048 --hidden 4096 --ffn 16384 --vocab 151936 --blocks 2] [--skip-memory] [--skip-timing]

Memory: examples/decoder_sp.py's model (vocab-parallel embedding -> 2 blocks [RMSNorm -> column -> GELU ->
row, residual] -> RMSNorm -> column LM head -> cross-entropy), float32, one forward + backward of `tokens`
tokens, in three layouts at each world size p:

    tp         tensor parallelism only: activations between the layers whole on every rank, the LM head
               gathers the logits [tokens, vocab] on every rank (what a tensor-parallel LM head without a
               vocab-parallel loss does), each rank computes the loss on them
    tp+vocab   the same with the logits left split by vocabulary and tp.vocab_parallel_cross_entropy
    sp+vocab   sequence parallelism too: activations between the layers are this rank's rows of the sequence

At p=1 the three are one model (no gather, no split); it runs once, as tp+vocab: the unsplit figure.

Per rank it reports, for the step: the peak bytes of live NumPy arrays (tracemalloc, which NumPy reports
its allocations to; the weights and their gradients exist before tracing starts and are not counted), the
peak resident set size above the one before the step (VmHWM after resetting it through
/proc/self/clear_refs; this also counts the C core's scratch buffers, e.g. a gathered input, which
tracemalloc does not see), and an explicit count of the arrays kept from forward to backward: between the
blocks (the residual stream's norms and the layers' saved inputs of hidden width), inside the blocks (the
FFN activations, split by features in every layout) and the logits with their gradient (written in
place). The embedding table and the LM head's weight are frozen (requires_grad=False; --train-embeddings
trains them), only so that the largest configuration fits this machine's memory: their gradients are
parameter memory, not activations.

Target (issue 15): between-block activations and logits at sp+vocab <= (unsplit figure) / p + one
block's working set, the unsplit figure being the p=1 model's.

Timing: the sequence-parallel column layer's forward with its gather pipelined in 2, 4 or 8 chunks under
the GEMM against gather-then-GEMM, its backward with the gather and the reduce-scatter run under the GEMMs
(Megatron's overlap) against one after the other, and a sequence-parallel MLP block forward + backward
against the plain tensor-parallel one; medians over repetitions after a warm-up, each step after a
barrier, the slowest rank's time; at the issue's sizes and at a communication-heavier shape (hidden 1024,
FFN 1024). The machine is shared: quote ratios of cases run in the same world, not absolute times.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from linear import reset_peak_rss  # noqa: E402
ROOT = os.path.dirname(HERE)
LAYOUTS = {"tp": (False, False), "tp+vocab": (False, True), "sp+vocab": (True, True)}
MB = 1 << 20


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


# ------------------------------------------------------------------------------------------- memory worker


def memory_worker(args):
    import tracemalloc

    import numpy as np

    import tplinear as tp
    import tplinear.distributed as dist

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import decoder_sp

    dist.init_process_group(timeout=1800)
    r, p = dist.get_rank(), dist.get_world_size()
    tp.set_training_mode(True)
    sp, vp = LAYOUTS[args.layout]
    model = decoder_sp.Decoder(args.vocab, args.hidden, args.ffn, args.blocks, sequence_parallel=sp, vocab_parallel=vp,
                               dtype="float32", seed=1)
    if not args.train_embeddings:
        model.embed.weight.requires_grad = model.head.weight.requires_grad = False
    for param in model.parameters():  # gradients exist before the step, as from the step before
        if param.requires_grad:
            param.grad = np.zeros_like(param.data)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.tokens, 1))
    targets = rng.integers(0, args.vocab, (args.tokens, 1))
    gc.collect()
    dist.barrier()
    rss0 = _proc_status("VmRSS")
    hwm_ok = reset_peak_rss()
    tracemalloc.start()
    t0 = time.perf_counter()
    loss = model.forward(ids, targets)
    kept = _kept_bytes(model)
    after_forward = tracemalloc.get_traced_memory()[0]
    model.backward()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    hwm = _proc_status("VmHWM")
    row = {"nproc": p, "rank": r, "layout": args.layout, "loss": loss, "seconds": seconds,
           "tracemalloc_peak": peak, "tracemalloc_after_forward": after_forward,
           "rss_peak_delta": (hwm - rss0) if hwm_ok else None, "rss_before": rss0, **kept}
    for k in range(p):  # one rank after the other into one file
        if k == r:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        dist.barrier()
    dist.destroy_process_group()


def _kept_bytes(model):
    """Bytes of the arrays the model keeps from forward to backward, by kind."""
    saved, ns, grad = model._saved
    between = sum(a.nbytes for bns, _ in saved for a in bns) + sum(a.nbytes for a in ns)
    between += sum(up._input.nbytes for _, up, _ in model.blocks) + model.head._input.nbytes
    intra = sum(down._input.nbytes for _, _, down in model.blocks) + sum(da.nbytes for _, da in saved)
    return {"kept_between_blocks": between, "kept_in_blocks": intra, "kept_logits": grad.nbytes}


# ------------------------------------------------------------------------------------------- timing worker


def timing_worker(args):
    import numpy as np

    import tplinear as tp
    import tplinear.distributed as dist
    from tplinear import _C

    dist.init_process_group(timeout=1800)
    r, p = dist.get_rank(), dist.get_world_size()
    tp.set_training_mode(True)
    S, H, F = args.tokens, args.hidden, args.ffn
    so, ss = tp.sequence_ranges(S, p)[r]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((S, 1, H)).astype(np.float32)
    up_sp = tp.LinearLayer.from_init(H, F, seed=1, sequence_parallel=True)
    up_sp_ov = tp.LinearLayer.from_init(H, F, seed=1, sequence_parallel=True, tp_overlap_comm=True)
    down_sp = tp.LinearAllreduce.from_init(F, H, seed=2, sequence_parallel=True)
    up, down = tp.LinearLayer.from_init(H, F, seed=1), tp.LinearAllreduce.from_init(F, H, seed=2)
    fs = up.local_shape[0]
    dy = rng.standard_normal((S, 1, fs)).astype(np.float32)
    xr = x[so:so + ss].copy()

    seq = tp.sequence_ranges(S, p)
    y = np.empty((S, 1, fs), np.float32)

    def col_forward(chunks):  # the layer's forward call with explicit chunks (TPLINEAR_SP_CHUNKS)
        def run():
            _C.col_forward_sp(up_sp.mp_group._handle, xr, up_sp.weight.data, up_sp.bias.data, seq, y, chunks)
        return run

    def col_backward(layer):
        def run():
            layer(xr, seq_len=S)
            t0 = time.perf_counter()
            layer.backward(dy)
            return time.perf_counter() - t0
        return run

    def block(sp):
        c, d = (up_sp, down_sp) if sp else (up, down)
        inp = xr if sp else x

        def run():
            h = c(inp, seq_len=S) if sp else c(inp)
            y = d(h)
            d.backward(np.ones_like(y))
            c.backward(h)
        return run

    cases = [("column fwd, gather then GEMM", col_forward(0))]
    cases += [(f"column fwd, gather in {k} chunks under the GEMM", col_forward(k)) for k in (2, 4, 8)]
    cases += [("column bwd, collectives one after the other", col_backward(up_sp)),
              ("column bwd, gather / reduce-scatter under the GEMMs", col_backward(up_sp_ov)),
              ("MLP block fwd+bwd, tensor parallel (all-reduce)", block(False)),
              ("MLP block fwd+bwd, sequence parallel", block(True))]
    times = {name: [] for name, _ in cases}
    for rep in range(args.warmup + args.reps):  # interleaved, so load changes hit every case alike
        for name, fn in cases:
            dist.barrier()
            t0 = time.perf_counter()
            inner = fn()
            t = inner if isinstance(inner, float) else time.perf_counter() - t0
            slowest = np.array([t])
            dist.all_reduce(slowest, op="max")
            if rep >= args.warmup:
                times[name].append(float(slowest[0]))
    if r == 0:
        with open(args.out, "w") as f:
            json.dump([{"nproc": p, "tokens": S, "hidden": H, "ffn": F, "case": name, "median_s": median(ts),
                        "times_s": ts} for name, ts in times.items()], f)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- driver


def run_world(nproc, argv, timeout):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.abspath(__file__)] + argv
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"world of {nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def estimate_bytes(args, p, layout):
    """A rough total over the ranks of a memory run, to skip what this machine cannot hold."""
    sp, vp = LAYOUTS[layout]
    weights = 4 * (2 * args.vocab * args.hidden / p + 2 * args.blocks * args.hidden * args.ffn / p)
    grads = 4 * (2 * args.blocks * args.hidden * args.ffn / p) + (4 * 2 * args.vocab * args.hidden / p
                                                                    if args.train_embeddings else 0)
    logits = 4 * args.tokens * args.vocab * ((1 / p) if vp else (2 + 2 / p))  # gathered: staging, shard, whole
    acts = 4 * args.tokens * (6 * args.hidden + 4 * args.ffn / p)
    return p * (weights + grads + logits + acts)


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def memory_runs(args, tmp):
    rows, skipped = [], []
    for p in args.nproc:
        for layout in (["tp+vocab"] if p == 1 else list(LAYOUTS)):  # p=1: the unsplit model
            need, avail = estimate_bytes(args, p, layout), mem_available()
            if avail is not None and need * 1.15 > avail:
                skipped.append({"nproc": p, "layout": layout, "reason": f"needs about {need / 2**30:.1f} GiB, "
                                f"{avail / 2**30:.1f} GiB available"})
                print(f"memory p={p} {layout}: skipped ({skipped[-1]['reason']})", flush=True)
                continue
            out = os.path.join(tmp, f"mem-{p}-{layout}.jsonl")
            argv = ["--worker", "memory", "--out", out, "--layout", layout] + _size_argv(args)
            t0 = time.time()
            run_world(p, argv, timeout=3600)
            with open(out) as f:
                got = [json.loads(line) for line in f]
            rows += got
            print(f"memory p={p} {layout}: peak arrays {max(x['tracemalloc_peak'] for x in got) / MB:.0f} MiB per "
                  f"rank, loss {got[0]['loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return rows, skipped


def timing_runs(args, tmp):
    rows = []
    for p in [n for n in args.nproc if n > 1]:
        for hidden, ffn in ((args.hidden, args.ffn), (1024, 1024)):
            out = os.path.join(tmp, f"time-{p}-{hidden}.json")
            run_world(p, ["--worker", "timing", "--out", out, "--tokens", str(args.tokens), "--hidden", str(hidden),
                          "--ffn", str(ffn), "--reps", str(args.reps), "--warmup", str(args.warmup)], timeout=3600)
            with open(out) as f:
                rows += json.load(f)
            print(f"timing p={p} hidden={hidden}: done", flush=True)
    return rows


def _size_argv(args):
    out = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--vocab",
           str(args.vocab), "--blocks", str(args.blocks)]
    return out + (["--train-embeddings"] if args.train_embeddings else [])


def summarize(args, mem, timing):
    """Per (p, layout): the largest rank's figures; the target check."""
    table = {}
    for x in mem:
        key = (x["nproc"], x["layout"])
        cur = table.setdefault(key, dict(x))
        for k in ("tracemalloc_peak", "rss_peak_delta", "kept_between_blocks", "kept_in_blocks", "kept_logits",
                  "seconds"):
            if x.get(k) is not None and (cur.get(k) is None or x[k] > cur[k]):
                cur[k] = x[k]
    unsplit = table.get((1, "tp+vocab"))
    checks = []
    for (p, layout), x in sorted(table.items()):
        if layout != "sp+vocab" or unsplit is None:
            continue
        S, H, F = args.tokens, args.hidden, args.ffn
        working = 4 * S * (2 * H + 3 * -(-F // p))  # a block's gathered input and partial output, its FFN arrays
        figure = x["kept_between_blocks"] + x["kept_logits"]
        bound = (unsplit["kept_between_blocks"] + unsplit["kept_logits"]) / p + working
        peak_bound = unsplit["tracemalloc_peak"] / p + working
        checks.append({"nproc": p, "between_blocks_and_logits": figure, "bound": bound, "ok": figure <= bound,
                       "peak_arrays": x["tracemalloc_peak"], "peak_bound": peak_bound,
                       "peak_ok": x["tracemalloc_peak"] <= peak_bound, "one_block_working_set": working})
    return table, checks


def markdown(args, table, checks, skipped, timing, command):
    mib = (lambda b: "" if b is None else f"{b / MB:,.0f}")
    lines = [f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
             f"Machine: {os.cpu_count()} cores, shared with other jobs while it ran.  ",
             f"Model: {args.blocks} blocks, {args.tokens} tokens, hidden {args.hidden}, FFN {args.ffn}, vocabulary "
             f"{args.vocab}, float32; embedding and LM head weights "
             f"{'trained' if args.train_embeddings else 'frozen (see the script)'}.", "",
             "Per-rank MiB, the largest rank (one forward + backward):", "",
             "| p | layout | kept between blocks | kept in blocks | logits (+grad in place) | peak live arrays "
             "(tracemalloc) | peak RSS above start | step s |", "|---|---|---|---|---|---|---|---|"]
    for (p, layout), x in sorted(table.items()):
        lines.append(f"| {p} | {layout} | {mib(x['kept_between_blocks'])} | {mib(x['kept_in_blocks'])} | "
                     f"{mib(x['kept_logits'])} | {mib(x['tracemalloc_peak'])} | {mib(x['rss_peak_delta'])} | "
                     f"{x['seconds']:.1f} |")
    for s in skipped:
        lines.append(f"| {s['nproc']} | {s['layout']} | skipped: {s['reason']} | | | | | |")
    if checks:
        lines += ["", "Target: between-block activations + logits at sp+vocab <= unsplit (p=1) / p + one block's "
                  "working set:", "", "| p | sp+vocab MiB | bound MiB | ok | peak live arrays MiB | "
                  "unsplit peak / p + working set MiB | ok |", "|---|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['nproc']} | {mib(c['between_blocks_and_logits'])} | {mib(c['bound'])} | {c['ok']} | "
                         f"{mib(c['peak_arrays'])} | {mib(c['peak_bound'])} | {c['peak_ok']} |")
    if timing:
        lines += ["", "Overlap (median s over repetitions, slowest rank; ratio to the first row of its group):", "",
                  "| p | hidden / FFN | case | median s | ratio |", "|---|---|---|---|---|"]
        groups = {}
        for t in timing:
            groups.setdefault((t["nproc"], t["hidden"], t["case"].split(",")[0]), []).append(t)
        for (p, h, _), ts in groups.items():
            for t in ts:
                lines.append(f"| {p} | {h} / {t['ffn']} | {t['case']} | {t['median_s']:.4f} | "
                             f"{t['median_s'] / ts[0]['median_s']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(table)
    labels = [f"p={p}\n{layout}" for p, layout in keys]
    parts = [("kept_between_blocks", "between blocks"), ("kept_in_blocks", "in blocks"), ("kept_logits", "logits")]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4.5))
    bottom = [0.0] * len(keys)
    for key, name in parts:
        vals = [table[k][key] / MB for k in keys]
        ax.bar(labels, vals, bottom=bottom, label=f"kept: {name}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(labels, [table[k]["tracemalloc_peak"] / MB for k in keys], "k_", markersize=30, mew=2,
            label="peak live arrays")
    ax.set_ylabel("MiB per rank")
    ax.set_title("Activation memory per rank, 2-block decoder")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--train-embeddings", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--png")
    ap.add_argument("--worker", choices=["memory", "timing"], help=argparse.SUPPRESS)
    ap.add_argument("--layout", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "memory":
        return memory_worker(args)
    if args.worker == "timing":
        return timing_worker(args)
    command = "python benchmarks/sequence_parallel.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        mem, skipped = memory_runs(args, tmp) if not args.skip_memory else ([], [])
        timing = timing_runs(args, tmp) if not args.skip_timing else []
    table, checks = summarize(args, mem, timing)
    md = markdown(args, table, checks, skipped, timing, command)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.png and table:
        plot(table, args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "sequence_parallel", "command": command, "cpus": os.cpu_count(),
                       "sizes": {k: getattr(args, k) for k in ("tokens", "hidden", "ffn", "vocab", "blocks")},
                       "train_embeddings": args.train_embeddings, "memory": mem, "skipped": skipped,
                       "targets": checks, "timing": timing}, f, indent=1)


if __name__ == "__main__":
    main()
