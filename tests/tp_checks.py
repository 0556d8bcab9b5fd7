"""Checks that run inside each rank of a world spawned by tests/test_tp_layers.py.

Every check builds the full layer in the same way on every rank, runs the tensor-parallel layer, and
compares this rank's results against a float64 single-process reference of the full layer. All ranks
draw the same random inputs (seeded from TPLINEAR_TEST_SEED), fresh on every test run.
"""
import os
import zlib

import ml_dtypes
import numpy as np

import tplinear as tp
import tplinear.distributed as dist

TOL = {"float32": 1e-5, "float64": 1e-12}
SEED = int(os.environ.get("TPLINEAR_TEST_SEED", "0"))


def rel_err(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    return np.linalg.norm(got - ref) / (den if den > 0 else 1.0)


def close(got, ref, dtype, what):
    err = rel_err(got, ref)
    assert np.shape(got) == np.shape(ref), f"{what}: shape {np.shape(got)} != {np.shape(ref)}"
    assert err < TOL[dtype], f"{what}: relative error {err:.3e} >= {TOL[dtype]}"


def rng_for(*key):
    return np.random.default_rng([SEED, zlib.crc32(repr(key).encode())])


def init(timeout=60.0, backend=None):
    dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def ranges(n, p, training, **kwargs):
    """Every rank's (offset, size) of an unpacked split dim."""
    return [pieces[0] for pieces in tp.shard_ranges(n, p, training=training, **kwargs)]


def gelu(x):
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


# ------------------------------------------------------------------------------------------- layers


def check_row(dtype, lead, bias, training, in_f, out_f, input_is_parallel=True, group=None):
    p, r = dist.get_world_size(group), dist.get_rank(group)
    tp.set_training_mode(training)
    rng = rng_for("row", dtype, lead, bias, training, in_f, out_f, input_is_parallel)
    lin = tp.Linear(in_f, out_f, bias=bias, dtype=dtype, seed=int(rng.integers(1 << 30)))
    w64 = lin.weight.data.astype(np.float64)
    b64 = None if lin.bias is None else lin.bias.data.astype(np.float64)
    layer = tp.LinearAllreduce(lin, group, input_is_parallel=input_is_parallel)
    off, size = ranges(in_f, p, training)[r]
    x = rng.standard_normal(lead + (in_f,)).astype(dtype)
    dy = rng.standard_normal(lead + (out_f,)).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    assert layer.weight.data.shape == (out_f, size)
    assert np.array_equal(layer.weight.data, lin.weight.data[:, off:off + size])
    y = layer(x[..., off:off + size] if input_is_parallel else x)
    close(y, x64 @ w64.T + (0 if b64 is None else b64), dtype, f"row forward p={p}")
    dx = layer.backward(dy)
    dx_full = dy64 @ w64
    close(dx, dx_full[..., off:off + size] if input_is_parallel else dx_full, dtype, "row dX")
    dw = dy64.reshape(-1, out_f).T @ x64.reshape(-1, in_f)
    close(layer.weight.grad, dw[:, off:off + size], dtype, "row dW")
    if bias:
        close(layer.bias.grad, dy64.reshape(-1, out_f).sum(0), dtype, "row db")


def check_col(dtype, lead, bias, training, in_f, out_f, gather_output=False, group=None):
    p, r = dist.get_world_size(group), dist.get_rank(group)
    tp.set_training_mode(training)
    rng = rng_for("col", dtype, lead, bias, training, in_f, out_f, gather_output)
    lin = tp.Linear(in_f, out_f, bias=bias, dtype=dtype, seed=int(rng.integers(1 << 30)))
    w64 = lin.weight.data.astype(np.float64)
    b64 = None if lin.bias is None else lin.bias.data.astype(np.float64)
    x = rng.standard_normal(lead + (in_f,)).astype(dtype)
    dy = rng.standard_normal(lead + (out_f,)).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    off, size = ranges(out_f, p, training)[r]
    results = []
    for overlap in (False, True):
        layer = tp.LinearLayer(lin, group, gather_output=gather_output, tp_overlap_comm=overlap)
        assert np.array_equal(layer.weight.data, lin.weight.data[off:off + size])
        y = layer(x)
        y_full = x64 @ w64.T + (0 if b64 is None else b64)
        close(y, y_full if gather_output else y_full[..., off:off + size], dtype, f"col forward p={p}")
        dx = layer.backward(dy if gather_output else dy[..., off:off + size])
        close(dx, dy64 @ w64, dtype, f"col dX overlap={overlap}")
        dw = dy64.reshape(-1, out_f).T @ x64.reshape(-1, in_f)
        close(layer.weight.grad, dw[off:off + size], dtype, "col dW")
        if bias:
            close(layer.bias.grad, dy64.reshape(-1, out_f).sum(0)[off:off + size], dtype, "col db")
        results.append((dx, layer.weight.grad))
    # overlapping the dX all-reduce with the dW GEMM changes nothing
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])


# half precision: bfloat16 (ml_dtypes) and float16
U = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}  # unit roundoff
ETA = {"bfloat16": 2.0 ** -134, "float16": 2.0 ** -25}  # half the smallest subnormal
NP_HALF = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def close_half(got, ref, terms, k, roundings, dtype, what):
    """Per element, against ref (the unsharded layer computed in float32 from the same half values, rounded
    once to dtype): both accumulate k terms in float32 (each within (k + 1) 2^-24 sum|terms| of the exact sum),
    and each rounding to dtype -- ours and ref's -- moves a value by at most u times its size (<= sum|terms|):
    |got - ref| <= (roundings u + 2 (k + 1) 2^-24) sum|terms| (+ 1 % slack, + subnormal halves). Roundings:
    a local GEMM 1, the reference's 1; an all-reduce of rounded partial sums 2 more (the partials, their float32
    sum: the reduction accumulates in float32); the row layer's bias, added after the reduction, 1 more."""
    got, ref, terms = (np.asarray(a).astype(np.float64) for a in (got, ref, terms))
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err = np.abs(got - ref)
    lim = 1.01 * (roundings * U[dtype] + 2 * (k + 1) * 2.0 ** -24) * terms + roundings * ETA[dtype]
    assert (err <= lim).all(), f"{what}: worst excess {np.max(err - lim):.3g} (err {err.max():.3g})"


def check_half(dtype, training, in_f, out_f, lead=(2, 3)):
    """NumPy row and column layers in dtype (NumPy arrays of it): outputs and gradients in dtype, each element
    within close_half's bound of the float32 computation rounded once."""
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(training)
    half = NP_HALF[dtype]
    rng = rng_for("half", dtype, training, in_f, out_f, lead)
    reduced = 2 if p > 1 else 0
    for kind in ("row", "col"):
        lin = tp.Linear(in_f, out_f, dtype=dtype, seed=int(rng.integers(1 << 30)))
        assert lin.weight.data.dtype == half
        w32, b32 = lin.weight.data.astype(np.float32), lin.bias.data.astype(np.float32)
        w64, b64 = w32.astype(np.float64), b32.astype(np.float64)
        x, dy = (rng.standard_normal(lead + (n,)).astype(half) for n in (in_f, out_f))
        x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
        x64, dy64 = x32.astype(np.float64), dy32.astype(np.float64)
        row = kind == "row"
        layer = tp.LinearAllreduce(lin) if row else tp.LinearLayer(lin)
        off, size = ranges(in_f if row else out_f, p, training)[r]
        cut = slice(off, off + size)
        y = layer(x[..., cut] if row else x)
        dx = layer.backward(dy if row else dy[..., cut])
        for name, got in (("y", y), ("dx", dx), ("dW", layer.weight.grad), ("db", layer.bias.grad)):
            assert got.dtype == half, f"{kind} {name}: {got.dtype}"
        out = slice(None) if row else cut
        close_half(y, (x32 @ w32.T + b32).astype(half)[..., out], (np.abs(x64) @ np.abs(w64).T + np.abs(b64))[..., out],
                   in_f, 2 + (reduced + 1 if row else 0), dtype, f"{kind} forward {dtype} p={p}")
        inp = cut if row else slice(None)
        close_half(dx, (dy32 @ w32).astype(half)[..., inp], (np.abs(dy64) @ np.abs(w64))[..., inp], out_f,
                   2 + (0 if row else reduced), dtype, f"{kind} dX")
        m = int(np.prod(lead))
        dw = (dy32.reshape(m, -1).T @ x32.reshape(m, -1)).astype(half)
        tdw = np.abs(dy64.reshape(m, -1)).T @ np.abs(x64.reshape(m, -1))
        wcut = (slice(None), cut) if row else (cut, slice(None))
        close_half(layer.weight.grad, dw[wcut], tdw[wcut], m, 2, dtype, f"{kind} dW")
        bcut = slice(None) if row else cut
        close_half(layer.bias.grad, dy32.reshape(m, -1).sum(0).astype(half)[bcut],
                   np.abs(dy64.reshape(m, -1)).sum(0)[bcut], m, 2, dtype, f"{kind} db")


def check_mlp(dtype, training, in_f, hidden, lead=(6,)):
    tp.set_training_mode(training)
    rng = rng_for("mlp", dtype, training, in_f, hidden, lead)
    l1 = tp.Linear(in_f, hidden, dtype=dtype, seed=int(rng.integers(1 << 30)))
    l2 = tp.Linear(hidden, in_f, dtype=dtype, seed=int(rng.integers(1 << 30)))
    w1, b1, w2, b2 = (a.astype(np.float64) for a in (l1.weight.data, l1.bias.data, l2.weight.data, l2.bias.data))
    col, row = tp.LinearLayer(l1), tp.LinearAllreduce(l2)
    x = rng.standard_normal(lead + (in_f,)).astype(dtype)
    dy = rng.standard_normal(lead + (in_f,)).astype(dtype)
    h = col(x)
    a, da = gelu(h)
    y = row(a.astype(dtype))
    dh = row.backward(dy) * da.astype(dtype)
    dx = col.backward(dh.astype(dtype))
    # float64 reference of the full block
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    h_ref = x64 @ w1.T + b1
    a_ref, da_ref = gelu(h_ref)
    close(y, a_ref @ w2.T + b2, dtype, "mlp forward")
    dh_ref = (dy64 @ w2) * da_ref
    close(dx, dh_ref @ w1, dtype, "mlp dX")
    p, r = dist.get_world_size(), dist.get_rank()
    off, size = ranges(hidden, p, training)[r]
    dw1 = dh_ref.reshape(-1, hidden).T @ x64.reshape(-1, in_f)
    close(col.weight.grad, dw1[off:off + size], dtype, "mlp dW1")
    dw2 = dy64.reshape(-1, in_f).T @ a_ref.reshape(-1, hidden)
    close(row.weight.grad, dw2[:, off:off + size], dtype, "mlp dW2")


def check_packed(dtype, training, blocks, heads=None):
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(training)
    rng = rng_for("packed", dtype, training, tuple(blocks), heads)
    in_f, out_f = 24, sum(blocks)
    lin = tp.Linear(in_f, out_f, dtype=dtype, seed=int(rng.integers(1 << 30)))
    layer = tp.LinearLayer(lin, block_sizes=blocks, block_heads=heads)
    mine = tp.shard_ranges(sum(blocks), p, training=training, block_sizes=blocks, block_heads=heads)[r]
    assert layer.shard_ranges()[r] == mine
    rows = np.concatenate([np.arange(o, o + s) for o, s in mine])
    assert np.array_equal(layer.weight.data, lin.weight.data[rows]), "packed shard is not this rank's pieces"
    x = rng.standard_normal((5, in_f)).astype(dtype)
    y_full = x.astype(np.float64) @ lin.weight.data.T.astype(np.float64) + lin.bias.data
    close(layer(x), y_full[:, rows], dtype, "packed forward")
    with tp.GatherReplacedLayerParams(layer.parameters(), layer):
        assert np.array_equal(layer.weight.data, lin.weight.data), "packed gather is not the original order"
        assert np.array_equal(layer.bias.data, lin.bias.data)
    assert np.array_equal(layer.weight.data, lin.weight.data[rows])
    layer.gather_output = True
    close(layer(x), y_full, dtype, "packed gather_output")


def _attention(q, k, v, nh, nkv, hd):
    """Grouped-query attention in float64: q [t, nh*hd], k and v [t, nkv*hd] -> [t, nh*hd]; query head j
    attends with KV head j // (nh // nkv)."""
    t = q.shape[0]
    q, k, v = q.reshape(t, nh, hd), k.reshape(t, max(nkv, 0), hd), v.reshape(t, max(nkv, 0), hd)
    out = np.empty((t, nh, hd))
    for j in range(nh):
        kv = j // (nh // nkv) if nkv else 0
        s = q[:, j] @ k[:, kv].T / np.sqrt(hd)
        w = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, j] = (w / w.sum(axis=1, keepdims=True)) @ v[:, kv]
    return out.reshape(t, nh * hd)


def check_gqa_attention(training, nh, nkv, hd, packed, hidden=12, tokens=5):
    """A small attention block: QKV column layer(s) -> per-head attention on this rank's heads -> o_proj
    row layer, against the unsharded block in float64. The column and row layers get the same head
    arguments; tplinear.attention_heads names the heads this rank holds."""
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(training)
    rng = rng_for("gqa", training, nh, nkv, hd, packed)
    heads = dict(num_heads=nh, num_kv_heads=nkv, head_dim=hd)
    qkv = tp.Linear(hidden, (nh + 2 * nkv) * hd, dtype="float64", seed=int(rng.integers(1 << 30)))
    o = tp.Linear(nh * hd, hidden, dtype="float64", seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((tokens, hidden))
    w, b = qkv.weight.data, qkv.bias.data
    full = x @ w.T + b
    ref = _attention(full[:, :nh * hd], full[:, nh * hd:(nh + nkv) * hd], full[:, (nh + nkv) * hd:], nh, nkv, hd)
    ref = ref @ o.weight.data.T + o.bias.data
    q_heads, kv_heads = tp.attention_heads(nh, nkv, p)[r]
    if packed:
        col = tp.LinearLayer(qkv, block_sizes=[nh * hd, nkv * hd, nkv * hd], **heads)
        y = col(x)
        lq, lkv = len(q_heads) * hd, len(kv_heads) * hd
        q, k, v = y[:, :lq], y[:, lq:lq + lkv], y[:, lq + lkv:]
    else:
        def part(lo, hi):
            return _Holder(w[lo:hi], b[lo:hi])
        q = tp.LinearLayer(part(0, nh * hd), **heads)(x)
        k = tp.LinearLayer(part(nh * hd, (nh + nkv) * hd), **heads)(x)
        v = tp.LinearLayer(part((nh + nkv) * hd, (nh + 2 * nkv) * hd), **heads)(x)
    assert q.shape[1] == len(q_heads) * hd and k.shape[1] == len(kv_heads) * hd
    row = tp.LinearAllreduce(o, **heads)
    assert row.shard_ranges() == [[(qh.start * hd, len(qh) * hd)] for qh, _ in tp.attention_heads(nh, nkv, p)]
    local = _attention(q, k, v, len(q_heads), len(kv_heads), hd) if len(q_heads) else np.zeros((tokens, 0))
    close(row(local), ref, "float64", f"GQA attention nh={nh} nkv={nkv} p={p} packed={packed} training={training}")


class _Holder:
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


def check_gqa_attentions():
    for training in (True, False):
        for nh, nkv, hd in ((4, 4, 4), (8, 2, 4), (6, 3, 2), (12, 4, 3), (10, 5, 2), (4, 1, 4)):
            for packed in (True, False):
                check_gqa_attention(training, nh, nkv, hd, packed)
    print(f"rank {dist.get_rank()}: GQA attention checks passed", flush=True)


def check_gather_context():
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(False)
    lin = tp.Linear(100, 70, dtype="float64", seed=11)  # uneven at 3 ranks (and a zero-width shard)
    row, col = tp.LinearAllreduce(lin), tp.LinearLayer(lin)
    for layer, dim in ((row, 1), (col, 0)):
        shard_w = layer.weight.data.copy()
        with tp.GatherReplacedLayerParams([layer.weight, layer.bias], layer) as ctx:
            assert ctx is not None
            assert np.array_equal(layer.weight.data, lin.weight.data)
            assert np.array_equal(layer.bias.data, lin.bias.data)
            assert np.array_equal(layer.state_dict()["weight"], lin.weight.data)
            layer.weight.data = layer.weight.data + 1.0  # an edit made while gathered
        assert layer.weight.data.shape == shard_w.shape
        assert np.array_equal(layer.weight.data, shard_w + 1.0), "edits made while gathered must persist"
        # a single parameter and a generator both work; the body raising still re-partitions
        with tp.GatherReplacedLayerParams(layer.weight, layer):
            assert layer.weight.data.shape == (70, 100)
        with tp.GatherReplacedLayerParams((q for q in [layer.weight]), layer):
            assert layer.weight.data.shape == (70, 100)
        try:
            with tp.GatherReplacedLayerParams(layer.parameters(), layer):
                raise KeyError("body failed")
        except KeyError:
            pass
        assert layer.weight.data.shape == shard_w.shape, "not re-partitioned after the body raised"
        # disabled, or no replaced parameter: nothing happens (and no collective is issued)
        with tp.GatherReplacedLayerParams(layer.parameters(), layer, enabled=False):
            assert layer.weight.data.shape == shard_w.shape
        plain = tp.Parameter(np.zeros(3))
        with tp.GatherReplacedLayerParams([plain], layer):
            assert plain.data.shape == (3,) and layer.weight.data.shape == shard_w.shape
        # DeepSpeed's per-parameter hooks
        layer.weight.gather_params([layer.weight])
        assert layer.weight.data.shape == (70, 100)
        layer.weight._tp_partition([layer.weight])
        assert layer.weight.data.shape == shard_w.shape
    del r


def check_from_init(training, in_f, out_f, dtype="float32"):
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(training)
    full = tp.Linear(in_f, out_f, dtype=dtype, seed=5)
    col = tp.LinearLayer.from_init(in_f, out_f, seed=5, dtype=dtype)
    row = tp.LinearAllreduce.from_init(in_f, out_f, seed=5, dtype=dtype)
    o, s = ranges(out_f, p, training)[r]
    assert np.array_equal(col.weight.data, full.weight.data[o:o + s])
    assert np.array_equal(col.bias.data, full.bias.data[o:o + s])
    o, s = ranges(in_f, p, training)[r]
    assert np.array_equal(row.weight.data, full.weight.data[:, o:o + s])
    assert np.array_equal(row.bias.data, full.bias.data)
    with tp.GatherReplacedLayerParams(col.parameters() + row.parameters(), None):
        assert np.array_equal(col.weight.data, full.weight.data)
        assert np.array_equal(row.weight.data, full.weight.data)


def check_skip_partition():
    """from_weights / skip_partition=True: the given weights are this rank's shard, used as they are;
    gathering concatenates the ranks' shards (of any sizes)."""
    p, r = dist.get_world_size(), dist.get_rank()
    rng = rng_for("skip", p)
    full = rng.standard_normal((3 * p + 3, 10))  # uneven: rank r holds 3 + (r == 0) * 3 rows
    bounds = np.cumsum([0] + [6 if q == 0 else 3 for q in range(p)])
    shard = full[bounds[r]:bounds[r + 1]]
    layer = tp.LinearLayer.from_weights(weight=shard.copy(), bias=np.arange(len(shard), dtype=np.float64))
    assert layer.skip_partition and np.array_equal(layer.weight.data, shard)
    x = rng.standard_normal((4, 10))
    close(layer(x), x @ shard.T + np.arange(len(shard)), "float64", "from_weights forward")
    with tp.GatherReplacedLayerParams(layer.parameters(), layer):
        assert np.array_equal(layer.weight.data, full)
    zero = tp.LinearLayer.from_weights(weight_shape=(4, 6), dtype="float64")
    assert zero.weight.data.shape == (4, 6) and not zero.weight.data.any() and zero.bias is None


def run_layer_checks(training_dims, inference_dims):
    """The full matrix for one world size."""
    for training, (in_f, out_f) in ((True, training_dims), (False, inference_dims)):
        for dtype in ("float32", "float64"):
            for lead in ((), (5,), (2, 3)):
                for bias in (True, False):
                    check_row(dtype, lead, bias, training, in_f, out_f)
                    check_col(dtype, lead, bias, training, in_f, out_f)
            check_row(dtype, (4,), True, training, in_f, out_f, input_is_parallel=False)
            check_col(dtype, (4,), True, training, in_f, out_f, gather_output=True)
            check_col(dtype, (0,), True, training, in_f, out_f)  # an empty batch
            check_mlp(dtype, training, in_f, out_f)
        check_from_init(training, in_f, out_f)
        for dtype in ("bfloat16", "float16"):
            check_half(dtype, training, in_f, out_f)
    p = dist.get_world_size()
    check_packed("float32", True, [12 * p, 4 * p, 4 * p])                      # fused QKV, training
    check_packed("float32", False, [8 * 4, 2 * 4, 2 * 4], heads=[8, 2, 2])      # GQA: 8 q heads, 2 kv heads
    check_packed("float64", True, [6 * p, 6 * p])                                # gate/up
    check_gather_context()
    check_skip_partition()
    check_gqa_attentions()
    print(f"rank {dist.get_rank()}: layer checks passed", flush=True)


# ------------------------------------------------------------------------------------------- checkpoints

CKPT_DIMS = {"fc1": (64, 190), "fc2": (190, 64)}  # 190: uneven at 3 and 4 ranks in either mode


def _ckpt_layers(training=False):
    tp.set_training_mode(training)  # either mode's split; any group size loads
    fc1 = tp.LinearLayer.from_init(*CKPT_DIMS["fc1"], seed=21, name="fc1")
    fc2 = tp.LinearAllreduce.from_init(*CKPT_DIMS["fc2"], seed=22, name="fc2")
    return fc1, fc2


def _mlp_out(fc1, fc2, x):
    a, _ = gelu(fc1(x))
    return fc2(a.astype(np.float32))


def checkpoint_save(path, ref_path, training=False):
    """Trains one SGD step (so the parameters differ from their init), saves, and records the output."""
    fc1, fc2 = _ckpt_layers(training)
    x = rng_for("ckpt-x").standard_normal((7, 64)).astype(np.float32)
    y = _mlp_out(fc1, fc2, x)
    fc2.backward(np.ones_like(y))
    for p in fc2.parameters():
        p.data -= 0.1 * p.grad
    y = _mlp_out(fc1, fc2, x)
    tp.save_checkpoint(path, {"fc1": fc1, "fc2": fc2})
    if dist.get_rank() == 0:
        np.save(ref_path, y)


def checkpoint_load(path, ref_path, training=False):
    fc1, fc2 = _ckpt_layers(training)
    tp.load_checkpoint(path, {"fc1": fc1, "fc2": fc2})
    x = rng_for("ckpt-x").standard_normal((7, 64)).astype(np.float32)
    y = _mlp_out(fc1, fc2, x)
    ref = np.load(ref_path)
    close(y, ref, "float32", f"output after reloading at {dist.get_world_size()} ranks")
    # shard-level state dicts round-trip too
    sd = fc2.state_dict()
    fc2.load_state_dict({k: v + 0 for k, v in sd.items()})
    try:
        fc2.load_state_dict({"weight": np.zeros((3, 3), np.float32), "bias": sd["bias"]})
        raise AssertionError("a wrong-shape shard was accepted")
    except ValueError as exc:
        assert "shape" in str(exc)


# ------------------------------------------------------------------------------------------- bad input


def expect_raises(exc_type, fn, *words):
    try:
        fn()
    except exc_type as exc:
        msg = str(exc)
        for w in words:
            assert w in msg, f"message {msg!r} lacks {w!r}"
        return
    raise AssertionError(f"{fn} did not raise {exc_type.__name__}")


def check_bad_input():
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(True)
    lin = tp.Linear(8 * p, 4 * p, seed=1)
    row = tp.LinearAllreduce(lin)
    # wrong shard width: every rank passes the full width (so no collective is reached); the message names
    # the shard, the full size and the rank
    if p > 1:
        expect_raises(ValueError, lambda: row(np.zeros((2, 8 * p), np.float32)), "must be 8",
                      f"shard of in_features={8 * p}: 8 at rank {r} of {p}", f"got {8 * p}")
        col = tp.LinearLayer(tp.Linear(8, 17 * p))
        col(np.zeros((2, 8), np.float32))
        expect_raises(ValueError, lambda: col.backward(np.zeros((2, 17 * p), np.float32)), "must be 17",
                      f"shard of out_features={17 * p}: 17 at rank {r} of {p}", f"got {17 * p}")
        col.backward(np.zeros((2, 17), np.float32))  # the rejected call kept the saved input
        expect_raises(RuntimeError, lambda: col.backward(np.zeros((2, 17), np.float32)), "second time", "retain=True")
    # the repr names the shard, as the example
    tp.set_training_mode(False)
    shard = tp.shard_ranges(4100, p)[r][0][1]
    text = repr(tp.LinearLayer.from_init(16, 4100))
    assert text == (f"LinearLayer(in_features=16, out_features=4100, shard={shard}/4100 at rank {r} of {p}, "
                    "mode=inference, bias=True)"), text
    if p == 3 and r == 2:
        assert shard == 1348
    tp.set_training_mode(True)
    # heads that do not tile the split dim: every rank raises, naming the dim and the heads
    expect_raises(ValueError, lambda: tp.LinearLayer(tp.Linear(8, 4 * p + 1), num_heads=4), str(4 * p + 1), "4 heads")
    # ranks that disagree on the grain or the heads: every rank raises
    if p > 1:
        expect_raises(ValueError, lambda: tp.LinearLayer(tp.Linear(8, 64 * p), tp_grain_size=1 + r), "tp_grain_size")
        expect_raises(ValueError, lambda: tp.LinearLayer(tp.Linear(8, 6 * p), num_heads=3 if r else 2), "partition")
        if r == 0:
            expect_raises(ValueError, lambda: tp.LinearLayer(tp.Linear(8, 4 * p + 1), num_heads=4), "4 heads")
        else:
            expect_raises(ValueError, lambda: tp.LinearLayer(tp.Linear(8, 4 * p + 1)), "failed on ranks [0]")
    # a group this rank is not in
    if p > 1:
        sub = dist.new_group([0])
        if r != 0:
            expect_raises(ValueError, lambda: tp.LinearLayer(lin, sub), "not a member")
        else:
            tp.LinearLayer(lin, sub)
    # mismatched modes across ranks: every rank raises
    if p > 1:
        tp.set_training_mode(r == 0)
        expect_raises(ValueError, lambda: tp.LinearLayer(tp.Linear(16 * p, 64 * p)), "training mode")
        tp.set_training_mode(True)
        # mismatched layer shapes across ranks
        expect_raises(ValueError, lambda: tp.LinearAllreduce(tp.Linear(8 * p, 4 + r)), "disagree")
    expect_raises(TypeError, lambda: tp.LinearLayer(lin, mp_group="world"), "ProcessGroup")
    print(f"rank {r}: bad-input checks passed", flush=True)


# ------------------------------------------------------------------------------------------- DeepSpeed's other classes
# The expected shards follow DeepSpeed 0.19's code, re-implemented here in NumPy: get_shard_size_list,
# _partition_logical_tensor (SubParam layers) and prepare_tp_fused_qkvw (fused QKV layouts).


def ds_sizes(n, p, kv=None, grain=64, name=None):
    """DeepSpeed's get_shard_size_list (see tests/test_partition.py for the line-by-line version)."""
    from test_partition import ds_get_shard_size_list
    return ds_get_shard_size_list(n, p, kv, grain, name)


def ds_split(a, sizes, axis):
    return np.split(a, np.cumsum(sizes)[:-1], axis=axis)


def ds_partition_logical(full, logical, dim, sub_sizes, p, r, kv=None, grain=64, name=None):
    """DeepSpeed's SubParam partition: view the weight as its logical shape, split every sub-parameter along
    dim by get_shard_size_list, keep rank r's piece of each, concatenate, flatten to 2-d."""
    view = full.reshape(logical)
    pieces = [ds_split(sp, ds_sizes(sp.shape[dim], p, kv, grain, name), dim)[r]
              for sp in ds_split(view, sub_sizes, dim)]
    out = np.concatenate(pieces, axis=dim)
    return out.reshape(-1, out.shape[-1]) if full.ndim == 2 else out.reshape(-1)


def ds_fused_qkv(full, kind, p, r, kv, n_embd=None, num_heads=None, grain=64):
    """DeepSpeed's prepare_tp_fused_qkvw for the bloom, glm/qwen and phi3 layouts."""
    if kind == "bloomtype":
        return ds_split(full, ds_sizes(full.shape[0], p, kv, grain), 0)[r]
    if kind in ("glmtype", "qwentype") and kv == 2:
        kv_dim = (full.shape[0] - n_embd) // kv
        blocks = ds_split(full, [n_embd, kv_dim, kv_dim], 0)
    elif kind in ("glmtype", "qwentype"):
        blocks = ds_split(full, [full.shape[0] // 3] * 3, 0)
    else:  # phi3type
        kv_dim = kv * (n_embd // num_heads)
        blocks = ds_split(full, [full.shape[0] - 2 * kv_dim, kv_dim, kv_dim], 0)
    return np.concatenate([ds_split(b, ds_sizes(b.shape[0], p, kv, grain), 0)[r] for b in blocks], axis=0)


class _Conv1D:
    """GPT-2's transformers.pytorch_utils.Conv1D in NumPy: weight [in, out], y = x @ W + b."""

    def __init__(self, nx, nf, rng):
        self.weight = rng.standard_normal((nx, nf))
        self.bias = rng.standard_normal(nf)


def check_uc_meta(layer, full_params):
    """Applying every rank's pieces from universal_checkpoint_meta() to the full parameters gives this rank's
    shard, and the pieces of all ranks tile the parameter (what a converter relies on)."""
    r = layer.tp_index
    for key, meta in layer.universal_checkpoint_meta().items():
        full = full_params[key]
        param = getattr(layer, key)
        assert getattr(param, "ds_autotp_universal_checkpoint_meta") == meta
        d = meta["pieces_dim"]
        mine = np.concatenate([np.take(full, range(o, o + s), axis=d) for o, s in meta["pieces"][r]], axis=d)
        assert np.array_equal(mine, param.data), (key, meta["pieces"])
        if not meta["replicated"]:
            covered = sorted(x for rank in meta["pieces"] for o, s in rank for x in range(o, o + s))
            assert covered == list(range(full.shape[d])), key
        assert meta["original_shape"] == full.shape and meta["target_partition_shape"] == param.data.shape
        if meta["sub_param_shard_widths"] is not None:
            assert [sum(w) for w in meta["sub_param_shard_widths"]] == list(meta["sub_param_sizes"])


def check_autotp_layers():
    from tplinear import autotp as A

    p, r = dist.get_world_size(), dist.get_rank()
    rng = rng_for("autotp", p)
    for training in (True, False):
        tp.set_training_mode(training)
        grain = 1 if training else 64
        x = rng.standard_normal((3, 4, 20))
        x64 = x
        # LmHeadLinearAllreduce: the full input, "lm_head" never takes the global heads
        tp.set_num_kv_heads(4)
        head = tp.Linear(20, 11, dtype="float64", seed=3)
        lm = A.LmHeadLinearAllreduce(head)
        assert lm.name == "lm_head" and not lm.input_is_parallel
        assert [s for (_, s), in lm.shard_ranges()] == ds_sizes(20, p, 4, grain, "lm_head")
        close(lm(x), x64 @ head.weight.data.T + head.bias.data, "float64", "lm_head forward")
        dy = rng.standard_normal((3, 4, 11))
        close(lm.backward(dy), dy @ head.weight.data, "float64", "lm_head dX (full)")
        tp.set_num_kv_heads(None)
        check_uc_meta(lm, {"weight": head.weight.data, "bias": head.bias.data})

        # SubParamLinearLayer: shapes ((q, k, v), -1), (3, -1), and a 3-d view (2, (a, b, c), -1)
        for shape, dim, rows in ((((24, 8, 8), -1), 0, 40), ((3, -1), 0, 30), ((2, (6, 4, 4), -1), 1, 28)):
            lin = tp.Linear(20, rows, dtype="float64", seed=5)
            layer = A.SubParamLinearLayer(lin, shape=shape, partition_dim=dim, name="attn.qkv")
            logical = layer._logical
            sizes = layer._subparam_sizes
            want_w = ds_partition_logical(lin.weight.data, logical, dim, sizes, p, r, None, grain, "attn.qkv")
            want_b = ds_partition_logical(lin.bias.data, logical[:-1], dim, sizes, p, r, None, grain, "attn.qkv")
            assert np.array_equal(layer.weight.data, want_w), (shape, layer.shard_ranges())
            assert np.array_equal(layer.bias.data, want_b), shape
            y_full = x64 @ lin.weight.data.T + lin.bias.data
            rows_mine = [i for o, s in layer.shard_ranges()[r] for i in range(o, o + s)]
            close(layer(x), y_full[..., rows_mine], "float64", f"SubParamLinearLayer {shape}")
            layer.gather_output = True
            close(layer(x), y_full, "float64", f"SubParamLinearLayer {shape} gathered")
            with tp.GatherReplacedLayerParams(layer.parameters(), layer):
                assert np.array_equal(layer.weight.data, lin.weight.data)
            assert np.array_equal(layer.weight.data, want_w)
            check_uc_meta(layer, {"weight": lin.weight.data, "bias": lin.bias.data})
        # SubParamLinearAllreduce over (-1, (a, b)) of the input dim
        lin = tp.Linear(20, 7, dtype="float64", seed=6)
        row = A.SubParamLinearAllreduce(lin, shape=(-1, (12, 8)), input_is_parallel=False)
        want = ds_partition_logical(lin.weight.data, (7, 20), 1, (12, 8), p, r, None, grain)
        assert np.array_equal(row.weight.data, want)
        close(row(x), x64 @ lin.weight.data.T + lin.bias.data, "float64", "SubParamLinearAllreduce")
        check_uc_meta(row, {"weight": lin.weight.data, "bias": lin.bias.data})

        # fused QKV layouts against prepare_tp_fused_qkvw
        for kind, n, kv, nh, module in (("bloomtype", 3 * 4 * 5, 4, 4, "BloomBlock()"),
                                        ("glmtype", 3 * 20, 4, 4, "GLMBlock()"),
                                        ("qwentype", 20 + 2 * 2 * 5, 2, 4, "QWenBlock()"),
                                        ("phi3type", 20 + 2 * 2 * 5, 2, 4, "Phi3DecoderLayer()")):
            lin = tp.Linear(20, n, dtype="float64", seed=7)
            tp.set_num_kv_heads(kv)
            layer = A.fused_LinearLayer(lin, fused_module=module, num_heads=nh, num_kv_heads=kv)
            assert layer.fused_type == kind
            want = ds_fused_qkv(lin.weight.data, kind, p, r, kv, n_embd=20, num_heads=nh, grain=grain)
            assert np.array_equal(layer.weight.data, want), (kind, layer.shard_ranges())
            # the same from DeepSpeed's model-wide kv heads alone (no heads of the layer's own)
            if kind != "phi3type":
                plain = A.fused_LinearLayer(lin, fused_type=kind)
                assert np.array_equal(plain.weight.data, want), kind
            tp.set_num_kv_heads(None)
            layer.gather_output = True
            close(layer(x), x64 @ lin.weight.data.T + lin.bias.data, "float64", f"fused {kind}")
        for kind in ("codegentype", "bigcodetype"):
            expect_raises(NotImplementedError, lambda: A.fused_LinearLayer(lin, fused_type=kind), kind)

        # GPT-2 Conv1D: weight [in, out], y = x @ W + b; shards keep that layout
        conv = _Conv1D(20, 13, rng_for("conv", training))
        col = A.conv_LinearLayer(conv)
        (o, s), = col.shard_ranges()[r]
        assert [sz for (_, sz), in col.shard_ranges()] == ds_sizes(13, p, None, grain)
        assert col.weight.data.shape == (20, s) and np.array_equal(col.weight.data, conv.weight[:, o:o + s])
        assert (col.in_features, col.out_features) == (20, 13) and col.local_shape == (20, s)
        y_full = x64 @ conv.weight + conv.bias
        close(col(x), y_full[..., o:o + s], "float64", "conv_LinearLayer forward")
        dy = rng.standard_normal((3, 4, 13))
        close(col.backward(dy[..., o:o + s]), dy @ conv.weight.T, "float64", "conv_LinearLayer dX")
        dw = x64.reshape(-1, 20).T @ dy.reshape(-1, 13)
        assert col.weight.grad.shape == (20, s)
        close(col.weight.grad, dw[:, o:o + s], "float64", "conv_LinearLayer dW")
        close(col.bias.grad, dy.reshape(-1, 13).sum(0)[o:o + s], "float64", "conv_LinearLayer db")
        sd = col.consolidated_state_dict()
        assert np.array_equal(sd["weight"], conv.weight) and np.array_equal(sd["bias"], conv.bias)
        check_uc_meta(col, {"weight": conv.weight, "bias": conv.bias})
        conv2 = _Conv1D(13, 20, rng_for("conv2", training))
        rowc = A.Conv_LinearALlreduce(conv2)
        (o, s), = rowc.shard_ranges()[r]
        assert rowc.weight.data.shape == (s, 20) and np.array_equal(rowc.weight.data, conv2.weight[o:o + s])
        h = rng.standard_normal((5, 13))
        close(rowc(h[:, o:o + s]), h @ conv2.weight + conv2.bias, "float64", "Conv_LinearAllreduce forward")
        dy = rng.standard_normal((5, 20))
        close(rowc.backward(dy), (dy @ conv2.weight.T)[:, o:o + s], "float64", "Conv_LinearAllreduce dX")
        close(rowc.weight.grad, (h.T @ dy)[o:o + s], "float64", "Conv_LinearAllreduce dW")
        check_uc_meta(rowc, {"weight": conv2.weight, "bias": conv2.bias})

        # the model-level description
        info = A.collect_universal_checkpoint_info({"lm_head": lm, "attn.c_attn": col, "attn.c_proj": rowc,
                                                    "mlp.down_proj": row, "qkv": layer})
        assert info["parameter_with_row_parallelism_patterns"] == sorted(
            [r"^lm_head\.weight$", r"^attn\.c_proj\.weight$", r"^mlp\.down_proj\.weight$"])
        assert info["tp_replicated_parameter_patterns"] == sorted(
            [r"^lm_head\.bias$", r"^attn\.c_proj\.bias$", r"^mlp\.down_proj\.bias$"])
        assert r"^mlp\.down_proj\.weight$" in info["sub_param_shard_widths"]
        assert info["universal_checkpoint_version"] == 0.4 and info["vocabulary_parameter_patterns"] == []
    print(f"rank {r}: DeepSpeed layer checks passed", flush=True)
