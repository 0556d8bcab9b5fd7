"""One rank: a parallelized model at p = 1 against the plain model, and what the thread rule of
``import tplinear.torch`` (tplinear's BLAS threads = torch.get_num_threads()) does for it.

    python benchmarks/torch_threads.py --json benchmarks/results/torch_threads.json --md benchmarks/results/torch_threads.md

A training step of a Qwen2-style model from a config (hidden 256, intermediate 704, 4 layers, 8 query heads
in 2 KV groups, vocabulary 2048, float32, batch 4 x 64 tokens): zero_grad, forward with labels, backward,
AdamW. Each configuration runs in a fresh process (thread pools are per process); the median of the timed
steps (after warm-up) is reported, and the ratio to the plain model in the same thread setting.

    plain        transformers' model, torch's threads
    tplinear     tpt.parallelize(model) in a world of one, with the rule (BLAS threads = torch's)
    no rule      the same with TPLINEAR_NUM_THREADS=0: tplinear leaves OpenBLAS's own thread count (every
                 core), as before the rule

Thread settings: torch's default (every core) and one thread (torch.set_num_threads(1) before the import).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

STEP = r"""
import json, os, statistics, sys, time
import torch
threads = int(sys.argv[1]); kind = sys.argv[2]; steps = int(sys.argv[3])
if threads > 0:
    torch.set_num_threads(threads)
import transformers
transformers.logging.set_verbosity_error()
cfg = transformers.Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=False)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
model = transformers.Qwen2ForCausalLM(cfg)
blas = None
if kind != "plain":
    import tplinear, tplinear.torch as tpt
    tplinear.set_training_mode(True)
    tpt.parallelize(model)
    blas = tplinear.get_num_threads()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(1))
times = []
for i in range(steps + 3):
    t0 = time.perf_counter()
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    opt.step()
    if i >= 3:
        times.append(time.perf_counter() - t0)
print(json.dumps({"median_ms": 1e3 * statistics.median(times), "torch_threads": torch.get_num_threads(),
                  "blas_threads": blas}))
"""


def run(threads, kind, steps):
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("TPLINEAR_NUM_THREADS", None)
    if kind == "no rule":
        env["TPLINEAR_NUM_THREADS"] = "0"
    out = subprocess.run([sys.executable, "-c", STEP, str(threads), kind, str(steps)], capture_output=True,
                         text=True, timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration (median of medians)")
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                    help="torch threads to run (0: torch's default, every core)")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    rows = []
    for threads in args.threads:
        base = None
        for kind in ("plain", "tplinear", "no rule"):
            runs = [run(threads, kind, args.steps) for _ in range(args.repeats)]
            ms = statistics.median(r["median_ms"] for r in runs)
            base = ms if kind == "plain" else base
            row = {"torch_threads": runs[0]["torch_threads"], "kind": kind, "blas_threads": runs[0]["blas_threads"],
                   "median_ms": round(ms, 2), "ratio_to_plain": round(ms / base, 3),
                   "runs_ms": [round(r["median_ms"], 2) for r in runs]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    host = {"cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "loadavg_at_end": os.getloadavg()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": host, "steps": args.steps, "repeats": args.repeats, "rows": rows}, f, indent=1)
    if args.md:
        lines = [f"One rank, Qwen2-style model (hidden 256, 4 layers), float32, training step (forward + backward + "
                 f"AdamW), median of {args.steps} steps, median over {args.repeats} processes; host: "
                 f"{host['cores']} cores (shared; load average at the end {host['loadavg_at_end'][0]:.1f}).", "",
                 "| torch threads | model | BLAS threads | ms / step | vs plain |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['torch_threads']} | {r['kind']} | {r['blas_threads'] if r['blas_threads'] else '-'} | "
                         f"{r['median_ms']:.1f} | {r['ratio_to_plain']:.2f} |")
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
