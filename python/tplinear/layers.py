"""Tensor-parallel linear layers with DeepSpeed AutoTP semantics (deepspeed/module_inject/layers.py).

The math (GEMMs, collectives, partition sizes, shards, gathers, initialisation) runs in the C core; this
module holds parameters, shapes and bookkeeping only.

    LinearAllreduce  row-parallel:    W split along in;  y = all_reduce(x_r @ W_r^T) + b
    LinearLayer      column-parallel: W, b split along out; backward all-reduces dX
"""
import math

import numpy as np

from . import _C
from . import checkpoint
from . import distributed as dist
from ._arrays import DTYPES, HOST_DTYPES, Placement, dtype_name, host_array, host_dtype
from .parameter import Parameter, data_of, param_list

# tplinear.layers held these before parameter.py and checkpoint.py were split out of it
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: F401,E402
from .parameter import GatherReplacedLayerParams  # noqa: F401,E402

# ---------------------------------------------------------------------------------------------- modes

_state = {"training": False, "num_kv_heads": None}  # DeepSpeed's default mode is inference


def set_training_mode(training=True):
    """Training mode splits evenly (torch.chunk; a dimension the group does not divide is an error);
    inference mode (the default, as in DeepSpeed) uses DeepSpeed's uneven shard-size rule."""
    _state["training"] = bool(training)


def is_training_mode():
    return _state["training"]


def set_autotp_mode(training=False):
    """DeepSpeed's name for set_training_mode."""
    set_training_mode(training)


def is_autotp_training_mode():
    return is_training_mode()


def set_num_kv_heads(num):
    """Head count used by the inference split of attention layers (DeepSpeed's set_num_kv_heads)."""
    if num is not None and (not isinstance(num, (int, np.integer)) or num < 1):
        raise ValueError(f"num_kv_heads must be a positive int or None, got {num!r}")
    _state["num_kv_heads"] = None if num is None else int(num)


def get_num_kv_heads():
    return _state["num_kv_heads"]


# ---------------------------------------------------------------------------------------------- helpers


def _resolve(weight, mp_group, device, dtype):
    """A layer's placement (device and dtype) and group, resolved once: the group is the default one
    when mp_group is None (with the nccl backend for a GPU layer), and this rank must belong to it."""
    place = Placement.resolve(weight, device, dtype)
    group = dist._group(mp_group, gpu=place.device is not None)
    if group.rank < 0:
        raise ValueError("this rank is not a member of mp_group: a layer needs a group this rank belongs to")
    return place, group


def _shape(x, what):
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


def _saved(x):
    if x is None:
        raise RuntimeError("backward() called before forward(): there is no saved input")
    return x


def _optional(param):
    return None if param is None else param.data


# ---------------------------------------------------------------------------------------------- plain layer


class _Layer:
    """What every layer shares: a placement, parameters, gradients, state dicts."""

    _place = None

    def __call__(self, x):
        return self.forward(x)

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

    def _grad(self, param):
        if param.grad is None:
            param.grad = self._place.zeros(param.data.shape)
        return param.grad

    def _grads(self):
        return self._grad(self.weight), None if self.bias is None else self._grad(self.bias)


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
        self._input = None

    def forward(self, x):
        y = self._place.empty(_shape(x, "input")[:-1] + (self.weight.data.shape[0],))
        _C.linear_forward(x, self.weight.data, _optional(self.bias), y)
        self._input = x
        return y

    def backward(self, grad_output):
        x = _saved(self._input)
        dx = self._place.empty(_shape(x, "input"))
        _C.linear_backward(grad_output, x, self.weight.data, dx, *self._grads())
        return dx


# ---------------------------------------------------------------------------------------------- TP layers

_KIND_ROW, _KIND_COL = 1, 2


class _TPLayer(_Layer):
    """Shared bookkeeping: group, partition, parameter marks, gather / re-partition, checkpoints.

    _shard_dim: the weight dim split across ranks (1: row-parallel, 0: column-parallel).
    _pieces[r]: rank r's pieces [(offset, size)] along that dim (one piece, or one per packed block).
    """

    _shard_dim = None
    _kind = None
    _bias_sharded = False

    def __init__(self, module, mp_group, name, skip_partition, block_sizes=None, block_heads=None, device=None,
                 dtype=None, _full=None):
        """_full (from_init): module.weight is already this rank's shard by the partition rule of a split
        dim of _full elements, so nothing is sliced and the rule's ranges are kept."""
        wobj = data_of(getattr(module, "weight", None))
        bobj = data_of(getattr(module, "bias", None))
        self._place, self.mp_group = _resolve(wobj, mp_group, device, dtype)
        self.device = self._place.device
        self.tp_world_size = self.mp_group.size
        self.tp_index = self.mp_group.rank
        self.name = name
        self.training_mode = is_training_mode()
        self.tp_overlap_comm = False
        self._input = None
        weight = self._place.readable(wobj, "module.weight")
        if len(weight.shape) != 2:
            raise ValueError(f"module.weight must be 2-d [out_features, in_features], got shape {tuple(weight.shape)}")
        bias = None if bobj is None else self._place.readable(bobj, "module.bias")
        if bias is not None and (len(bias.shape) != 1 or bias.shape[0] != weight.shape[0]):
            raise ValueError(f"module.bias must be 1-d of size {weight.shape[0]} (out_features), "
                             f"got shape {tuple(bias.shape)}")
        if bias is not None and host_dtype(dtype_name(bias)) != host_dtype(dtype_name(weight)):
            raise TypeError(f"module.bias has dtype {dtype_name(bias)} but module.weight has {dtype_name(weight)}")
        self._blocks = None if block_sizes is None else [int(b) for b in block_sizes]
        self._block_heads = None if block_heads is None else [int(h) for h in block_heads]
        self.skip_partition = bool(skip_partition)
        local = int(weight.shape[self._shard_dim])
        full = _full if _full is not None else (None if self.skip_partition else local)
        locals_ = self._agree(weight.shape, bias is not None, local, full)
        self._full_shape = [int(s) for s in weight.shape]
        self._full_shape[self._shard_dim] = full if full is not None else sum(locals_)
        self._pieces = self._partition(self._full_shape[self._shard_dim], locals_)
        self.in_features, self.out_features = self._full_shape[1], self._full_shape[0]
        self.weight = self._mark(Parameter(None))
        self.bias = None if bias is None else self._mark(Parameter(None))
        given_shard = self.skip_partition or _full is not None  # module.weight is this rank's shard already
        for param, value, what in ((self.weight, weight, "module.weight"), (self.bias, bias, "module.bias")):
            if param is not None:
                param.data = self._place.adopt(value, what) if given_shard else self._piece(param, value, what)

    # -- construction

    def _agree(self, weight_shape, has_bias, local, full):
        """One exchange at construction: every rank must agree on mode, kind, dtype, bias, the unsplit dim
        and (when known: full is not None) the full size of the split dim. Returns every rank's size
        along the split dim."""
        p = self.tp_world_size
        if p == 1:
            return [local]
        other = int(weight_shape[1 - self._shard_dim])
        mine = np.array([self._kind, int(self.training_mode), DTYPES[self._place.dtype]["code"], int(has_bias),
                         other, -1 if full is None else full, local], dtype=np.int64)
        every = np.empty(7 * p, dtype=np.int64)
        dist.all_gather_into_tensor(every, mine, group=self.mp_group)
        every = every.reshape(p, 7)
        fields = ["layer kind", "training mode", "dtype", "bias presence",
                  "in_features" if self._shard_dim == 0 else "out_features",
                  "full " + ("out_features" if self._shard_dim == 0 else "in_features")]
        names = {d["code"]: name for name, d in DTYPES.items()}
        for i, field in enumerate(fields):
            if not np.all(every[:, i] == every[0, i]):
                seen = [names[int(v)] for v in every[:, i]] if field == "dtype" else every[:, i].tolist()
                raise ValueError(f"ranks disagree on the {field} of layer {self.name or type(self).__name__}: "
                                 f"{seen} across ranks {list(range(p))} "
                                 "(every rank must build the same layer in the same mode)")
        return every[:, 6].tolist()

    def _partition(self, n, locals_):
        """Every rank's pieces: the given shards one after another under skip_partition, else the rule."""
        if self.skip_partition:
            offs = np.concatenate([[0], np.cumsum(locals_)[:-1]]).tolist()
            return [[(int(o), int(s))] for o, s in zip(offs, locals_)]
        if self._blocks is not None and sum(self._blocks) != n:
            raise ValueError(f"packed block sizes {self._blocks} sum to {sum(self._blocks)}, "
                             f"but the split dimension is {n}")
        return _rule_pieces(n, self.tp_world_size, self.training_mode, self.name, self._blocks, self._block_heads)

    def _my_pieces(self):
        return self._pieces[self.tp_index]

    def _flat_ranges(self):
        return [rng for pieces in self._pieces for rng in pieces]

    @property
    def _nblocks(self):
        return len(self._pieces[0])

    def _mark(self, param):
        param.ds_is_replaced_module = True
        param.tp_layer = self
        return param

    # -- shards (DeepSpeed's gather_params / _tp_partition)

    def _is_sharded(self, param):
        return param is self.weight or (param is self.bias and self._bias_sharded)

    def _dim_of(self, param):
        return self._shard_dim if param is self.weight else 0

    def _piece(self, param, full, what):
        """This rank's part of param's full value, placed like the layer: its shard of a sharded
        parameter (cut on the GPU for GPU arrays), a copy of a replicated one."""
        if not self._is_sharded(param):
            return self._place.put(full, what)
        return self._place.shard(full, self._dim_of(param), self._flat_ranges(), self._nblocks, self.tp_index, what)

    def gather_params(self, params_list):
        """All-gathers each of this layer's sharded parameters in params_list into the full tensor, in
        place (param.data becomes the full array, on the parameter's device). Collective over mp_group;
        uneven shards work."""
        for param in param_list(params_list):
            if not self._is_sharded(param) or getattr(param, "_tp_gathered", False):
                continue
            dim = self._dim_of(param)
            shard = self._place.adopt(param.data, "parameter")
            shape = list(shard.shape)
            shape[dim] = self._full_shape[dim if param is self.weight else 0]
            full = self._place.empty(tuple(shape))
            _C.gather(self.mp_group._handle, shard, dim, self._flat_ranges(), self._nblocks, full)
            param.data = full
            param._tp_gathered = True

    def _tp_partition(self, params_list):
        """Re-slices each gathered parameter from its current full value (edits made while gathered
        persist in the shards); GPU parameters stay on the GPU."""
        for param in param_list(params_list):
            if not self._is_sharded(param) or not getattr(param, "_tp_gathered", False):
                continue
            param.data = self._piece(param, param.data, "parameter")
            param._tp_gathered = False

    # -- state dicts (checkpoint.py holds the consolidated ones and the files)

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
        """The full parameters as NumPy arrays (collective over mp_group)."""
        return checkpoint.consolidated_state_dict(self)

    def load_consolidated_state_dict(self, state_dict):
        """Loads full parameters and keeps this rank's shards (works at any group size)."""
        checkpoint.load_consolidated_state_dict(self, state_dict)


class LinearAllreduce(_TPLayer):
    """Row-parallel layer: weight split along in_features; y = all_reduce(x_r @ W_r^T) + b, the bias added
    once after the reduce; backward has no collective.

    input_is_parallel=True (default): x is this rank's slice of the input's last dim.
    input_is_parallel=False: x is the full input; the layer slices its part, and backward returns the full
    dX (all-gathered)."""

    _shard_dim = 1
    _kind = _KIND_ROW

    def __init__(self, module, mp_group=None, name=None, input_is_parallel=True, skip_partition=False, device=None,
                 dtype=None, _full=None):
        super().__init__(module, mp_group, name, skip_partition, device=device, dtype=dtype, _full=_full)
        self.input_is_parallel = bool(input_is_parallel)

    @classmethod
    def from_init(cls, in_features, out_features, mp_group=None, seed=0, bias=True, dtype="float32", name=None,
                  input_is_parallel=True, device=None):
        """Creates only this rank's shard, equal to slicing tplinear.Linear(in, out, bias, dtype, seed)."""
        return _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name,
                          input_is_parallel=input_is_parallel, device=device)

    def forward(self, x):
        w = self.weight.data
        width = _shape(x, "input")[-1]
        if not self.input_is_parallel:
            if width != self.in_features:
                raise ValueError(f"input's last dimension must be {self.in_features} (in_features, "
                                 f"input_is_parallel=False), got {width}")
            (off, size), = self._my_pieces()
            x = x[..., off:off + size]
        elif self.tp_world_size > 1 and width != w.shape[1]:
            raise ValueError(f"input's last dimension must be {w.shape[1]} (this rank's shard of in_features="
                             f"{self.in_features} over {self.tp_world_size} ranks), got {width}")
        y = self._place.empty(_shape(x, "input")[:-1] + (w.shape[0],))
        _C.row_forward(self.mp_group._handle, x, w, _optional(self.bias), y)
        self._input = x
        return y

    def backward(self, grad_output):
        x = _saved(self._input)
        dx = self._place.empty(_shape(x, "input"))
        _C.row_backward(self.mp_group._handle, grad_output, x, self.weight.data, dx, *self._grads())
        if self.input_is_parallel:
            return dx
        full = self._place.empty(dx.shape[:-1] + (self.in_features,))
        _C.gather(self.mp_group._handle, dx, dx.ndim - 1, self._flat_ranges(), self._nblocks, full)
        return full


class LinearLayer(_TPLayer):
    """Column-parallel layer: weight and bias split along out_features; the output stays partitioned
    unless gather_output=True; backward all-reduces dX (overlapped with the dW GEMM when
    tp_overlap_comm=True).

    block_sizes / block_heads: a packed output dim (fused QKV, gate/up): each block is split separately
    and a rank's shard is its pieces in block order."""

    _shard_dim = 0
    _kind = _KIND_COL
    _bias_sharded = True

    def __init__(self, module=None, mp_group=None, skip_partition=False, name=None, gather_output=False,
                 tp_overlap_comm=False, block_sizes=None, block_heads=None, device=None, dtype=None, _full=None):
        super().__init__(module, mp_group, name, skip_partition, block_sizes, block_heads, device=device, dtype=dtype,
                         _full=_full)
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
        return cls(_Module(weight, bias), mp_group=mp_group, skip_partition=True, **kwargs)

    @classmethod
    def from_init(cls, in_features, out_features, mp_group=None, seed=0, bias=True, dtype="float32", name=None,
                  block_sizes=None, block_heads=None, **kwargs):
        """Creates only this rank's shard, equal to slicing tplinear.Linear(in, out, bias, dtype, seed)."""
        return _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name,
                          block_sizes=block_sizes, block_heads=block_heads, **kwargs)

    def forward(self, x):
        w = self.weight.data
        y = self._place.empty(_shape(x, "input")[:-1] + (w.shape[0],))
        _C.col_forward(self.mp_group._handle, x, w, _optional(self.bias), y)
        self._input = x
        if not self.gather_output:
            return y
        full = self._place.empty(y.shape[:-1] + (self.out_features,))
        _C.gather(self.mp_group._handle, y, y.ndim - 1, self._flat_ranges(), self._nblocks, full)
        return full

    def backward(self, grad_output):
        x = _saved(self._input)
        if self.gather_output:
            width = _shape(grad_output, "grad_output")[-1]
            if width != self.out_features:
                raise ValueError(f"grad_output's last dimension must be {self.out_features} (out_features, "
                                 f"gather_output=True), got {width}")
            grad_output = _shard_where_it_is(grad_output, self._flat_ranges(), self._nblocks, self.tp_index)
        dx = self._place.empty(_shape(x, "input"))
        _C.col_backward(self.mp_group._handle, grad_output, x, self.weight.data, dx, *self._grads(),
                        self.tp_overlap_comm)
        return dx


def _shard_where_it_is(arr, ranges, nblocks, rank):
    """rank's pieces of arr's last dim, as a new array on arr's device in arr's dtype."""
    if dtype_name(arr) is None:
        arr = host_array(arr, "grad_output")
    place = Placement.of(arr)
    if place.device is None and place.dtype not in HOST_DTYPES:
        arr = host_array(arr, "grad_output")  # reports the dtype the host cannot take
    return place.shard(arr, len(arr.shape) - 1, ranges, nblocks, rank, "grad_output")


class _Module:
    """A minimal holder with .weight / .bias, for factories."""

    def __init__(self, weight, bias=None):
        self.weight, self.bias = weight, bias


def _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name, **kwargs):
    """Builds the layer around this rank's shard only, initialised in place from the counter-based
    generator with the shard's global offsets (no full copy is ever allocated)."""
    in_features, out_features = _check_features(in_features, out_features)
    place, group = _resolve(None, mp_group, kwargs.get("device"), dtype)
    kwargs["dtype"] = place.dtype
    host = host_dtype(place.dtype)
    split_dim = cls._shard_dim
    n = out_features if split_dim == 0 else in_features
    pieces = _rule_pieces(n, group.size, is_training_mode(), name, kwargs.get("block_sizes"),
                          kwargs.get("block_heads"))[group.rank]
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
    return cls(_Module(weight, b), mp_group=group, name=name, _full=n, **kwargs)


def _rule_pieces(n, p, training, name, blocks=None, block_heads=None):
    """Every rank's pieces [(offset, size)] of a split dim of n by the partition rule (C core): one piece,
    or one per block of a packed dim."""
    if blocks is None:
        return [[rng] for rng in _C.partition(n, p, training, _state["num_kv_heads"] or 0, name)]
    blocks = [int(b) for b in blocks]
    flat = _C.partition_packed(blocks, p, training, block_heads, name)
    return [flat[r * len(blocks):(r + 1) * len(blocks)] for r in range(p)]
