"""tplinear's row and column layers on the GPU against torch.nn.functional.linear on the same inputs.

    python benchmarks/gpu_linear.py --json out.json [--size 8192] [--dtypes bfloat16,float16] [--iters 20]

For each dtype: x [size, size], W [size, size], b [size] (M = N = K = size). Forward: tplinear's
LinearLayer (column) and LinearAllreduce (row) vs F.linear(x, W, b); backward: layer.backward(dy) (dX, dW
accumulated, db) vs the same three products in torch (dy @ W, dW.addmm_(dy^T, x), db += dy.sum(0)).
Reports median milliseconds, TFLOP/s (2MNK forward, 4MNK backward) and the ratio of tplinear's throughput to
torch's (target >= 0.95). A world of one: the row layer's all-reduce is the group's no-op.
Timings are CUDA events on the stream both libraries use (the legacy default stream), 5 calls enqueued
back to back per sample. Without torch or a
GPU it prints why and writes {"skipped": reason}."""
import argparse
import json
import statistics
import sys


def skip(reason, path):
    print(f"gpu_linear: skipped: {reason}")
    if path:
        with open(path, "w") as f:
            json.dump({"benchmark": "gpu_linear", "skipped": reason}, f, indent=2)
    return 0


def timed(fn, iters, warmup, torch, inner=5):
    """Median milliseconds per call over `iters` samples; each sample enqueues `inner` calls back to back
    between two events (throughput, as in training: host overhead overlaps the previous call's GPU work)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def run_dtype(tp, torch, dtype_name, size, iters, warmup):
    F = torch.nn.functional
    tdt = getattr(torch, dtype_name)
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=dev).manual_seed(0)
    m = n = k = size
    x = torch.randn(m, k, device=dev, dtype=tdt, generator=g)
    w = torch.randn(n, k, device=dev, dtype=tdt, generator=g) / k**0.5
    b = torch.randn(n, device=dev, dtype=tdt, generator=g)
    dy = torch.randn(m, n, device=dev, dtype=tdt, generator=g)

    class Module:  # torch.nn.Linear-like: the layers copy the weights onto their GPU, keeping the dtype
        weight, bias = w, b

    tp.set_training_mode(True)
    layers = {"column": tp.LinearLayer(Module(), device=dev.index), "row": tp.LinearAllreduce(Module(), device=dev.index)}
    out = {}
    # correctness first (bf16/fp16 tolerances), then timings
    ref = F.linear(x, w, b).float()
    for name, layer in layers.items():
        y = torch.from_dlpack(layer(x)).float()
        err = ((y - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"{name} {dtype_name}: relative error {err}"

    fwd_flops, bwd_flops = 2.0 * m * n * k, 4.0 * m * n * k
    t_fwd = timed(lambda: F.linear(x, w, b), iters, warmup, torch)
    dw, db = torch.zeros_like(w), torch.zeros_like(b)

    def torch_backward():
        dx = dy @ w
        dw.addmm_(dy.t(), x)
        db.add_(dy.sum(0))
        return dx

    t_bwd = timed(torch_backward, iters, warmup, torch)
    out["torch"] = {"forward_ms": t_fwd, "backward_ms": t_bwd, "forward_tflops": fwd_flops / t_fwd / 1e9,
                    "backward_tflops": bwd_flops / t_bwd / 1e9}
    for name, layer in layers.items():
        layer(x)  # saves the input for backward
        f = timed(lambda: layer(x), iters, warmup, torch)
        bwd = timed(lambda: layer.backward(dy, retain=True), iters, warmup, torch)
        out[name] = {"forward_ms": f, "backward_ms": bwd, "forward_tflops": fwd_flops / f / 1e9,
                     "backward_tflops": bwd_flops / bwd / 1e9, "forward_ratio": t_fwd / f,
                     "backward_ratio": t_bwd / bwd}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--size", type=int, default=8192, help="M = N = K (default 8192)")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        import tplinear as tp
    except ImportError as exc:
        return skip(f"tplinear is not importable ({exc})", args.json)
    if not tp.cuda_available():
        why = "no CUDA GPU is visible" if tp._C.cuda_compiled() else "tplinear was built without CUDA"
        return skip(f"{why} (tplinear.cuda_available() is False); run it on a GPU machine", args.json)
    try:
        import torch
    except ImportError:
        return skip("torch is not installed (the baseline is torch.nn.functional.linear)", args.json)
    if not torch.cuda.is_available():
        return skip("torch sees no CUDA GPU", args.json)
    results = {
        "benchmark": "gpu_linear", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "tplinear": tp.__version__, "shape": {"M": args.size, "N": args.size, "K": args.size},
        "iters": args.iters, "stat": "median", "dtypes": {},
    }
    for dt in args.dtypes.split(","):
        results["dtypes"][dt] = run_dtype(tp, torch, dt.strip(), args.size, args.iters, args.warmup)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
