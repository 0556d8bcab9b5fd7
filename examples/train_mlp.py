"""Trains a tensor-parallel MLP block (column -> GELU -> row) with SGD on synthetic regression data.

    python -m tplinear.run --nproc-per-node 2 examples/train_mlp.py [--steps 20 --losses out.json]
    torchrun --nproc-per-node 2 examples/train_mlp.py
    mpirun -np 4 python examples/train_mlp.py --dp 2      # 2 data-parallel replicas of 2 TP ranks

Every rank builds only its shards (from_init: equal to slicing the same full layers), draws the same
data, and sees the same all-reduced output, so the loss curve is the same at any world size (to float
summation order). With --dp D the world is D replicas of world/D tensor-parallel ranks: consecutive ranks
form a TP group (over shm when they share a host: new_group(..., backend="auto")), ranks with the same TP
rank form a data-parallel group (the world's backend, e.g. mpi across hosts); each replica trains on its
1/D of the batch and the gradients are averaged over the DP group, which gives the single-process curve
again. Rank 0 prints a progress line per step.
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
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas (divides the world and the batch)")
    args = ap.parse_args()

    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.dp < 1 or world % args.dp or args.batch % args.dp:
        ap.error(f"--dp {args.dp} must divide the world size ({world}) and the batch ({args.batch})")
    tp_size = world // args.dp
    # every rank creates every group (new_group is collective over the world), and keeps its own
    tp_groups = [dist.new_group(range(d * tp_size, (d + 1) * tp_size), backend="auto") for d in range(args.dp)]
    dp_groups = [dist.new_group(range(t, world, tp_size)) for t in range(tp_size)]
    tp_group, dp_group = tp_groups[rank // tp_size], dp_groups[rank % tp_size]
    replica = rank // tp_size
    tp.set_training_mode(True)
    fc1 = tp.LinearLayer.from_init(args.features, args.hidden, tp_group, seed=1, dtype=args.dtype)      # column
    fc2 = tp.LinearAllreduce.from_init(args.hidden, args.features, tp_group, seed=2, dtype=args.dtype)  # row

    rng = np.random.default_rng(1234)  # same data on every rank
    x = rng.standard_normal((args.batch, args.features)).astype(args.dtype)
    teacher = rng.standard_normal((args.features, args.features)).astype(args.dtype) / np.sqrt(args.features)
    target = np.tanh(x @ teacher).astype(args.dtype)
    rows = slice(replica * args.batch // args.dp, (replica + 1) * args.batch // args.dp)  # this replica's share
    x, target = np.ascontiguousarray(x[rows]), np.ascontiguousarray(target[rows])

    losses = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        h = fc1(x)                       # [batch, hidden / world]
        a, da = gelu(h)
        y = fc2(a)                       # [batch, features], all-reduced
        diff = y - target
        loss = np.array([np.mean(diff.astype(np.float64) ** 2)])
        dy = (2.0 / diff.size) * diff
        dh = fc2.backward(dy.astype(args.dtype)) * da
        fc1.backward(dh)                 # all-reduces dX across the TP group
        for p in fc1.parameters() + fc2.parameters():
            if args.dp > 1:              # equal shares: the mean of the replicas' gradients is the batch's
                dist.all_reduce(p.grad, op="avg", group=dp_group)
            p.data -= args.lr * p.grad
            p.grad = None
        if args.dp > 1:
            dist.all_reduce(loss, op="avg", group=dp_group)
        losses.append(float(loss[0]))
        if rank == 0:
            layout = f"{world} rank{'s' if world > 1 else ''}" + (f", dp {args.dp} x tp {tp_size}" if args.dp > 1 else "")
            print(f"step {step:3d}/{args.steps}  loss {losses[-1]:.8f}  ({(time.perf_counter() - t0) * 1e3:.1f} ms, "
                  f"{layout}, {dist.get_backend()})", flush=True)
    if rank == 0 and args.losses:
        with open(args.losses, "w") as f:
            json.dump({"world_size": world, "losses": losses}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
