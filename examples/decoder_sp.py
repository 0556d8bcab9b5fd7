"""A small decoder trained with tensor, sequence and vocabulary parallelism (Megatron-core's layout):

    embedding (vocab-parallel) -> blocks [RMSNorm -> column -> GELU -> row, residual] -> RMSNorm
    -> LM head (column, vocab-parallel) -> vocab-parallel cross-entropy

    python -m tplinear.run --nproc-per-node 2 examples/decoder_sp.py [--steps 10 --no-sequence-parallel]

With sequence parallelism every activation between the layers (the residual stream, the norms' inputs and
outputs) is this rank's rows of the sequence, and the logits are this rank's columns of the vocabulary:
no rank ever holds a whole activation between blocks or the whole logits. Every rank draws the same data,
so the loss curve is the same at any world size and with or without sequence parallelism (to float
summation order). benchmarks/sequence_parallel.py measures its memory; tests/test_sequence_parallel.py
checks it against a single-process float64 reference.
"""
import argparse
import json
import time

import numpy as np

import tplinear as tp
import tplinear.distributed as dist


def gelu(x):
    """GELU (tanh approximation) and its derivative, in x's dtype."""
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return (0.5 * x * (1.0 + t)).astype(x.dtype), \
        (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)).astype(x.dtype)


def rms_norm(x, weight, eps):
    """RMSNorm over the last dim: (y, what its backward needs)."""
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    xhat = x * r
    return (xhat * weight).astype(x.dtype), (xhat, r)


def rms_norm_backward(dy, weight, saved):
    """(dx, dweight) of rms_norm; dweight sums over this rank's rows only."""
    xhat, r = saved
    dxhat = dy * weight
    dx = r * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx.astype(dy.dtype), np.sum((dy * xhat).reshape(-1, dy.shape[-1]), axis=0).astype(dy.dtype)


class Decoder:
    """The model above over mp_group. sequence_parallel: activations between layers split along the sequence
    (dim 0 of ids); vocab_parallel: the LM head's logits stay split by vocabulary and the loss is
    tp.vocab_parallel_cross_entropy; without it the head gathers the whole logits on every rank (what a
    plain tensor-parallel LM head does) and each rank computes the loss on them alone."""

    def __init__(self, vocab, hidden, ffn, blocks=2, mp_group=None, sequence_parallel=True, vocab_parallel=True,
                 dtype="float32", seed=0, tp_overlap_comm=False, eps=1e-6):
        if sequence_parallel and not vocab_parallel:
            raise ValueError("sequence parallelism here goes with the vocab-parallel head")
        self.group = mp_group if mp_group is not None else dist.get_world_group()
        self.sequence_parallel, self.vocab_parallel, self.eps, self.dtype = sequence_parallel, vocab_parallel, eps, dtype
        sp = dict(sequence_parallel=sequence_parallel)
        self.embed = tp.VocabParallelEmbedding(vocab, hidden, self.group, seed=seed, dtype=dtype, name="embed_tokens",
                                               **sp)
        self.blocks = []
        for i in range(blocks):
            norm = tp.Parameter(np.ones(hidden, dtype=dtype))
            up = tp.LinearLayer.from_init(hidden, ffn, self.group, seed=seed + 2 * i + 1, dtype=dtype,
                                          name=f"layers.{i}.mlp.up_proj", tp_overlap_comm=tp_overlap_comm, **sp)
            down = tp.LinearAllreduce.from_init(ffn, hidden, self.group, seed=seed + 2 * i + 2, dtype=dtype,
                                                name=f"layers.{i}.mlp.down_proj", **sp)
            self.blocks.append((norm, up, down))
        self.norm = tp.Parameter(np.ones(hidden, dtype=dtype))
        self.head = tp.LinearLayer.from_init(hidden, vocab, self.group, seed=seed + 2 * blocks + 1, bias=False,
                                             dtype=dtype, name="lm_head", gather_output=not vocab_parallel,
                                             tp_overlap_comm=tp_overlap_comm, **sp)
        self._loss_group = self.group
        if not vocab_parallel:  # each rank's loss over the whole logits it holds: a group of its own
            own = [dist.new_group([r]) for r in range(self.group.size)] if self.group.size > 1 else [self.group]
            self._loss_group = own[self.group.rank]
        self._saved = None

    def norms(self):
        """The replicated parameters (the RMSNorm weights)."""
        return [b[0] for b in self.blocks] + [self.norm]

    def parameters(self):
        out = self.embed.parameters() + self.head.parameters() + self.norms()
        for _, up, down in self.blocks:
            out += up.parameters() + down.parameters()
        return out

    def forward(self, ids, targets, label_smoothing=0.0):
        """The mean loss over the targets (the same on every rank); keeps what backward needs, including the
        logits' gradient, which the loss computes with it (in the logits' own memory)."""
        h = self.embed(ids)
        saved = []
        for norm, up, down in self.blocks:
            n, ns = rms_norm(h, norm.data, self.eps)
            a, da = gelu(up(n, seq_len=ids.shape[0]) if self.sequence_parallel else up(n))
            h = h + down(a)
            saved.append((ns, da))
        n, ns = rms_norm(h, self.norm.data, self.eps)
        logits = self.head(n, seq_len=ids.shape[0]) if self.sequence_parallel else self.head(n)
        loss, grad = tp.vocab_parallel_cross_entropy(logits, targets, self._loss_group, label_smoothing=label_smoothing,
                                                     grad_out=logits)
        self._saved = (saved, ns, grad)
        return loss

    def backward(self):
        """Accumulates every parameter's .grad (the norms' all-reduced over the group under sequence
        parallelism, where each rank saw its rows only)."""
        saved, ns, grad = self._saved
        self._saved = None
        dn = self.head.backward(grad)
        del grad
        dh, dw = rms_norm_backward(dn, self.norm.data, ns)
        grads = [dw]
        for (norm, up, down), (bns, da) in zip(reversed(self.blocks), reversed(saved)):
            dn = up.backward(down.backward(dh) * da)
            dx, dw = rms_norm_backward(dn, norm.data, bns)
            dh = dh + dx
            grads.append(dw)
        self.embed.backward(dh)
        for param, g in zip(self.norms(), reversed(grads)):
            if self.sequence_parallel and self.group.size > 1:
                dist.all_reduce(g, group=self.group)
            param.grad = g if param.grad is None else param.grad + g


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--no-sequence-parallel", action="store_true")
    ap.add_argument("--losses", help="rank 0 writes the loss curve here as JSON")
    args = ap.parse_args()

    dist.init_process_group()
    tp.set_training_mode(True)
    sp = not args.no_sequence_parallel
    model = Decoder(args.vocab, args.hidden, args.ffn, mp_group=None, sequence_parallel=sp, dtype=args.dtype, seed=7)
    rng = np.random.default_rng(1234)  # the same batch on every rank: learn to predict a shifted copy
    ids = rng.integers(0, args.vocab, (args.seq + 1, args.batch))
    inputs, targets = ids[:-1], ids[1:]
    losses = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        loss = model.forward(inputs, targets)
        model.backward()
        for p in model.parameters():
            p.data -= args.lr * p.grad
            p.grad = None
        losses.append(loss)
        if dist.get_rank() == 0:
            print(f"step {step:3d}/{args.steps}  loss {loss:.6f}  ({(time.perf_counter() - t0) * 1e3:.1f} ms, "
                  f"{dist.get_world_size()} ranks, sequence_parallel={sp})", flush=True)
    if dist.get_rank() == 0 and args.losses:
        with open(args.losses, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "sequence_parallel": sp, "losses": losses}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
