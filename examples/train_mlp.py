"""Trains a tensor-parallel MLP block (column -> GELU -> row) with SGD on synthetic regression data.

    python -m tplinear.run --nproc-per-node 2 examples/train_mlp.py [--steps 20 --losses out.json]

Every rank builds only its shards (from_init: equal to slicing the same full layers), draws the same
data, and sees the same all-reduced output, so the loss curve is the same at any world size (to float
summation order). Rank 0 prints a progress line per step.
"""
import argparse
import json
import time

import numpy as np

import tplinear as tp
import tplinear.distributed as dist


def gelu(x):
    """GELU, tanh approximation, and its derivative."""
    c = np.sqrt(2.0 / np.pi)
    inner = c * (x + 0.044715 * x**3)
    t = np.tanh(inner)
    y = 0.5 * x * (1.0 + t)
    dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    return y.astype(x.dtype), dy.astype(x.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--losses", help="rank 0 writes the loss curve here as JSON")
    args = ap.parse_args()

    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    tp.set_training_mode(True)
    fc1 = tp.LinearLayer.from_init(args.features, args.hidden, seed=1, dtype=args.dtype)      # column
    fc2 = tp.LinearAllreduce.from_init(args.hidden, args.features, seed=2, dtype=args.dtype)  # row

    rng = np.random.default_rng(1234)  # same data on every rank
    x = rng.standard_normal((args.batch, args.features)).astype(args.dtype)
    teacher = rng.standard_normal((args.features, args.features)).astype(args.dtype) / np.sqrt(args.features)
    target = np.tanh(x @ teacher).astype(args.dtype)

    losses = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        h = fc1(x)                       # [batch, hidden / world]
        a, da = gelu(h)
        y = fc2(a)                       # [batch, features], all-reduced
        diff = y - target
        loss = float(np.mean(diff.astype(np.float64) ** 2))
        dy = (2.0 / diff.size) * diff
        dh = fc2.backward(dy.astype(args.dtype)) * da
        fc1.backward(dh)                 # all-reduces dX across the group
        for p in fc1.parameters() + fc2.parameters():
            p.data -= args.lr * p.grad
            p.grad = None
        losses.append(loss)
        if rank == 0:
            print(f"step {step:3d}/{args.steps}  loss {loss:.8f}  ({(time.perf_counter() - t0) * 1e3:.1f} ms, "
                  f"{world} rank{'s' if world > 1 else ''})", flush=True)
    if rank == 0 and args.losses:
        with open(args.losses, "w") as f:
            json.dump({"world_size": world, "losses": losses}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
