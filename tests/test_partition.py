"""The partition rule against DeepSpeed 0.19's, implemented here from its source
(deepspeed/module_inject/tp_shard.py: get_shard_size / get_shard_size_list), over n = 1..300 and p = 1..8,
in training (grain 1) and inference (grain 64), with and without heads; the GQA rule; packed blocks; bad
arguments. When DeepSpeed itself is installed, the same tables are checked against it too."""
import importlib.util
import itertools
import subprocess
import sys
import textwrap

import pytest

import tplinear as tp

NS = range(1, 301)
PS = range(1, 9)


@pytest.fixture(autouse=True)
def _defaults():
    """Every test starts and ends with the process defaults (inference, no global heads, default grain)."""
    def reset():
        tp.set_training_mode(False)
        tp.set_num_kv_heads(None)
        tp.set_tp_grain_size(None)
    reset()
    yield
    reset()


# ------------------------------------------------------------------------------ DeepSpeed's rule, from its source

def ds_get_shard_size(total_size, mp_size, num_kv_heads, tp_grain_size, name=None, rank=0):
    """deepspeed.module_inject.tp_shard.get_shard_size (0.19), line by line."""
    last_linear = ["lm_head", "embed_out"]
    moe_mlp_layer = ["gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"]
    not_moe_mlp_layer = True
    if name is not None and any(s in str(name) for s in moe_mlp_layer):
        not_moe_mlp_layer = False
    if (num_kv_heads is not None and total_size % num_kv_heads == 0 and "mlp" not in str(name)
            and str(name) not in last_linear and not_moe_mlp_layer):
        my_slices = (num_kv_heads // mp_size) + (1 if rank < (num_kv_heads % mp_size) else 0)
        return total_size * my_slices // num_kv_heads
    if total_size >= tp_grain_size:
        grain_size, remainder = divmod(total_size, tp_grain_size)
        shard_size = (grain_size // mp_size + (1 if rank < (grain_size % mp_size) else 0)) * tp_grain_size
        if rank == mp_size - 1:
            shard_size += remainder
        return shard_size
    return total_size // mp_size + (1 if rank < (total_size % mp_size) else 0)


def ds_get_shard_size_list(total_size, mp_size, num_kv_heads, tp_grain_size, name=None):
    sizes = [ds_get_shard_size(total_size, mp_size, num_kv_heads, tp_grain_size, name, r) for r in range(mp_size)]
    assert sum(sizes) == total_size
    return sizes


def sizes_of(pieces):
    """Per-rank sizes of an unpacked shard_ranges result, checking that the pieces tile the dimension."""
    off = 0
    out = []
    for rank_pieces in pieces:
        (o, s), = rank_pieces
        assert o == off, pieces
        off += s
        out.append(s)
    return out


# ------------------------------------------------------------------------------ the tables

@pytest.mark.parametrize("training", [True, False])
def test_tables_without_heads_match_deepspeed(training):
    grain = 1 if training else 64
    for n, p in itertools.product(NS, PS):
        got = sizes_of(tp.shard_ranges(n, p, training=training))
        assert got == ds_get_shard_size_list(n, p, None, grain), (n, p, training)


@pytest.mark.parametrize("grain", [1, 64])
def test_tables_with_the_global_kv_heads_match_deepspeed(grain):
    """set_num_kv_heads is DeepSpeed's model-wide num_kv_heads: used where it divides n and the name
    allows heads, at either grain (the head rule applies in training too)."""
    names = [None, "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head", "gate_proj",
             "transformer.h.0.attn.c_attn", "embed_out"]
    for heads in (1, 2, 3, 4, 5, 8, 12, 32):
        tp.set_num_kv_heads(heads)
        for n, p, name in itertools.product(NS, PS, names):
            got = sizes_of(tp.shard_ranges(n, p, grain=grain, name=name))
            assert got == ds_get_shard_size_list(n, p, heads, grain, name), (n, p, heads, grain, name)


@pytest.mark.parametrize("grain", [1, 64])
def test_the_layers_own_heads_match_deepspeed_where_they_tile_and_raise_where_not(grain):
    for heads in (1, 2, 3, 4, 5, 8, 12, 32):
        for n, p in itertools.product(NS, PS):
            if n % heads:
                with pytest.raises(ValueError, match=f"dimension {n} is not made of {heads}"):
                    tp.shard_ranges(n, p, grain=grain, num_heads=heads)
                continue
            want = ds_get_shard_size_list(n, p, heads, grain)
            # the layer's heads apply whatever the name (an MLP-like name does not switch them off)
            for name in (None, "mlp.attn_like"):
                assert sizes_of(tp.shard_ranges(n, p, grain=grain, num_heads=heads, name=name)) == want
            # with GQA the unit is the KV group: num_kv_heads decides, num_heads is any multiple
            assert sizes_of(tp.shard_ranges(n, p, grain=grain, num_heads=3 * heads, num_kv_heads=heads)) == want


def test_issue_examples():
    tp.set_training_mode(True)
    assert sizes_of(tp.shard_ranges(130, 3)) == [44, 43, 43]
    assert sizes_of(tp.shard_ranges(129, 4)) == [33, 32, 32, 32]
    assert sizes_of(tp.shard_ranges(101, 2, name="lm_head")) == [51, 50]
    tp.set_num_kv_heads(4)  # DeepSpeed 0.19: q_proj, 768 rows, 4 KV heads, 3 ranks
    assert sizes_of(tp.shard_ranges(768, 3, name="self_attn.q_proj")) == [384, 192, 192]
    tp.set_num_kv_heads(None)
    assert sizes_of(tp.shard_ranges(768, 3, num_heads=12, num_kv_heads=4, head_dim=64)) == [384, 192, 192]


def test_grain_defaults_and_overrides():
    assert tp.get_tp_grain_size() == 64 and tp.get_tp_grain_size(training=True) == 1
    tp.set_training_mode(True)
    assert tp.get_tp_grain_size() == 1 and tp.get_tp_grain_size(training=False) == 64
    assert sizes_of(tp.shard_ranges(100, 3)) == [34, 33, 33]
    assert sizes_of(tp.shard_ranges(100, 3, grain=64)) == [64, 0, 36]
    assert sizes_of(tp.shard_ranges(100, 3, training=False)) == [64, 0, 36]
    tp.set_tp_grain_size(8)
    assert tp.get_tp_grain_size() == 8 and tp.get_tp_grain_size(training=False) == 8
    assert sizes_of(tp.shard_ranges(100, 3)) == [32, 32, 36]
    assert sizes_of(tp.shard_ranges(100, 3, grain=1)) == [34, 33, 33]
    for bad in (0, -1):
        with pytest.raises(ValueError, match="tp_grain_size"):
            tp.set_tp_grain_size(bad)
        with pytest.raises(ValueError, match="tp_grain_size"):
            tp.shard_ranges(10, 2, grain=bad)
    with pytest.raises(TypeError, match="tp_grain_size"):
        tp.set_tp_grain_size(2.5)


# ------------------------------------------------------------------------------ the GQA rule

GQA = [(nh, nkv) for nkv in (1, 2, 3, 4, 5, 8) for nh in (nkv, 2 * nkv, 4 * nkv, 8 * nkv)]


def test_attention_heads_deal_kv_heads_and_q_heads_follow_their_group():
    for (nh, nkv), p in itertools.product(GQA, PS):
        heads = tp.attention_heads(nh, nkv, p)
        assert len(heads) == p
        group = nh // nkv
        q_next = kv_next = 0
        for r, (q, kv) in enumerate(heads):
            assert isinstance(q, range) and isinstance(kv, range)
            assert q.start == q_next and kv.start == kv_next
            assert len(kv) == nkv // p + (1 if r < nkv % p else 0)  # KV heads dealt whole
            # every query head of this rank uses one of this rank's KV heads, and no other rank's does
            assert [j // group for j in q] == sorted(k for k in kv for _ in range(group))
            q_next, kv_next = q.stop, kv.stop
        assert q_next == nh and kv_next == nkv
    assert tp.attention_heads(8, None, 3) == tp.attention_heads(8, 8, 3)


@pytest.mark.parametrize("training", [True, False])
def test_every_attention_projection_holds_the_heads_attention_heads_names(training):
    """q_proj, k_proj, v_proj, a packed QKV (from block_heads, from head_dim alone, from the KV groups
    alone) and o_proj (the row layer's in_features) give each rank exactly its attention_heads ranges."""
    hd = 4
    for (nh, nkv), p in itertools.product(GQA, PS):
        heads = tp.attention_heads(nh, nkv, p)
        kw = dict(training=training, num_heads=nh, num_kv_heads=nkv, head_dim=hd)
        q_ranges = [[(q.start * hd, len(q) * hd)] for q, _ in heads]
        kv_ranges = [[(kv.start * hd, len(kv) * hd)] for _, kv in heads]
        assert tp.shard_ranges(nh * hd, p, **kw) == q_ranges           # q_proj and o_proj
        assert tp.shard_ranges(nkv * hd, p, **kw) == kv_ranges          # k_proj, v_proj
        blocks = [nh * hd, nkv * hd, nkv * hd]
        want = [[q[0], (nh * hd + k[0][0], k[0][1]), ((nh + nkv) * hd + k[0][0], k[0][1])]
                for q, k in zip(q_ranges, kv_ranges)]
        for extra in (dict(block_heads=[nh, nkv, nkv]), dict(num_heads=nh, num_kv_heads=nkv, head_dim=hd),
                      dict(num_heads=nh, num_kv_heads=nkv)):
            got = tp.shard_ranges(sum(blocks), p, training=training, block_sizes=blocks, **extra)
            assert got == want, (nh, nkv, p, extra)
        # DeepSpeed's model-wide num_kv_heads on separate or packed projections gives the same
        tp.set_num_kv_heads(nkv)
        assert tp.shard_ranges(nh * hd, p, training=training, name="self_attn.q_proj") == q_ranges
        assert tp.shard_ranges(nkv * hd, p, training=training, name="self_attn.k_proj") == kv_ranges
        assert tp.shard_ranges(nh * hd, p, training=training, name="self_attn.o_proj") == q_ranges
        assert tp.shard_ranges(sum(blocks), p, training=training, block_sizes=blocks, name="qkv_proj") == want
        tp.set_num_kv_heads(None)


def test_issue_case_packed_qkv_with_ten_q_and_five_kv_heads_at_three_ranks():
    """set_num_kv_heads(5), block_heads=[10, 5, 5] at 3 ranks used to split Q 4/3/3 and KV 2/2/1."""
    tp.set_num_kv_heads(5)
    hd = 4
    got = tp.shard_ranges(80, 3, block_sizes=[40, 20, 20], block_heads=[10, 5, 5])
    assert [[s // hd for _, s in pieces] for pieces in got] == [[4, 2, 2], [4, 2, 2], [2, 1, 1]]


def test_heads_that_cannot_follow_their_kv_group_raise():
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads=4"):
        tp.attention_heads(10, 4, 2)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads=4"):
        tp.shard_ranges(40, 2, num_heads=10, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"block 0 of 3 \(size 40\).*10 heads cannot follow their KV group"):
        tp.shard_ranges(72, 3, block_sizes=[40, 16, 16], block_heads=[10, 4, 4])
    with pytest.raises(ValueError, match="packed blocks have 4 KV heads .* the layer has 2"):
        tp.shard_ranges(80, 2, block_sizes=[48, 16, 16], block_heads=[12, 4, 4], num_heads=12, num_kv_heads=2)
    with pytest.raises(ValueError, match="head_dim"):
        tp.shard_ranges(700, 2, num_heads=12, num_kv_heads=4, head_dim=64)
    with pytest.raises(ValueError, match="block 1 of size 4 is not made of heads of head_dim=8"):
        tp.shard_ranges(36, 2, block_sizes=[32, 4], num_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="do not tile"):
        tp.shard_ranges(38, 2, block_sizes=[30, 8], block_heads=[4, 4])


def test_bad_arguments():
    with pytest.raises(ValueError, match="p must be a positive int"):
        tp.shard_ranges(10, 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        tp.shard_ranges(-1, 2)
    with pytest.raises(TypeError, match="n must be an int"):
        tp.shard_ranges(10.0, 2)
    with pytest.raises(ValueError, match=r"sum to 9, but the split dimension is 10"):
        tp.shard_ranges(10, 2, block_sizes=[4, 5])
    with pytest.raises(ValueError, match="block_heads needs block_sizes"):
        tp.shard_ranges(10, 2, block_heads=[2])
    with pytest.raises(ValueError, match="2 head counts for 3 blocks"):
        tp.shard_ranges(12, 2, block_sizes=[4, 4, 4], block_heads=[2, 2])
    with pytest.raises(TypeError, match="name must be a str"):
        tp.shard_ranges(12, 2, name=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tp.set_num_kv_heads(0)
    assert tp.shard_ranges(0, 3) == [[(0, 0)]] * 3


# ------------------------------------------------------------------------------ DeepSpeed itself, when installed

def test_against_installed_deepspeed():
    """The same tables against DeepSpeed's own get_shard_size_list (skipped without deepspeed). In a fresh
    interpreter that imports DeepSpeed (and torch) before tplinear: a CUDA build of tplinear loads the
    CUDA toolkit's NCCL, which a newer torch cannot use once it is loaded."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    code = textwrap.dedent("""
        import itertools
        from deepspeed.module_inject import tp_shard
        import tplinear as tp
        for grain, heads in itertools.product((1, 64), (None, 4, 5)):
            meta = tp_shard.AutoTPMeta(num_kv_heads=heads, tp_grain_size=grain)
            tp.set_num_kv_heads(heads)
            for n, p, name in itertools.product(range(1, 301), range(1, 9),
                                                (None, "self_attn.q_proj", "mlp.down_proj", "lm_head")):
                want = tp_shard.get_shard_size_list(n, p, meta, name)
                got = [s for (_, s), in tp.shard_ranges(n, p, grain=grain, name=name)]
                assert got == want, (n, p, grain, heads, name, got, want)
        print("deepspeed agrees")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "deepspeed agrees" in proc.stdout, proc.stdout + proc.stderr


def test_layer_splits_against_installed_deepspeed():
    """SubParam and fused-QKV shards against DeepSpeed's own partition functions (_infer_subparam_logical_shapes,
    _subparam_shard_widths, _partition_logical_tensor, prepare_tp_fused_qkvw), for every rank at p = 1..4 and
    both grains (skipped without deepspeed; a fresh interpreter, as above)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    code = textwrap.dedent("""
        import itertools
        import torch
        from deepspeed.module_inject import layers as L, tp_shard
        from deepspeed.module_inject.fusedqkv_utils import prepare_tp_fused_qkvw
        import numpy as np
        import tplinear as tp
        from tplinear import autotp as A

        def mine(full, pieces, dim=0):
            return np.concatenate([np.take(full, range(o, o + s), axis=dim) for o, s in pieces], axis=dim)

        checked = 0
        for grain, kv, p in itertools.product((1, 64), (None, 2, 4), range(1, 5)):
            meta = tp_shard.AutoTPMeta(num_kv_heads=kv, tp_grain_size=grain, n_embd=20, num_attention_heads=4)
            tp.set_num_kv_heads(kv)
            # sub-parameters: column specs (output dims) and a row spec (the input dim)
            for wshape, shape, dim, name in (((40, 20), ((24, 8, 8), -1), 0, "attn.qkv"),
                                             ((30, 20), (3, -1), 0, "qkv"), ((28, 20), (2, (6, 4, 4), -1), 1, None),
                                             ((12, 20), (2, -1), 0, "mlp.gate_up"), ((7, 20), (-1, (12, 8)), 1, None)):
                full = torch.arange(wshape[0] * wshape[1], dtype=torch.float64).reshape(wshape)
                logical, output, sizes, _ = L._infer_subparam_logical_shapes(wshape, shape, dim, name)
                ours = A.subparam_layout(wshape, shape, dim, name)
                assert tuple(logical) == ours[0] and tuple(output) == ours[1], (shape, logical, ours)
                assert (tuple(sizes) if sizes else None) == ours[2], (shape, sizes, ours)
                widths = L._subparam_shard_widths(sizes or (logical[dim],), p, meta, name)
                pieces, our_widths = A.subparam_pieces(ours[0], dim, ours[2], p, grain=grain, name=name)
                assert [list(w) for w in widths] == our_widths, (shape, widths, our_widths)
                row = dim == len(logical) - 1
                for r in range(p):
                    ds = L._partition_logical_tensor(full.reshape(logical), dim, p, r, widths, subparam_sizes=sizes)
                    ds = (ds.reshape(wshape[0], -1) if row else ds.reshape(-1, wshape[1])).numpy()
                    assert np.array_equal(mine(full.numpy(), pieces[r], 1 if row else 0), ds), (shape, p, r)
                    checked += 1
            # fused QKV layouts
            for kind, module, n in (("bloomtype", "BloomBlock()", 60), ("glmtype", "GLMBlock()", 60),
                                    ("qwentype", "QWenBlock()", 40), ("phi3type", "Phi3DecoderLayer()", 40)):
                if kind == "phi3type" and kv is None:
                    continue
                if kind in ("glmtype", "qwentype") and kv == 2 and n == 60:
                    continue
                if kind == "qwentype" and kv != 2:
                    continue
                full = torch.arange(n * 20, dtype=torch.float64).reshape(n, 20)
                kw = A.fused_qkv_split(kind, n, 20, 4 if kind == "phi3type" else None, kv if kind == "phi3type" else None)
                pieces = tp.shard_ranges(n, p, grain=grain, block_sizes=kw.get("block_sizes"),
                                         num_heads=kw.get("num_heads"), num_kv_heads=kw.get("num_kv_heads"))
                for r in range(p):
                    ds = prepare_tp_fused_qkvw(module, full, p, r, meta).numpy()
                    assert np.array_equal(mine(full.numpy(), pieces[r]), ds), (kind, kv, p, r)
                    checked += 1
        assert checked > 100, checked
        print("deepspeed layers agree", checked)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "deepspeed layers agree" in proc.stdout, proc.stdout + proc.stderr
