"""Vocabulary parallelism for tplinear.torch (Megatron-core's VocabParallelEmbedding and
vocab_parallel_cross_entropy), as autograd Functions over the same C calls as the NumPy API
(csrc/layers/vocab.c):

    function / module               forward                                    backward
    VocabParallelEmbedding          lookup in this rank's rows, all-reduce     scatter-add into this rank's rows
                                    (sequence-parallel: reduce-scatter rows)   (sequence-parallel: gather dY first)
    vocab_parallel_cross_entropy    max all-reduce, one sum all-reduce         the gradient the forward computed,
                                                                               times dLoss
"""
import torch
from torch import nn

from .. import _C
from .. import _layout
from .. import partition
from .. import distributed as dist
from .._arrays import dtype_name
from . import _ops
from .modules import TorchPlacement, TPModule

_arr, _handle = _ops.arr, _ops.handle


def _empty(like, shape):
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, layer):
        shape, seq = tuple(ids.shape), None
        if layer.sequence_parallel:
            if not shape:
                raise ValueError("sequence_parallel: ids must have a sequence dim (at least 1-d)")
            seq = partition.sequence_ranges(shape[0], layer.tp_world_size)
            shape = (seq[layer.tp_index][1],) + shape[1:]
        y = _empty(weight, shape + (weight.shape[1],))
        _C.embedding_forward(_handle(layer.mp_group), _arr(ids), _arr(weight), layer._vocab_offset,
                             layer.num_embeddings, seq, y)
        ctx.layer, ctx.seq = layer, seq
        ctx.save_for_backward(ids, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        ids, weight = ctx.saved_tensors
        layer = ctx.layer
        if not ctx.needs_input_grad[0]:  # a frozen table on every rank: no collective either
            return None, None, None
        dw = layer._grads.zeros(weight, weight.shape)
        _C.embedding_backward(_handle(layer.mp_group), _arr(ids), _arr(dy), layer._vocab_offset, ctx.seq, dw)
        pad = layer.padding_idx
        if pad is not None and 0 <= pad - layer._vocab_offset < weight.shape[0]:
            dw[pad - layer._vocab_offset].zero_()  # nn.Embedding: the padding row gets no gradient
        return dw, None, None


class VocabParallelEmbedding(TPModule):
    """nn.Embedding split by vocabulary across mp_group (Megatron-core's VocabParallelEmbedding), on the C core
    like tplinear.VocabParallelEmbedding: each rank looks up the ids in its rows (zeros elsewhere) and the
    results are all-reduced, or with sequence_parallel=True reduce-scattered along dim 0 (this rank's rows).
    The rows are split by the partition rule without heads (tplinear.shard_ranges; training mode grain 1).

    weight: a whole [num_embeddings, embedding_dim] table to start from (else nn.Embedding's N(0, 1) from the
    counter-based generator and seed, only this rank's rows allocated); padding_idx as nn.Embedding's (that
    row starts at zero and gets no gradient). CPU tensors, float32 / float64 / bfloat16 / float16 (half: each
    row's gradient summed in float32 with its old value, rounded once). from_embedding(nn.Embedding)
    builds one from a model's embedding (its Parameter object keeps its identity, holding this rank's rows)."""

    _shard_dim = 0
    _kind = _layout.KIND_COL + 1  # its own kind in the construction agreement

    def __init__(self, num_embeddings, embedding_dim, mp_group=None, seed=0, dtype=None, sequence_parallel=False,
                 padding_idx=None, weight=None, name=None, tp_grain_size=None):
        nn.Module.__init__(self)
        V = partition.as_count(num_embeddings, "num_embeddings")
        H = partition.as_count(embedding_dim, "embedding_dim")
        source = weight
        if weight is not None:
            if tuple(weight.shape) != (V, H):
                raise ValueError(f"weight must be [num_embeddings, embedding_dim] = [{V}, {H}], got shape "
                                 f"{tuple(weight.shape)}")
            dtype = weight.dtype if dtype is None else dtype
            if weight.device.type != "cpu":
                raise NotImplementedError("VocabParallelEmbedding runs on CPU tensors in this version of tplinear")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"VocabParallelEmbedding takes float32, float64, bfloat16 or float16 (CPU), got {dtype}")
        if padding_idx is not None:
            if not -V <= padding_idx < V:
                raise ValueError(f"padding_idx must be within num_embeddings={V}, got {padding_idx}")
            padding_idx = padding_idx % V
        group = dist.resolve_group(mp_group)
        if group.rank < 0:
            raise ValueError("this rank is not a member of mp_group: a layer needs a group this rank belongs to")
        self._place = TorchPlacement(dtype, "cpu")
        self.mp_group, self.tp_world_size, self.tp_index = group, group.size, group.rank
        self.name, self.training_mode, self.skip_partition = name, partition.is_training_mode(), False
        self.tp_overlap_comm = False
        self.sequence_parallel, self.padding_idx = bool(sequence_parallel), padding_idx  # (checked by the agreement)
        self._set_split(tp_grain_size, None, None, None, None, None)
        self._grads = _ops.GradBuffers()
        (off, size), = self._rule(V)[self.tp_index]
        self._set_partition((V, H), False, size, V, dtype_name(torch.empty(0, dtype=dtype)))
        self.out_features, self.in_features = V, H
        self._vocab_offset = off
        if source is None:
            half = dtype in (torch.bfloat16, torch.float16)  # drawn in float32, rounded once
            rows = torch.empty((size, H), dtype=torch.float32 if half else dtype)
            _C.init_normal(rows.numpy(), int(seed) & (2**64 - 1), 0, 1.0, off, 0, H)
            rows = rows.to(dtype)
            if padding_idx is not None and 0 <= padding_idx - off < size:
                rows[padding_idx - off].zero_()
            self.weight = self._mark(nn.Parameter(rows), True, 0)
        else:
            self.weight = self._adopt_param(source, source.detach(), sharded=True)
        self.register_parameter("bias", None)
        for key, meta in self.universal_checkpoint_meta().items():
            setattr(getattr(self, key), _layout.UC_META_ATTR, meta)

    def _rule(self, n):
        return _layout.vocab_rule(n, self.tp_world_size, self.tp_grain_size)

    @classmethod
    def from_embedding(cls, embedding, mp_group=None, sequence_parallel=False, name=None, tp_grain_size=None):
        """From an nn.Embedding (max_norm, scale_grad_by_freq and sparse are not supported)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding takes an nn.Embedding, got {type(embedding).__name__}")
        for attr in ("max_norm", "scale_grad_by_freq", "sparse"):
            if getattr(embedding, attr, None):
                raise ValueError(f"nn.Embedding({attr}=...) is not supported by VocabParallelEmbedding")
        return cls(embedding.num_embeddings, embedding.embedding_dim, mp_group, dtype=embedding.weight.dtype,
                   sequence_parallel=sequence_parallel, padding_idx=embedding.padding_idx, weight=embedding.weight,
                   name=name, tp_grain_size=tp_grain_size)

    num_embeddings = property(lambda self: self.out_features)
    embedding_dim = property(lambda self: self.in_features)

    def vocab_range(self):
        """(start, end) of the vocabulary rows this rank holds."""
        return self._vocab_offset, self._vocab_offset + self.local_shape[0]

    def forward(self, input):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(input).__name__}")
        return _Embedding.apply(self.weight, input, self)

    def extra_repr(self):
        lo, hi = self.vocab_range()
        parts = [f"{self.num_embeddings}", f"{self.embedding_dim}",
                 f"rows={lo}..{hi} at rank {self.tp_index} of {self.tp_world_size}"]
        if self.padding_idx is not None:
            parts.append(f"padding_idx={self.padding_idx}")
        if self.sequence_parallel:
            parts.append("sequence_parallel=True")
        return ", ".join(parts)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, offset, vocab, ignore_index, smoothing, reduction):
        grad = _empty(logits, logits.shape)
        losses = _empty(logits, logits.shape[:-1]) if reduction == "none" else None
        loss = _C.vocab_cross_entropy(_handle(group), _arr(logits), _arr(targets), offset, vocab, ignore_index,
                                      smoothing, reduction, losses, grad)
        ctx.reduction = reduction
        ctx.save_for_backward(grad)
        return losses if reduction == "none" else torch.tensor(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, dloss):
        grad, = ctx.saved_tensors
        scale = dloss.unsqueeze(-1) if ctx.reduction == "none" else dloss
        return grad * scale, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits, targets, mp_group=None, ignore_index=-100, label_smoothing=0.0,
                                 reduction="mean", vocab_ranges=None):
    """torch.nn.functional.cross_entropy over logits split by vocabulary (this rank's columns, in rank order),
    with autograd, without gathering them: tplinear.vocab_parallel_cross_entropy's C call. targets: int64 /
    int32, the logits' leading shape, the same on every rank. Returns the loss (0-d, or the targets' shape for
    reduction="none") in the logits' dtype; its backward is the gradient the forward computed (kept, one array
    like the logits), times the incoming gradient. CPU tensors."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be torch.Tensors")
    group = dist.resolve_group(mp_group, gpu=logits.is_cuda)
    offset, vocab = _layout.vocab_loss_args(group, tuple(logits.shape), ignore_index, label_smoothing, reduction,
                                            vocab_ranges)
    return _CrossEntropy.apply(logits, targets, group, offset, vocab, int(ignore_index), float(label_smoothing),
                               reduction)
