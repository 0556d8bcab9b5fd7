"""The shard bookkeeping of a tensor-parallel layer, shared by the NumPy layers (``layers.py``) and the
torch modules (``tplinear.torch``): the one exchange at construction that checks the ranks build the same
layer, every rank's pieces of the split dimension, the parameter marks DeepSpeed looks for, and
DeepSpeed's gather_params / _tp_partition. Where arrays live and how they are made is the layer's
``_place`` (``_arrays.Placement`` for NumPy / DeviceArray, a torch placement for torch tensors)."""
import numpy as np

from . import _C
from . import distributed as dist
from ._arrays import DTYPES
from .parameter import param_list

KIND_ROW, KIND_COL = 1, 2


def agree(group, kind, shard_dim, training, dtype_code, dtype_names, has_bias, weight_shape, local, full, name):
    """One all-gather over group: every rank must agree on the layer kind, mode, dtype, bias presence, the
    unsplit dim and (when known: full is not None) the full size of the split dim. Raises ValueError on
    every rank naming the field and each rank's value. Returns every rank's size along the split dim.

    dtype_names maps dtype codes to names (for the message)."""
    p = group.size
    if p == 1:
        return [int(local)]
    other = int(weight_shape[1 - shard_dim])
    mine = np.array([kind, int(training), dtype_code, int(has_bias), other, -1 if full is None else full, local],
                    dtype=np.int64)
    every = np.empty(7 * p, dtype=np.int64)
    dist.all_gather_into_tensor(every, mine, group=group)
    every = every.reshape(p, 7)
    fields = ["layer kind", "training mode", "dtype", "bias presence",
              "in_features" if shard_dim == 0 else "out_features",
              "full " + ("out_features" if shard_dim == 0 else "in_features")]
    for i, field in enumerate(fields):
        if not np.all(every[:, i] == every[0, i]):
            seen = [dtype_names.get(int(v), int(v)) for v in every[:, i]] if field == "dtype" else every[:, i].tolist()
            raise ValueError(f"ranks disagree on the {field} of layer {name}: {seen} across ranks {list(range(p))} "
                             "(every rank must build the same layer in the same mode)")
    return every[:, 6].tolist()


def skip_partition_pieces(locals_):
    """Every rank's pieces when each rank brings its own shard (skip_partition): the shards one after
    another in rank order."""
    offs = np.concatenate([[0], np.cumsum(locals_)[:-1]]).tolist()
    return [[(int(o), int(s))] for o, s in zip(offs, locals_)]


class Sharded:
    """Mixed into a layer that has: mp_group, tp_world_size, tp_index, name, training_mode, skip_partition,
    _place, _blocks, _block_heads, weight / bias (objects with .data), _full_shape ([out, in]) and
    _pieces (set from _partition).

    _shard_dim: the weight dim split across ranks (1: row-parallel, 0: column-parallel).
    _pieces[r]: rank r's pieces [(offset, size)] along that dim (one piece, or one per packed block)."""

    _shard_dim = None
    _kind = None
    _bias_sharded = False

    # -- construction

    def _agree(self, weight_shape, has_bias, local, full, dtype):
        """The construction exchange (agree above) for this layer; dtype is a dtype name."""
        return agree(self.mp_group, self._kind, self._shard_dim, self.training_mode, DTYPES[dtype]["code"],
                     {d["code"]: n for n, d in DTYPES.items()}, has_bias, weight_shape, local, full,
                     self.name or type(self).__name__)

    def _partition(self, n, locals_):
        """Every rank's pieces: the given shards one after another under skip_partition, else the rule."""
        from .layers import _rule_pieces  # layers.py imports this module

        if self.skip_partition:
            return skip_partition_pieces(locals_)
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
