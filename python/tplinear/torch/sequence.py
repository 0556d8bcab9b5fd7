"""Sequence parallelism for tplinear.torch (Megatron-core's), as autograd Functions over the same C calls as
the NumPy API (csrc/layers/sequence.c): no second implementation of the math. tplinear.torch.vocab has the
vocabulary-parallel embedding and loss.

    function / module                 forward                                  backward
    SequenceParallelLinear, column    all-gather rows, x @ W_r^T + b_r         reduce-scatter rows of dY_r W_r; dW_r
    SequenceParallelLinear, row       reduce-scatter rows of x_r W_r^T, + b    all-gather rows of dY; dX, dW_r, db
    scatter_to_sequence_parallel_region      this rank's rows               all-gather rows of dX
    gather_from_sequence_parallel_region     all-gather rows                reduce-scatter rows (or this rank's rows)
    reduce_scatter_to_sequence_parallel_region  reduce-scatter rows         all-gather rows

The sequence dim is dim 0 (Megatron's [seq, batch, hidden]); rank r holds rows
``tplinear.sequence_ranges(seq_len, p)[r]``.
"""
import torch

from .. import _C
from .. import _layout
from .. import partition
from .. import distributed as dist
from . import _ops

_arr, _handle, _on_stream = _ops.arr, _ops.handle, _ops.on_stream


def _empty(like, shape):
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------------------- the layers


class SequenceParallelLinear(torch.autograd.Function):
    """A row or a column layer (by layer.partition_dim) with sequence parallelism over seq (every rank's rows
    of dim 0)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, seq):
        _on_stream(weight)
        h = _handle(layer.mp_group)
        if layer.partition_dim == 1:  # row: [seq, ..., in_r] -> this rank's rows [rows, ..., out]
            y = _empty(weight, (seq[layer.tp_index][1],) + tuple(x.shape[1:-1]) + (weight.shape[0],))
            _C.row_forward_sp(h, _arr(x), _arr(weight), _arr(bias), seq, y)
        else:  # column: this rank's rows [rows, ..., in] -> [seq, ..., out_r]
            y = _empty(weight, (sum(s for _, s in seq),) + tuple(x.shape[1:-1]) + (weight.shape[0],))
            _C.col_forward_sp(h, _arr(x), _arr(weight), _arr(bias), seq, y, -1)  # chunks: TPLINEAR_SP_CHUNKS
        ctx.layer, ctx.seq = layer, seq
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        layer, seq = ctx.layer, ctx.seq
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        _on_stream(weight)
        h = _handle(layer.mp_group)
        # every rank runs the same collectives whatever it needs; a bias gradient needs the weight's pass
        dw = layer._grads.zeros(weight, weight.shape) if need_w or need_b else None
        db = layer._grads.zeros(weight, (weight.shape[0],)) if need_b else None
        if layer.partition_dim == 1:
            dx = _empty(weight, x.shape) if need_x else None
            _C.row_backward_sp(h, _arr(dy), _arr(x), _arr(weight), seq, dx, dw, db)
        else:
            dx = _empty(weight, x.shape)
            _C.col_backward_sp(h, _arr(dy), _arr(x), _arr(weight), seq, dx, dw, db, layer.tp_overlap_comm)
        return (dx if need_x else None), (dw if need_w else None), db, None, None


def sequence_parallel_linear(layer, x, seq_len=None):
    """The forward of a sequence-parallel tplinear.torch LinearLayer / LinearAllreduce (their forward calls it)."""
    if x.dim() < 2:
        raise ValueError(f"sequence_parallel: input must be [sequence, ..., features] (at least 2-d), got shape "
                         f"{tuple(x.shape)}")
    if layer.partition_dim == 1:
        if seq_len is not None:
            raise ValueError("seq_len is for column layers (a row layer's input holds the whole sequence)")
        seq = partition.sequence_ranges(x.shape[0], layer.tp_world_size)
    else:
        seq = _layout.sequence_split(layer.mp_group, int(x.shape[0]), seq_len)
    return SequenceParallelLinear.apply(x, layer.weight, layer.bias, layer, seq)


# ----------------------------------------------------------------------------------------- the mappings


def _rows(group, n):
    return partition.sequence_ranges(n, group.size)


def _gather_rows(group, t, seq):
    _on_stream(t)
    out = _empty(t, (sum(s for _, s in seq),) + tuple(t.shape[1:]))
    _C.gather(_handle(group), _arr(t), 0, seq, 1, out)
    return out


def _reduce_scatter_rows(group, t, seq):
    _on_stream(t)
    out = _empty(t, (seq[group.rank][1],) + tuple(t.shape[1:]))
    _C.reduce_scatter_rows(_handle(group), _arr(t), seq, out)
    return out


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        seq = _rows(group, x.shape[0])
        ctx.group, ctx.seq = group, seq
        off, size = seq[group.rank]
        return x[off:off + size].clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, dy):
        return _gather_rows(ctx.group, dy, ctx.seq), None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, seq, reduce_grad):
        ctx.group, ctx.seq, ctx.reduce_grad = group, seq, reduce_grad
        return _gather_rows(group, x, seq)

    @staticmethod
    def backward(ctx, dy):
        if ctx.reduce_grad:
            return _reduce_scatter_rows(ctx.group, dy, ctx.seq), None, None, None
        off, size = ctx.seq[ctx.group.rank]
        return dy[off:off + size].clone(memory_format=torch.contiguous_format), None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        seq = _rows(group, x.shape[0])
        ctx.group, ctx.seq = group, seq
        return _reduce_scatter_rows(group, x, seq)

    @staticmethod
    def backward(ctx, dy):
        return _gather_rows(ctx.group, dy, ctx.seq), None


def scatter_to_sequence_parallel_region(x, mp_group=None):
    """This rank's rows of x (dim 0, tplinear.sequence_ranges); backward: the all-gathered gradient. Where a
    sequence-parallel region starts from a value every rank has."""
    return _ScatterRows.apply(x, dist.resolve_group(mp_group, gpu=x.is_cuda))


def gather_from_sequence_parallel_region(x, mp_group=None, seq_len=None, tensor_parallel_output_grad=True):
    """All ranks' rows of x, all-gathered along dim 0 (seq_len: the whole length, else one small exchange of
    the ranks' row counts); backward: the gradient reduce-scattered to this rank's rows (its consumers are
    tensor-parallel, each rank's gradient a partial sum), or with tensor_parallel_output_grad=False only
    this rank's rows of it (the consumers are replicated), as Megatron's."""
    group = dist.resolve_group(mp_group, gpu=x.is_cuda)
    seq = _layout.sequence_split(group, int(x.shape[0]), seq_len)
    return _GatherRows.apply(x, group, seq, bool(tensor_parallel_output_grad))


def reduce_scatter_to_sequence_parallel_region(x, mp_group=None):
    """This rank's rows of the sum of x over the group (dim 0); backward: the all-gathered gradient."""
    return _ReduceScatterRows.apply(x, dist.resolve_group(mp_group, gpu=x.is_cuda))


def allreduce_gradients(module, mp_group=None):
    """Registers a hook on each of module's parameters that sums its gradient over mp_group before it
    accumulates: for replicated parameters inside a sequence-parallel region (norm weights), whose gradient
    on each rank covers only its rows of the sequence (Megatron all-reduces them too). A tensor hook, so
    accumulation over micro-batches stays right; registering twice does nothing. Returns module."""
    group = dist.resolve_group(mp_group)
    for param in module.parameters():
        _ops.reduce_grad(param, group)
    return module
