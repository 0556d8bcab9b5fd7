"""Tensor-parallel linear layers with DeepSpeed AutoTP semantics (deepspeed/module_inject/layers.py).

The math (GEMMs, collectives, partition sizes, gathers, initialisation) runs in the C core; this module
holds parameters, shapes and bookkeeping only.

    LinearAllreduce  row-parallel:    W split along in;  y = all_reduce(x_r @ W_r^T) + b
    LinearLayer      column-parallel: W, b split along out; backward all-reduces dX
"""
import math
import os

import numpy as np

from . import _C
from . import _device
from . import distributed as dist

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


# ---------------------------------------------------------------------------------------------- arrays

_DTYPES = {"float32": np.float32, "float64": np.float64}


def _dtype(dtype):
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return np.dtype(_DTYPES[name])


def _host_array(obj, what):
    """A parameter value as a NumPy array (Parameter, NumPy, torch tensors and other array-likes)."""
    if isinstance(obj, Parameter):
        obj = obj.data
    if isinstance(obj, _device.DeviceArray):  # GPU parameters: a host copy (half types as float32)
        obj = obj.numpy().astype(np.float32, copy=False) if obj.dtype.itemsize == 2 else obj.numpy()
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch.Tensor / nn.Parameter
        obj = obj.detach().cpu()
        obj = (obj.float() if str(obj.dtype) in ("torch.float16", "torch.bfloat16") else obj).numpy()
    if hasattr(obj, "numpy") and not isinstance(obj, np.ndarray) and not hasattr(obj, "__array__"):
        obj = obj.numpy()
    try:
        arr = np.asarray(obj)
    except Exception as exc:  # noqa: BLE001 - report what was given
        raise TypeError(f"{what} must be an array, got {type(obj).__name__}") from exc
    if arr.dtype.kind != "f" or arr.dtype.name not in _DTYPES:
        raise TypeError(f"{what} must have dtype float32 or float64, got {arr.dtype} ({type(obj).__name__})")
    return arr


def _shape(x, what):
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{what} must be an array (NumPy, or a DLPack / CUDA array), got {type(x).__name__}")
    if len(shape) < 1:
        raise ValueError(f"{what} must have at least 1 dimension, got a 0-d array")
    return tuple(int(s) for s in shape)


def _empty(shape, like):
    """An uninitialised output on the same device as `like` (a parameter array)."""
    if isinstance(like, _device.DeviceArray):
        return _device.empty(shape, like.dtype, like.device)
    return np.empty(shape, dtype=like.dtype)


def _zeros_like(arr):
    if isinstance(arr, _device.DeviceArray):
        return _device.zeros(arr.shape, arr.dtype, arr.device)
    return np.zeros(arr.shape, dtype=arr.dtype)


def _dtypes(dtype, device):
    """(host dtype, GPU dtype name) of a layer: float16 / bfloat16 live on the GPU only and are
    initialised in float32 on the host, then rounded once when copied to the device."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", str(dtype))
    name = name.replace("torch.", "")
    if name in ("float16", "bfloat16"):
        if device is None:
            raise TypeError(f"dtype {name} runs on the GPU only: pass device='cuda'")
        return np.dtype(np.float32), name
    dt = _dtype(dtype)
    return dt, dt.name


def _layer_device(weight, device):
    """The GPU index of a layer (None: host): device= when given, else where module.weight lives."""
    if device is not None:
        return None if device == "cpu" else _device.device_index(device)
    return _device.where(weight.data if isinstance(weight, Parameter) else weight)


def _to_layer_device(arr, device, dtype):
    return arr if device is None else _device.to_device(arr, dtype, device)


def _like(ref, value):
    """A host array placed like ref: on ref's GPU in ref's dtype, or a NumPy copy in ref's dtype."""
    if isinstance(ref, _device.DeviceArray):
        return _device.to_device(value, ref.dtype, ref.device)
    return np.array(value, dtype=ref.dtype, copy=True)


def _take(full, dim, pieces):
    """This rank's shard: the pieces [(offset, size)] of full along dim, concatenated (a new array)."""
    parts = [np.take(full, np.arange(off, off + size), axis=dim) for off, size in pieces]
    return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=dim))


# ---------------------------------------------------------------------------------------------- parameters


class Parameter:
    """An array with a gradient and the marks DeepSpeed's GatherReplacedLayerParams looks for.

    .data is the array (a shard inside a TP layer, the full tensor while gathered); .grad accumulates.
    """

    def __init__(self, data, requires_grad=True):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.ds_is_replaced_module = False
        self.tp_layer = None

    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)

    def numpy(self):
        return _host_array(self.data, "parameter")

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self.data)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def gather_params(self, params_list):
        """DeepSpeed's per-parameter hook: gathers the owning layer's parameters in place."""
        self._layer().gather_params(params_list)

    def _tp_partition(self, params_list):
        self._layer()._tp_partition(params_list)

    def _layer(self):
        if self.tp_layer is None:
            raise ValueError("this parameter does not belong to a tensor-parallel layer")
        return self.tp_layer

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, replaced={self.ds_is_replaced_module})"


# ---------------------------------------------------------------------------------------------- plain layer


class Linear:
    """A single-process linear layer, y = x @ W^T + b, with nn.Linear's initial distribution
    (uniform in +-1/sqrt(in_features)) from a counter-based generator: element (i, j) of W depends only on
    (seed, i * in_features + j), so any shard can be initialised alone (see from_init)."""

    def __init__(self, in_features, out_features, bias=True, dtype="float32", seed=0, device=None):
        in_features, out_features = _check_features(in_features, out_features)
        device = _layer_device(None, device)
        dt, ddt = _dtypes(dtype, device)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(np.empty((out_features, in_features), dtype=dt))
        _init_block(self.weight.data, seed, 0, in_features, 0, 0, in_features)
        self.bias = None
        if bias:
            self.bias = Parameter(np.empty((out_features,), dtype=dt))
            _init_block(self.bias.data, seed, 1, in_features, 0, 0, out_features)
        for p in self.parameters():  # device="cuda": initialised on the host, then copied once
            p.data = _to_layer_device(p.data, device, ddt)
        self._input = None

    def forward(self, x):
        w = self.weight.data
        y = _empty(_shape(x, "input")[:-1] + (w.shape[0],), w)
        _C.linear_forward(x, w, None if self.bias is None else self.bias.data, y)
        self._input = x
        return y

    __call__ = forward

    def backward(self, grad_output):
        x = _saved(self._input)
        w = self.weight.data
        dx = _empty(_shape(x, "input"), w)
        _C.linear_backward(grad_output, x, w, dx, _grad(self.weight), None if self.bias is None else _grad(self.bias))
        return dx

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]

    def state_dict(self):
        return _state_dict(self)


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


def _grad(param):
    if param.grad is None:
        param.grad = _zeros_like(param.data)
    return param.grad


def _state_dict(layer):
    out = {"weight": layer.weight.data}
    if layer.bias is not None:
        out["bias"] = layer.bias.data
    return out


# ---------------------------------------------------------------------------------------------- TP layers

_KIND_ROW, _KIND_COL = 1, 2


class _TPLayer:
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
        wobj = getattr(module, "weight", None) if module is not None else None
        device = _layer_device(wobj, device)
        if dtype is None:  # half-precision modules stay half on the GPU
            dtype = str(getattr(wobj.data if isinstance(wobj, Parameter) else wobj, "dtype", "")).replace("torch.", "")
        ddt = dtype if device is not None and dtype in ("float16", "bfloat16") else None
        self.device = device
        self.mp_group = dist._group(mp_group, gpu=device is not None)
        self.tp_world_size = self.mp_group.size
        self.tp_index = self.mp_group.rank
        if self.tp_index < 0:
            raise ValueError("this rank is not a member of mp_group: a layer needs a group this rank belongs to")
        self.name = name
        self.training_mode = is_training_mode()
        self.tp_overlap_comm = False
        self._input = None
        weight = _host_array(getattr(module, "weight", None) if module is not None else None, "module.weight")
        if weight.ndim != 2:
            raise ValueError(f"module.weight must be 2-d [out_features, in_features], got shape {weight.shape}")
        bias_obj = getattr(module, "bias", None)
        bias = None if bias_obj is None else _host_array(bias_obj, "module.bias")
        if bias is not None and (bias.ndim != 1 or bias.shape[0] != weight.shape[0]):
            raise ValueError(f"module.bias must be 1-d of size {weight.shape[0]} (out_features), "
                             f"got shape {bias.shape}")
        if bias is not None and bias.dtype != weight.dtype:
            raise TypeError(f"module.bias has dtype {bias.dtype} but module.weight has {weight.dtype}")
        self._blocks = None if block_sizes is None else [int(b) for b in block_sizes]
        self._block_heads = None if block_heads is None else [int(h) for h in block_heads]
        self.skip_partition = bool(skip_partition)
        local = weight.shape[self._shard_dim]
        full = _full if _full is not None else (None if self.skip_partition else local)
        locals_ = self._agree(weight, bias, local, full)
        self._full_shape = list(weight.shape)
        self._full_shape[self._shard_dim] = full if full is not None else sum(locals_)
        self._pieces = self._partition(self._full_shape[self._shard_dim], locals_)
        self.in_features, self.out_features = self._full_shape[1], self._full_shape[0]
        if self.skip_partition or _full is not None:
            w_shard, b_shard = np.ascontiguousarray(weight), None if bias is None else np.ascontiguousarray(bias)
        else:
            w_shard = _take(weight, self._shard_dim, self._my_pieces())
            b_shard = None if bias is None else (
                _take(bias, 0, self._my_pieces()) if self._bias_sharded else np.array(bias, copy=True))
        self.weight = self._mark(Parameter(_to_layer_device(w_shard, device, ddt)))
        self.bias = None if b_shard is None else self._mark(Parameter(_to_layer_device(b_shard, device, ddt)))

    # -- construction

    def _agree(self, weight, bias, local, full):
        """One exchange at construction: every rank must agree on mode, kind, dtype, bias, the unsplit dim
        and (when known: full is not None) the full size of the split dim. Returns every rank's size
        along the split dim."""
        other = weight.shape[1 - self._shard_dim]
        mine = np.array([self._kind, int(self.training_mode), {"float32": 4, "float64": 8}[weight.dtype.name],
                         int(bias is not None), other, -1 if full is None else full, local], dtype=np.int64)
        p = self.tp_world_size
        if p == 1:
            return [local]
        every = np.empty(7 * p, dtype=np.int64)
        dist.all_gather_into_tensor(every, mine, group=self.mp_group)
        every = every.reshape(p, 7)
        fields = ["layer kind", "training mode", "dtype size", "bias presence",
                  "in_features" if self._shard_dim == 0 else "out_features",
                  "full " + ("out_features" if self._shard_dim == 0 else "in_features")]
        for i, field in enumerate(fields):
            if not np.all(every[:, i] == every[0, i]):
                raise ValueError(f"ranks disagree on the {field} of layer {self.name or type(self).__name__}: "
                                 f"{every[:, i].tolist()} across ranks {list(range(p))} "
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

    def _mark(self, param):
        param.ds_is_replaced_module = True
        param.tp_layer = self
        return param

    # -- forward / backward plumbing

    def __call__(self, x):
        return self.forward(x)

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # -- gather / re-partition (DeepSpeed's gather_params / _tp_partition)

    def _is_sharded(self, param):
        return param is self.weight or (param is self.bias and self._bias_sharded)

    def _dim_of(self, param):
        return self._shard_dim if param is self.weight else 0

    def gather_params(self, params_list):
        """All-gathers each of this layer's sharded parameters in params_list into the full tensor, in
        place (param.data becomes the full array). Collective over mp_group; uneven shards work."""
        for param in _param_list(params_list):
            if not self._is_sharded(param) or getattr(param, "_tp_gathered", False):
                continue
            dim = self._dim_of(param)
            shape = list(param.data.shape)
            shape[dim] = self._full_shape[dim if param is self.weight else 0]
            on_gpu = isinstance(param.data, _device.DeviceArray)
            src = _host_array(param.data, "parameter") if on_gpu else param.data  # GPU: gathered via the host
            full = _empty(tuple(shape), src)
            _C.gather(self.mp_group._handle, src, dim, self._flat_ranges(), len(self._pieces[0]), full)
            param.data = _like(param.data, full) if on_gpu else full
            param._tp_gathered = True

    def _tp_partition(self, params_list):
        """Re-slices each gathered parameter from its current full value (edits made while gathered
        persist in the shards)."""
        for param in _param_list(params_list):
            if not self._is_sharded(param) or not getattr(param, "_tp_gathered", False):
                continue
            piece = _take(_host_array(param.data, "parameter"), self._dim_of(param), self._my_pieces())
            param.data = _like(param.data, piece) if isinstance(param.data, _device.DeviceArray) else piece
            param._tp_gathered = False

    # -- state dicts and checkpoints

    def state_dict(self):
        """This rank's view: shards outside GatherReplacedLayerParams, full tensors inside."""
        return _state_dict(self)

    def load_state_dict(self, state_dict):
        """Loads this rank's shards (shapes must match the current shards)."""
        for key, param in (("weight", self.weight), ("bias", self.bias)):
            if param is None:
                if key in state_dict and state_dict[key] is not None:
                    raise ValueError(f"state_dict has a {key} but the layer has none")
                continue
            if key not in state_dict:
                raise ValueError(f"state_dict is missing {key!r}")
            value = _host_array(state_dict[key], f"state_dict[{key!r}]")
            if value.shape != tuple(param.data.shape):
                raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, this rank's shard is "
                                 f"{tuple(param.data.shape)}")
            param.data = _like(param.data, value)

    def consolidated_state_dict(self):
        """The full parameters (collective over mp_group)."""
        with GatherReplacedLayerParams(self.parameters(), self):
            return {k: np.array(_host_array(v, k), copy=True) for k, v in self.state_dict().items()}

    def load_consolidated_state_dict(self, state_dict):
        """Loads full parameters and keeps this rank's shards (works at any group size)."""
        for key, param in (("weight", self.weight), ("bias", self.bias)):
            if param is None:
                continue
            if key not in state_dict:
                raise ValueError(f"checkpoint is missing {key!r}")
            value = _host_array(state_dict[key], f"checkpoint[{key!r}]")
            full = self._full_shape if key == "weight" else [self._full_shape[0]]
            if list(value.shape) != list(full):
                raise ValueError(f"checkpoint[{key!r}] has shape {value.shape}, the layer's full shape is {tuple(full)}")
            piece = _take(value, self._dim_of(param), self._my_pieces()) if self._is_sharded(param) else value
            param.data = _like(param.data, piece)


def _param_list(params):
    """One parameter or an iterable of them, materialised once (a generator is not consumed twice)."""
    if params is None:
        return []
    if isinstance(params, Parameter) or not hasattr(params, "__iter__") or isinstance(params, np.ndarray):
        return [params]
    return [p for p in params if p is not None]


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
        if not self.input_is_parallel:
            width = _shape(x, "input")[-1]
            if width != self.in_features:
                raise ValueError(f"input's last dimension must be {self.in_features} (in_features, "
                                 f"input_is_parallel=False), got {width}")
            (off, size), = self._my_pieces()
            x = x[..., off:off + size]
        elif self.tp_world_size > 1 and _shape(x, "input")[-1] != w.shape[1]:
            raise ValueError(f"input's last dimension must be {w.shape[1]} (this rank's shard of in_features="
                             f"{self.in_features} over {self.tp_world_size} ranks), got {_shape(x, 'input')[-1]}")
        y = _empty(_shape(x, "input")[:-1] + (w.shape[0],), w)
        _C.row_forward(self.mp_group._handle, x, w, None if self.bias is None else self.bias.data, y)
        self._input = x
        return y

    def backward(self, grad_output):
        x = _saved(self._input)
        w = self.weight.data
        dx = _empty(_shape(x, "input"), w)
        _C.row_backward(self.mp_group._handle, grad_output, x, w, dx, _grad(self.weight),
                        None if self.bias is None else _grad(self.bias))
        if self.input_is_parallel:
            return dx
        full = _empty(dx.shape[:-1] + (self.in_features,), w)
        _C.gather(self.mp_group._handle, dx, dx.ndim - 1, self._flat_ranges(), 1, full)
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
            weight = np.zeros(tuple(int(s) for s in weight_shape), dtype=_dtype(dtype))
        return cls(_Module(weight, bias), mp_group=mp_group, skip_partition=True, **kwargs)

    @classmethod
    def from_init(cls, in_features, out_features, mp_group=None, seed=0, bias=True, dtype="float32", name=None,
                  block_sizes=None, block_heads=None, **kwargs):
        """Creates only this rank's shard, equal to slicing tplinear.Linear(in, out, bias, dtype, seed)."""
        return _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name,
                          block_sizes=block_sizes, block_heads=block_heads, **kwargs)

    def forward(self, x):
        w = self.weight.data
        y = _empty(_shape(x, "input")[:-1] + (w.shape[0],), w)
        _C.col_forward(self.mp_group._handle, x, w, None if self.bias is None else self.bias.data, y)
        self._input = x
        if not self.gather_output:
            return y
        full = _empty(y.shape[:-1] + (self.out_features,), w)
        _C.gather(self.mp_group._handle, y, y.ndim - 1, self._flat_ranges(), len(self._pieces[0]), full)
        return full

    def backward(self, grad_output):
        x = _saved(self._input)
        w = self.weight.data
        if self.gather_output:
            width = _shape(grad_output, "grad_output")[-1]
            if width != self.out_features:
                raise ValueError(f"grad_output's last dimension must be {self.out_features} (out_features, "
                                 f"gather_output=True), got {width}")
            grad_output = _take(_host_array(grad_output, "grad_output"), -1, self._my_pieces())
        dx = _empty(_shape(x, "input"), w)
        _C.col_backward(self.mp_group._handle, grad_output, x, w, dx, _grad(self.weight),
                        None if self.bias is None else _grad(self.bias), self.tp_overlap_comm)
        return dx


class _Module:
    """A minimal holder with .weight / .bias, for factories."""

    def __init__(self, weight, bias=None):
        self.weight, self.bias = weight, bias


def _from_init(cls, in_features, out_features, mp_group, seed, bias, dtype, name, **kwargs):
    """Builds the layer around this rank's shard only, initialised in place from the counter-based
    generator with the shard's global offsets (no full copy is ever allocated)."""
    in_features, out_features = _check_features(in_features, out_features)
    device = _layer_device(None, kwargs.get("device"))
    dt, kwargs["dtype"] = _dtypes(dtype, device)
    group = dist._group(mp_group, gpu=device is not None)
    p, r = group.size, group.rank
    if r < 0:
        raise ValueError("this rank is not a member of mp_group")
    training = is_training_mode()
    split_dim = cls._shard_dim
    n = out_features if split_dim == 0 else in_features
    pieces = _rule_pieces(n, p, training, name, kwargs.get("block_sizes"), kwargs.get("block_heads"))[r]
    local = sum(size for _, size in pieces)
    wshape = (local, in_features) if split_dim == 0 else (out_features, local)
    weight = np.empty(wshape, dtype=dt)
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
            b = np.empty((local,), dtype=dt)
            at = 0
            for off, size in pieces:
                _init_block(b[at:at + size], seed, 1, in_features, 0, off, out_features)
                at += size
        else:
            b = np.empty((out_features,), dtype=dt)
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


# ---------------------------------------------------------------------------------------------- gather context


class GatherReplacedLayerParams:
    """Gathers the full parameters of replaced (tensor-parallel) layers on enter and re-partitions them on
    exit, even when the body raises. Accepts one parameter or any iterable (a generator too); does
    nothing when none of them is a replaced parameter or enabled=False. Collective over the layers'
    groups: every rank enters together."""

    def __init__(self, params, module=None, enabled=True):
        self.module = module
        self.enabled = bool(enabled)
        self.params = _param_list(params) if self.enabled else []
        self.layers = []
        for p in self.params:
            layer = getattr(p, "tp_layer", None) if getattr(p, "ds_is_replaced_module", False) else None
            if layer is not None and all(layer is not l for l in self.layers):
                self.layers.append(layer)

    def __enter__(self):
        for layer in self.layers:
            layer.gather_params([p for p in self.params if getattr(p, "tp_layer", None) is layer])
        return self

    def __exit__(self, exc_type, exc, tb):
        for layer in self.layers:
            layer._tp_partition([p for p in self.params if getattr(p, "tp_layer", None) is layer])
        return False


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, layers):
    """Saves full (consolidated) parameters of {name: layer} to one .npz on rank 0 of the world, atomically.
    Collective: every rank calls it. Reloads at any other group size with load_checkpoint."""
    arrays = {}
    for lname, layer in _named_layers(layers):
        for key, value in layer.consolidated_state_dict().items():
            arrays[f"{lname}.{key}"] = value
    if dist.get_rank() == 0:
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    dist.barrier()


def load_checkpoint(path, layers):
    """Loads a save_checkpoint file into {name: layer}, each rank keeping its shards."""
    with np.load(path) as data:
        for lname, layer in _named_layers(layers):
            prefix = f"{lname}."
            layer.load_consolidated_state_dict({k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)})


def _named_layers(layers):
    if not isinstance(layers, dict):
        raise TypeError(f"layers must be a dict of name -> layer, got {type(layers).__name__}")
    for lname, layer in layers.items():
        if not isinstance(layer, _TPLayer):
            raise TypeError(f"layers[{lname!r}] is a {type(layer).__name__}, not a tplinear layer")
        yield lname, layer
