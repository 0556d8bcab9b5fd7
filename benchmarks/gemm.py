"""Single-process layer forward and backward against NumPy at [2048x4096].[4096->4096] float32.

    python benchmarks/gemm.py --json out.json [--batch 2048 --in 4096 --out 4096 --reps 7]

Both contenders run in this process on the same inputs: tplinear's LinearLayer (world of one,
OpenBLAS from scipy-openblas32) and NumPy (`x @ w.T + b`; backward `dy @ w`, `dy.T @ x`, `dy.sum(0)`,
NumPy's own OpenBLAS). Reports medians over --reps timed runs after one warm-up, and the ratio
numpy_time / tplinear_time (>= 1 means tplinear is at least as fast).
"""
import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

import tplinear as tp


def median_time(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--in", dest="in_features", type=int, default=4096)
    ap.add_argument("--out", dest="out_features", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    lin = tp.Linear(args.in_features, args.out_features, seed=0)
    layer = tp.LinearLayer(lin)
    w, b = layer.weight.data, layer.bias.data
    x = rng.standard_normal((args.batch, args.in_features), dtype=np.float32)
    dy = rng.standard_normal((args.batch, args.out_features), dtype=np.float32)
    dw_np, db_np = np.zeros_like(w), np.zeros_like(b)

    def np_forward():
        return x @ w.T + b

    def np_backward():
        dx = dy @ w
        dw_np.__iadd__(dy.T @ x)
        db_np.__iadd__(dy.sum(axis=0))
        return dx

    def tp_forward():
        return layer(x)

    def tp_backward():
        return layer.backward(dy, retain=True)  # timed again and again after one forward

    flops_fwd = 2.0 * args.batch * args.in_features * args.out_features
    results = {}
    for name, fn, flops in (("numpy_forward", np_forward, flops_fwd), ("tplinear_forward", tp_forward, flops_fwd),
                            ("numpy_backward", np_backward, 2 * flops_fwd),
                            ("tplinear_backward", tp_backward, 2 * flops_fwd)):
        med, times = median_time(fn, args.reps)
        results[name] = {"median_s": med, "gflops": flops / med / 1e9, "times_s": times}
    ratios = {
        "forward": results["numpy_forward"]["median_s"] / results["tplinear_forward"]["median_s"],
        "backward": results["numpy_backward"]["median_s"] / results["tplinear_backward"]["median_s"],
    }
    out = {
        "benchmark": "gemm",
        "shape": {"batch": args.batch, "in": args.in_features, "out": args.out_features, "dtype": "float32"},
        "reps": args.reps,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "tplinear_blas_threads": tp.get_num_threads(),
                    "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")},
        "results": results,
        "speed_ratio_vs_numpy": ratios,
        "target": "speed ratio >= 0.95",
    }
    for name, r in results.items():
        print(f"{name:20s} median {r['median_s'] * 1e3:9.2f} ms  {r['gflops']:7.1f} GFLOP/s")
    print(f"speed ratio vs numpy: forward {ratios['forward']:.3f}  backward {ratios['backward']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
