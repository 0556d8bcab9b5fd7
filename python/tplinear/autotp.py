"""DeepSpeed 0.19's remaining AutoTP layer classes (deepspeed/module_inject/layers.py) over tplinear's row and
column layers, and the model-level universal-checkpoint description of a set of layers.

    LmHeadLinearAllreduce      row-parallel output head: takes the full input, name "lm_head"
    SubParamLinearLayer        column-parallel over a shape spec of sub-parameters ((q, k, v), -1), (2, -1)
    SubParamLinearAllreduce    row-parallel over sub-parameters of the input dim (-1, (a, b))
    fused_LinearLayer          a fused QKV cut by its model family's layout (bloom, glm/qwen, phi3)
    conv_LinearLayer           column-parallel over GPT-2's Conv1D (weight [in, out], y = x @ W + b)
    Conv_LinearALlreduce       row-parallel over Conv1D (DeepSpeed's spelling; Conv_LinearAllreduce too)
    collect_universal_checkpoint_info({name: layer})   DeepSpeed's UNIVERSAL_CHECKPOINT_INFO schema

Each splits by the one partition rule (tplinear.shard_ranges), so its shards gather, re-partition, save and
reload like the base layers'. Where DeepSpeed 0.19 does something else, README.md's "DeepSpeed
compatibility" table says what and why.
"""
import math
import re

from . import partition
from ._layout import UC_VERSION
from .layers import LinearAllreduce, LinearLayer, TPLayer

__all__ = ["LmHeadLinearAllreduce", "SubParamLinearLayer", "SubParamLinearAllreduce", "fused_LinearLayer",
           "conv_LinearLayer", "Conv_LinearALlreduce", "Conv_LinearAllreduce", "collect_universal_checkpoint_info"]


class LmHeadLinearAllreduce(LinearAllreduce):
    """DeepSpeed's output head: row-parallel, named "lm_head" (so never split by heads), and its forward takes
    the full input and uses its own slice (input_is_parallel=False; backward returns the full dX)."""

    _from_init_ok = False

    def __init__(self, module, mp_group=None, **kwargs):
        kwargs["name"] = "lm_head"
        kwargs["input_is_parallel"] = False
        super().__init__(module, mp_group, **kwargs)


# ---------------------------------------------------------------------------------------------- sub-parameters


def subparam_layout(weight_shape, shape, partition_dim, name=None):
    """DeepSpeed's shape spec of a weight made of sub-parameters (its _infer_subparam_logical_shapes):
    ``shape`` views the 2-d weight [out, in] as a logical shape whose last dim is in_features; at
    partition_dim it holds a tuple of sub-parameter sizes ((q, k, v)), a count of equal sub-parameters (3),
    or -1 (one); other dims are sizes or -1 (inferred). Returns (logical_shape, output_shape,
    sub-parameter sizes or None)."""
    label = f"layer {name!r}" if name else "layer"

    def fail(msg):
        raise ValueError(f"{label}: {msg} (shape={shape!r}, partition_dim={partition_dim}, weight {weight_shape})")

    if isinstance(shape, list):
        shape = tuple(tuple(s) if isinstance(s, list) else s for s in shape)
    if not isinstance(shape, tuple) or not shape:
        fail("the shape spec must be a non-empty tuple")
    if not isinstance(partition_dim, int) or not 0 <= partition_dim < len(shape):
        fail(f"partition_dim must index the shape spec (0..{len(shape) - 1})")
    sizes, count = None, None
    dims = []
    for i, d in enumerate(shape):
        if i == partition_dim and isinstance(d, tuple):
            if not d or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in d):
                fail("sub-parameter sizes must be positive ints")
            sizes = tuple(d)
            dims.append(sum(sizes))
        elif isinstance(d, bool) or not isinstance(d, int) or (d <= 0 and d != -1):
            fail(f"dim {i} must be a positive int or -1")
        elif i == partition_dim and d > 0:
            count = d  # that many equal sub-parameters of a size still to infer
            dims.append(None)
        else:
            dims.append(None if d == -1 else d)
    numel = weight_shape[0] * weight_shape[1]
    unknown = [i for i, d in enumerate(dims) if d is None]
    known = math.prod(d for d in dims if d is not None)
    if len(unknown) == 1:
        if numel % known:
            fail(f"cannot infer dim {unknown[0]}")
        dims[unknown[0]] = numel // known
    elif len(unknown) > 1:
        if len(dims) != 2:
            fail("more than one dim to infer")
        dims = list(weight_shape)
    if math.prod(dims) != numel or dims[-1] != weight_shape[1] or math.prod(dims[:-1]) != weight_shape[0]:
        fail(f"the logical shape {tuple(dims)} does not match the weight (last dim in_features)")
    if count is not None:
        if dims[partition_dim] % count:
            fail(f"dim {partition_dim} of {dims[partition_dim]} is not {count} equal sub-parameters")
        sizes = (dims[partition_dim] // count,) * count
    return tuple(dims), tuple(dims[:-1]), sizes


def subparam_pieces(logical, partition_dim, sizes, p, **split):
    """Every rank's pieces of the stored 2-d weight's split dim for a logical shape split at partition_dim
    into sub-parameters of `sizes` (None: one), and every sub-parameter's per-rank widths. A column split
    (an output dim) gives, for each index of the logical dims before partition_dim, the rank's piece of
    every sub-parameter, each `inner` rows per logical element (the product of the output dims after it):
    DeepSpeed's _partition_logical_tensor flattened. A row split (the last, input, dim) gives the
    sub-parameters' pieces themselves. split: shard_ranges's keyword arguments (grain, heads, name)."""
    k, d = partition_dim, logical[partition_dim]
    column = k < len(logical) - 1
    outer = math.prod(logical[:k]) if column else 1
    inner = math.prod(logical[k + 1:-1]) if column else 1
    split = dict(split, block_sizes=list(sizes) if sizes and len(sizes) > 1 else None, block_heads=None)
    per = partition.shard_ranges(d, p, **split)
    widths = [[rank[i][1] for rank in per] for i in range(len(per[0]))]
    pieces = [[(o * d * inner + off * inner, size * inner) for o in range(outer) for off, size in rank]
              for rank in per]
    return pieces, widths


class _SubParams:
    """A layer whose split dim is a logical dim of a shape spec: every sub-parameter is split on its own by
    the rule (with the layer's heads, grain and name), and a rank's shard holds its piece of each, for
    every index of the logical dims before the split one (DeepSpeed's _partition_logical_tensor)."""

    _from_init_ok = False

    def _init_subparams(self, module, shape, partition_dim, kwargs, column):
        name = kwargs.get("name")
        for key in ("skip_partition", "block_sizes", "block_heads"):
            if kwargs.get(key):
                raise TypeError(f"{type(self).__name__} takes its sub-parameters from shape=, not {key}=")
        wshape = tuple(int(s) for s in module.weight.shape)
        self.shape, self.partition_dim = shape, partition_dim
        self._logical, self._output, self._subparam_sizes = subparam_layout(wshape, shape, partition_dim, name)
        last = len(self._logical) - 1
        if column and partition_dim == last:
            raise ValueError(f"{type(self).__name__} splits an output dim; partition_dim={partition_dim} is the "
                             "input dim (use SubParamLinearAllreduce)")
        if not column and partition_dim != last:
            raise ValueError(f"{type(self).__name__} splits the input dim (partition_dim={last} of shape "
                             f"{shape!r}), got partition_dim={partition_dim}")

    def _rule(self, n):
        pieces, self._widths = subparam_pieces(self._logical, self.partition_dim, self._subparam_sizes,
                                               self.tp_world_size, **self._split)
        return pieces

    def _uc_layout(self):
        sizes = self._subparam_sizes or (self._logical[self.partition_dim],)
        return self.partition_dim, self._logical, self._output, self.shape, tuple(sizes), self._widths


class SubParamLinearLayer(_SubParams, LinearLayer):
    """DeepSpeed's column-parallel layer over sub-parameters: ``shape`` views the weight (e.g. (3, -1): three
    equal sub-parameters; ((q, k, v), -1): unequal ones) and partition_dim (an output dim, default 0) is
    split sub-parameter by sub-parameter, so a rank holds matching pieces of each; with num_heads /
    num_kv_heads / head_dim query heads follow their KV group."""

    def __init__(self, module, mp_group=None, shape=None, partition_dim=0, **kwargs):
        self._init_subparams(module, shape, partition_dim, kwargs, column=True)
        super().__init__(module, mp_group, **kwargs)


class SubParamLinearAllreduce(_SubParams, LinearAllreduce):
    """DeepSpeed's row-parallel layer over sub-parameters of the input dim: ``shape`` (e.g. (-1, (a, b))) with
    partition_dim the last (input) dim, default 1; each sub-parameter is split on its own. The bias stays
    whole."""

    def __init__(self, module, mp_group=None, shape=None, partition_dim=1, **kwargs):
        self._init_subparams(module, shape, partition_dim, kwargs, column=False)
        super().__init__(module, mp_group, **kwargs)


# ---------------------------------------------------------------------------------------------- fused QKV

# DeepSpeed's FUSED_QKV_TYPE_DICT: the model block a fused QKV belongs to -> its layout
FUSED_QKV_TYPES = {
    "CodeGenBlock": "codegentype", "BloomBlock": "bloomtype", "GLMBlock": "glmtype", "MPTBlock": "glmtype",
    "MptBlock": "glmtype", "BaichuanLayer": "glmtype", "QWenBlock": "qwentype", "FalconDecoderLayer": "bloomtype",
    "GPTBigCodeBlock": "bigcodetype", "DecoderLayer": "glmtype", "Phi3DecoderLayer": "phi3type",
}


def fused_qkv_type(fused_module):
    """The layout of a fused QKV from the model block it belongs to (the longest matching name, as
    DeepSpeed's get_fused_qkv_type), or None."""
    text = str(fused_module).strip()
    names = [k for k in FUSED_QKV_TYPES if k in text]
    return FUSED_QKV_TYPES[max(names, key=len)] if names else None


def fused_qkv_split(kind, n, in_features, num_heads=None, num_kv_heads=None, head_dim=None):
    """How a fused QKV of n rows (layout `kind`) is split, as LinearLayer keyword arguments: block_sizes for
    the [Q | K | V] layouts, the head arguments adjusted for the interleaved bloom one (a head's q, k, v
    rows are one unit). DeepSpeed's prepare_tp_fused_qkvw, as a description."""
    nh, nkv = num_heads, num_kv_heads
    kv = nkv or nh or partition.get_num_kv_heads()
    if kind == "bloomtype":
        if head_dim is not None and nh is not None and n != 3 * nh * head_dim:
            raise ValueError(f"a bloom-type fused QKV of {n} rows is not 3 * num_heads * head_dim")
        return {} if nh is None else {"num_heads": nkv or nh, "num_kv_heads": None, "head_dim": None}
    if kind in ("glmtype", "qwentype"):
        if kv == 2:  # ChatGLM2/3: the query block is the hidden size
            kv_dim = (n - in_features) // 2
            return {"block_sizes": [in_features, kv_dim, kv_dim]}
        if n % 3:
            raise ValueError(f"a {kind} fused QKV of {n} rows is not three equal blocks")
        return {"block_sizes": [n // 3] * 3}
    if kind == "phi3type":
        if not nh or not nkv:
            raise ValueError("a phi3-type fused QKV needs num_heads and num_kv_heads")
        kv_dim = nkv * (in_features // nh)
        return {"block_sizes": [n - 2 * kv_dim, kv_dim, kv_dim]}
    if kind in ("codegentype", "bigcodetype"):
        raise NotImplementedError(
            f"fused QKV layout {kind}: its rows are permuted across ranks (codegen) or its K/V block is held "
            "whole by every rank (bigcode), which no gather or checkpoint description can undo; DeepSpeed "
            "0.19 cannot gather it either")
    raise ValueError(f"unknown fused QKV type {kind!r}; one of {sorted(set(FUSED_QKV_TYPES.values()))}")


class fused_LinearLayer(LinearLayer):  # noqa: N801 - DeepSpeed's name
    """DeepSpeed's fused QKV column layer, cut by its model family's layout:

    - bloomtype (BLOOM, Falcon; DeepSpeed's default for unknown blocks): heads interleaved [q1 k1 v1 q2 ...],
      split as one dimension by heads;
    - glmtype / qwentype (GLM, MPT, Baichuan, QWen): [Q | K | V] in equal thirds, each split on its own;
      with 2 KV heads (ChatGLM2/3) the blocks are (in_features, kv, kv);
    - phi3type: [Q | K | V] with K and V of num_kv_heads * head_dim (head_dim = in_features / num_heads).

    fused_module: the model block (its str() names the family, as in DeepSpeed), or fused_type= directly.
    Heads: num_heads / num_kv_heads / head_dim, else tplinear.set_num_kv_heads's global. codegentype and
    bigcodetype (rows permuted across ranks; a K/V block every rank holds whole) raise
    NotImplementedError: DeepSpeed cannot gather or describe them either."""

    _from_init_ok = False

    def __init__(self, module, mp_group=None, skip_partition=False, fused_module=None, fused_type=None, **kwargs):
        kind = fused_type or (fused_qkv_type(fused_module) if fused_module is not None else None) or "bloomtype"
        self.fused_type = kind
        n, in_features = (int(s) for s in module.weight.shape)
        kwargs.update(fused_qkv_split(kind, n, in_features, kwargs.get("num_heads"), kwargs.get("num_kv_heads"),
                                      kwargs.get("head_dim")))
        super().__init__(module, mp_group, skip_partition=skip_partition, **kwargs)


# ---------------------------------------------------------------------------------------------- GPT-2 Conv1D


class conv_LinearLayer(LinearLayer):  # noqa: N801 - DeepSpeed's name
    """Column-parallel over GPT-2's Conv1D (transformers.pytorch_utils.Conv1D): the weight is stored
    [in_features, out_features] and y = x @ W + b; the shard keeps that layout, [in_features, out_r], so
    state dicts and checkpoints match the model's. Host arrays only."""

    _from_init_ok = False
    _transposed = True
    _shard_dim = 1


class Conv_LinearALlreduce(LinearAllreduce):  # noqa: N801 - DeepSpeed's name (sic)
    """Row-parallel over GPT-2's Conv1D: weight [in_features, out_features] split along in_features, kept in
    that layout ([in_r, out_features]); the bias stays whole. Host arrays only."""

    _from_init_ok = False
    _transposed = True
    _shard_dim = 0


Conv_LinearAllreduce = Conv_LinearALlreduce


# ---------------------------------------------------------------------------------------------- checkpoints


def collect_universal_checkpoint_info(layers):
    """DeepSpeed 0.19's model-level UNIVERSAL_CHECKPOINT_INFO (collect_autotp_universal_checkpoint_info) for
    {name: layer}: which parameters are row-parallel, replicated, vocabulary-split or made of
    sub-parameters (with their per-rank widths), as regex patterns of "name.weight" / "name.bias". Each
    layer's universal_checkpoint_meta() has the per-parameter detail."""
    if not isinstance(layers, dict):
        raise TypeError(f"layers must be a dict of name -> layer, got {type(layers).__name__}")
    row, replicated, vocab, sub, widths = [], [], [], [], {}
    vocab_size = None
    for lname, layer in layers.items():
        if not isinstance(layer, TPLayer):
            raise TypeError(f"layers[{lname!r}] is a {type(layer).__name__}, not a tplinear layer")
        for key, meta in layer.universal_checkpoint_meta().items():
            full = f"{lname}.{key}"
            pattern = rf"^{re.escape(full)}$"
            conv = meta["conversion"]
            if conv["replicated"]:
                replicated.append(pattern)
            if conv["partition_type"] == "row" and not conv["is_bias"]:
                row.append(pattern)
            shape, dim = conv["original_shape"], conv["partition_dim"]
            if len(shape) == 2 and dim == 0 and ("embed" in full or "lm_head" in full):
                vocab.append(pattern)
                vocab_size = shape[0] if vocab_size is None else vocab_size
            if conv["sub_param_shape"] is not None and dim is not None:
                published = list(conv["sub_param_shape"])
                published[dim] = tuple(sum(w) for w in conv["sub_param_shard_widths"])
                widths[pattern] = [list(w) for w in conv["sub_param_shard_widths"]]
                sub.append({"patterns": [pattern], "shape": published, "partition_dim": dim})
    info = {
        "universal_checkpoint_version": UC_VERSION,
        "parameter_with_row_parallelism_patterns": sorted(set(row)),
        "tp_replicated_parameter_patterns": sorted(set(replicated)),
        "vocabulary_parameter_patterns": sorted(set(vocab)),
        "parameter_with_sub_params": sub,
        "autotp_unsupported_parameter_patterns": {},
    }
    if widths:
        info["sub_param_shard_widths"] = widths
    if vocab_size is not None:
        info["original_vocab_size"] = vocab_size
    return info
