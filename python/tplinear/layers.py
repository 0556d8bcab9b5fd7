"""Tensor-parallel linear layers with DeepSpeed AutoTP semantics (deepspeed/module_inject/layers.py).

The math (GEMMs, collectives, partition sizes, shards, gathers, initialisation) runs in the C core; this
module holds parameters, shapes and bookkeeping only.

    LinearAllreduce  row-parallel:    W split along in;  y = all_reduce(x_r @ W_r^T) + b
    LinearLayer      column-parallel: W, b split along out; backward all-reduces dX

TPLayer (the base of every NumPy tensor-parallel layer), WeightHolder, placement_and_group and shape_of are
what vocab.py, autotp.py and checkpoint.py build on; the names with a leading underscore are this module's.
"""
import math

import numpy as np

from . import _C
from . import _layout
from . import distributed as dist
from . import partition
from ._arrays import HOST_DTYPES, Placement, dtype_name, host_array, host_dtype
from ._layout import UC_META_ATTR
from .parameter import GatherReplacedLayerParams, Parameter, data_of
from .partition import is_training_mode

# ---------------------------------------------------------------------------------------------- helpers


def placement_and_group(weight, mp_group, device, dtype):
    """A layer's placement (device and dtype) and group, resolved once: the group is the default one
    when mp_group is None (with the nccl backend for a GPU layer), and this rank must belong to it."""
    place = Placement.resolve(weight, device, dtype)
    group = dist.resolve_group(mp_group, gpu=place.device is not None)
    if group.rank < 0:
        raise ValueError("this rank is not a member of mp_group: a layer needs a group this rank belongs to")
    return place, group


def shape_of(x, what):
    """x's shape as a tuple of ints; TypeError / ValueError naming what unless x is an array of >= 1 dims."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{what} must be an array (NumPy, or a DLPack / CUDA array), got {type(x).__name__}")
    if len(shape) < 1:
        raise ValueError(f"{what} must have at least 1 dimension, got a 0-d array")
    return tuple(int(s) for s in shape)


def _check_features(in_features, out_features):
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(in_features), int(out_features)


def _init_block(arr, seed, stream, in_features, row_offset, col_offset, full_cols):
    _C.init_uniform(arr, int(seed) & (2**64 - 1), stream, 1.0 / math.sqrt(in_features), row_offset, col_offset,
                    full_cols)


def _optional(param):
    return None if param is None else param.data


# ---------------------------------------------------------------------------------------------- plain layer


class _Layer:
    """What every layer shares: a placement, parameters, gradients, state dicts, and the input saved by
    forward for backward.

    The backward contract (torch's, with retain for retain_graph): forward saves its input; backward uses
    it and releases it, so a second backward without a new forward raises RuntimeError instead of adding
    the same gradient twice; backward(dy, retain=True) keeps it for another backward."""

    _place = None
    _input = None
    _released = False

    def __call__(self, x, *args, **kwargs):
        return self.forward(x, *args, **kwargs)

    def _save(self, x):
        self._input, self._released = x, False

    def _saved(self):
        """The input forward saved (raises when there is none: see the class doc)."""
        x = self._input
        if x is None:
            if self._released:
                raise RuntimeError(f"{type(self).__name__}.backward() called a second time without a new forward(): "
                                   "the saved input was released by the first backward (pass retain=True to "
                                   "a backward that another backward follows, as torch's retain_graph=True)")
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward(): there is no saved input")
        return x

    def _release(self, retain):
        """Called by backward once its arguments are checked: drops the saved input unless retain."""
        if not retain:
            self._input, self._released = None, True

    def _check_grad_output(self, grad_output, x, width, what, rows=None):
        """grad_output must be [*x's leading dims, width] (rows: with that many sequence rows, dim 0, instead
        of x's); `what` says what width is."""
        got, lead = shape_of(grad_output, "grad_output"), shape_of(x, "input")[:-1]
        if rows is not None:
            lead = (rows,) + lead[1:]
        if got[-1] != width:
            raise ValueError(f"grad_output's last dimension must be {width} ({what}), got {got[-1]}")
        if got[:-1] != lead:
            raise ValueError(f"grad_output has leading dimensions {got[:-1]} but the input of forward() had {lead}")

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def state_dict(self):
        """The parameters' arrays (a TP layer's shards outside GatherReplacedLayerParams, full inside)."""
        out = {"weight": self.weight.data}
        if self.bias is not None:
            out["bias"] = self.bias.data
        return out

    _transposed = False  # the weight is stored [in_features, out_features] (GPT-2's Conv1D)

    def _grad(self, param):
        """param's gradient array, created at zero; a transposed weight's in the core's [out, in] layout (its
        .grad is then a transposed view of it, in the layout of .data)."""
        flip = self._transposed and param is self.weight
        if param.grad is None:
            param.grad = self._place.zeros(param.data.shape[::-1]).T if flip else self._place.zeros(param.data.shape)
        return param.grad.T if flip else param.grad

    def _grads(self):
        """(dW, db) for backward to accumulate into, as torch treats frozen parameters: a parameter with
        requires_grad=False gets no .grad; a frozen weight with no learning bias skips its dW GEMM (a learning
        bias beside a frozen weight: dW goes to a scratch array)."""
        learn_b = self.bias is not None and self.bias.requires_grad
        if not self.weight.requires_grad:
            if not learn_b:
                return None, None
            return self._place.zeros(self._w().shape), self._grad(self.bias)
        return self._grad(self.weight), self._grad(self.bias) if learn_b else None

    def _w(self):
        """The weight as the core takes it, [out, in] (a transposed view of a transposed weight)."""
        return self.weight.data.T if self._transposed else self.weight.data


class Linear(_Layer):
    """A single-process linear layer, y = x @ W^T + b, with nn.Linear's initial distribution
    (uniform in +-1/sqrt(in_features)) from a counter-based generator: element (i, j) of W depends only on
    (seed, i * in_features + j), so any shard can be initialised alone (see from_init)."""

    def __init__(self, in_features, out_features, bias=True, dtype="float32", seed=0, device=None):
        in_features, out_features = _check_features(in_features, out_features)
        self._place = Placement.resolve(None, device, dtype)
        self.device = self._place.device
        self.in_features, self.out_features = in_features, out_features
        host = host_dtype(self._place.dtype)  # half types: drawn in float32, rounded once on the way to the GPU
        self.weight = Parameter(np.empty((out_features, in_features), dtype=host))
        _init_block(self.weight.data, seed, 0, in_features, 0, 0, in_features)
        self.bias = None
        if bias:
            self.bias = Parameter(np.empty((out_features,), dtype=host))
            _init_block(self.bias.data, seed, 1, in_features, 0, 0, out_features)
        for p in self.parameters():  # device="cuda": initialised on the host, then copied once
            p.data = self._place.adopt(p.data, "parameter")

    def forward(self, x):
        y = self._place.empty(shape_of(x, "input")[:-1] + (self.weight.data.shape[0],))
        _C.linear_forward(x, self.weight.data, _optional(self.bias), y)
        self._save(x)
        return y

    def backward(self, grad_output, retain=False):
        """dX; accumulates .grad. Releases the saved input unless retain=True (see _Layer)."""
        x = self._saved()
        self._check_grad_output(grad_output, x, self.out_features, "out_features")
        self._release(retain)
        dx = self._place.empty(shape_of(x, "input"))
        _C.linear_backward(grad_output, x, self.weight.data, dx, *self._grads())
        return dx

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{_placement_repr(self._place)})")


# ---------------------------------------------------------------------------------------------- TP layers


class TPLayer(_Layer, _layout.Sharded):
    """A NumPy / DeviceArray tensor-parallel layer: group, placement, parameters, state dicts, messages; the
    shard bookkeeping (split arguments, partition, marks, gather / re-partition, universal-checkpoint
    metadata) is _layout.Sharded's."""

    _from_init_ok = True  # False where the constructor changes the split from_init would initialise

    def __init__(self, module, mp_group, name, skip_partition, block_sizes=None, block_heads=None, device=None,
                 dtype=None, tp_grain_size=None, num_heads=None, num_kv_heads=None, head_dim=None, _full=None):
        """_full (from_init): module.weight is already this rank's shard by the partition rule of a split
        dim of _full elements, so nothing is sliced and the rule's ranges are kept."""
        wobj = data_of(getattr(module, "weight", None))
        bobj = data_of(getattr(module, "bias", None))
        self._place, self.mp_group = placement_and_group(wobj, mp_group, device, dtype)
        self.device = self._place.device
        if self._transposed and self.device is not None:
            raise NotImplementedError(f"{type(self).__name__} (a transposed Conv1D weight) runs on host arrays only")
        self.tp_world_size = self.mp_group.size
        self.tp_index = self.mp_group.rank
        self.name = name
        self.training_mode = is_training_mode()
        self.tp_overlap_comm = False
        self._set_split(tp_grain_size, num_heads, num_kv_heads, head_dim, block_sizes, block_heads)
        weight = self._place.readable(wobj, "module.weight")
        if len(weight.shape) != 2:
            raise ValueError(f"module.weight must be 2-d [out_features, in_features], got shape {tuple(weight.shape)}")
        bias = None if bobj is None else self._place.readable(bobj, "module.bias")
        out_dim = 1 if self._transposed else 0
        if bias is not None and (len(bias.shape) != 1 or bias.shape[0] != weight.shape[out_dim]):
            raise ValueError(f"module.bias must be 1-d of size {weight.shape[out_dim]} (out_features), "
                             f"got shape {tuple(bias.shape)}")
        if bias is not None and host_dtype(dtype_name(bias)) != host_dtype(dtype_name(weight)):
            raise TypeError(f"module.bias has dtype {dtype_name(bias)} but module.weight has {dtype_name(weight)}")
        self.skip_partition = bool(skip_partition)
        local = int(weight.shape[self._shard_dim])
        full = _full if _full is not None else (None if self.skip_partition else local)
        self._set_partition(weight.shape, bias is not None, local, full, self._place.dtype)
        self.out_features, self.in_features = self._full_shape[out_dim], self._full_shape[1 - out_dim]
        self.weight = self._mark(Parameter(None))
        self.bias = None if bias is None else self._mark(Parameter(None))
        given_shard = self.skip_partition or _full is not None  # module.weight is this rank's shard already
        for param, value, what in ((self.weight, weight, "module.weight"), (self.bias, bias, "module.bias")):
            if param is not None:
                param.data = self._place.adopt(value, what) if given_shard else self._piece(param, value, what)
        for key, meta in self.universal_checkpoint_meta().items():  # DeepSpeed's per-parameter attribute
            setattr(getattr(self, key), UC_META_ATTR, meta)

    # -- what the layer holds

    def _shard_words(self):
        """'this rank's shard of out_features=34: 17 at rank 0 of 2', for messages."""
        dim = self._dim_name(self._shard_dim)
        return (f"this rank's shard of {dim}={self._full_shape[self._shard_dim]}: "
                f"{self.local_shape[self._shard_dim]} at rank {self.tp_index} of {self.tp_world_size}")

    def __repr__(self):
        """Like torch's: LinearLayer(in_features=4096, out_features=4100, shard=1348/4100 at rank 2 of 3,
        mode=inference, bias=True), then what differs from the defaults."""
        d = self._shard_dim
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"shard={self.local_shape[d]}/{self._full_shape[d]} at rank {self.tp_index} of {self.tp_world_size}",
                 f"mode={'training' if self.training_mode else 'inference'}", f"bias={self.bias is not None}"]
        if self.name is not None:
            parts.append(f"name={self.name!r}")
        for key in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, key) is not None:
                parts.append(f"{key}={getattr(self, key)}")
        if self.tp_grain_size != (partition.GRAIN_TRAINING if self.training_mode else partition.GRAIN_INFERENCE):
            parts.append(f"tp_grain_size={self.tp_grain_size}")
        if self._split["block_sizes"] is not None:
            parts.append(f"block_sizes={self._split['block_sizes']}")
        if self.skip_partition:
            parts.append("skip_partition=True")
        if getattr(self, "sequence_parallel", False):
            parts.append("sequence_parallel=True")
        return f"{type(self).__name__}({', '.join(parts)}{_placement_repr(self._place)})"

    # -- state dicts (checkpoint.py holds the files)

    def load_state_dict(self, state_dict):
        """Loads this rank's shards (shapes must match the current shards)."""
        for key, param in (("weight", self.weight), ("bias", self.bias)):
            if param is None:
                if key in state_dict and state_dict[key] is not None:
                    raise ValueError(f"state_dict has a {key} but the layer has none")
                continue
            if key not in state_dict:
                raise ValueError(f"state_dict is missing {key!r}")
            value = self._place.readable(data_of(state_dict[key]), f"state_dict[{key!r}]")
            if tuple(value.shape) != tuple(param.data.shape):
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(value.shape)}, this rank's shard is "
                                 f"{tuple(param.data.shape)}")
            param.data = self._place.put(value, f"state_dict[{key!r}]")

    def consolidated_state_dict(self):
        """The full parameters as NumPy arrays (half types as float32). Collective over mp_group."""
        with GatherReplacedLayerParams(self.parameters(), self):
            return {k: np.array(host_array(v, k), copy=True) for k, v in self.state_dict().items()}

    def load_consolidated_state_dict(self, state_dict):
        """Loads full parameters and keeps this rank's shards (works at any group size)."""
        for key, param in (("weight", self.weight), ("bias", self.bias)):
            if param is None:
                continue
            if key not in state_dict:
                raise ValueError(f"checkpoint is missing {key!r}")
            what = f"checkpoint[{key!r}]"
            value = self._place.readable(data_of(state_dict[key]), what)
            full = self._full_shape if key == "weight" else [self.out_features]
            if list(value.shape) != list(full):
                raise ValueError(f"{what} has shape {tuple(value.shape)}, the layer's full shape is {tuple(full)}")
            param.data = self._piece(param, value, what)


class LinearAllreduce(TPLayer):
    """Row-parallel layer: weight split along in_features; y = all_reduce(x_r @ W_r^T) + b, the bias added
    once after the reduce; backward has no collective.

    input_is_parallel=True (default): x is this rank's slice of the input's last dim.
    input_is_parallel=False: x is the full input; the layer slices its part, and backward returns the full
    dX (all-gathered).
    sequence_parallel=True (Megatron's sequence parallelism): the output is reduce-scattered along the
    sequence dim (dim 0: this rank's rows, partition.sequence_ranges) instead of all-reduced, and backward
    all-gathers dY; needs input_is_parallel=True.

    num_heads / num_kv_heads / head_dim: the attention output projection's heads (in_features is
    num_heads * head_dim); the same arguments as the column layer before attention give the same heads.
    block_sizes / block_heads: a packed input dim, each block split on its own."""

    _shard_dim = 1
    _kind = _layout.KIND_ROW

    def __init__(self, module, mp_group=None, name=None, input_is_parallel=True, skip_partition=False, device=None,
                 dtype=None, tp_grain_size=None, num_heads=None, num_kv_heads=None, head_dim=None, block_sizes=None,
                 block_heads=None, sequence_parallel=False, _full=None):
        if sequence_parallel and not input_is_parallel:  # Megatron's RowParallelLinear refuses it too
            raise ValueError("sequence_parallel=True needs input_is_parallel=True (the input's features split, its "
                             "sequence whole)")
        self.sequence_parallel = bool(sequence_parallel)  # before the construction agreement, which checks it
        super().__init__(module, mp_group, name, skip_partition, block_sizes, block_heads, device=device, dtype=dtype,
                         tp_grain_size=tp_grain_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, _full=_full)
        self.input_is_parallel = bool(input_is_parallel)

    @classmethod
    def from_init(cls, in_features, out_features, mp_group=None, seed=0, bias=True, dtype="float32", name=None,
                  input_is_parallel=True, device=None, **kwargs):
        """Creates only this rank's shard, equal to slicing tplinear.Linear(in, out, bias, dtype, seed).
        kwargs: the constructor's (tp_grain_size, num_heads, num_kv_heads, head_dim, block_sizes, ...)."""
        return _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name,
                          input_is_parallel=input_is_parallel, device=device, **kwargs)

    def forward(self, x):
        w = self._w()
        width = shape_of(x, "input")[-1]
        if not self.input_is_parallel:
            if width != self.in_features:
                raise ValueError(f"input's last dimension must be {self.in_features} (in_features; "
                                 f"input_is_parallel=False takes the full input), got {width}")
            if self._nblocks == 1:
                (off, size), = self._my_pieces()
                x = x[..., off:off + size]
            else:
                x = _shard_where_it_is(x, self._flat_ranges(), self._nblocks, self.tp_index, "input")
        elif width != w.shape[1]:
            raise ValueError(f"input's last dimension must be {w.shape[1]} ({self._shard_words()}; "
                             f"input_is_parallel=True), got {width}")
        if self.sequence_parallel:
            return self._forward_sp(x, w)
        y = self._place.empty(shape_of(x, "input")[:-1] + (w.shape[0],))
        _C.row_forward(self.mp_group._handle, x, w, _optional(self.bias), y)
        self._save(x)
        return y

    def _forward_sp(self, x, w):
        """This rank's rows of all_reduce(x_r @ W_r^T) + b: x is [seq, ..., in_r], the result [rows, ..., out]."""
        shape = _sequence_shape(x)
        self._seq = partition.sequence_ranges(shape[0], self.tp_world_size)
        y = self._place.empty((self._seq[self.tp_index][1],) + shape[1:-1] + (w.shape[0],))
        _C.row_forward_sp(self.mp_group._handle, x, w, _optional(self.bias), self._seq, y)
        self._save(x)
        return y

    def backward(self, grad_output, retain=False):
        """dX (this rank's slice; the full dX when input_is_parallel=False); accumulates .grad. Releases
        the saved input unless retain=True."""
        x = self._saved()
        rows = self._seq[self.tp_index][1] if self.sequence_parallel else None
        self._check_grad_output(grad_output, x, self.out_features, "out_features, the full output", rows)
        self._release(retain)
        dx = self._place.empty(shape_of(x, "input"))
        if self.sequence_parallel:
            _C.row_backward_sp(self.mp_group._handle, grad_output, x, self._w(), self._seq, dx, *self._grads())
            return dx
        _C.row_backward(self.mp_group._handle, grad_output, x, self._w(), dx, *self._grads())
        if self.input_is_parallel:
            return dx
        full = self._place.empty(dx.shape[:-1] + (self.in_features,))
        _C.gather(self.mp_group._handle, dx, dx.ndim - 1, self._flat_ranges(), self._nblocks, full)
        return full


class LinearLayer(TPLayer):
    """Column-parallel layer: weight and bias split along out_features; the output stays partitioned
    unless gather_output=True; backward all-reduces dX (overlapped with the dW GEMM when
    tp_overlap_comm=True).

    sequence_parallel=True (Megatron's sequence parallelism): the input is this rank's rows of the sequence
    (dim 0), all-gathered before the GEMM; backward reduce-scatters dX to those rows and gathers the input
    again for dW (the full input is not kept between forward and backward). forward(x, seq_len=None): the
    whole sequence's length, when known, spares one small all-gather of the ranks' row counts. With
    tp_overlap_comm=True the backward runs its two collectives under its two GEMMs (TPLINEAR_SP_CHUNKS
    pipelines the forward's gather with its GEMM).

    block_sizes / block_heads: a packed output dim (fused QKV, gate/up): each block is split separately
    and a rank's shard is its pieces in block order.
    num_heads / num_kv_heads / head_dim: the attention heads of q_proj, k_proj, v_proj or a packed QKV;
    query heads follow their KV group (tplinear.attention_heads)."""

    _shard_dim = 0
    _kind = _layout.KIND_COL
    _bias_sharded = True

    def __init__(self, module=None, mp_group=None, skip_partition=False, name=None, gather_output=False,
                 tp_overlap_comm=False, block_sizes=None, block_heads=None, device=None, dtype=None,
                 tp_grain_size=None, num_heads=None, num_kv_heads=None, head_dim=None, sequence_parallel=False,
                 _full=None):
        self.sequence_parallel = bool(sequence_parallel)  # before the construction agreement, which checks it
        super().__init__(module, mp_group, name, skip_partition, block_sizes, block_heads, device=device, dtype=dtype,
                         tp_grain_size=tp_grain_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, _full=_full)
        self.gather_output = bool(gather_output)
        self.tp_overlap_comm = bool(tp_overlap_comm)

    @classmethod
    def from_weights(cls, weight_shape=None, weight=None, bias=None, mp_group=None, dtype="float32", **kwargs):
        """DeepSpeed's factory: a layer around given (already partitioned) weights, skip_partition=True.
        With only weight_shape, a zero weight of that shape."""
        if weight is None:
            if weight_shape is None or len(weight_shape) != 2:
                raise ValueError(f"from_weights needs weight or a 2-d weight_shape, got {weight_shape!r}")
            place = Placement.resolve(None, kwargs.get("device"), dtype)
            weight = place.zeros(tuple(int(s) for s in weight_shape))
        return cls(WeightHolder(weight, bias), mp_group=mp_group, skip_partition=True, **kwargs)

    @classmethod
    def from_init(cls, in_features, out_features, mp_group=None, seed=0, bias=True, dtype="float32", name=None,
                  block_sizes=None, block_heads=None, **kwargs):
        """Creates only this rank's shard, equal to slicing tplinear.Linear(in, out, bias, dtype, seed).
        kwargs: the constructor's (tp_grain_size, num_heads, num_kv_heads, head_dim, gather_output, ...)."""
        return _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name,
                          block_sizes=block_sizes, block_heads=block_heads, **kwargs)

    def forward(self, x, seq_len=None):
        w = self._w()
        width = shape_of(x, "input")[-1]
        if width != self.in_features:
            raise ValueError(f"input's last dimension must be {self.in_features} (in_features; a column layer "
                             f"takes the full input), got {width}")
        if self.sequence_parallel:
            y = self._forward_sp(x, w, seq_len)
        elif seq_len is not None:
            raise ValueError("seq_len is for sequence_parallel=True layers")
        else:
            y = self._place.empty(shape_of(x, "input")[:-1] + (w.shape[0],))
            _C.col_forward(self.mp_group._handle, x, w, _optional(self.bias), y)
            self._save(x)
        if not self.gather_output:
            return y
        full = self._place.empty(y.shape[:-1] + (self.out_features,))
        _C.gather(self.mp_group._handle, y, y.ndim - 1, self._flat_ranges(), self._nblocks, full)
        return full

    def _forward_sp(self, x, w, seq_len):
        """The whole sequence's x @ W_r^T + b_r from this rank's rows x [rows, ..., in]."""
        shape = _sequence_shape(x)
        self._seq = _layout.sequence_split(self.mp_group, shape[0], seq_len)
        rows = sum(size for _, size in self._seq)
        y = self._place.empty((rows,) + shape[1:-1] + (w.shape[0],))
        _C.col_forward_sp(self.mp_group._handle, x, w, _optional(self.bias), self._seq, y, -1)  # TPLINEAR_SP_CHUNKS
        self._save(x)
        return y

    def backward(self, grad_output, retain=False):
        """The full dX (all-reduced; sequence_parallel: this rank's rows of it, reduce-scattered); accumulates
        .grad. grad_output is this rank's shard of the output, or the full output with gather_output=True.
        Releases the saved input unless retain=True."""
        x = self._saved()
        if self.sequence_parallel:
            rows = sum(size for _, size in self._seq)
            if self.gather_output:
                self._check_grad_output(grad_output, x, self.out_features, "out_features, gather_output=True", rows)
                grad_output = _shard_where_it_is(grad_output, self._flat_ranges(), self._nblocks, self.tp_index)
            else:
                self._check_grad_output(grad_output, x, self.local_shape[self._shard_dim], self._shard_words(), rows)
            self._release(retain)
            dx = self._place.empty(shape_of(x, "input"))
            _C.col_backward_sp(self.mp_group._handle, grad_output, x, self._w(), self._seq, dx, *self._grads(),
                               self.tp_overlap_comm)
            return dx
        if self.gather_output:
            self._check_grad_output(grad_output, x, self.out_features, "out_features, gather_output=True")
            grad_output = _shard_where_it_is(grad_output, self._flat_ranges(), self._nblocks, self.tp_index)
        else:
            self._check_grad_output(grad_output, x, self.local_shape[self._shard_dim], self._shard_words())
        self._release(retain)
        dx = self._place.empty(shape_of(x, "input"))
        _C.col_backward(self.mp_group._handle, grad_output, x, self._w(), dx, *self._grads(),
                        self.tp_overlap_comm)
        return dx


def _sequence_shape(x, what="input"):
    """x's shape, which must have a sequence dim (dim 0) and a feature dim."""
    shape = shape_of(x, what)
    if len(shape) < 2:
        raise ValueError(f"sequence_parallel: {what} must be [sequence, ..., features] (at least 2-d), got shape "
                         f"{shape}")
    return shape


def _shard_where_it_is(arr, ranges, nblocks, rank, what="grad_output"):
    """rank's pieces of arr's last dim, as a new array on arr's device in arr's dtype."""
    if dtype_name(arr) is None:
        arr = host_array(arr, what)
    place = Placement.of(arr)
    if place.device is None and place.dtype not in HOST_DTYPES:
        arr = host_array(arr, what)  # reports the dtype the host cannot take
    return place.shard(arr, len(arr.shape) - 1, ranges, nblocks, rank, what)


class WeightHolder:
    """A minimal holder with .weight / .bias, for factories."""

    def __init__(self, weight, bias=None):
        self.weight, self.bias = weight, bias


def _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name, **kwargs):
    """Builds the layer around this rank's shard only, initialised in place from the counter-based
    generator with the shard's global offsets (no full copy is ever allocated)."""
    if not cls._from_init_ok:
        raise TypeError(f"{cls.__name__}.from_init is not available: build it from a module")
    in_features, out_features = _check_features(in_features, out_features)
    place, group = placement_and_group(None, mp_group, kwargs.get("device"), dtype)
    kwargs["dtype"] = place.dtype
    host = host_dtype(place.dtype)
    split_dim = cls._shard_dim
    n = out_features if split_dim == 0 else in_features
    split = _layout.split_args(is_training_mode(), name, kwargs.get("tp_grain_size"), kwargs.get("num_heads"),
                        kwargs.get("num_kv_heads"), kwargs.get("head_dim"), kwargs.get("block_sizes"),
                        kwargs.get("block_heads"))
    pieces = partition.shard_ranges(n, group.size, **split)[group.rank]
    local = sum(size for _, size in pieces)
    weight = np.empty((local, in_features) if split_dim == 0 else (out_features, local), dtype=host)
    at = 0
    for off, size in pieces:
        if split_dim == 0:
            _init_block(weight[at:at + size], seed, 0, in_features, off, 0, in_features)
        else:
            _init_block(weight[:, at:at + size], seed, 0, in_features, 0, off, in_features)
        at += size
    b = None
    if bias:
        if split_dim == 0:
            b = np.empty((local,), dtype=host)
            at = 0
            for off, size in pieces:
                _init_block(b[at:at + size], seed, 1, in_features, 0, off, out_features)
                at += size
        else:
            b = np.empty((out_features,), dtype=host)
            _init_block(b, seed, 1, in_features, 0, 0, out_features)
    return cls(WeightHolder(weight, b), mp_group=group, name=name, _full=n, **kwargs)


def _placement_repr(place):
    """', dtype=float64, device=cuda:0' for what is not the default (float32 on the host)."""
    out = "" if place.dtype == "float32" else f", dtype={place.dtype}"
    return out if place.device is None else f"{out}, device=cuda:{place.device}"
