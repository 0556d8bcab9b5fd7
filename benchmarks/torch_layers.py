"""CPU benchmark of tplinear.torch against DeepSpeed AutoTP's layers and torch's parallelize_module (issue 12).

    python benchmarks/torch_layers.py --json out.json --md table.md --plot plot.png [--dtype float32 bfloat16]

p = 2 ranks, float32 (or each --dtype in turn in every world: the block and its inputs in that dtype), forward
+ backward of transformers' Llama blocks (hidden 4096, intermediate 11008 as Llama-2-7B, 32 query heads of 128
in 8 KV groups):

    mlp       LlamaMLP: gate_proj, up_proj (column) -> SiLU * -> down_proj (row)
    decoder   LlamaDecoderLayer: RMSNorm, q/k/v (column), RoPE, SDPA attention, o_proj (row), RMSNorm, the MLP

at the decode shape (1 x 8 tokens) and the training shape (1 x 2048 tokens). A step is what a training step
does with the block: the gradients are set to None (optimizer.zero_grad()'s default, untimed), then
forward and backward from a fixed dY, the input requiring grad.

Contenders, each its own 2-rank world started by this script, all in one run, on the same weights (seed 0):

    tplinear   tplinear.torch.parallelize over tplinear's shm group (python -m tplinear.run)
    deepspeed  DeepSpeed 0.19's LinearLayer / LinearAllreduce (set_autotp_mode(training=True): its
               all-reduces are torch.distributed over gloo), placed on the same modules (torchrun)
    torch_tp   torch.distributed.tensor.parallel.parallelize_module with ColwiseParallel / RowwiseParallel
               on a CPU DeviceMesh over gloo (torchrun)

Threads: one per rank for everyone (torch.set_num_threads(cores / p); tplinear's BLAS picks cores / local
ranks). Timing: all ranks meet at a barrier, each times its step, the step's time is the slowest rank's; the
median over the timed steps is reported. A checksum of every contender's decode output on the same input
is compared (they compute the same function).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from linear import add_dtype_arg, free_port, save_report  # noqa: E402
P = 2
HIDDEN, INTER, HEADS, KV_HEADS = 4096, 11008, 32, 8
SHAPES = {"decode": 8, "training": 2048}
if os.environ.get("TORCH_LAYERS_SHAPES"):  # --shapes: a subset (the workers read it from here)
    SHAPES = {k: v for k, v in SHAPES.items() if k in os.environ["TORCH_LAYERS_SHAPES"].split(",")}
if os.environ.get("TORCH_LAYERS_SMALL") == "1":  # --small: a quick run of the script itself
    HIDDEN, INTER, HEADS, KV_HEADS = 256, 512, 8, 2
    SHAPES = {"decode": 8, "training": 128}
BLOCKS = ("mlp", "decoder")
REPS = {"decode": (2, 8), "training": (1, 2)}  # (warm-up, timed) steps
CONTENDERS = ("tplinear", "deepspeed", "torch_tp")
LABELS = {"tplinear": "tplinear.torch", "deepspeed": "DeepSpeed 0.19 AutoTP (gloo)",
          "torch_tp": "torch parallelize_module (gloo)"}


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ====================================================================================== worker (one rank)


def config():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, num_hidden_layers=1, vocab_size=128,
                      max_position_embeddings=max(SHAPES.values()))
    cfg._attn_implementation = "sdpa"
    return cfg


def build_block(kind, cfg):
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP
    torch.manual_seed(0)
    return LlamaMLP(cfg) if kind == "mlp" else LlamaDecoderLayer(cfg, layer_idx=0)


def block_inputs(kind, cfg, tokens, dtype):
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, HIDDEN, generator=g).to(dtype)
    dy = torch.randn(1, tokens, HIDDEN, generator=g).to(dtype)
    kwargs = {}
    if kind == "decoder":
        pos = torch.arange(tokens)[None]
        kwargs = {"position_embeddings": LlamaRotaryEmbedding(cfg)(x, pos), "position_ids": pos}
    return x, dy, kwargs


LINEAR_PLAN = {"self_attn.q_proj": "col", "self_attn.k_proj": "col", "self_attn.v_proj": "col",
               "self_attn.o_proj": "row", "mlp.gate_proj": "col", "mlp.up_proj": "col", "mlp.down_proj": "row",
               "gate_proj": "col", "up_proj": "col", "down_proj": "row"}


def key_of(kind, shape, dtype):
    """A case's results key (shape None: the decode checksum's): float32's keeps its name from before the dtypes."""
    return "_".join([kind] + ([shape] if shape else []) + ([dtype] if dtype != "float32" else []))


def worker(name, out_path, dtypes):
    import torch
    threads = max(1, cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    from transformers import logging
    logging.set_verbosity_error()
    cfg = config()
    if name == "tplinear":
        import tplinear as tp
        import tplinear.distributed as dist
        import tplinear.torch as tpt
        dist.init_process_group()
        tp.set_training_mode(True)
        rank, barrier = dist.get_rank(), dist.barrier

        def parallel(block):  # the same modules as the others (LINEAR_PLAN), heads kept whole
            names = {n for n, _ in block.named_modules()}
            plan = {n: "colwise" if k == "col" else "rowwise" for n, k in LINEAR_PLAN.items() if n in names}
            block = tpt.parallelize(block, plan=plan, num_heads=HEADS, num_kv_heads=KV_HEADS,
                                    head_dim=HIDDEN // HEADS)
            assert len(tpt.tp_modules(block)) == len(plan), "not every planned module was parallelized"
            return block

        def slowest(t):
            import numpy as np
            a = np.array([t])
            dist.all_reduce(a, op="max")
            return float(a[0])
        versions = {"tplinear": tp.__version__, "torch": torch.__version__}
    else:
        import torch.distributed as tdist
        if name == "deepspeed":
            import deepspeed
            import deepspeed.comm as dscomm
            from deepspeed.module_inject import layers as L
            L.set_autotp_mode(training=True)
            deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=600))
            group = dscomm.new_group(list(range(tdist.get_world_size())))

            def parallel(block):
                for mname, kind in LINEAR_PLAN.items():
                    try:
                        sub = block.get_submodule(mname)
                    except AttributeError:
                        continue
                    parent, _, child = mname.rpartition(".")
                    layer = L.LinearLayer(sub, group) if kind == "col" else L.LinearAllreduce(sub, group)
                    setattr(block.get_submodule(parent) if parent else block, child, layer)
                return block
            versions = {"deepspeed": deepspeed.__version__, "torch": torch.__version__}
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
            tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
            mesh = init_device_mesh("cpu", (tdist.get_world_size(),))

            def parallel(block):
                names = {n for n, _ in block.named_modules()}
                plan = {n: (ColwiseParallel() if k == "col" else RowwiseParallel())
                        for n, k in LINEAR_PLAN.items() if n in names}
                return parallelize_module(block, mesh, plan)
            versions = {"torch": torch.__version__}
        rank, barrier = tdist.get_rank(), tdist.barrier

        def slowest(t):
            a = torch.tensor([t], dtype=torch.float64)
            tdist.all_reduce(a, op=tdist.ReduceOp.MAX)
            return float(a[0])

    results, checks = {}, {}
    for dtype, kind in [(d, k) for d in dtypes for k in BLOCKS]:
        block = parallel(build_block(kind, cfg).to(getattr(torch, dtype)))
        params = [p for p in block.parameters() if p.requires_grad]
        for shape, tokens in SHAPES.items():
            x0, dy, kwargs = block_inputs(kind, cfg, tokens, getattr(torch, dtype))

            def step():
                for p in params:  # optimizer.zero_grad(): untimed
                    p.grad = None
                barrier()
                x = x0.clone().requires_grad_()
                t0 = time.perf_counter()
                out = block(x, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                out.backward(dy)
                return time.perf_counter() - t0, out

            warm, reps = REPS[shape]
            for _ in range(warm):
                _, out = step()
            if shape == "decode":
                checks[key_of(kind, None, dtype)] = float(out.detach().double().sum())
            times = [slowest(step()[0]) for _ in range(reps)]
            results[key_of(kind, shape, dtype)] = {"median_s": statistics.median(times), "times_s": times}
            if rank == 0:
                print(f"{name}: {kind} {shape} {dtype}: median {statistics.median(times) * 1e3:.1f} ms", flush=True)
        block = params = None  # free this block before building the next
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"contender": name, "results": results, "checksums": checks, "versions": versions,
                       "threads_per_rank": threads}, f)


# ====================================================================================== driver


def run_contender(name, out_path, python, dtypes):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # the workers import the installed tplinear, as linear.py's do: the source tree's python/ has no built _C
    script = [os.path.abspath(__file__), "--worker", name, "--out", out_path, "--dtype"] + dtypes
    if name == "tplinear":
        cmd = [python, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(P)] + script
    else:
        cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(P), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port())] + script
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    with open(out_path) as f:
        data = json.load(f)
    data["wall_s"] = time.time() - t0
    return data


def fmt(s):
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def table(report):
    dtypes = report["config"]["dtypes"]
    rows = ["| block | shape | dtype | " + " | ".join(LABELS[c] for c in report["contenders"]) +
            " | tplinear speed-up vs the faster other | tplinear: float32 time / this |",
            "|---|---|---|" + "---|" * (len(report["contenders"]) + 2)]
    for kind in BLOCKS:
        for shape, tokens in SHAPES.items():
            for dtype in dtypes:
                key = key_of(kind, shape, dtype)
                times = {c: report["results"][c][key]["median_s"] for c in report["contenders"]}
                others = [t for c, t in times.items() if c != "tplinear"]
                speedup = f"{min(others) / times['tplinear']:.2f}x" if others else "—"
                base = report["results"]["tplinear"].get(key_of(kind, shape, "float32"))
                vs32 = f"{base['median_s'] / times['tplinear']:.2f}x" if base and "tplinear" in times else "—"
                rows.append(f"| {kind} fwd+bwd | {shape} 1x{tokens}x{HIDDEN} | {dtype} | " +
                            " | ".join(fmt(times[c]) for c in report["contenders"]) + f" | {speedup} | {vs32} |")
    return "\n".join(rows)


def targets(report):
    lines = []
    res = report["results"].get("tplinear", {})
    a, b = res.get(key_of("mlp", "decode", "float32")), res.get(key_of("mlp", "decode", "bfloat16"))
    if a and b:
        t32, t16 = a["median_s"], b["median_s"]
        lines.append(f"| mlp decode: bfloat16 >= 1.7x faster than tplinear's float32 | {t32 / t16:.2f}x | "
                     f"{'met' if t32 / t16 >= 1.7 else 'missed'} |")
    for kind, shape, dtype in [(k, s, d) for k in BLOCKS for s in SHAPES for d in report["config"]["dtypes"]]:
        key = key_of(kind, shape, dtype)
        t = report["results"]["tplinear"][key]["median_s"]
        others = {c: report["results"][c][key]["median_s"] for c in report["contenders"] if c != "tplinear"}
        if not others:
            continue
        best = min(others.values())
        need = 2.0 if shape == "decode" else 1.0
        met = best / t >= need
        goal = ">= 2x faster than the faster other" if shape == "decode" else "no slower than either"
        lines.append(f"| {kind} {shape} {dtype}: {goal} | {best / t:.2f}x | {'met' if met else 'missed'} |")
    return "| target | measured | |\n|---|---|---|\n" + "\n".join(lines)


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dtypes = report["config"]["dtypes"]
    for ax, shape in zip(axes, SHAPES):
        keys = [key_of(k, shape, d) for k in BLOCKS for d in dtypes]
        width = 0.8 / len(report["contenders"])
        for i, c in enumerate(report["contenders"]):
            vals = [report["results"][c][k]["median_s"] * 1e3 for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=LABELS[c])
        ax.set_xticks([j + width * (len(report["contenders"]) - 1) / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{k}\n{d}" for k in BLOCKS for d in dtypes], fontsize=8)
        ax.set_ylabel("ms per step (median, slowest rank)")
        ax.set_title(f"{shape}: 1 x {SHAPES[shape]} tokens, fwd+bwd, p = {P}, CPU")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--md", help="write the Markdown table here")
    ap.add_argument("--plot", help="write a PNG plot here")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--small", action="store_true", help="small sizes: checks the script, measures nothing")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the contenders this many times in turn (A B C A B C ...) and report, per case, the "
                         "median of the rounds' medians: drifting load on a shared machine hits every contender")
    ap.add_argument("--shapes", help="a subset of the shapes, e.g. decode (default: decode,training)")
    ap.add_argument("--nice", type=int, default=0, help="scheduling niceness of every world (e.g. -5 on a shared box)")
    add_dtype_arg(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.out, args.dtype)
    if (args.small and os.environ.get("TORCH_LAYERS_SMALL") != "1") or (
            args.shapes and os.environ.get("TORCH_LAYERS_SHAPES") != args.shapes):
        os.environ["TORCH_LAYERS_SMALL"] = "1" if args.small else ""
        os.environ["TORCH_LAYERS_SHAPES"] = args.shapes or ""
        os.execv(sys.executable, [sys.executable] + sys.argv)
    names = [c for c in args.contenders.split(",") if c]
    report = {"contenders": names, "results": {}, "checksums": {}, "versions": {},
              "config": {"p": P, "hidden": HIDDEN, "intermediate": INTER, "heads": HEADS, "kv_heads": KV_HEADS,
                         "shapes": SHAPES, "reps": REPS, "dtypes": args.dtype},
              "machine": {"cores": cores(), "cpu": platform.processor() or platform.machine(),
                          "python": platform.python_version(), "load_before": os.getloadavg()},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every world; the same for all contenders
    report["config"].update(rounds=args.rounds, nice=args.nice)
    rounds = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in names:
                data = run_contender(name, os.path.join(tmp, f"{name}.json"), args.python, args.dtype)
                rounds[name].append(data["results"])
                report["checksums"][name] = data["checksums"]
                report["versions"][name] = data["versions"]
    for name in names:
        report["results"][name] = {key: {"median_s": statistics.median(r[key]["median_s"] for r in rounds[name]),
                                         "round_medians_s": [r[key]["median_s"] for r in rounds[name]],
                                         "times_s": [t for r in rounds[name] for t in r[key]["times_s"]]}
                                   for key in rounds[name][0]}
    report["machine"]["load_after"] = os.getloadavg()
    ref = report["checksums"][names[0]]
    for name in names[1:]:
        for kind, v in report["checksums"][name].items():
            tol = 1e-3 if kind in BLOCKS else 5e-2  # float32's keys are the blocks'; half: roundings of 2^-8
            if abs(v - ref[kind]) > tol * max(1.0, abs(ref[kind])):
                raise SystemExit(f"{name} computes a different {kind} output than {names[0]}: {v} vs {ref[kind]}")
    m = report["machine"]
    md = (f"Date: {report['date']}; {m['cores']} cores; dtypes {', '.join(args.dtype)}; 1-minute load average "
          f"{m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after (other processes on the machine)\n\n"
          + table(report) + "\n\n" + (targets(report) if len(names) > 1 or len(args.dtype) > 1 else ""))
    save_report(report, md + "\n", plot, args, "torch_layers")


if __name__ == "__main__":
    main()
