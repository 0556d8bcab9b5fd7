"""How a split dimension is cut across the ranks of a group: the modes and defaults the rule reads,
the rule itself (DeepSpeed 0.19's ``tp_shard.get_shard_size_list``, computed by the C core's
``tp_partition_packed``) and the GQA rule that keeps query heads with their KV group.

    tp.shard_ranges(130, 3, training=True)           # [[(0, 44)], [(44, 43)], [(87, 43)]]
    tp.shard_ranges(768, 3, num_heads=12, num_kv_heads=4, head_dim=64)
                                                      # [[(0, 384)], [(384, 192)], [(576, 192)]]
    tp.attention_heads(12, 4, 3)                     # [(range(0, 6), range(0, 2)), ...]

Every layer, gather, re-partition and checkpoint takes its ranges from here, so they agree on every rank.
"""
import numbers

from . import _C

# DeepSpeed's tp_grain_size defaults: its training engine (tensor_parallel.tp_grain_size) and its
# inference engine (init_inference's tp_grain_size)
GRAIN_TRAINING = 1
GRAIN_INFERENCE = 64

_state = {"training": False, "num_kv_heads": None, "grain": None}  # DeepSpeed's default mode is inference


def set_training_mode(training=True):
    """Training mode: DeepSpeed's rule at grain 1 (130 over 3 -> 44/43/43). Inference mode (the default,
    as in DeepSpeed): the same rule at grain 64. Read when a layer is built."""
    _state["training"] = bool(training)


def is_training_mode():
    return _state["training"]


def set_autotp_mode(training=False):
    """DeepSpeed's name for set_training_mode."""
    set_training_mode(training)


def is_autotp_training_mode():
    return is_training_mode()


def set_num_kv_heads(num):
    """The model-wide KV head count of DeepSpeed's older global API, a default for layers built without
    heads of their own: used as DeepSpeed uses it, only where it divides the split dimension and the
    layer's name allows heads (not mlp / gate_proj / up_proj / down_proj / w1-w3 / lm_head / embed_out).
    None clears it. Give attention layers num_heads / num_kv_heads / head_dim instead."""
    _state["num_kv_heads"] = None if num is None else as_count(num, "num_kv_heads")


def get_num_kv_heads():
    return _state["num_kv_heads"]


def set_tp_grain_size(grain=None):
    """The default grain of layers built without tp_grain_size=: a positive int for both modes, or None
    for DeepSpeed's defaults (1 in training mode, 64 in inference mode)."""
    _state["grain"] = None if grain is None else as_count(grain, "tp_grain_size")


def get_tp_grain_size(training=None):
    """The grain a layer built now would use in the given mode (None: the current mode)."""
    if _state["grain"] is not None:
        return _state["grain"]
    training = is_training_mode() if training is None else bool(training)
    return GRAIN_TRAINING if training else GRAIN_INFERENCE


def shard_ranges(n, p, *, training=None, grain=None, num_heads=None, num_kv_heads=None, head_dim=None, name=None,
                 block_sizes=None, block_heads=None):
    """Every rank's pieces of a split dimension of n elements over p ranks: a list of p lists of
    (offset, size), offsets into the full dimension; a rank's shard is its pieces concatenated in order
    (one piece, or one per block of a packed dimension).

    The rule (DeepSpeed 0.19's get_shard_size_list, for training and inference alike):
      - with h head units, rank r gets ``h // p + (1 if r < h % p else 0)`` units of ``n // h``;
      - otherwise ``n // grain`` grains dealt the same way, the ``n % grain`` tail to the last rank;
        a dimension smaller than the grain is dealt element by element.
    grain: DeepSpeed's tp_grain_size; None: set_tp_grain_size's default, else 1 in training mode and 64
    in inference mode (training: None means the current mode).
    num_heads / num_kv_heads / head_dim: the layer's own attention heads. The dimension must be made of
    them (with head_dim: num_heads * head_dim or num_kv_heads * head_dim; packed: each block is), the
    unit is the KV group, so query heads stay with their KV heads (see attention_heads), and the layer's
    name does not matter. Without them, set_num_kv_heads's global applies the DeepSpeed way (where it
    divides n and the name allows heads).
    block_sizes: a packed dimension (fused QKV, gate/up) of consecutive blocks, each split on its own.
    block_heads: the heads of each block (0 for a block without heads); the fewest is the KV head count,
    every other must be a multiple of it, and each block is dealt as that many KV groups.

    Raises ValueError when the heads cannot be split that way (naming the block, its size and heads).
    """
    n = as_count(n, "n", zero=True)
    p = as_count(p, "p")
    if grain is None:
        grain = get_tp_grain_size(training)
    grain = as_count(grain, "tp_grain_size")
    blocks = [n]
    if block_sizes is not None:
        blocks = [as_count(b, "block size", zero=True) for b in block_sizes]
        if sum(blocks) != n:
            raise ValueError(f"packed block sizes {blocks} sum to {sum(blocks)}, but the split dimension is {n}")
    if block_heads is not None:
        if block_sizes is None:
            raise ValueError("block_heads needs block_sizes (the heads of each block of a packed dimension)")
        block_heads = [as_count(h, "block heads", zero=True) for h in block_heads]
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    flat = _C.partition(blocks, p, grain, kv_heads=_state["num_kv_heads"] or 0, name=name,
                        num_heads=_opt_count(num_heads, "num_heads"), num_kv_heads=_opt_count(num_kv_heads, "num_kv_heads"),
                        head_dim=_opt_count(head_dim, "head_dim"), block_heads=block_heads)
    k = len(blocks)
    return [flat[r * k:(r + 1) * k] for r in range(p)]


def attention_heads(num_heads, num_kv_heads, p):
    """The GQA rule: for each of p ranks, (query heads, KV heads) as ``range``s of head indices.

    KV heads are dealt whole (rank r gets ``num_kv_heads // p + (1 if r < num_kv_heads % p else 0)``), and
    every query head goes with its KV group (query head j uses KV head ``j // (num_heads // num_kv_heads)``),
    so rank r holds exactly the query heads whose keys and values it holds. num_kv_heads None: multi-head
    attention (num_kv_heads = num_heads). Fewer KV heads than ranks leaves ranks without heads, as
    DeepSpeed does (they contribute zeros to the output projection's all-reduce).

    shard_ranges(..., num_heads=, num_kv_heads=, head_dim=) gives these ranges times head_dim for q_proj,
    k_proj, v_proj, a packed QKV and the attention output projection, so the column layer before attention
    and the row layer after it always hold the same heads.
    """
    nh = as_count(num_heads, "num_heads")
    nkv = _opt_count(num_kv_heads, "num_kv_heads")
    return [(range(q[0], q[0] + q[1]), range(kv[0], kv[0] + kv[1])) for q, kv in _C.attention_heads(nh, nkv, as_count(p, "p"))]


def sequence_ranges(seq_len, p):
    """Every rank's rows of a sequence of seq_len tokens split over p ranks (sequence parallelism): the rule
    at grain 1, without heads (the first ``seq_len % p`` ranks get one row more), as a list of p
    ``(offset, size)``. Sequence-parallel layers split their outputs this way, so rank r's slice of an input
    is ``x[off:off + size]`` with ``(off, size) = sequence_ranges(len(x), p)[r]``."""
    return [tuple(r) for r in _C.partition([as_count(seq_len, "seq_len", zero=True)], as_count(p, "p"), 1)]


def as_count(v, what, zero=False):
    """v as an int >= 1 (>= 0 with zero=True), else TypeError / ValueError naming what (the argument check
    of every size and count tplinear takes)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(v).__name__} {v!r}")
    if v < (0 if zero else 1):
        raise ValueError(f"{what} must be {'>= 0' if zero else 'a positive int'}, got {v}")
    return int(v)


def _opt_count(v, what):
    return 0 if v is None else as_count(v, what)
