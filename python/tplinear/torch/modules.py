"""tplinear's tensor-parallel layers as torch.nn.Modules (DeepSpeed AutoTP's LinearAllreduce / LinearLayer,
with its constructor signatures), on the same C core and the same shard bookkeeping as the NumPy layers
(``tplinear._layout.Sharded``).

The shards are ``nn.Parameter``s, marked as DeepSpeed marks them (``ds_is_replaced_module``,
``tensor_model_parallel``, ``gather_params`` / ``_tp_partition``) and carrying their partition
(``partition_dim``, ``tp_layer``). The source module's own Parameter object is kept and its data replaced
by the shard (as DeepSpeed does), so the full weight is released and an optimizer built earlier still
holds the right objects.
"""
import torch
from torch import nn

from .. import _C
from .. import _layout
from .. import distributed as dist
from .._arrays import DTYPES, dtype_name
from ..partition import is_training_mode
from . import _grads, _ops
from . import _training
from . import sequence as _sequence


class TorchPlacement:
    """Where a torch module's tensors live (a torch.device) and their dtype: the ``_place`` that
    _layout.Sharded's gather and re-partition allocate through."""

    def __init__(self, dtype, device):
        self.dtype, self.device = dtype, torch.device(device)

    def _tensor(self, value):
        if isinstance(value, torch.Tensor):
            return value.detach()
        if hasattr(value, "__dlpack__") and not hasattr(value, "__array__"):
            return torch.from_dlpack(value)  # a tplinear.DeviceArray
        return torch.as_tensor(value)  # NumPy and other array-likes: shares their memory

    def _here(self, value):
        t = self._tensor(value)
        if t.device != self.device or t.dtype != self.dtype:
            t = t.to(device=self.device, dtype=self.dtype)
        return t

    def empty(self, shape):
        return torch.empty(tuple(shape), dtype=self.dtype, device=self.device)

    def zeros(self, shape):
        return torch.zeros(tuple(shape), dtype=self.dtype, device=self.device)

    def readable(self, value, what):
        return self._tensor(value)

    def adopt(self, value, what):
        """value as a contiguous tensor here (itself when it is one); GPU work is then ordered on torch's
        current stream."""
        t = self._here(value).contiguous()
        _ops.on_stream(t)
        return t

    def put(self, value, what):
        return self._here(value).clone(memory_format=torch.contiguous_format)

    def shard(self, src, dim, ranges=None, nblocks=1, rank=0, what="tensor"):
        """A new tensor here holding rank's pieces of src along dim (cut by the C core where src lives)."""
        src = self._here(src)
        if dim is None:
            return src.clone(memory_format=torch.contiguous_format)
        shape = list(src.shape)
        shape[dim] = sum(size for _, size in ranges[rank * nblocks:(rank + 1) * nblocks])
        out = self.empty(shape)
        _ops.on_stream(out)
        _C.shard(src, dim, ranges, nblocks, rank, out)
        return out

    def __repr__(self):
        return f"TorchPlacement({self.device}, {self.dtype})"


def _weight_of(module, what="module"):
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must have a .weight torch.Tensor (an nn.Linear, a Conv1D, ...), "
                        f"got {type(weight).__name__} on {type(module).__name__}")
    return weight


class TPModule(nn.Module, _layout.Sharded):
    """What the torch row and column modules share: construction, marks, gradient buffers, repr."""

    _conv1d = False  # the source stores its weight [in, out] (GPT-2's Conv1D)

    def __init__(self, module, mp_group, name, skip_partition, tp_overlap_comm=False, block_sizes=None,
                 block_heads=None, tp_grain_size=None, num_heads=None, num_kv_heads=None, head_dim=None):
        nn.Module.__init__(self)
        weight = _weight_of(module)
        bias = getattr(module, "bias", None)
        full_w = weight.detach().t() if self._conv1d else weight.detach()  # a view: [out, in]
        if full_w.dim() != 2:
            raise ValueError(f"module.weight must be 2-d [out_features, in_features], got shape {tuple(weight.shape)}")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != full_w.shape[0]):
            raise ValueError(f"module.bias must be 1-d of size {full_w.shape[0]} (out_features), "
                             f"got shape {tuple(bias.shape)}")
        if bias is not None and (bias.dtype != weight.dtype or bias.device != weight.device):
            raise TypeError(f"module.bias is {bias.dtype} on {bias.device} but module.weight is {weight.dtype} on "
                            f"{weight.device}")
        dname = dtype_name(weight)
        if weight.device.type not in ("cpu", "cuda"):
            raise ValueError(f"module.weight is on {weight.device}; tplinear layers take CPU and CUDA tensors "
                             "(build the model on a real device before parallelizing)")
        math = "device_math" if weight.is_cuda else "host_math"
        if dname is None or not DTYPES[dname][math]:
            takes = [n for n, d in DTYPES.items() if d[math]]
            raise TypeError(f"module.weight has dtype {weight.dtype}; tplinear's {weight.device.type.upper()} layers "
                            f"take {', '.join(takes)}")
        group = dist.resolve_group(mp_group, gpu=weight.is_cuda)
        if group.rank < 0:
            raise ValueError("this rank is not a member of mp_group: a layer needs a group this rank belongs to")
        self._place = TorchPlacement(weight.dtype, weight.device)
        self.mp_group = group
        self.tp_world_size, self.tp_index = group.size, group.rank
        self.name = name
        self.training_mode = is_training_mode()
        self.skip_partition = bool(skip_partition)
        self.tp_overlap_comm = bool(tp_overlap_comm)
        self._set_split(tp_grain_size, num_heads, num_kv_heads, head_dim, block_sizes, block_heads)
        self._grads = _ops.GradBuffers()
        self._op_key = _ops.register(self)  # names this layer in the torch.compile operators
        local = int(full_w.shape[self._shard_dim])
        full = None if self.skip_partition else local  # skip_partition: the full size is the shards' sum
        self._set_partition(full_w.shape, bias is not None, local, full, dname)
        self.out_features, self.in_features = self._full_shape
        self.weight = self._adopt_param(weight, full_w, sharded=True)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = self._adopt_param(bias, bias.detach(), sharded=self._bias_sharded)
        for key, meta in self.universal_checkpoint_meta().items():  # DeepSpeed's per-parameter attribute
            setattr(getattr(self, key), _layout.UC_META_ATTR, meta)

    def _adopt_param(self, source, full, sharded):
        """This rank's Parameter for source: the source's own Parameter object with its data replaced by
        the shard (the full tensor is then released), or a new Parameter when the source is a plain tensor
        or stored transposed."""
        if sharded and not self.skip_partition:
            data = self._place.shard(full, self._shard_dim if full.dim() == 2 else 0, self._flat_ranges(),
                                     self._nblocks, self.tp_index)
        else:
            data = full.contiguous()
        if isinstance(source, nn.Parameter) and not (self._conv1d and source.dim() == 2):
            with torch.no_grad():
                source.data = data
            source.grad = None
            param = source
        else:
            param = nn.Parameter(data, requires_grad=source.requires_grad)
        return self._mark(param, sharded, 0 if full.dim() == 1 else self._shard_dim)

    def _mark(self, param, sharded=True, dim=None):
        """DeepSpeed's marks (ds_is_replaced_module, tensor_model_parallel, gather_params / _tp_partition)
        and the partition a checkpoint needs (tp_layer, partition_dim: None for a replicated parameter)."""
        _layout.Sharded._mark(self, param)
        param.tensor_model_parallel = bool(sharded)
        param.partition_dim = dim if sharded else None
        param.gather_params = self.gather_params
        param._tp_partition = self._tp_partition
        _grads.track(param, self, sharded)  # its gradient's norm is the full one's (torch's clipping is right)
        return param

    def __setstate__(self, state):
        """After copy.deepcopy (torch's Parameter copies drop their attributes and hooks): the copy's
        parameters get their marks again, the copy its own operator key and gradient buffers; the group
        is shared."""
        super().__setstate__(state)
        _training.after_copy(self)

    # -- what users and checkpoints read

    @property
    def full_shape(self):
        """The full weight's shape [out_features, in_features]."""
        return tuple(self._full_shape)

    @property
    def partition_dim(self):
        """The weight dim split across the ranks: 1 for row-parallel, 0 for column-parallel."""
        return self._shard_dim

    def full_tensor(self, param, value=None):
        """The full tensor of one of this layer's parameters (value: a tensor laid out like param's shard,
        e.g. param.grad; default param's data), all-gathered into a new tensor; a replicated parameter's
        value as it is. Collective over mp_group."""
        value = param.detach() if value is None else value.detach()
        if not self._is_sharded(param) or getattr(param, "_tp_gathered", False):
            return value
        dim = self._dim_of(param)
        shape = list(value.shape)
        shape[dim] = self._full_shape[dim if param is self.weight else 0]
        full = self._place.empty(shape)
        _C.gather(self.mp_group._handle, self._place.adopt(value, "value"), dim, self._flat_ranges(), self._nblocks,
                  full)
        return full

    def release_grad_buffers(self):
        """Drops the host gradient buffers this layer keeps for reuse (see tplinear.torch docs)."""
        self._grads.clear()

    def extra_repr(self):
        d = self._shard_dim
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"shard={self.local_shape[d]}/{self._full_shape[d]} at rank {self.tp_index} of {self.tp_world_size}",
                 f"mode={'training' if self.training_mode else 'inference'}", f"bias={self.bias is not None}"]
        for key in ("name", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, key) is not None:
                parts.append(f"{key}={getattr(self, key)!r}")
        if self._split["block_sizes"] is not None:
            parts.append(f"block_sizes={self._split['block_sizes']}")
        if getattr(self, "sequence_parallel", False):
            parts.append("sequence_parallel=True")
        return ", ".join(parts)

    def _linear(self, x):
        x, weight, bias = _training.autocast_args(self, x)  # torch.autocast: cast as nn.Linear is
        if torch.compiler.is_compiling():  # Dynamo traces the custom operator into the graph
            return torch.ops.tplinear.linear(x, weight, bias, self._op_key)
        return _ops.TPLinear.apply(x, weight, bias, self)

    _widths_agreed = False  # set after the first forward's check, which every rank of the group passed

    def _check_width(self, x, expected, what):
        """The input's last dim is expected, else TypeError / ValueError. The first forward checks on every
        rank together (one small all-reduce): a rank whose input is wrong raises its error, its peers a
        RuntimeError naming it, before any of them enters the layer's collectives, so none is left waiting
        and the group stays usable. The widths are the model's structure (its ranks' shards), so after one
        forward that every rank passed, each checks alone."""
        if self._widths_agreed or self.tp_world_size == 1 or torch.compiler.is_compiling():
            return self._check_input_width(x, expected, what)
        failure = None
        try:
            self._check_input_width(x, expected, what)
        except (TypeError, ValueError) as exc:
            failure = exc
        label = self._label().replace("{", "{{").replace("}", "}}")
        dist.agree_on_failure(self.mp_group, failure, f"layer {label}: the input check failed on rank(s) "
                              "{ranks} of its group (see their errors); no rank entered the layer's collectives")
        self._widths_agreed = True

    def _check_input_width(self, x, expected, what):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != expected:
            got = x.shape[-1] if x.dim() else "a 0-d tensor"
            raise ValueError(f"input's last dimension must be {expected} ({what}), got {got}")


class LinearAllreduce(TPModule):
    """Row-parallel: the weight is split along in_features; y = all_reduce(x_r @ W_r^T) + b, the bias added
    once after the reduce; the backward has no collective.

    input_is_parallel=True (default): x is this rank's slice of the input's last dim (the output of a
    column layer). False: x is the full input, and the layer takes its slice (the backward all-gathers
    dX); DeepSpeed calls this LinearAllreduceWithReplicatedInput.

    sequence_parallel=True (Megatron's sequence parallelism): the output is reduce-scattered along the
    sequence dim (dim 0: this rank's rows, tplinear.sequence_ranges) instead of all-reduced; the backward
    all-gathers dY. Needs input_is_parallel=True."""

    _shard_dim = 1
    _kind = _layout.KIND_ROW

    def __init__(self, module, mp_group=None, name=None, input_is_parallel=True, skip_partition=False,
                 tp_overlap_comm=False, block_sizes=None, block_heads=None, tp_grain_size=None, num_heads=None,
                 num_kv_heads=None, head_dim=None, sequence_parallel=False):
        if sequence_parallel and not input_is_parallel:  # Megatron's RowParallelLinear refuses it too
            raise ValueError("sequence_parallel=True needs input_is_parallel=True (the input's features split, its "
                             "sequence whole)")
        self.sequence_parallel = bool(sequence_parallel)  # before the construction agreement, which checks it
        super().__init__(module, mp_group, name, skip_partition, tp_overlap_comm, block_sizes, block_heads,
                         tp_grain_size, num_heads, num_kv_heads, head_dim)
        self.input_is_parallel = bool(input_is_parallel)

    def forward(self, input):
        x = input
        if self.sequence_parallel:
            self._check_width(x, self.weight.shape[1], f"this rank's shard of in_features={self.in_features} over "
                                                       f"{self.tp_world_size} ranks")
            _training.autocast_args(self, x, sequence_parallel=True)
            return _sequence.sequence_parallel_linear(self, x)
        if not self.input_is_parallel:
            self._check_width(x, self.in_features, "in_features, input_is_parallel=False")
            x = _ops.ScatterLastDim.apply(x, self.mp_group, self._flat_ranges(), self._nblocks)
        else:
            self._check_width(x, self.weight.shape[1], f"this rank's shard of in_features={self.in_features} over "
                                                       f"{self.tp_world_size} ranks")
        return self._linear(x)


class LinearAllreduceWithReplicatedInput(LinearAllreduce):
    """DeepSpeed's name for a row-parallel layer whose input is the full (replicated) tensor."""

    def __init__(self, module, mp_group=None, name=None, skip_partition=False, **kwargs):
        super().__init__(module, mp_group, name, input_is_parallel=False, skip_partition=skip_partition, **kwargs)


class LinearLayer(TPModule):
    """Column-parallel: weight and bias are split along out_features; y_r = x @ W_r^T + b_r, the output
    stays partitioned unless gather_output=True; the backward all-reduces dX (overlapped with the dW GEMM
    when tp_overlap_comm=True).

    block_sizes / block_heads: a packed output dim (fused QKV, gate/up): each block is split on its own
    and a rank's shard is its pieces in block order.

    sequence_parallel=True (Megatron's sequence parallelism): the input is this rank's rows of the sequence
    (dim 0), all-gathered before the GEMM; the backward reduce-scatters dX to those rows and gathers the
    input again for dW. forward(input, seq_len=None): the whole sequence's length, when known, spares one
    small all-gather of the ranks' row counts."""

    _shard_dim = 0
    _kind = _layout.KIND_COL
    _bias_sharded = True

    def __init__(self, module, mp_group=None, skip_partition=False, name=None, gather_output=False,
                 tp_overlap_comm=False, block_sizes=None, block_heads=None, tp_grain_size=None, num_heads=None,
                 num_kv_heads=None, head_dim=None, sequence_parallel=False):
        self.sequence_parallel = bool(sequence_parallel)  # before the construction agreement, which checks it
        super().__init__(module, mp_group, name, skip_partition, tp_overlap_comm, block_sizes, block_heads,
                         tp_grain_size, num_heads, num_kv_heads, head_dim)
        self.gather_output = bool(gather_output)

    def forward(self, input, seq_len=None):
        self._check_width(input, self.in_features, "in_features")
        if self.sequence_parallel:
            _training.autocast_args(self, input, sequence_parallel=True)
            y = _sequence.sequence_parallel_linear(self, input, seq_len)
        elif seq_len is not None:
            raise ValueError("seq_len is for sequence_parallel=True layers")
        else:
            y = self._linear(input)
        if self.gather_output:
            y = _ops.GatherLastDim.apply(y, self.mp_group, self._flat_ranges(), self._nblocks, self.out_features)
        return y

    @classmethod
    def from_weights(cls, weight_shape=None, dtype=None, weight=None, bias=None, gather_output=False, mp_group=None,
                     **kwargs):
        """DeepSpeed's factory: a layer around this rank's given weight (skip_partition=True); with only
        weight_shape, a zero weight of that shape (dtype: torch's default when None)."""
        if weight is None:
            if weight_shape is None or len(weight_shape) != 2:
                raise ValueError(f"from_weights needs weight or a 2-d weight_shape, got {weight_shape!r}")
            weight = torch.zeros(tuple(int(s) for s in weight_shape), dtype=dtype)
        holder = nn.Module()
        holder.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(torch.as_tensor(weight))
        holder.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter)
                                                 else nn.Parameter(torch.as_tensor(bias)))
        return cls(holder, mp_group=mp_group, skip_partition=True, gather_output=gather_output, **kwargs)


class fused_LinearLayer(LinearLayer):  # noqa: N801 - DeepSpeed's name
    """A column layer over a packed output dim (fused QKV: block_sizes [q, k, v], block_heads their head
    counts; gate/up: two blocks): each block is split on its own."""

    def __init__(self, module, mp_group=None, skip_partition=False, name=None, block_sizes=None, block_heads=None,
                 **kwargs):
        if block_sizes is None:
            raise ValueError("fused_LinearLayer needs block_sizes (the packed blocks' sizes along out_features)")
        super().__init__(module, mp_group, skip_partition, name, block_sizes=block_sizes, block_heads=block_heads,
                         **kwargs)


class conv_LinearLayer(LinearLayer):  # noqa: N801 - DeepSpeed's name
    """A column layer from a GPT-2 style Conv1D, whose weight is stored [in_features, out_features]; the
    shard is kept as [out_r, in] like every other layer's."""

    _conv1d = True


class Conv_LinearALlreduce(LinearAllreduce):  # noqa: N801 - DeepSpeed's name (sic)
    """A row layer from a GPT-2 style Conv1D ([in_features, out_features] weight)."""

    _conv1d = True


def release_grad_buffers(model):
    """Drops the gradient buffers every tplinear layer in model keeps for reuse on the host."""
    for m in model.modules():
        if isinstance(m, TPModule):
            m.release_grad_buffers()
