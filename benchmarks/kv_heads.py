"""parallelize(model, kv_heads=...) on multi-query models (issue 22 item 6): the balance between the ranks of a
forward + backward, KV heads dealt whole (DeepSpeed's rule, the default) against replicated (Megatron's).

    python benchmarks/kv_heads.py [--nproc 2] [--reps 5] [--json out.json] [--md out.md]
        [--hidden 512 --heads 16 --inter 1024 --layers 2 --batch 2 --seq 256]

Models (transformers, from a config, float32, eager attention, training mode):

    llama-mqa    Llama with 1 KV head (multi-query, separate q/k/v projections: Gemma-2B's shape)
    bigcode-mqa  GPT-BigCode with multi_query=True (a fused [q | k v] c_attn: StarCoder's shape)

Each model runs unsharded on every rank (p=1 figure, the same work everywhere), and parallelized with
kv_heads="whole" and kv_heads="replicate" (GPT-BigCode's fused multi-query projection is refused under
"whole": one KV head cannot be dealt whole over 2 ranks). Per rank, the CPU seconds of one forward + backward
(time.process_time; one torch thread; tplinear's collectives sleep on a futex after a spin of at most 50 us
and a yield of at most 200 us, so waiting for a peer costs little CPU): the work that rank does. The step's
wall time is the slowest rank's. Medians over --reps steps after one warm-up. The machine is shared: compare
cases of one run, not absolute times.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODES = ("unsharded", "whole", "replicate")


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def build(kind, a):
    import torch
    import transformers
    from transformers import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "llama-mqa":
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=a.hidden, num_attention_heads=a.heads,
                                       num_key_value_heads=1, intermediate_size=a.inter,
                                       num_hidden_layers=a.layers, max_position_embeddings=a.seq)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.GPTBigCodeConfig(vocab_size=512, n_embd=a.hidden, n_head=a.heads, n_inner=a.inter,
                                            n_layer=a.layers, n_positions=a.seq, multi_query=True)
        cls = transformers.GPTBigCodeForCausalLM
    cfg._attn_implementation = "eager"
    return cls(cfg).train()


def worker(a):
    import torch
    import tplinear as tp
    import tplinear.distributed as dist
    import tplinear.torch as tpt

    dist.init_process_group(timeout=120)
    torch.set_num_threads(1)
    tp.set_training_mode(True)
    rank = dist.get_rank()
    ids = torch.randint(0, 512, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    rows = []
    for kind in ("llama-mqa", "bigcode-mqa"):
        for mode in MODES:
            model = build(kind, a)
            try:
                if mode != "unsharded":
                    tpt.parallelize(model, kv_heads=mode)
            except ValueError as exc:
                rows.append({"model": kind, "mode": mode, "rank": rank, "refused": str(exc)[:160]})
                continue
            cpu, wall = [], []
            for i in range(a.reps + 1):
                model.zero_grad(set_to_none=True)
                dist.barrier()
                c0, w0 = time.process_time(), time.perf_counter()
                model(ids, labels=ids).loss.backward()
                c1 = time.process_time()
                dist.barrier()
                if i:
                    cpu.append(c1 - c0)
                    wall.append(time.perf_counter() - w0)
            rows.append({"model": kind, "mode": mode, "rank": rank, "cpu_s": median(cpu), "wall_s": median(wall)})
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(a.nproc),
               os.path.abspath(__file__), "--worker", "--out", tmp] + _size_argv(a)
        proc = subprocess.run(cmd, env=env, timeout=1800, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"world failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [r for p in range(a.nproc) for r in json.load(open(os.path.join(tmp, f"rank{p}.json")))]
    command = "python benchmarks/kv_heads.py " + " ".join(sys.argv[1:])
    result = {"command": command, "nproc": a.nproc, "rows": rows}
    lines = [f"`{command}` (p = {a.nproc}; per-rank CPU s of one forward + backward, median of {a.reps}; "
             "wall: the step)", "", "| model | kv_heads | " + " | ".join(f"rank {p} CPU s" for p in range(a.nproc))
             + " | max / min | wall s |", "|---|---|" + "---|" * (a.nproc + 2)]
    for kind in ("llama-mqa", "bigcode-mqa"):
        for mode in MODES:
            mine = sorted((r for r in rows if r["model"] == kind and r["mode"] == mode), key=lambda r: r["rank"])
            if any("refused" in r for r in mine):
                why = mine[0]["refused"][:90].replace("|", "\\|")
                lines.append(f"| {kind} | {mode} | refused: {why}... |")
                continue
            cpu = [r["cpu_s"] for r in mine]
            lines.append(f"| {kind} | {mode} | " + " | ".join(f"{c:.3f}" for c in cpu)
                         + f" | {max(cpu) / max(min(cpu), 1e-9):.2f} | {max(r['wall_s'] for r in mine):.3f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)


def _size_argv(a):
    return [f"--{k}={getattr(a, k)}" for k in ("reps", "hidden", "heads", "inter", "layers", "batch", "seq")]


if __name__ == "__main__":
    main()
