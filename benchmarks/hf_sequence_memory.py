"""parallelize(model, sequence_parallel=True) on a Hugging Face decoder (issue 22 item 7): activation memory per
rank against the plain tensor-parallel run.

    python benchmarks/hf_sequence_memory.py [--nproc 2] [--json out.json] [--md out.md]
        [--family llama --hidden 512 --heads 8 --kv-heads 4 --inter 1536 --layers 2 --batch 1 --seq 768]

Per rank, for one forward of a training step (float32, eager attention, loss on the labels): the bytes of the
tensors autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks; each storage counted once;
parameters excluded), in total and those of hidden width [batch, rows, hidden] over the whole sequence and over
fewer rows (the activations between and at the edges of the blocks, which sequence parallelism splits; a
region's gathered input, which its column layers keep for dW, is whole), for the unsharded model,
parallelize(model) and parallelize(model, sequence_parallel=True).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

MODES = ("unsharded", "tp", "tp+sp")


def build(a):
    import torch
    import transformers
    from transformers import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg_cls = transformers.AutoConfig.for_model(a.family).__class__
    cfg = cfg_cls(vocab_size=1000, hidden_size=a.hidden, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                  head_dim=a.hidden // a.heads, intermediate_size=a.inter, num_hidden_layers=a.layers,
                  max_position_embeddings=max(a.seq, 128))
    cfg._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(cfg).train()


def saved_bytes(model, ids, hidden):
    """(all saved bytes, hidden-width ones over the whole sequence, hidden-width ones over fewer rows)."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total, wide, part = set(), [0], [0], [0]

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in params and key not in seen and st.nbytes():
            seen.add(key)
            total[0] += st.nbytes()
            if t.dim() == 3 and t.shape[-1] == hidden:
                (wide if t.shape[1] == ids.shape[1] else part)[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return total[0], wide[0], part[0]


def worker(a):
    import torch
    import tplinear as tp
    import tplinear.distributed as dist
    import tplinear.torch as tpt

    dist.init_process_group(timeout=120)
    torch.set_num_threads(1)
    tp.set_training_mode(True)
    rank = dist.get_rank()
    ids = torch.randint(0, 1000, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    rows = []
    for mode in MODES:
        model = build(a)
        if mode != "unsharded":
            tpt.parallelize(model, sequence_parallel=(mode == "tp+sp"))
        total, wide, part = saved_bytes(model, ids, a.hidden)
        rows.append({"mode": mode, "rank": rank, "saved_bytes": total, "hidden_whole_seq_bytes": wide,
                     "hidden_seq_shard_bytes": part})
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


SIZES = ("family", "hidden", "heads", "kv_heads", "inter", "layers", "batch", "seq")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--family", default="llama")
    for k, v in (("hidden", 512), ("heads", 8), ("kv-heads", 4), ("inter", 1536), ("layers", 2), ("batch", 1),
                 ("seq", 768)):
        ap.add_argument(f"--{k}", type=int, default=v)
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
               os.path.abspath(__file__), "--worker", "--out", tmp] + [
               f"--{k.replace('_', '-')}={getattr(a, k)}" for k in SIZES]
        proc = subprocess.run(cmd, env=env, timeout=1800, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"world failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [r for p in range(a.nproc) for r in json.load(open(os.path.join(tmp, f"rank{p}.json")))]
    command = "python benchmarks/hf_sequence_memory.py " + " ".join(sys.argv[1:])
    mib = 1 << 20
    lines = [f"`{command}` (p = {a.nproc}; MiB of tensors saved for the backward, per rank)", "",
             "| run | " + " | ".join(f"rank {p}: all | [b, seq, hidden] | [b, seq shard, hidden]"
                                     for p in range(a.nproc)) + " |",
             "|---|" + "---|---|---|" * a.nproc]
    for mode in MODES:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["rank"])
        lines.append(f"| {mode} | " + " | ".join(
            f"{r['saved_bytes'] / mib:.2f} | {r['hidden_whole_seq_bytes'] / mib:.2f} | "
            f"{r['hidden_seq_shard_bytes'] / mib:.2f}" for r in mine) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
