"""Trains a small Hugging Face Llama-style model (grouped-query attention) tensor-parallel with
tplinear.torch.parallelize and torch.optim.AdamW, on synthetic tokens.

    python -m tplinear.run --nproc-per-node 2 examples/train_hf.py [--steps 20 --losses out.json]
    torchrun --nproc-per-node 2 examples/train_hf.py

A plain single-process script becomes tensor-parallel with three lines (marked "tplinear" below): create
tplinear's process group, set training mode, parallelize the model. Every rank builds the same model
from the same seed and reads the same tokens, so the loss curve is the same at any world size (to float
summation order). Rank 0 shows a progress bar and prints the loss and tokens/s of every step.
"""
import argparse
import json
import time

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, logging

import tplinear as tp
import tplinear.distributed as dist
import tplinear.torch as tpt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=344)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--losses", help="rank 0 writes the loss curve here as JSON")
    args = ap.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    dist.init_process_group()                       # tplinear: the tensor-parallel group (shm, NCCL, MPI)
    tp.set_training_mode(True)                      # tplinear: DeepSpeed's training split (grain 1)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same model on every rank
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model = tpt.parallelize(model)                  # tplinear: q/k/v/gate/up column, o/down row, heads kept whole
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    # synthetic tokens with something to learn: each sequence follows next = (3 * token + 1) mod vocab from a
    # random start; the same tokens on every rank
    data = torch.Generator().manual_seed(1234)
    losses = []
    bar = tqdm(range(1, args.steps + 1), disable=rank != 0, desc=f"train_hf ({world} rank{'s' if world > 1 else ''})",
               unit="step", dynamic_ncols=True)
    for step in bar:
        ids = torch.empty(args.batch, args.seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, args.vocab, (args.batch,), generator=data)
        for t in range(1, args.seq):
            ids[:, t] = (3 * ids[:, t - 1] + 1) % args.vocab
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        tokens = args.batch * args.seq / dt
        if rank == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens:.0f}")
            bar.write(f"step {step:3d}/{args.steps}  loss {loss.item():.6f}  {tokens:8.0f} tokens/s")
    if rank == 0 and args.losses:
        with open(args.losses, "w") as f:
            json.dump({"world_size": world, "losses": losses}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
