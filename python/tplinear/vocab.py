"""Vocabulary parallelism (Megatron-core's ``VocabParallelEmbedding`` and ``vocab_parallel_cross_entropy``):
the embedding table and the output logits split by vocabulary, never gathered. The math runs in the C core
(csrc/layers/vocab.c); this module holds the bookkeeping.

    emb = tp.VocabParallelEmbedding(151936, 4096, sequence_parallel=True)
    h = emb(ids)                                  # ids [seq, ...] on every rank -> this rank's rows [rows, ..., 4096]
    ...                                           # blocks with sequence_parallel=True layers
    logits = head(h)                              # LinearLayer(..., sequence_parallel=True): [seq, ..., vocab_r]
    loss, grad = tp.vocab_parallel_cross_entropy(logits, targets)
    dh = head.backward(grad)
"""
import numpy as np

from . import _C
from . import _layout
from . import partition
from ._layout import split_args as _split_args
from .layers import TPLayer, WeightHolder, placement_and_group, shape_of
from .partition import is_training_mode

class VocabParallelEmbedding(TPLayer):
    """An embedding table whose rows (the vocabulary) are split across the ranks of mp_group by the
    partition rule (without heads; training mode: grain 1, inference mode: grain 64, or tp_grain_size=).

    forward(ids): ids (int32 / int64, any shape, the same on every rank) -> [*ids.shape, embedding_dim];
    every rank looks up the ids in its rows (zeros for the others) and the results are all-reduced, or,
    with sequence_parallel=True, reduce-scattered along the sequence dim (dim 0 of ids): this rank's rows
    [rows, *ids.shape[1:], embedding_dim] (``tp.sequence_ranges``). Ids outside [0, num_embeddings) raise
    ValueError on every rank.
    backward(grad): accumulates weight.grad (this rank's rows); grad is the output's gradient (this rank's
    rows of it with sequence_parallel=True). Returns None (ids have no gradient).

    The initial table is nn.Embedding's N(0, 1) from a counter-based generator, so each rank's rows equal
    the same rows of the table at any group size; weight= (a full [num_embeddings, embedding_dim] array,
    NumPy or torch) starts from given values instead. Host arrays, float32 or float64.
    """

    _shard_dim = 0
    _kind = _layout.KIND_COL + 1  # its own kind in the construction agreement
    _from_init_ok = False

    def __init__(self, num_embeddings, embedding_dim, mp_group=None, seed=0, dtype="float32", sequence_parallel=False,
                 weight=None, name=None, tp_grain_size=None):
        num_embeddings = partition.as_count(num_embeddings, "num_embeddings")
        embedding_dim = partition.as_count(embedding_dim, "embedding_dim")
        full = None
        if weight is None:
            weight, full = self._initial_rows(num_embeddings, embedding_dim, mp_group, seed, dtype, name,
                                              tp_grain_size), num_embeddings
        elif tuple(shape_of(weight, "weight")) != (num_embeddings, embedding_dim):
            raise ValueError(f"weight must be [num_embeddings, embedding_dim] = [{num_embeddings}, {embedding_dim}], "
                             f"got shape {tuple(shape_of(weight, 'weight'))}")
        self.sequence_parallel = bool(sequence_parallel)  # before the construction agreement, which checks it
        super().__init__(WeightHolder(weight), mp_group, name, False, dtype=dtype, tp_grain_size=tp_grain_size, _full=full)
        if self.device is not None:
            raise NotImplementedError("VocabParallelEmbedding runs on host arrays in this version of tplinear")
        (self._vocab_offset, _), = self._pieces[self.tp_index]

    @staticmethod
    def _initial_rows(num_embeddings, embedding_dim, mp_group, seed, dtype, name, grain):
        """This rank's rows of the N(0, 1) table (only they are ever allocated)."""
        place, group = placement_and_group(None, mp_group, None, dtype)
        grain = _split_args(is_training_mode(), name, grain, None, None, None, None, None)["grain"]
        (off, size), = _layout.vocab_rule(num_embeddings, group.size, grain)[group.rank]
        rows = np.empty((size, embedding_dim), dtype=place.dtype)
        _C.init_normal(rows, int(seed) & (2**64 - 1), 0, 1.0, off, 0, embedding_dim)
        return rows

    def _rule(self, n):
        return _layout.vocab_rule(n, self.tp_world_size, self.tp_grain_size)

    num_embeddings = property(lambda self: self.out_features)
    embedding_dim = property(lambda self: self.in_features)

    def vocab_range(self):
        """(start, end) of the vocabulary rows this rank holds."""
        return self._vocab_offset, self._vocab_offset + self.local_shape[0]

    def forward(self, ids):
        shape = shape_of(ids, "ids") if self.sequence_parallel else tuple(int(s) for s in np.shape(ids))
        seq = None
        if self.sequence_parallel:
            seq = partition.sequence_ranges(shape[0], self.tp_world_size)
            shape = (seq[self.tp_index][1],) + shape[1:]
        y = self._place.empty(shape + (self.embedding_dim,))
        _C.embedding_forward(self.mp_group._handle, ids, self.weight.data, self._vocab_offset, self.num_embeddings,
                             seq, y)
        self._save(ids)
        self._seq = seq
        return y

    def backward(self, grad_output, retain=False):
        """Accumulates weight.grad from the output's gradient; returns None. Releases the saved ids unless
        retain=True."""
        ids = self._saved()
        rows = None if self._seq is None else self._seq[self.tp_index][1]
        lead = tuple(int(s) for s in np.shape(ids))
        got = shape_of(grad_output, "grad_output")
        want = ((rows,) + lead[1:] if rows is not None else lead) + (self.embedding_dim,)
        if got != want:
            raise ValueError(f"grad_output must have shape {want} (the output's), got {got}")
        self._release(retain)
        if self.weight.requires_grad:
            _C.embedding_backward(self.mp_group._handle, ids, grad_output, self._vocab_offset, self._seq,
                                  self._grad(self.weight))
        return None

    def _shard_words(self):
        return (f"this rank's rows of num_embeddings={self.num_embeddings}: {self.local_shape[0]} at rank "
                f"{self.tp_index} of {self.tp_world_size}")

    def __repr__(self):
        parts = [f"num_embeddings={self.num_embeddings}", f"embedding_dim={self.embedding_dim}",
                 f"rows={self.vocab_range()[0]}..{self.vocab_range()[1]} at rank {self.tp_index} of "
                 f"{self.tp_world_size}", f"mode={'training' if self.training_mode else 'inference'}"]
        if self.name is not None:
            parts.append(f"name={self.name!r}")
        if self.sequence_parallel:
            parts.append("sequence_parallel=True")
        dtype = "" if self._place.dtype == "float32" else f", dtype={self._place.dtype}"
        return f"VocabParallelEmbedding({', '.join(parts)}{dtype})"


def vocab_parallel_cross_entropy(logits_shard, targets, mp_group=None, ignore_index=-100, label_smoothing=0.0,
                                 reduction="mean", grad_out=None, vocab_ranges=None):
    """Cross-entropy of logits split by vocabulary across mp_group, as ``torch.nn.functional.cross_entropy``
    with class-index targets, without gathering the logits (Megatron-core's vocab_parallel_cross_entropy:
    a max all-reduce and one sum all-reduce of sum-exp, target logit and, with label smoothing, the sum of
    logits, a few values per token).

    logits_shard: [..., vocab_r], this rank's columns of the vocabulary; the ranks' shards lie in rank order
    (a column-parallel LM head's output). targets: int array of the logits' leading shape, the same on every
    rank, in [0, vocab) or ignore_index. label_smoothing in [0, 1] and reduction ("mean": over the targets
    that are not ignored, NaN when all are; "sum"; "none") as torch.

    Returns (loss, grad_logits_shard): loss a float (reduction "none": an array of the targets' shape, in the
    logits' dtype) and the gradient of the (reduced) loss with respect to logits_shard ("none": of the sum of
    the losses), in the logits' dtype. grad_out: where to write that gradient (an array of the logits'
    shape and dtype; logits_shard itself overwrites the logits, as Megatron does to save memory).
    vocab_ranges: every rank's (offset, size) of the vocabulary, e.g. the head's ``shard_ranges()``; None:
    from the ranks' shard widths in rank order (one small all-gather).
    """
    shape = shape_of(logits_shard, "logits_shard")
    place, group = placement_and_group(logits_shard, mp_group, None, None)
    offset, vocab = _layout.vocab_loss_args(group, shape, ignore_index, label_smoothing, reduction, vocab_ranges)
    grad = place.empty(shape) if grad_out is None else grad_out
    losses = place.empty(shape[:-1]) if reduction == "none" else None
    loss = _C.vocab_cross_entropy(group._handle, logits_shard, targets, offset, vocab, int(ignore_index),
                                  float(label_smoothing), reduction, losses, grad)
    return (losses if reduction == "none" else loss), grad


__all__ = ["VocabParallelEmbedding", "vocab_parallel_cross_entropy"]
