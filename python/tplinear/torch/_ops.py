"""The autograd Functions of tplinear.torch: each forward and backward is one call into the C core on the
tensors' own memory (zero-copy: CPU tensors and CUDA tensors go in through DLPack, detached so that a
tensor that requires grad can be passed), with the outputs allocated by torch where the inputs live.

Megatron-core's ``tensor_parallel/mappings.py`` pairs, over a tplinear process group:

    function              forward                                  backward
    TPLinear, row         all_reduce(x_r @ W_r^T) + b              dX_r = dY @ W_r ; dW_r ; db
    TPLinear, column      x @ W_r^T + b_r                          dX = all_reduce(dY_r @ W_r) ; dW_r ; db_r
    GatherLastDim         all-gather-v of the last dim             this rank's pieces of dY
    ScatterLastDim        this rank's pieces of the last dim       all-gather-v of dX
    ReduceFromGroup       all_reduce(x)                            dY
    CopyToGroup           x                                        all_reduce(dY)
"""
import weakref
from typing import Optional

import torch

from .. import _C
from .._device import stream_for

# ----------------------------------------------------------------------------------------- tensors in


def arr(t):
    """t as the C core takes it: the same memory, detached (DLPack refuses tensors that require grad)."""
    return None if t is None else t.detach()


# with on_stream(t): tplinear's GPU work runs on torch's current stream of t's device, and tplinear's stream
# is given back after the call (CPU tensors: nothing to do)
on_stream = stream_for


def handle(group):
    return group._handle


# ----------------------------------------------------------------------------------------- gradients


def _storage_users(t):
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


try:  # how many references a storage that only one tensor holds reports (the call adds its own)
    _ALONE = _storage_users(torch.empty(1))
except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the private counter
    _ALONE = None


class GradBuffers:
    """Reused weight-gradient buffers on the host.

    A weight gradient is a fresh tensor that autograd moves into ``param.grad`` without copying. On the
    host a fresh tensor of hundreds of MB costs page faults on every step (torch has no caching allocator
    for CPU memory; after ``optimizer.zero_grad()`` the old gradient is unmapped), more than the GEMM that
    fills it at small batches. So each layer keeps the buffers it handed out and hands one out again once
    nothing else refers to its memory (``param.grad`` was set to None, and no one kept it). GPU memory
    comes from torch's caching allocator and needs none of this.

    ``empty`` hands out a buffer with whatever it held (for the C core's ``assign=True``, which writes every
    element without reading one: no zeroing pass over memory); ``zeros`` one set to zero (for calls that add
    into it)."""

    def __init__(self):
        self._free = {}

    def empty(self, like, shape):
        if like.is_cuda or _ALONE is None:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        key = (tuple(shape), like.dtype)
        bufs = self._free.setdefault(key, [])
        for buf in bufs:
            if _storage_users(buf) == _ALONE:
                return buf.detach()  # a new tensor on the same memory: autograd takes it as it is
        buf = torch.empty(shape, dtype=like.dtype)
        bufs.append(buf)
        return buf.detach()

    def zeros(self, like, shape):
        return self.empty(like, shape).zero_()

    def clear(self):
        self._free.clear()

    def __deepcopy__(self, memo):  # a copied layer keeps buffers of its own, none of the original's
        return GradBuffers()


# ----------------------------------------------------------------------------------------- the layers


def _empty(like, shape):
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _forward(layer, x, weight, bias):
    y = _empty(weight, tuple(x.shape[:-1]) + (weight.shape[0],))
    forward = _C.row_forward if layer.partition_dim == 1 else _C.col_forward
    with on_stream(weight):
        forward(handle(layer.mp_group), arr(x), arr(weight), arr(bias), y)
    return y


def _backward(layer, grads, dy, x, weight, need_x, need_w, need_b):
    """dX, dW, dB (None where not needed) of a row or column layer. grads hands out the gradient buffers,
    which the C core overwrites (assign=True: one pass over dW's memory, no zeroing first); autograd adds
    them to .grad where a gradient is already there."""
    dx = _empty(weight, x.shape) if need_x else None
    dw = grads.empty(weight, weight.shape) if need_w else None
    db = grads.empty(weight, (weight.shape[0],)) if need_b and need_w else None
    group = handle(layer.mp_group)
    if dy.is_cuda:  # e.g. y.sum().backward()'s expand()ed dY (strides 0): packed by torch on the device, as
        dy = dy.contiguous()  # the host path packs it in C (GPU GEMMs take unit-stride rows only)
    with on_stream(weight):
        if layer.partition_dim == 1:
            if need_x or need_w:
                _C.row_backward(group, arr(dy), arr(x), arr(weight), dx, dw, db, True)
        elif need_x:  # every rank of the group has the same graph, so all of them reduce or none does
            _C.col_backward(group, arr(dy), arr(x), arr(weight), dx, dw, db, layer.tp_overlap_comm, True)
        elif need_w:
            _C.linear_backward(arr(dy), arr(x), arr(weight), None, dw, db, True)
    if need_b and not need_w:
        db = dy.reshape(-1, weight.shape[0]).sum(0)
    return dx, dw, db


class TPLinear(torch.autograd.Function):
    """A row layer (LinearAllreduce: y = all_reduce(x_r @ W_r^T) + b; no collective backward) or a column
    layer (LinearLayer: y_r = x @ W_r^T + b_r; the backward all-reduces dX), by layer.partition_dim."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        y = _forward(layer, x, weight, bias)
        ctx.layer = layer
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = _backward(ctx.layer, ctx.layer._grads, dy, x, weight, need_x, need_w, need_b)
        return dx, dw, db, None


# ----------------------------------------------------------------------------------------- torch.compile
# The same layer as torch custom operators, so that Dynamo puts tplinear's layers into the graph instead of
# breaking it at each opaque C call (torch.compile(..., fullgraph=True) works). A layer is named by an int
# (its registry key): an operator takes tensors and plain values only. The gradient buffers are not reused
# here: a compiled graph may assume its operators' outputs are fresh tensors.

_REGISTRY = weakref.WeakValueDictionary()


def register(layer):
    """The key that names layer in the custom operators."""
    key = id(layer)
    _REGISTRY[key] = layer
    return key


class _FreshGrads:
    @staticmethod
    def empty(like, shape):
        return torch.empty(shape, dtype=like.dtype, device=like.device)


@torch.library.custom_op("tplinear::linear", mutates_args=())
def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layer: int) -> torch.Tensor:
    return _forward(_REGISTRY[layer], x, weight, bias)


@linear_op.register_fake
def _linear_fake(x, weight, bias, layer):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],), dtype=weight.dtype)


@torch.library.custom_op("tplinear::linear_backward", mutates_args=())
def linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, layer: int, need_x: bool,
                       need_w: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lay = _REGISTRY[layer]
    dx, dw, db = _backward(lay, _FreshGrads, dy, x, weight, need_x, need_w, need_b)
    none = weight.new_empty(0)
    return (none if dx is None else dx, none if dw is None else dw, none if db is None else db)


@linear_backward_op.register_fake
def _linear_backward_fake(dy, x, weight, layer, need_x, need_w, need_b):
    none = weight.new_empty(0)
    return (x.new_empty(x.shape, dtype=weight.dtype) if need_x else none,
            weight.new_empty(weight.shape) if need_w else none,
            weight.new_empty((weight.shape[0],)) if need_b else none)


def _setup(ctx, inputs, output):
    x, weight, bias, layer = inputs
    ctx.save_for_backward(x, weight)
    ctx.layer, ctx.has_bias = layer, bias is not None


def _op_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = linear_backward_op(dy, x, weight, ctx.layer, need_x, need_w, need_b and ctx.has_bias)
    return dx if need_x else None, dw if need_w else None, db if need_b and ctx.has_bias else None, None


linear_op.register_autograd(_op_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------- mappings


def _gather_last(group, t, ranges, nblocks, full_width):
    """The full last dim from every rank's pieces of it (all-gather-v)."""
    out = _empty(t, tuple(t.shape[:-1]) + (full_width,))
    with on_stream(t):
        _C.gather(handle(group), arr(t).contiguous(), t.dim() - 1, ranges, nblocks, out)
    return out


def _slice_last(t, ranges, nblocks, rank):
    """This rank's pieces of t's last dim, as a new contiguous tensor (no collective)."""
    width = sum(size for _, size in ranges[rank * nblocks:(rank + 1) * nblocks])
    out = _empty(t, tuple(t.shape[:-1]) + (width,))
    if t.is_cuda:  # a strided view (e.g. expand()ed dY) is packed by torch on the device
        t = t.contiguous()
    with on_stream(t):
        _C.shard(arr(t), t.dim() - 1, ranges, nblocks, rank, out)
    return out


class GatherLastDim(torch.autograd.Function):
    """Forward: the full last dim from every rank's pieces; backward: this rank's pieces of dY."""

    @staticmethod
    def forward(ctx, x, group, ranges, nblocks, full_width):
        ctx.args = (ranges, nblocks, group.rank)
        return _gather_last(group, x, ranges, nblocks, full_width)

    @staticmethod
    def backward(ctx, dy):
        return _slice_last(dy, *ctx.args), None, None, None, None


class ScatterLastDim(torch.autograd.Function):
    """Forward: this rank's pieces of the last dim; backward: the full dX, all-gathered."""

    @staticmethod
    def forward(ctx, x, group, ranges, nblocks):
        ctx.args = (group, ranges, nblocks, x.shape[-1])
        return _slice_last(x, ranges, nblocks, group.rank)

    @staticmethod
    def backward(ctx, dy):
        group, ranges, nblocks, width = ctx.args
        return _gather_last(group, dy, ranges, nblocks, width), None, None, None


def all_reduce_(group, t):
    """In place over the group; t must be contiguous."""
    with on_stream(t):
        _C.all_reduce(handle(group), arr(t), "sum")
    return t


def reduce_grad(param, group):
    """param's incoming gradient summed over group before it accumulates (a tensor hook, so accumulation over
    micro-batches stays right), for a replicated parameter that each rank's part of the work gives a partial
    gradient. Once per parameter; the group is kept (param._tplinear_grad_allreduce_group) for copies of
    the model (tplinear.torch.training)."""
    if param.requires_grad and not getattr(param, "_tplinear_grad_allreduce", False):
        param.register_hook(lambda g: all_reduce_(group, g.clone(memory_format=torch.contiguous_format)))
        param._tplinear_grad_allreduce = True
        param._tplinear_grad_allreduce_group = group


class ReduceFromGroup(torch.autograd.Function):
    """Forward: all_reduce(x) (partial sums become the full value); backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_(group, x.detach().clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class CopyToGroup(torch.autograd.Function):
    """Forward: identity (a value every rank has); backward: all_reduce(dY) (each rank's part of it)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return all_reduce_(ctx.group, dy.clone(memory_format=torch.contiguous_format)), None
