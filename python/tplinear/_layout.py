"""The shard bookkeeping of a tensor-parallel layer, shared by the NumPy layers (``layers.py``) and the
torch modules (``tplinear.torch``): the layer's split arguments, the one exchange at construction that
checks the ranks build the same layer, every rank's pieces of the split dimension (by
``partition.shard_ranges``), the parameter marks DeepSpeed looks for, and DeepSpeed's gather_params /
_tp_partition. Where arrays live and how they are made is the layer's ``_place`` (``_arrays.Placement``
for NumPy / DeviceArray, ``tplinear.torch.TorchPlacement`` for torch tensors).

The two front ends are siblings over this module, ``_ckpt`` and ``distributed``; neither imports the
other. What both use is here under names without a leading underscore: ``Sharded``, ``split_args``,
``sequence_split`` (the rows of a sequence-parallel input), ``vocab_rule`` and ``vocab_loss_args`` (the
vocabulary split and the checks of the vocab-parallel loss), ``checkpoint_entries`` (a layer's tensors as
the checkpoint engine's entries)."""
import numbers
import zlib

import numpy as np

from . import _C
from . import _ckpt
from . import distributed as dist
from . import partition
from ._arrays import DTYPES
from .parameter import param_list

KIND_ROW, KIND_COL = 1, 2

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


def split_args(training, name, grain, num_heads, num_kv_heads, head_dim, block_sizes, block_heads):
    """A layer's arguments of partition.shard_ranges, the grain resolved once (tp_grain_size=, else the
    default of the mode it is built in)."""
    grain = partition.get_tp_grain_size(training) if grain is None else partition.as_count(grain, "tp_grain_size")
    return {"grain": grain, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "name": name,
            "block_sizes": None if block_sizes is None else list(block_sizes),
            "block_heads": None if block_heads is None else list(block_heads)}


def concatenated(sizes):
    """Pieces of shards given one after another (skip_partition)."""
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    return [[(int(o), int(s))] for o, s in zip(offs, sizes)]


def sequence_split(group, local_rows, seq_len, what="input"):
    """The sequence ranges of a sequence-parallel input of local_rows rows on this rank: by the rule when
    seq_len is given (checking this rank's rows), else from every rank's rows (one all-gather)."""
    if seq_len is None:
        return dist.gather_extents(group, local_rows)
    ranges = partition.sequence_ranges(seq_len, group.size)
    if ranges[group.rank][1] != local_rows:
        off, size = ranges[group.rank]
        raise ValueError(f"{what}'s sequence dim (dim 0) must be {size} (this rank's rows {off}..{off + size} of "
                         f"seq_len={seq_len} at rank {group.rank} of {group.size}), got {local_rows}")
    return ranges


def vocab_rule(n, p, grain):
    """Every rank's rows of a vocabulary of n: the partition rule at `grain`, never by heads."""
    return [[tuple(r)] for r in _C.partition([n], p, grain)]


_REDUCTIONS = ("mean", "sum", "none")


def vocab_loss_args(group, shape, ignore_index, label_smoothing, reduction, vocab_ranges):
    """Checks vocab_parallel_cross_entropy's arguments (before any collective); returns (this rank's first
    column, the whole vocabulary). The NumPy and the torch loss both call it."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) or \
            not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if len(shape) < 1:
        raise ValueError("logits_shard must have a vocabulary dim, got a 0-d array")
    return _vocab_span(group, shape[-1], vocab_ranges)


def _vocab_span(group, width, vocab_ranges=None):
    """(this rank's first column, the whole vocabulary) of logits split in rank order: from vocab_ranges
    (one (offset, size) per rank, or a layer's shard_ranges()) or every rank's width (one all-gather)."""
    if vocab_ranges is None:
        spans = dist.gather_extents(group, width)
    else:
        spans = [tuple(r[0]) if len(r) == 1 and not isinstance(r[0], numbers.Integral) else tuple(r)
                 for r in vocab_ranges]
        if len(spans) != group.size or spans[group.rank][1] != width:
            raise ValueError(f"vocab_ranges {list(vocab_ranges)} do not describe {group.size} ranks whose rank "
                             f"{group.rank} holds {width} columns")
    return spans[group.rank][0], max(o + s for o, s in spans)


class Sharded:
    """Mixed into a tensor-parallel layer. The layer sets mp_group, tp_world_size, tp_index, name,
    training_mode, skip_partition and _place, calls _set_split, then _set_partition, and holds weight /
    bias (objects with .data).

    _shard_dim: the weight dim split across ranks (1: row-parallel, 0: column-parallel).
    _full_shape: the full weight's [out, in].
    _pieces[r]: rank r's pieces [(offset, size)] along the split dim (one piece, or one per packed block)."""

    _shard_dim = None
    _kind = None
    _bias_sharded = False
    _transposed = False  # the weight is stored [in_features, out_features] (GPT-2's Conv1D read in place)

    # -- construction

    def _set_split(self, tp_grain_size, num_heads, num_kv_heads, head_dim, block_sizes, block_heads):
        self._split = split_args(self.training_mode, self.name, tp_grain_size, num_heads, num_kv_heads, head_dim,
                                 block_sizes, block_heads)
        self.tp_grain_size = self._split["grain"]
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def _set_partition(self, weight_shape, has_bias, local, full, dtype):
        """Every rank's pieces, agreed in one exchange: full is the split dim's full size when this rank
        knows it (None under skip_partition: the shards' sum); local this rank's size; dtype a name."""
        pieces, error = None, None
        if full is not None and not self.skip_partition:
            try:  # every rank learns of a bad split in the exchange below, rather than some waiting in it
                pieces = self._rule(full)
            except ValueError as exc:
                error = exc
        locals_ = self._agree(weight_shape, has_bias, local, full, pieces, error, dtype)
        self._full_shape = [int(s) for s in weight_shape]
        self._full_shape[self._shard_dim] = full if full is not None else sum(locals_)
        self._pieces = pieces if pieces is not None else concatenated(locals_)

    def _rule(self, n):
        """Every rank's pieces of a split dim of n by the partition rule (partition.shard_ranges)."""
        return partition.shard_ranges(n, self.tp_world_size, **self._split)

    def _agree(self, weight_shape, has_bias, local, full, pieces, error, dtype):
        """One exchange at construction: every rank must agree on mode, kind, dtype, bias, the unsplit dim,
        (when known: full is not None) the full size of the split dim, the grain and the partition (heads,
        name, blocks, set_num_kv_heads). Raises `error` (a rule that failed on this rank) on every rank.
        Returns every rank's size along the split dim."""
        p = self.tp_world_size
        digest = -1 if error is not None else zlib.crc32(repr(pieces).encode())
        if p > 1:
            other = int(weight_shape[1 - self._shard_dim])
            mine = np.array([self._kind, int(self.training_mode), DTYPES[dtype]["code"], int(has_bias),
                             other, -1 if full is None else full, self.tp_grain_size,
                             int(getattr(self, "sequence_parallel", False)), digest, local], dtype=np.int64)
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
                  "full " + self._dim_name(self._shard_dim), "tp_grain_size", "sequence_parallel",
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
        kind = "row" if self._kind == KIND_ROW else "column"
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


# -- checkpoints (the engine in _ckpt.py; checkpoint.py and tplinear.torch.checkpoint describe the rest)


def checkpoint_entries(lname, layer, tensors):
    """The checkpoint engine's entries (_ckpt.Entry) of a tensor-parallel layer's weight and bias (keys
    "<lname>.weight", "<lname>.bias"): split by the layer's partition (layer.shard_ranges()) or replicated on
    its group. Works for every Sharded layer: NumPy layers and tplinear.torch modules. tensors: how the
    front end's parameters become and take NumPy arrays (dtype, host, live, store: checkpoint.NumpyTensors,
    tplinear.torch.checkpoint.TorchTensors)."""
    out = []
    for key in ("weight", "bias"):
        param = getattr(layer, key)
        if param is None:
            continue
        if getattr(param, "_tp_gathered", False):
            raise ValueError(f"{lname}.{key} is gathered (inside GatherReplacedLayerParams): save or load outside it")
        sharded = layer._is_sharded(param)
        dim = layer._dim_of(param) if sharded else None
        shape = layer._full_shape if key == "weight" else [layer.out_features]  # the weight as stored
        dtype = tensors.dtype(layer, param)
        info = {"kind": type(layer).__name__, "mode": "training" if layer.training_mode else "inference",
                "tp_grain_size": layer.tp_grain_size,
                "universal_checkpoint_meta": layer.universal_checkpoint_meta()[key]}
        for k in ("name", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(layer, k, None) is not None:
                info[k if k != "name" else "layer_name"] = getattr(layer, k)
        blocks = layer._split["block_sizes"] if sharded and dim == layer._dim_of(layer.weight) == 0 else None
        get, put = (lambda p=param: tensors.host(layer, p)), (lambda a, p=param: tensors.store(layer, p, a))
        buffer = lambda p=param, dt=dtype: tensors.live(layer, p, dt)  # noqa: E731
        if getattr(layer, "_conv1d", False) and key == "weight":
            # a torch module over GPT-2's Conv1D holds [out, in]; the file keeps Conv1D's [in, out] (the NumPy
            # Conv1D layers hold [in, out] themselves: _full_shape and the split dim are already that layout)
            shape, dim, blocks, buffer = shape[::-1], None if dim is None else 1 - dim, None, None
            get, put = (lambda p=param: tensors.host(layer, p).T), (lambda a, p=param: tensors.store(layer, p, a.T))
        out.append(_ckpt.Entry(
            f"{lname}.{key}" if lname else key, shape, dtype, dim, layer.shard_ranges() if sharded else None,
            layer.mp_group, layer.tp_index, get=get, put=put, buffer=buffer, blocks=blocks, info=info))
    return out
