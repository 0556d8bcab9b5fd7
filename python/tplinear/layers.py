"""Tensor-parallel linear layers with DeepSpeed AutoTP semantics (deepspeed/module_inject/layers.py).

The math (GEMMs, collectives, partition sizes, shards, gathers, initialisation) runs in the C core; this
module holds parameters, shapes and bookkeeping only.

    LinearAllreduce  row-parallel:    W split along in;  y = all_reduce(x_r @ W_r^T) + b
    LinearLayer      column-parallel: W, b split along out; backward all-reduces dX
"""
import math
import zlib

import numpy as np

from . import _C
from . import checkpoint
from . import distributed as dist
from . import partition
from ._arrays import DTYPES, HOST_DTYPES, Placement, dtype_name, host_array, host_dtype
from .parameter import Parameter, data_of, param_list

# tplinear.layers held these before parameter.py, checkpoint.py and partition.py were split out of it
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: F401,E402
from .parameter import GatherReplacedLayerParams  # noqa: F401,E402
from .partition import (  # noqa: F401,E402
    get_num_kv_heads, is_autotp_training_mode, is_training_mode, set_autotp_mode, set_num_kv_heads, set_training_mode,
)

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

    def __call__(self, x):
        return self.forward(x)

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

    def _check_grad_output(self, grad_output, x, width, what):
        """grad_output must be [*x's leading dims, width]; `what` says what width is."""
        got, lead = _shape(grad_output, "grad_output"), _shape(x, "input")[:-1]
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
        return self._grad(self.weight), None if self.bias is None else self._grad(self.bias)

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
        y = self._place.empty(_shape(x, "input")[:-1] + (self.weight.data.shape[0],))
        _C.linear_forward(x, self.weight.data, _optional(self.bias), y)
        self._save(x)
        return y

    def backward(self, grad_output, retain=False):
        """dX; accumulates .grad. Releases the saved input unless retain=True (see _Layer)."""
        x = self._saved()
        self._check_grad_output(grad_output, x, self.out_features, "out_features")
        self._release(retain)
        dx = self._place.empty(_shape(x, "input"))
        _C.linear_backward(grad_output, x, self.weight.data, dx, *self._grads())
        return dx

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{_placement_repr(self._place)})")


# ---------------------------------------------------------------------------------------------- TP layers

_KIND_ROW, _KIND_COL = 1, 2


class _TPLayer(_Layer):
    """Shared bookkeeping: group, partition, parameter marks, gather / re-partition, checkpoints.

    _shard_dim: the weight dim split across ranks (1: row-parallel, 0: column-parallel; the other way round
    for a transposed weight).
    _pieces[r]: rank r's pieces [(offset, size)] along that dim (one piece, or one per packed block).
    """

    _shard_dim = None
    _kind = None
    _bias_sharded = False
    _from_init_ok = True  # False where the constructor changes the split from_init would initialise

    def __init__(self, module, mp_group, name, skip_partition, block_sizes=None, block_heads=None, device=None,
                 dtype=None, tp_grain_size=None, num_heads=None, num_kv_heads=None, head_dim=None, _full=None):
        """_full (from_init): module.weight is already this rank's shard by the partition rule of a split
        dim of _full elements, so nothing is sliced and the rule's ranges are kept."""
        wobj = data_of(getattr(module, "weight", None))
        bobj = data_of(getattr(module, "bias", None))
        self._place, self.mp_group = _resolve(wobj, mp_group, device, dtype)
        self.device = self._place.device
        if self._transposed and self.device is not None:
            raise NotImplementedError(f"{type(self).__name__} (a transposed Conv1D weight) runs on host arrays only")
        self.tp_world_size = self.mp_group.size
        self.tp_index = self.mp_group.rank
        self.name = name
        self.training_mode = is_training_mode()
        self.tp_overlap_comm = False
        self._split = _split_args(self.training_mode, name, tp_grain_size, num_heads, num_kv_heads, head_dim,
                                  block_sizes, block_heads)
        self.tp_grain_size = self._split["grain"]
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
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
        pieces, error = None, None
        if full is not None and not self.skip_partition:
            try:  # every rank learns of a bad split in the exchange below, rather than some waiting in it
                pieces = self._rule(full)
            except ValueError as exc:
                error = exc
        locals_ = self._agree(weight.shape, bias is not None, local, full, pieces, error)
        self._full_shape = [int(s) for s in weight.shape]
        self._full_shape[self._shard_dim] = full if full is not None else sum(locals_)
        self._pieces = pieces if pieces is not None else _concatenated(locals_)
        self.out_features, self.in_features = self._full_shape[out_dim], self._full_shape[1 - out_dim]
        self.weight = self._mark(Parameter(None))
        self.bias = None if bias is None else self._mark(Parameter(None))
        given_shard = self.skip_partition or _full is not None  # module.weight is this rank's shard already
        for param, value, what in ((self.weight, weight, "module.weight"), (self.bias, bias, "module.bias")):
            if param is not None:
                param.data = self._place.adopt(value, what) if given_shard else self._piece(param, value, what)
        for key, meta in self.universal_checkpoint_meta().items():  # DeepSpeed's per-parameter attribute
            setattr(getattr(self, key), UC_META_ATTR, meta)

    # -- construction

    def _rule(self, n):
        """Every rank's pieces of a split dim of n by the partition rule (partition.shard_ranges)."""
        return partition.shard_ranges(n, self.tp_world_size, **self._split)

    def _agree(self, weight_shape, has_bias, local, full, pieces, error):
        """One exchange at construction: every rank must agree on mode, kind, dtype, bias, the unsplit dim,
        (when known: full is not None) the full size of the split dim, the grain and the partition (heads,
        name, blocks, set_num_kv_heads). Raises `error` (a rule that failed on this rank) on every rank.
        Returns every rank's size along the split dim."""
        p = self.tp_world_size
        digest = -1 if error is not None else zlib.crc32(repr(pieces).encode())
        if p > 1:
            other = int(weight_shape[1 - self._shard_dim])
            mine = np.array([self._kind, int(self.training_mode), DTYPES[self._place.dtype]["code"], int(has_bias),
                             other, -1 if full is None else full, self.tp_grain_size, digest, local], dtype=np.int64)
            every = np.empty(len(mine) * p, dtype=np.int64)
            dist.all_gather_into_tensor(every, mine, group=self.mp_group)
            every = every.reshape(p, len(mine))
        else:
            every = np.array([[digest, local]], dtype=np.int64)
        if error is not None or np.any(every[:, -2] == -1):
            raise error if error is not None else ValueError(
                f"the partition of layer {self._label()} failed on ranks "
                f"{np.flatnonzero(every[:, -2] == -1).tolist()} (see their error)")
        fields = ["layer kind", "training mode", "dtype", "bias presence", self._dim_name(1 - self._shard_dim),
                  "full " + self._dim_name(self._shard_dim), "tp_grain_size",
                  "partition (heads, name, block sizes or set_num_kv_heads)"]
        names = {d["code"]: name for name, d in DTYPES.items()}
        for i, field in enumerate(fields if p > 1 else ()):
            if not np.all(every[:, i] == every[0, i]):
                seen = [names[int(v)] for v in every[:, i]] if field == "dtype" else every[:, i].tolist()
                raise ValueError(f"ranks disagree on the {field} of layer {self._label()}: "
                                 f"{seen} across ranks {list(range(p))} "
                                 "(every rank must build the same layer in the same mode)")
        return every[:, -1].tolist()

    def _label(self):
        return self.name or type(self).__name__

    def _dim_name(self, dim):
        """What a weight dim is: 'out_features' or 'in_features'."""
        return "out_features" if dim == (1 if self._transposed else 0) else "in_features"

    # -- what the layer holds (public)

    def shard_ranges(self):
        """Every rank's pieces of the split dimension (in_features for a row layer, out_features for a
        column layer): a list per rank of [(offset, size), ...], one piece or one per packed block; a
        rank's shard is its pieces concatenated in order. The same as tplinear.shard_ranges for this
        layer's arguments (skip_partition: the given shards one after another)."""
        return [list(pieces) for pieces in self._pieces]

    @property
    def local_shape(self):
        """The shape of this rank's weight shard (also while gathered)."""
        shape = list(self._full_shape)
        shape[self._shard_dim] = sum(size for _, size in self._pieces[self.tp_index])
        return tuple(shape)

    # -- universal-checkpoint metadata (DeepSpeed 0.19's ds_autotp_universal_checkpoint_meta)

    def _uc_layout(self):
        """The weight's split as DeepSpeed describes it: (partition_dim, logical_shape, output_shape,
        sub-parameter shape spec, their sizes, their per-rank widths); the last three None unless packed."""
        blocks = self._split["block_sizes"]
        logical, output = tuple(self._full_shape), (self.out_features,)
        if blocks is None or self.skip_partition:
            return self._shard_dim, logical, output, None, None, None
        spec = list(self._full_shape)
        spec[self._shard_dim] = tuple(blocks)
        widths = [[self._pieces[r][i][1] for r in range(self.tp_world_size)] for i in range(len(blocks))]
        return self._shard_dim, logical, output, tuple(spec), tuple(blocks), widths

    def universal_checkpoint_meta(self):
        """How each parameter was split, for a checkpoint converter: {"weight": meta, "bias": meta} with
        DeepSpeed 0.19's fields (its layers' ds_autotp_universal_checkpoint_meta, which tplinear also sets
        on each Parameter): universal_checkpoint_version, partition_type ("row" / "column"), partition_dim
        (of logical_shape), logical_shape, output_shape, sub_param_shape, sub_param_sizes,
        sub_param_shard_widths (per sub-parameter, every rank's width), partition_sizes (every rank's
        width, unpacked layers), target_partition_shape (this rank's shard), original_shape, is_bias,
        replicated, and "conversion" (the subset a model-level converter reads). tplinear adds "pieces":
        every rank's [(offset, size)] along dim "pieces_dim" of the parameter as stored, which a converter
        can apply without knowing the rule."""
        kind = "column" if self._kind == _KIND_COL else "row"
        dim, logical, output, spec, sizes, widths = self._uc_layout()
        totals = None if widths else tuple(sum(size for _, size in pieces) for pieces in self._pieces)
        pieces = self.shard_ranges()
        out = {"weight": _uc_meta(kind, dim, logical, output, spec, sizes, widths, totals, self.local_shape,
                                  tuple(self._full_shape), False, False, pieces, self._shard_dim)}
        if self.bias is None:
            return out
        full = (self.out_features,)
        if self._bias_sharded:
            bias_spec = None
            if spec is not None:
                bias_spec = list(output)
                bias_spec[dim] = tuple(sizes)
            out["bias"] = _uc_meta(kind, dim, output, output, bias_spec, sizes, widths, totals,
                                   (self.local_shape[self._shard_dim],), full, True, False, pieces, 0)
        else:
            out["bias"] = _uc_meta(kind, None, full, full, None, None, None, None, full, full, True, True,
                                   [[(0, self.out_features)]] * self.tp_world_size, 0)
        return out

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
        return f"{type(self).__name__}({', '.join(parts)}{_placement_repr(self._place)})"

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
            shape[dim] = self._full_shape[dim] if param is self.weight else self.out_features
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
    dX (all-gathered).

    num_heads / num_kv_heads / head_dim: the attention output projection's heads (in_features is
    num_heads * head_dim); the same arguments as the column layer before attention give the same heads.
    block_sizes / block_heads: a packed input dim, each block split on its own."""

    _shard_dim = 1
    _kind = _KIND_ROW

    def __init__(self, module, mp_group=None, name=None, input_is_parallel=True, skip_partition=False, device=None,
                 dtype=None, tp_grain_size=None, num_heads=None, num_kv_heads=None, head_dim=None, block_sizes=None,
                 block_heads=None, _full=None):
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
        width = _shape(x, "input")[-1]
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
        y = self._place.empty(_shape(x, "input")[:-1] + (w.shape[0],))
        _C.row_forward(self.mp_group._handle, x, w, _optional(self.bias), y)
        self._save(x)
        return y

    def backward(self, grad_output, retain=False):
        """dX (this rank's slice; the full dX when input_is_parallel=False); accumulates .grad. Releases
        the saved input unless retain=True."""
        x = self._saved()
        self._check_grad_output(grad_output, x, self.out_features, "out_features, the full output")
        self._release(retain)
        dx = self._place.empty(_shape(x, "input"))
        _C.row_backward(self.mp_group._handle, grad_output, x, self._w(), dx, *self._grads())
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
    and a rank's shard is its pieces in block order.
    num_heads / num_kv_heads / head_dim: the attention heads of q_proj, k_proj, v_proj or a packed QKV;
    query heads follow their KV group (tplinear.attention_heads)."""

    _shard_dim = 0
    _kind = _KIND_COL
    _bias_sharded = True

    def __init__(self, module=None, mp_group=None, skip_partition=False, name=None, gather_output=False,
                 tp_overlap_comm=False, block_sizes=None, block_heads=None, device=None, dtype=None,
                 tp_grain_size=None, num_heads=None, num_kv_heads=None, head_dim=None, _full=None):
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
        return cls(_Module(weight, bias), mp_group=mp_group, skip_partition=True, **kwargs)

    @classmethod
    def from_init(cls, in_features, out_features, mp_group=None, seed=0, bias=True, dtype="float32", name=None,
                  block_sizes=None, block_heads=None, **kwargs):
        """Creates only this rank's shard, equal to slicing tplinear.Linear(in, out, bias, dtype, seed).
        kwargs: the constructor's (tp_grain_size, num_heads, num_kv_heads, head_dim, gather_output, ...)."""
        return _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name,
                          block_sizes=block_sizes, block_heads=block_heads, **kwargs)

    def forward(self, x):
        w = self._w()
        width = _shape(x, "input")[-1]
        if width != self.in_features:
            raise ValueError(f"input's last dimension must be {self.in_features} (in_features; a column layer "
                             f"takes the full input), got {width}")
        y = self._place.empty(_shape(x, "input")[:-1] + (w.shape[0],))
        _C.col_forward(self.mp_group._handle, x, w, _optional(self.bias), y)
        self._save(x)
        if not self.gather_output:
            return y
        full = self._place.empty(y.shape[:-1] + (self.out_features,))
        _C.gather(self.mp_group._handle, y, y.ndim - 1, self._flat_ranges(), self._nblocks, full)
        return full

    def backward(self, grad_output, retain=False):
        """The full dX (all-reduced); accumulates .grad. grad_output is this rank's shard of the output,
        or the full output with gather_output=True. Releases the saved input unless retain=True."""
        x = self._saved()
        if self.gather_output:
            self._check_grad_output(grad_output, x, self.out_features, "out_features, gather_output=True")
            grad_output = _shard_where_it_is(grad_output, self._flat_ranges(), self._nblocks, self.tp_index)
        else:
            self._check_grad_output(grad_output, x, self.local_shape[self._shard_dim], self._shard_words())
        self._release(retain)
        dx = self._place.empty(_shape(x, "input"))
        _C.col_backward(self.mp_group._handle, grad_output, x, self._w(), dx, *self._grads(),
                        self.tp_overlap_comm)
        return dx


def _shard_where_it_is(arr, ranges, nblocks, rank, what="grad_output"):
    """rank's pieces of arr's last dim, as a new array on arr's device in arr's dtype."""
    if dtype_name(arr) is None:
        arr = host_array(arr, what)
    place = Placement.of(arr)
    if place.device is None and place.dtype not in HOST_DTYPES:
        arr = host_array(arr, what)  # reports the dtype the host cannot take
    return place.shard(arr, len(arr.shape) - 1, ranges, nblocks, rank, what)


class _Module:
    """A minimal holder with .weight / .bias, for factories."""

    def __init__(self, weight, bias=None):
        self.weight, self.bias = weight, bias


def _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name, **kwargs):
    """Builds the layer around this rank's shard only, initialised in place from the counter-based
    generator with the shard's global offsets (no full copy is ever allocated)."""
    if not cls._from_init_ok:
        raise TypeError(f"{cls.__name__}.from_init is not available: build it from a module")
    in_features, out_features = _check_features(in_features, out_features)
    place, group = _resolve(None, mp_group, kwargs.get("device"), dtype)
    kwargs["dtype"] = place.dtype
    host = host_dtype(place.dtype)
    split_dim = cls._shard_dim
    n = out_features if split_dim == 0 else in_features
    split = _split_args(is_training_mode(), name, kwargs.get("tp_grain_size"), kwargs.get("num_heads"),
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
    return cls(_Module(weight, b), mp_group=group, name=name, _full=n, **kwargs)


UC_META_ATTR = "ds_autotp_universal_checkpoint_meta"  # DeepSpeed's DS_AUTOTP_UC_META
UC_VERSION = 0.4  # DeepSpeed 0.19's UNIVERSAL_CHECKPOINT_VERSION_VALUE


def _uc_meta(kind, dim, logical, output, spec, sizes, widths, partition_sizes, target, original, is_bias, replicated,
             pieces, pieces_dim):
    """One parameter's universal-checkpoint metadata, in DeepSpeed 0.19's schema (restore fields, with the
    conversion subset nested), plus tplinear's explicit pieces."""
    tup = (lambda v: None if v is None else tuple(v))
    return {
        "universal_checkpoint_version": UC_VERSION, "partition_type": kind, "partition_dim": dim,
        "logical_shape": tup(logical), "output_shape": tup(output), "sub_param_shape": tup(spec),
        "sub_param_sizes": tup(sizes), "sub_param_shard_widths": widths, "partition_sizes": tup(partition_sizes),
        "target_partition_shape": tup(target), "original_shape": tup(original), "is_bias": is_bias,
        "replicated": replicated, "pieces": [list(p) for p in pieces], "pieces_dim": pieces_dim,
        "conversion": {"partition_type": kind, "partition_dim": dim, "sub_param_shape": tup(spec),
                       "sub_param_shard_widths": widths, "original_shape": tup(original), "is_bias": is_bias,
                       "replicated": replicated, "unsupported_reason": None},
    }


def _placement_repr(place):
    """', dtype=float64, device=cuda:0' for what is not the default (float32 on the host)."""
    out = "" if place.dtype == "float32" else f", dtype={place.dtype}"
    return out if place.device is None else f"{out}, device=cuda:{place.device}"


def _split_args(training, name, grain, num_heads, num_kv_heads, head_dim, block_sizes, block_heads):
    """A layer's arguments of partition.shard_ranges, the grain resolved once (tp_grain_size=, else the
    default of the mode it is built in)."""
    grain = partition.get_tp_grain_size(training) if grain is None else partition._count(grain, "tp_grain_size")
    return {"grain": grain, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "name": name,
            "block_sizes": None if block_sizes is None else list(block_sizes),
            "block_heads": None if block_heads is None else list(block_heads)}


def _concatenated(sizes):
    """Pieces of shards given one after another (skip_partition)."""
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    return [[(int(o), int(s))] for o, s in zip(offs, sizes)]
