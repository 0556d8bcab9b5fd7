"""α–β cost model of tensor-parallel layer steps (issue 16; the write-up is docs/performance.md).

    python benchmarks/cost_model.py      # reads results/allreduce.json and results/linear.json,
                                         # writes results/cost_model.md and results/cost_model.json
    python benchmarks/cost_model.py --allreduce A.json --linear L.json --md out.md --json out.json

1. Fits each backend's collectives measured by benchmarks/allreduce.py to T(n) = α + β·n: α is the 4 KB
   time; β is fitted (least squares, through α) in two regimes, 256 KB .. 16 MB (the buffers stay in this
   machine's caches) and 32 .. 64 MB (they do not).
2. Models a row-parallel step as T(p) = G(p) + C(p): G from a measured FLOP rate (one core's, from the
   2-rank GEMM-alone steps of benchmarks/linear.py) or, for the decode shape, the memory roofline (the
   weight streamed at the STREAM bandwidth measured by allreduce.py); C = the all-reduce of the output at
   the fitted α, β (0 at p = 1). Compared with linear.py's paired steps at p = 1, 2, 4.
3. Projects the same model to 8 NVLink H100s and to two CPU nodes over 100 Gb/s with published figures
   (PROJECTIONS below, each with its source) and says where tensor parallelism stops paying off.
"""
import argparse
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

H, B_BIG, B_DEC = 4096, 2048, 8
KB, MB = 1 << 10, 1 << 20

# Other machines. A ring all-reduce of n bytes over p ranks: alpha + 2 (p - 1) / p * n / busbw.
PROJECTIONS = {
    "h100": {
        "label": "8x H100 SXM (NVLink 4, NVSwitch), bf16",
        "flops": 989e12 * 0.65, "flops_src": "989 TFLOP/s dense BF16 peak (NVIDIA H100 SXM datasheet), at an "
                                             "assumed 65 % in large GEMMs",
        "mem_bw": 3.35e12 * 0.85, "mem_src": "3.35 TB/s HBM3 (datasheet), assumed 85 % reachable",
        "busbw": 370e9, "busbw_src": "NCCL ring over NVLink: ~370 GB/s effective of the 450 GB/s line rate "
                                     "(S. Jeaugey, NVIDIA/nccl-tests#212; NVLink SHARP reaches ~480 GB/s busBw)",
        "alpha": 20e-6, "alpha_src": "NCCL's own model: ring/LL base latency 6.6 us + 0.6 us per NVLink step, "
                                     "14 steps at 8 GPUs (src/graph/tuning.cc); 8x A100 measured 34 us with one "
                                     "channel (NVIDIA/nccl-tests#123)",
        "elem": 2, "max_p": 8,
    },
    "cpu2": {
        "label": "2 CPU nodes, 32 cores each, 100 Gb/s between them, fp32",
        "flops": None, "flops_src": "32 x one core of this machine (measured below)",
        "mem_bw": 200e9, "mem_src": "assumed STREAM of a 2-socket DDR5 node",
        "busbw": 11e9, "busbw_src": "100 Gb/s = 12.5 GB/s line rate (InfiniBand EDR / 100 GbE); ib_write_bw "
                                    "measures 11.7 GB/s on a 100 Gb/s IB card (linux-rdma/perftest#225), NCCL's "
                                    "ring adds its protocol overhead: 11 GB/s assumed",
        "alpha": 12e-6, "alpha_src": "NCCL's model for the network: base 6.6 us + 2.7 us per step "
                                     "(src/graph/tuning.cc, ring/LL); TCP is slower (tens of us)",
        "elem": 4, "max_p": 2,
    },
}


def fit(cells):
    """(alpha, beta_cache, beta_mem) in s and s/byte from {size: seconds}."""
    alpha = cells.get(4 * KB)

    def slope(sizes):
        pts = [(n, cells[n] - alpha) for n in sizes if n in cells]
        den = sum(n * n for n, _ in pts)
        return sum(n * t for n, t in pts) / den if den else None
    return alpha, slope([n for n in cells if 256 * KB <= n <= 16 * MB]), slope([n for n in cells if n >= 32 * MB])


def coll_time(f, n):
    alpha, bc, bm = f
    return alpha + n * (bc if n <= 16 * MB or bm is None else bm)


def load_fits(path):
    rep = json.load(open(path))
    fits, stream = {}, {}
    for who, per in rep["results"].items():
        for p, r in per.items():
            for coll in ("all_reduce", "reduce_scatter", "all_gather"):
                cells = {int(k.split("/")[1]): v["median_s"] for k, v in r.get("cells", {}).items()
                         if k.startswith(coll + "/") and "median_s" in v}
                if 4 * KB in cells:
                    fits[(who, int(p), coll)] = fit(cells)
            if who == "tplinear":
                stream[int(p)] = {int(k): v for k, v in r.get("stream", {}).items()}
    return rep, fits, stream


def linear_points(path):
    rep = json.load(open(path))
    out = {}
    for p, r in rep["results"].get("tplinear", {}).items():
        for case, v in r.get("cases", {}).items():
            out[(int(p), case)] = v["median_s"]
    return rep, out


def row_model(p, b, f_core, cores, mem_bw, ar_fit):
    """Predicted (GEMM, all-reduce) seconds of the row forward [b x H/p] . [H/p -> H] at p ranks on a machine
    of `cores` cores: the ranks share them (cores / p BLAS threads each, or p / cores ranks per core), so the
    GEMM takes the whole layer's FLOPs at all cores' rate, or streams the whole weight at the machine's
    memory bandwidth, whichever is longer, at every p."""
    g = max(2.0 * b * H * H / (cores * f_core), 4.0 * H * H / mem_bw)
    return g, (coll_time(ar_fit, 4 * b * H) if p > 1 else 0.0)


def projection(m, f_core):
    """Rows of (layer, tokens, p, T(p), speedup over p/2) for the projected machine."""
    flops = m["flops"] or 32 * f_core
    rows = []
    layers = [("attention out (row) h=4096", 4096, 4096), ("MLP down (row) 4h->h, h=4096", 16384, 4096),
              ("attention out (row) h=8192", 8192, 8192), ("MLP down (row) 4h->h, h=8192", 32768, 8192)]
    for name, inn, out in layers:
        for b in (8, 4096):
            prev = None
            p = 1
            while p <= m["max_p"]:
                g = max(2.0 * b * inn * out / p / flops, m["elem"] * inn * out / p / m["mem_bw"])
                c = 0.0 if p == 1 else m["alpha"] + 2 * (p - 1) / p * m["elem"] * b * out / m["busbw"]
                t = g + c
                rows.append({"layer": name, "tokens": b, "p": p, "gemm_s": g, "comm_s": c, "t_s": t,
                             "speedup_vs_half": (prev / t) if prev else None, "comm_frac": c / t})
                prev = t
                p *= 2
    return rows


def fmt(s):
    if s is None:
        return "—"
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} µs"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allreduce", default=os.path.join(RESULTS, "allreduce.json"),
                    help="JSON of benchmarks/allreduce.py (default: %(default)s)")
    ap.add_argument("--linear", default=os.path.join(RESULTS, "linear.json"),
                    help="JSON of benchmarks/linear.py with the row_pair, dec_row_pair cases (default: %(default)s)")
    ap.add_argument("--md", default=os.path.join(RESULTS, "cost_model.md"),
                    help="write the Markdown here (default: %(default)s; '' to skip)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "cost_model.json"),
                    help="write the numbers here (default: %(default)s; '' to skip)")
    args = ap.parse_args()
    arrep, fits, stream = load_fits(args.allreduce)
    linrep, pts = linear_points(args.linear)
    cores = linrep["machine"]["cores"]
    lines, out = [], {"fits": {}, "check": [], "projections": {}}

    lines.append("#### Collectives: T(n) = α + β·n (float32, from benchmarks/allreduce.py)\n")
    lines.append("| backend | p | collective | α (4 KB) | 1/β, 256 KB–16 MB | 1/β, 32–64 MB |")
    lines.append("|---|---|---|---|---|---|")
    for (who, p, coll), (a, bc, bm) in sorted(fits.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        out["fits"][f"{who}/{p}/{coll}"] = {"alpha_s": a, "beta_cache_s_per_B": bc, "beta_mem_s_per_B": bm}
        lines.append(f"| {who} | {p} | {coll} | {fmt(a)} | " + (f"{1 / bc / 1e9:.1f} GB/s" if bc else "—") + " | "
                     + (f"{1 / bm / 1e9:.1f} GB/s" if bm else "—") + " |")

    # one core's FLOP rate: the 2-rank GEMM alone, one BLAS thread per rank
    g2 = pts.get((2, "row_pair_gemm"))
    f_core = 2.0 * B_BIG * H * (H // 2) / g2
    bw2 = stream.get(2, {}).get(64 * MB, {}).get("copy")  # per rank, both ranks streaming from memory
    agg_bw = bw2 * 2 if bw2 else 20e9
    lines.append(f"\nGEMM rate: {f_core / 1e9:.0f} GFLOP/s per core (the 2-rank row GEMM alone, "
                 f"{fmt(g2)} for {2.0 * B_BIG * H * H / 2 / 1e9:.1f} GFLOP); memory: STREAM copy "
                 f"{agg_bw / 1e9:.1f} GB/s for the whole machine (64 MB arrays, {cores} cores).\n")
    lines.append("#### Row-parallel forward at p = 1, 2, 4: model against linear.py's paired steps\n")
    lines.append("| shape | p | GEMM model | GEMM measured | all-reduce model | overhead measured | "
                 "step model | step measured | error |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for b, pre in ((B_BIG, "row_pair"), (B_DEC, "dec_row_pair")):
        for p in (1, 2, 4):
            meas_g, meas_f = pts.get((p, pre + "_gemm")), pts.get((p, pre + "_fwd"))
            meas_o = pts.get((p, pre + "_overhead"))
            ar = fits.get(("tplinear", p, "all_reduce"))
            if meas_f is None or (p > 1 and ar is None):
                continue
            g, c = row_model(p, b, f_core, cores, agg_bw, ar or (0, 0, 0))
            err = (g + c) / meas_f - 1
            out["check"].append({"batch": b, "p": p, "gemm_model_s": g, "gemm_s": meas_g, "comm_model_s": c,
                                 "overhead_s": meas_o, "step_model_s": g + c, "step_s": meas_f, "error": err})
            lines.append(f"| [{b}x{H}]·[{H}→{H}] | {p} | {fmt(g)} | {fmt(meas_g)} | {fmt(c)} | {fmt(meas_o)} | "
                         f"{fmt(g + c)} | {fmt(meas_f)} | {err:+.0%} |")

    for key, m in PROJECTIONS.items():
        rows = projection(m, f_core)
        out["projections"][key] = {"machine": {k: v for k, v in m.items()}, "rows": rows}
        lines.append(f"\n#### Projection: {m['label']}\n")
        for k in ("flops", "mem", "busbw", "alpha"):
            lines.append(f"- {k}: {m[k + '_src']}")
        lines.append("\n| layer | tokens | p | GEMM | all-reduce | step | vs p/2 | comm share |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in rows:
            sp = r["speedup_vs_half"]
            lines.append(f"| {r['layer']} | {r['tokens']} | {r['p']} | {fmt(r['gemm_s'])} | {fmt(r['comm_s'])} | "
                         f"{fmt(r['t_s'])} | " + (f"{sp:.2f}x" if sp else "—") + f" | {r['comm_frac']:.0%} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
