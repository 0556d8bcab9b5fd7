"""Checks that run inside each rank of a world spawned by tests/test_sequence_parallel.py: the
sequence-parallel layers, the vocab-parallel embedding and cross-entropy, and a 2-block decoder, each
against a float64 single-process reference of the whole computation (every rank draws the same random
inputs, fresh on every test run: TPLINEAR_TEST_SEED)."""
import os
import sys

import numpy as np

import tplinear as tp
import tplinear.distributed as dist
from tplinear import _C
from tp_checks import close, expect_raises, rng_for

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import decoder_sp  # noqa: E402  (examples/decoder_sp.py: the model the decoder check runs)


def cross_entropy_ref(logits, targets, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """torch.nn.functional.cross_entropy with class-index targets (its documented formula: the target mixed
    with a uniform distribution by label_smoothing, the mean over the targets that are not ignored), in
    float64 on the whole logits: (loss, its gradient with respect to the logits; reduction "none": of the
    sum)."""
    vocab = logits.shape[-1]
    x = np.asarray(logits, dtype=np.float64).reshape(-1, vocab)
    t = np.asarray(targets).reshape(-1)
    m = x.max(axis=1, keepdims=True)
    logp = x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))
    valid = t != ignore_index
    tt = np.where(valid, t, 0)
    rows = np.arange(len(t))
    per = (1 - label_smoothing) * -logp[rows, tt] + label_smoothing * -logp.mean(axis=1)
    per = np.where(valid, per, 0.0)
    grad = np.exp(logp) - label_smoothing / vocab
    grad[rows, tt] -= (1 - label_smoothing)
    grad[~valid] = 0.0
    if reduction == "mean":
        n = valid.sum()
        loss = per.sum() / n if n else np.nan
        grad = grad / n if n else grad
    elif reduction == "sum":
        loss = per.sum()
    else:
        loss = per.reshape(np.shape(targets))
    return loss, grad.reshape(np.shape(logits))


def _rows(seq_len):
    return tp.sequence_ranges(seq_len, dist.get_world_size())[dist.get_rank()]


# ------------------------------------------------------------------------------------------- layers


def check_sp_column(dtype, seq_len, rest, in_f, out_f, bias, training, overlap, give_len):
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(training)
    rng = rng_for("spcol", dtype, seq_len, rest, in_f, out_f, bias, training)
    lin = tp.Linear(in_f, out_f, bias=bias, dtype=dtype, seed=int(rng.integers(1 << 30)))
    w64 = lin.weight.data.astype(np.float64)
    layer = tp.LinearLayer(lin, sequence_parallel=True, tp_overlap_comm=overlap)
    assert "sequence_parallel=True" in repr(layer)
    (fo, fs), = layer.shard_ranges()[r]
    so, ss = _rows(seq_len)
    x = rng.standard_normal((seq_len,) + rest + (in_f,)).astype(dtype)
    dy = rng.standard_normal((seq_len,) + rest + (out_f,)).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    y = layer(x[so:so + ss], seq_len=seq_len) if give_len else layer(x[so:so + ss])
    what = f"SP column p={p} S={seq_len} rest={rest} overlap={overlap} seq_len={give_len} {dtype}"
    ref = x64 @ w64.T + (lin.bias.data if bias else 0)
    close(y, ref[..., fo:fo + fs], dtype, what + " forward")
    dx = layer.backward(dy[..., fo:fo + fs])
    close(dx, (dy64 @ w64)[so:so + ss], dtype, what + " dX")  # the sum over ranks of dY_r W_r, this rank's rows
    dw = dy64.reshape(-1, out_f).T @ x64.reshape(-1, in_f)
    close(layer.weight.grad, dw[fo:fo + fs], dtype, what + " dW")
    if bias:
        close(layer.bias.grad, dy64.reshape(-1, out_f).sum(0)[fo:fo + fs], dtype, what + " db")
    return y, dx


def check_sp_row(dtype, seq_len, rest, in_f, out_f, bias, training):
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(training)
    rng = rng_for("sprow", dtype, seq_len, rest, in_f, out_f, bias, training)
    lin = tp.Linear(in_f, out_f, bias=bias, dtype=dtype, seed=int(rng.integers(1 << 30)))
    w64 = lin.weight.data.astype(np.float64)
    layer = tp.LinearAllreduce(lin, sequence_parallel=True)
    (fo, fs), = layer.shard_ranges()[r]
    so, ss = _rows(seq_len)
    x = rng.standard_normal((seq_len,) + rest + (in_f,)).astype(dtype)
    dy = rng.standard_normal((seq_len,) + rest + (out_f,)).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    what = f"SP row p={p} S={seq_len} rest={rest} {dtype}"
    y = layer(x[..., fo:fo + fs])
    close(y, (x64 @ w64.T + (lin.bias.data if bias else 0))[so:so + ss], dtype, what + " forward")
    dx = layer.backward(dy[so:so + ss])
    close(dx, (dy64 @ w64)[..., fo:fo + fs], dtype, what + " dX")
    dw = dy64.reshape(-1, out_f).T @ x64.reshape(-1, in_f)
    close(layer.weight.grad, dw[:, fo:fo + fs], dtype, what + " dW")
    if bias:  # the replicated bias gets the whole gradient, the same on every rank
        close(layer.bias.grad, dy64.reshape(-1, out_f).sum(0), dtype, what + " db")


def check_sp_layers():
    p = dist.get_world_size()
    for dtype in ("float32", "float64"):
        for seq_len in (7, 2 * p + 1, max(p - 1, 1), 0):   # uneven, a rank without rows, an empty sequence
            for rest in ((), (3,)):
                for training, (in_f, out_f) in ((True, (10, 13)), (False, (70, 130))):
                    check_sp_row(dtype, seq_len, rest, in_f, out_f, True, training)
                    for overlap in (False, True):
                        for give_len in (False, True):
                            check_sp_column(dtype, seq_len, rest, in_f, out_f, give_len, training, overlap,
                                            give_len)
    # gather_output=True after a sequence-parallel column layer: the whole output; backward takes it whole
    tp.set_training_mode(True)
    lin = tp.Linear(6, 10, dtype="float64", seed=8)
    rng = rng_for("sp-gather")
    x, dy = rng.standard_normal((5, 2, 6)), rng.standard_normal((5, 2, 10))
    so, ss = _rows(5)
    col = tp.LinearLayer(lin, sequence_parallel=True, gather_output=True)
    close(col(x[so:so + ss], seq_len=5), x @ lin.weight.data.T + lin.bias.data, "float64", "SP gather_output forward")
    close(col.backward(dy), (dy @ lin.weight.data)[so:so + ss], "float64", "SP gather_output dX")
    close(col.weight.grad, (dy.reshape(-1, 10).T @ x.reshape(-1, 6))[col.shard_ranges()[dist.get_rank()][0][0]:][
        :col.local_shape[0]], "float64", "SP gather_output dW")
    # strided inputs: a transposed view as the row layer's input, a sliced one as the column layer's
    tp.set_training_mode(True)
    lin = tp.Linear(12, 9, dtype="float64", seed=3)
    rng = rng_for("sp-strided")
    x = np.asfortranarray(rng.standard_normal((9, 12)))
    so, ss = _rows(9)
    col = tp.LinearLayer(lin, sequence_parallel=True)
    (fo, fs), = col.shard_ranges()[dist.get_rank()]
    close(col(x[so:so + ss]), (x @ lin.weight.data.T + lin.bias.data)[:, fo:fo + fs], "float64", "strided column")
    print(f"rank {dist.get_rank()}: sequence-parallel layer checks passed", flush=True)


def check_frozen():
    """requires_grad=False (torch's frozen parameters): no .grad for it, the other parameter's and dX as before,
    with and without sequence parallelism; a frozen embedding table gets no gradient either."""
    r = dist.get_rank()
    tp.set_training_mode(True)
    rng = rng_for("frozen")
    lin = tp.Linear(6, 10, dtype="float64", seed=4)
    x, dy = rng.standard_normal((5, 6)), rng.standard_normal((5, 10))
    so, ss = _rows(5)
    for sp in (False, True):
        for frozen in ("weight", "both"):
            layer = tp.LinearLayer(lin, sequence_parallel=sp)
            (fo, fs), = layer.shard_ranges()[r]
            layer.weight.requires_grad = False
            layer.bias.requires_grad = frozen != "both"
            layer(x[so:so + ss] if sp else x)
            dx = layer.backward(dy[:, fo:fo + fs])
            close(dx, (dy @ lin.weight.data)[so:so + ss] if sp else dy @ lin.weight.data, "float64", f"frozen {frozen} dX")
            assert layer.weight.grad is None
            if frozen == "both":
                assert layer.bias.grad is None
            else:
                close(layer.bias.grad, dy.sum(0)[fo:fo + fs], "float64", "bias beside a frozen weight")
    emb = tp.VocabParallelEmbedding(9, 4, dtype="float64")
    emb.weight.requires_grad = False
    emb(np.array([1, 2]))
    emb.backward(np.ones((2, 4)))
    assert emb.weight.grad is None


def check_sp_bad_input():
    p, r = dist.get_world_size(), dist.get_rank()
    lin = tp.Linear(8, 6, seed=1)
    expect_raises(ValueError, lambda: tp.LinearAllreduce(lin, sequence_parallel=True, input_is_parallel=False),
                  "input_is_parallel")
    col = tp.LinearLayer(lin, sequence_parallel=True)
    expect_raises(ValueError, lambda: col(np.zeros(8, np.float32)), "at least 2-d")
    expect_raises(ValueError, lambda: tp.LinearLayer(lin)(np.zeros((3, 8), np.float32), seq_len=3), "seq_len")
    so, ss = _rows(5)
    # seq_len that does not match this rank's rows: raised on every rank before any collective
    expect_raises(ValueError, lambda: col(np.zeros((ss + 1, 8), np.float32), seq_len=5), f"must be {ss}",
                  f"rank {r} of {p}")
    y = col(np.zeros((ss, 2, 8), np.float32), seq_len=5)
    expect_raises(ValueError, lambda: col.backward(np.zeros((6, 2, y.shape[-1]), np.float32)), "leading dimensions")
    col.backward(np.zeros(y.shape, np.float32))  # the rejected call kept the saved input
    print(f"rank {r}: sequence-parallel bad-input checks passed", flush=True)


# ------------------------------------------------------------------------------------------- embedding


def check_embedding(dtype, training, vocab, hidden, ids_shape, sequence_parallel):
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(training)
    rng = rng_for("emb", dtype, training, vocab, hidden, ids_shape, sequence_parallel)
    seed = int(rng.integers(1 << 30))
    emb = tp.VocabParallelEmbedding(vocab, hidden, seed=seed, dtype=dtype, sequence_parallel=sequence_parallel)
    table = np.empty((vocab, hidden), dtype=dtype)
    _C.init_normal(table, seed, 0, 1.0, 0, 0, hidden)  # the whole table: every rank's rows are slices of it
    (vo, vs), = emb.shard_ranges()[r]
    assert emb.vocab_range() == (vo, vo + vs) and emb.weight.data.shape == (vs, hidden)
    assert [s for (_, s), in emb.shard_ranges()] == [s for (_, s), in tp.shard_ranges(vocab, p, training=training)]
    assert np.array_equal(emb.weight.data, table[vo:vo + vs]), "the shard is not its rows of the N(0, 1) table"
    what = f"embedding p={p} V={vocab} ids={ids_shape} sp={sequence_parallel} {dtype}"
    for idt in (np.int64, np.int32):
        ids = rng.integers(0, vocab, ids_shape).astype(idt)
        if ids.size:
            ids.flat[0] = ids.flat[-1] = vocab - 1  # a repeated id and the last row
        y = emb(ids)
        want, gfull = table[ids], rng.standard_normal(ids_shape + (hidden,)).astype(dtype)
        g = gfull
        if sequence_parallel:  # this rank's rows
            so, ss = _rows(ids_shape[0])
            want, g = want[so:so + ss], gfull[so:so + ss]
        assert y.shape == want.shape and np.array_equal(y, want), what + " forward"  # exact: one rank adds its row
        emb.zero_grad()
        emb.backward(g)
        ref = np.zeros((vocab, hidden))
        np.add.at(ref, ids, gfull)
        close(emb.weight.grad, ref[vo:vo + vs], dtype, what + " backward")
    with tp.GatherReplacedLayerParams(emb.parameters(), emb):
        assert np.array_equal(emb.weight.data, table)
    sd = emb.consolidated_state_dict()
    assert list(sd) == ["weight"] and np.array_equal(sd["weight"], table)
    other = tp.VocabParallelEmbedding(vocab, hidden, seed=seed + 1, dtype=dtype)
    other.load_consolidated_state_dict(sd)
    assert np.array_equal(other.weight.data, table[vo:vo + vs])
    # a given table
    given = rng.standard_normal((vocab, hidden)).astype(dtype)
    emb2 = tp.VocabParallelEmbedding(vocab, hidden, dtype=dtype, weight=given)
    assert np.array_equal(emb2.weight.data, given[vo:vo + vs])


def check_embeddings():
    p = dist.get_world_size()
    for dtype in ("float32", "float64"):
        for training, vocab in ((True, 37), (False, 130), (True, max(p - 1, 1))):   # uneven; fewer rows than ranks
            for sp in (False, True):
                for ids_shape in ((7,), (2 * p + 1, 3), (1, 2)):
                    check_embedding(dtype, training, vocab, 6, ids_shape, sp)
    # N(0, 1): the moments of a larger table
    tp.set_training_mode(True)
    emb = tp.VocabParallelEmbedding(4000, 50, seed=11, dtype="float64")
    with tp.GatherReplacedLayerParams(emb.parameters(), emb):
        w = emb.weight.data.ravel()
        assert abs(w.mean()) < 0.01 and abs(w.std() - 1) < 0.01 and abs(np.mean(w**4) / w.var()**2 - 3) < 0.05
    assert "embed_tokens" in str(tp.collect_universal_checkpoint_info({"embed_tokens": emb})["vocabulary_parameter_patterns"])
    # bad ids: every rank raises, before any collective
    expect_raises(ValueError, lambda: emb(np.array([1, 4000])), "out of range", "4000")
    expect_raises(ValueError, lambda: emb(np.array([-1])), "out of range")
    expect_raises(TypeError, lambda: emb(np.array([1.0])), "int32 or int64")
    expect_raises(ValueError, lambda: tp.VocabParallelEmbedding(10, 4, weight=np.zeros((10, 5))), "[10, 4]")
    emb(np.array([1, 2]))
    expect_raises(ValueError, lambda: emb.backward(np.zeros((3, 50))), "shape (2, 50)")
    print(f"rank {dist.get_rank()}: embedding checks passed", flush=True)


# ------------------------------------------------------------------------------------------- cross-entropy


def check_cross_entropy_case(dtype, vocab, shape, training, smoothing, reduction, ignored, scale=3.0,
                             inplace=False, give_ranges=False, tdtype=np.int64):
    p, r = dist.get_world_size(), dist.get_rank()
    rng = rng_for("ce", dtype, vocab, shape, training, smoothing, reduction, ignored, scale, inplace)
    logits = (rng.standard_normal(shape + (vocab,)) * scale).astype(dtype)
    targets = rng.integers(0, vocab, shape).astype(tdtype)
    if ignored == "all":
        targets[...] = -100
    elif ignored:
        targets.flat[::3] = -100
    ranges = tp.shard_ranges(vocab, p, training=training)
    (vo, vs), = ranges[r]
    mine = logits[..., vo:vo + vs]  # a strided view of the whole logits
    if inplace:
        mine = mine.copy()  # (at p=1 the slice is the whole array, which the reference still reads)
    loss, grad = tp.vocab_parallel_cross_entropy(mine, targets, label_smoothing=smoothing, reduction=reduction,
                                                 grad_out=mine if inplace else None,
                                                 vocab_ranges=ranges if give_ranges else None)
    ref_loss, ref_grad = cross_entropy_ref(logits, targets, label_smoothing=smoothing, reduction=reduction)
    what = f"cross-entropy p={p} V={vocab} {shape} e={smoothing} {reduction} ignored={ignored} x{scale} {dtype}"
    if ignored == "all" and reduction == "mean":
        assert np.isnan(loss), what
    else:
        close(np.atleast_1d(loss), np.atleast_1d(ref_loss), dtype, what + " loss")
    assert grad.shape == mine.shape and grad.dtype == np.dtype(dtype)
    close(grad, ref_grad[..., vo:vo + vs], dtype, what + " gradient")
    if inplace:
        assert grad is mine
    # the same loss on every rank
    every = np.empty(p)
    dist.all_gather_into_tensor(every, np.array([np.nansum(np.atleast_1d(loss))], dtype=np.float64))
    assert np.all(every == every[0]), every


def check_cross_entropies():
    p = dist.get_world_size()
    for dtype in ("float32", "float64"):
        for training, vocab in ((True, 37), (False, 130), (True, max(p - 1, 1) + 1)):
            for smoothing in (0.0, 0.1, 1.0):
                for reduction in ("mean", "sum", "none"):
                    check_cross_entropy_case(dtype, vocab, (5, 2), training, smoothing, reduction, ignored=True)
            check_cross_entropy_case(dtype, vocab, (7,), training, 0.0, "mean", ignored=False, give_ranges=True,
                                     tdtype=np.int32)
            check_cross_entropy_case(dtype, vocab, (6,), training, 0.2, "mean", ignored="all")
            check_cross_entropy_case(dtype, vocab, (6,), training, 0.2, "sum", ignored="all")
            check_cross_entropy_case(dtype, vocab, (3, 2, 2), training, 0.1, "mean", ignored=True, inplace=True)
            check_cross_entropy_case(dtype, vocab, (0,), training, 0.0, "sum", ignored=False)
        # logits up to 1e4 in magnitude: stable (the float64 reference of the same float32 values)
        for scale in (1e3, 1e4):
            check_cross_entropy_case(dtype, 37, (9,), True, 0.1, "mean", ignored=True, scale=scale)
    # bad input: every rank raises before any collective
    logits = np.zeros((4, tp.shard_ranges(37, p, training=True)[dist.get_rank()][0][1]), np.float32)
    expect_raises(ValueError, lambda: tp.vocab_parallel_cross_entropy(logits, np.array([0, 1, 2, 37])), "37",
                  "out of range")
    expect_raises(ValueError, lambda: tp.vocab_parallel_cross_entropy(logits, np.array([0, 1, 2])), "shape")
    expect_raises(ValueError, lambda: tp.vocab_parallel_cross_entropy(logits, np.zeros(4, int), label_smoothing=1.5),
                  "label_smoothing")
    expect_raises(ValueError, lambda: tp.vocab_parallel_cross_entropy(logits, np.zeros(4, int), reduction="avg"),
                  "reduction")
    expect_raises(TypeError, lambda: tp.vocab_parallel_cross_entropy(logits, np.zeros(4, np.float32)), "int")
    expect_raises(ValueError, lambda: tp.vocab_parallel_cross_entropy(logits, np.zeros(4, int),
                                                                       grad_out=logits[:, ::-1]), "overlaps")
    print(f"rank {dist.get_rank()}: cross-entropy checks passed", flush=True)


# ------------------------------------------------------------------------------------------- decoder


def decoder_reference(model_args, ids, targets, norms, smoothing):
    """The decoder of examples/decoder_sp.py on one process in float64: (loss, {name: gradient})."""
    vocab, hidden, ffn, blocks, seed = (model_args[k] for k in ("vocab", "hidden", "ffn", "blocks", "seed"))
    eps = 1e-6
    table = np.empty((vocab, hidden))
    _C.init_normal(table, seed, 0, 1.0, 0, 0, hidden)
    ups = [tp.Linear(hidden, ffn, dtype="float64", seed=seed + 2 * i + 1) for i in range(blocks)]
    downs = [tp.Linear(ffn, hidden, dtype="float64", seed=seed + 2 * i + 2) for i in range(blocks)]
    head = tp.Linear(hidden, vocab, bias=False, dtype="float64", seed=seed + 2 * blocks + 1).weight.data
    h = table[ids]
    saved = []
    for i in range(blocks):
        n, ns = decoder_sp.rms_norm(h, norms[i], eps)
        a = n @ ups[i].weight.data.T + ups[i].bias.data
        g, da = decoder_sp.gelu(a)
        h = h + g @ downs[i].weight.data.T + downs[i].bias.data
        saved.append((n, ns, g, da))
    n, ns = decoder_sp.rms_norm(h, norms[-1], eps)
    loss, dlogits = cross_entropy_ref(n @ head.T, targets, label_smoothing=smoothing)
    flat = (lambda a: a.reshape(-1, a.shape[-1]))
    grads = {"head": flat(dlogits).T @ flat(n)}
    dh, grads["norm"] = decoder_sp.rms_norm_backward(dlogits @ head, norms[-1], ns)
    for i in reversed(range(blocks)):
        bn, bns, g, da = saved[i]
        grads[f"down{i}.w"] = flat(dh).T @ flat(g)
        grads[f"down{i}.b"] = flat(dh).sum(0)
        dpre = (dh @ downs[i].weight.data) * da
        grads[f"up{i}.w"] = flat(dpre).T @ flat(bn)
        grads[f"up{i}.b"] = flat(dpre).sum(0)
        dx, grads[f"norm{i}"] = decoder_sp.rms_norm_backward(dpre @ ups[i].weight.data, norms[i], bns)
        dh = dh + dx
    emb = np.zeros_like(table)
    np.add.at(emb, ids, dh)
    grads["embed"] = emb
    return loss, grads


def check_decoder(dtype="float64", seq_len=7, batch=2):
    """The 2-block decoder with sequence parallelism and the vocab-parallel loss, without sequence
    parallelism, and with the whole logits gathered: the same loss and gradients as the float64 reference."""
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(True)
    rng = rng_for("decoder", dtype, seq_len, batch)
    args = dict(vocab=37, hidden=8, ffn=10, blocks=2, seed=int(rng.integers(1 << 20)))
    ids = rng.integers(0, args["vocab"], (seq_len, batch))
    targets = rng.integers(0, args["vocab"], (seq_len, batch))
    targets[0, 0] = -100
    norms = [rng.uniform(0.5, 1.5, args["hidden"]) for _ in range(args["blocks"] + 1)]
    ref_loss, ref = decoder_reference(args, ids, targets, norms, 0.1)
    losses = {}
    for sp, vp in ((True, True), (False, True), (False, False)):
        for overlap in ((False, True) if sp else (False,)):
            model = decoder_sp.Decoder(args["vocab"], args["hidden"], args["ffn"], args["blocks"], sequence_parallel=sp,
                                       vocab_parallel=vp, dtype=dtype, seed=args["seed"], tp_overlap_comm=overlap)
            for param, value in zip(model.norms(), norms):
                param.data = value.astype(dtype)
            what = f"decoder p={p} sequence_parallel={sp} vocab_parallel={vp} overlap={overlap}"
            loss = model.forward(ids, targets, label_smoothing=0.1)
            model.backward()
            close([loss], [ref_loss], dtype, what + " loss")
            losses[(sp, vp, overlap)] = loss
            (vo, vs), = model.embed.shard_ranges()[r]
            close(model.embed.weight.grad, ref["embed"][vo:vo + vs], dtype, what + " embedding grad")
            (ho, hs), = model.head.shard_ranges()[r]
            close(model.head.weight.grad, ref["head"][ho:ho + hs], dtype, what + " head grad")
            for i, (norm, up, down) in enumerate(model.blocks):
                (fo, fs), = up.shard_ranges()[r]
                close(up.weight.grad, ref[f"up{i}.w"][fo:fo + fs], dtype, what + f" up{i} dW")
                close(up.bias.grad, ref[f"up{i}.b"][fo:fo + fs], dtype, what + f" up{i} db")
                close(down.weight.grad, ref[f"down{i}.w"][:, fo:fo + fs], dtype, what + f" down{i} dW")
                close(down.bias.grad, ref[f"down{i}.b"], dtype, what + f" down{i} db")
                close(norm.grad, ref[f"norm{i}"], dtype, what + f" norm{i} grad")
            close(model.norm.grad, ref["norm"], dtype, what + " final norm grad")
            # what sequence parallelism is for: no rank holds a whole activation between blocks or the logits
            if sp:
                h = model.embed(ids)
                assert h.shape == (_rows(seq_len)[1], batch, args["hidden"]), h.shape
                logits = model.head(decoder_sp.rms_norm(h, model.norm.data, 1e-6)[0], seq_len=seq_len)
                assert logits.shape == (seq_len, batch, model.head.local_shape[0])
    vals = list(losses.values())
    assert max(vals) - min(vals) <= 1e-12 * abs(vals[0]), losses
    print(f"rank {r}: decoder checks passed", flush=True)
