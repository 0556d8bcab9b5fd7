"""Checks that run inside each rank of a world spawned by tests/test_torch_sequence.py: tplinear.torch's
sequence-parallel modules, vocab-parallel embedding and cross-entropy (autograd), the sequence mappings
and parallelize's embedding_rowwise style, against unsharded float64 torch references."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import tplinear as tp
import tplinear.distributed as dist
import tplinear.torch as tpt
from torch_checks import ETA, U, close, close_half, full_grad, hf_model, pieces_index, same_bits_everywhere, seed


def _rows(n):
    return tp.sequence_ranges(n, dist.get_world_size())[dist.get_rank()]


def check_sp_modules(dtype, seq_len, rest, in_f, out_f, training, overlap):
    """LinearLayer -> GELU -> LinearAllreduce with sequence_parallel=True against the nn.Linear pair."""
    tp.set_training_mode(training)
    seed("tsp", str(dtype), seq_len, rest, in_f, out_f, training, overlap)
    up, down = nn.Linear(in_f, out_f).to(dtype), nn.Linear(out_f, in_f).to(dtype)
    ref_up, ref_down = copy.deepcopy(up).double(), copy.deepcopy(down).double()
    col = tpt.LinearLayer(up, sequence_parallel=True, tp_overlap_comm=overlap)
    row = tpt.LinearAllreduce(down, sequence_parallel=True)
    assert "sequence_parallel=True" in repr(col)
    x = torch.randn((seq_len,) + rest + (in_f,), dtype=dtype)
    g = torch.randn((seq_len,) + rest + (in_f,), dtype=dtype)
    so, ss = _rows(seq_len)
    xr = x[so:so + ss].clone().requires_grad_()
    y = row(F.gelu(col(xr, seq_len=seq_len if overlap else None)))
    xd = x.double().requires_grad_()
    yd = ref_down(F.gelu(ref_up(xd)))
    what = f"torch SP p={dist.get_world_size()} S={seq_len} {dtype} overlap={overlap}"
    close(y, yd[so:so + ss], dtype, what + " forward")
    y.backward(g[so:so + ss])
    yd.backward(g.double())
    close(xr.grad, xd.grad[so:so + ss], dtype, what + " dX")
    for mine, ref, name in ((col, ref_up, "up"), (row, ref_down, "down")):
        close(full_grad(mine.weight), ref.weight.grad, dtype, f"{what} {name} dW")
        close(full_grad(mine.bias), ref.bias.grad, dtype, f"{what} {name} db")


def check_sp_half(dtype, seq_len, in_f, out_f, overlap):
    """bfloat16 / float16 sequence-parallel column and row layers, each against the unsharded float32 nn.Linear
    on the same half values rounded once, per element within close_half's bound; roundings counted as
    check_half_layer counts them (a reduce-scatter of rounded partial sums as an all-reduce: 2 more; the row
    layer's bias added after it: 1 more); the all-gathers move bits."""
    tp.set_training_mode(True)
    seed("tsp-half", str(dtype), seq_len, in_f, out_f, overlap)
    so, ss = _rows(seq_len)
    reduced = 2 if dist.get_world_size() > 1 else 0
    for row in (False, True):
        src = nn.Linear(in_f, out_f).to(dtype)
        ref = copy.deepcopy(src).float()
        layer = (tpt.LinearAllreduce(src, sequence_parallel=True) if row else
                 tpt.LinearLayer(src, sequence_parallel=True, tp_overlap_comm=overlap))
        idx = pieces_index(layer)
        x = torch.randn(seq_len, 2, in_f).to(dtype)
        dy = torch.randn(seq_len, 2, out_f).to(dtype)
        xin = (x[..., idx] if row else x[so:so + ss]).clone().requires_grad_()
        y = layer(xin) if row or not overlap else layer(xin, seq_len=seq_len)
        x32 = x.float().requires_grad_()
        y32 = ref(x32)
        y32.backward(dy.float())
        mine = (slice(so, so + ss), Ellipsis) if row else (Ellipsis, idx)  # this rank's part of Y and dY
        y.backward(dy[mine].contiguous())
        w64, x64, dy64 = ref.weight.detach().double(), x.double(), dy.double()
        ty = x64.abs() @ w64.abs().t() + ref.bias.detach().double().abs()
        what = f"SP {'row' if row else 'col'} p={dist.get_world_size()} S={seq_len} {dtype} overlap={overlap}"
        close_half(y, y32.to(dtype)[mine], ty[mine], in_f, 2 + (reduced + 1 if row else 0), dtype, what + " forward")
        tdx = dy64.abs() @ w64.abs()
        dx_at = (Ellipsis, idx) if row else (slice(so, so + ss), Ellipsis)
        close_half(xin.grad, x32.grad.to(dtype)[dx_at], tdx[dx_at], out_f, 2 + (0 if row else reduced), dtype,
                   what + " dX")
        m = seq_len * 2
        tdw = dy64.reshape(m, out_f).abs().t() @ x64.reshape(m, in_f).abs()
        close_half(full_grad(layer.weight), ref.weight.grad.to(dtype), tdw, m, 2, dtype, what + " dW")
        close_half(full_grad(layer.bias), ref.bias.grad.to(dtype), dy64.reshape(m, out_f).abs().sum(0), m, 2, dtype,
                   what + " db")


def check_mappings():
    """scatter / gather / reduce-scatter of sequence rows and their gradients."""
    p, r = dist.get_world_size(), dist.get_rank()
    seed("mappings")
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    so, ss = _rows(7)
    a = x.clone().requires_grad_()
    part = tpt.scatter_to_sequence_parallel_region(a)
    assert torch.equal(part, x[so:so + ss])
    part.backward(torch.ones_like(part))
    assert torch.equal(a.grad, torch.ones_like(x))  # every rank's rows gathered: the whole gradient
    b = x[so:so + ss].clone().requires_grad_()
    whole = tpt.gather_from_sequence_parallel_region(b, seq_len=7)
    assert torch.equal(whole, x)
    whole.backward(torch.full_like(whole, 2.0))
    assert torch.equal(b.grad, torch.full_like(b, 2.0 * p))  # the gradient reduce-scattered: a sum over ranks
    c = x.clone().requires_grad_()
    mine = tpt.reduce_scatter_to_sequence_parallel_region(c)
    assert torch.allclose(mine, p * x[so:so + ss])
    mine.backward(torch.ones_like(mine))
    assert torch.equal(c.grad, torch.ones_like(x))
    del r


def check_embedding(dtype, training, vocab, sequence_parallel, padding_idx):
    tp.set_training_mode(training)
    seed("temb", str(dtype), training, vocab, sequence_parallel, padding_idx)
    ref = nn.Embedding(vocab, 6, padding_idx=padding_idx).to(dtype)
    emb = tpt.VocabParallelEmbedding.from_embedding(copy.deepcopy(ref), sequence_parallel=sequence_parallel)
    ref = ref.double()
    ids = torch.randint(0, vocab, (7, 3))
    ids[0, 0] = vocab - 1
    if padding_idx is not None:
        ids[1, 1] = padding_idx
    y = emb(ids)
    want = ref(ids)
    so, ss = _rows(7)
    if sequence_parallel:
        want = want[so:so + ss]
    what = f"torch embedding p={dist.get_world_size()} V={vocab} sp={sequence_parallel} pad={padding_idx}"
    close(y, want, dtype, what + " forward")
    g = torch.randn(7, 3, 6, dtype=torch.float64)
    y.backward((g[so:so + ss] if sequence_parallel else g).to(dtype))
    ref(ids).backward(g)
    close(full_grad(emb.weight), ref.weight.grad, dtype, what + " grad")
    lo, hi = emb.vocab_range()
    assert tuple(emb.weight.shape) == (hi - lo, 6)


def _cross_entropy_case(logits, dtype, smoothing, reduction):
    """Targets for logits [5, 2, vocab] (float64; one ignored), this rank's vocabulary slice of them in dtype
    through vocab_parallel_cross_entropy, and F.cross_entropy of the whole float64 logits: (targets, (vo, vs),
    mine, loss, full, want), mine and full requiring grad."""
    p, r, vocab = dist.get_world_size(), dist.get_rank(), logits.shape[-1]
    targets = torch.randint(0, vocab, (5, 2))
    targets[0, 1] = -100
    (vo, vs), = tp.shard_ranges(vocab, p, training=True)[r]
    mine = logits[..., vo:vo + vs].to(dtype).requires_grad_()
    loss = tpt.vocab_parallel_cross_entropy(mine, targets, label_smoothing=smoothing, reduction=reduction)
    full = logits.clone().requires_grad_()
    want = F.cross_entropy(full.reshape(-1, vocab), targets.reshape(-1), label_smoothing=smoothing,
                           reduction=reduction)
    return targets, (vo, vs), mine, loss, full, want


def check_cross_entropy(dtype, vocab, smoothing, reduction):
    p = dist.get_world_size()
    seed("tce", str(dtype), vocab, smoothing, reduction)
    logits = torch.randn(5, 2, vocab, dtype=torch.float64) * 3
    targets, (vo, vs), mine, loss, full, want = _cross_entropy_case(logits, dtype, smoothing, reduction)
    if reduction == "none":
        want = want.reshape(5, 2)
    what = f"torch cross-entropy p={p} V={vocab} e={smoothing} {reduction} {dtype}"
    assert loss.dtype == dtype and loss.shape == want.shape
    close(loss.reshape(-1), want.reshape(-1), dtype, what + " loss")
    w = torch.rand(want.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    loss.backward(w.to(dtype))
    want.backward(w)
    close(mine.grad, full.grad[..., vo:vo + vs], dtype, what + " gradient")


def check_vocab_half(dtype, vocab=37, smoothing=0.1):
    """The vocab-parallel embedding and cross-entropy in bfloat16 / float16 (sequence-parallel and not),
    against float64 from the same half values. The lookup is exact (the same bits as nn.Embedding in dtype);
    the table's gradient is each row's dY rows summed in float32, rounded once (close_half with one rounding,
    k = the number of tokens). The loss: float32 exponentials (relative error < 2^-22 each), sums in float64,
    rounded once: |err| <= u|loss| + 2^-20 (1 + max|logit|) per token, and as much for a mean or a sum per
    token it covers; its gradient: float32 math, rounded once, times the incoming gradient in dtype (one more
    rounding): |err| <= 2u|g| + 2^-20 (|g| + w), w the token's weight. Torch's own F.cross_entropy in dtype
    meets that loss bound + u max|log p| per token (it rounds the log-probabilities that label smoothing
    averages). The loss is the same bits on every rank."""
    p = dist.get_world_size()
    tp.set_training_mode(True)
    for sp in (False, True):
        seed("temb-half", str(dtype), vocab, sp)
        ref = nn.Embedding(vocab, 6).to(dtype)
        emb = tpt.VocabParallelEmbedding.from_embedding(copy.deepcopy(ref), sequence_parallel=sp)
        ids = torch.randint(0, vocab // 3, (7, 3))  # repeated ids: rows with several tokens' gradients
        so, ss = _rows(7)
        rows = slice(so, so + ss) if sp else slice(None)
        y = emb(ids)
        assert y.dtype == dtype and torch.equal(y, ref(ids)[rows]), f"embedding {dtype} sp={sp}: not the lookup"
        if not sp:
            same_bits_everywhere(y)
        g = torch.randn(7, 3, 6).to(dtype)
        y.backward(g[rows])
        want = torch.zeros(vocab, 6, dtype=torch.float64).index_add_(0, ids.reshape(-1), g.double().reshape(-1, 6))
        terms = torch.zeros(vocab, 6, dtype=torch.float64).index_add_(0, ids.reshape(-1), g.double().abs().reshape(-1, 6))
        close_half(full_grad(emb.weight), want, terms, ids.numel(), 1, dtype, f"embedding {dtype} sp={sp} grad")
    for reduction in ("mean", "sum", "none"):
        seed("tce-half", str(dtype), vocab, reduction)
        logits = (torch.randn(5, 2, vocab) * 3).to(dtype).double()
        targets, (vo, vs), mine, loss, full, want = _cross_entropy_case(logits, dtype, smoothing, reduction)
        theirs = F.cross_entropy(logits.to(dtype).reshape(-1, vocab), targets.reshape(-1), label_smoothing=smoothing,
                                 reduction=reduction)
        what = f"cross-entropy p={p} {reduction} {dtype}"
        assert loss.dtype == dtype == theirs.dtype, (what, loss.dtype, theirs.dtype)
        want = want.reshape(loss.shape)
        tokens = 1 if reduction != "sum" else int((targets != -100).sum())
        lim = U[dtype] * want.abs() + tokens * 2.0 ** -20 * (1 + logits.abs().max()) + ETA[dtype]
        # torch rounds each log-probability to dtype before label smoothing averages them: u max|log p| more
        lsm = torch.log_softmax(logits, -1).abs().max()
        for got, who, more in ((loss, "tplinear", 0), (theirs.reshape(loss.shape), "torch", tokens * U[dtype] * lsm)):
            err = (got.double() - want.detach()).abs() - more
            assert bool((err <= lim).all()), f"{what} {who} loss: worst excess {(err - lim).max().item():.3g}"
        same_bits_everywhere(loss)
        w = (torch.rand(want.shape) if reduction == "none" else torch.tensor(1.7)).to(dtype)
        loss.backward(w)
        want.backward(w.double())
        per_token = w.double().reshape(5, 2, 1) if reduction == "none" else w.double()
        if reduction == "mean":
            per_token = per_token / int((targets != -100).sum())
        ref_g = full.grad[..., vo:vo + vs]
        lim = 2 * U[dtype] * ref_g.abs() + 2.0 ** -20 * (ref_g.abs() + per_token) + 2 * ETA[dtype]
        err = (mine.grad.double() - ref_g).abs()
        assert bool((err <= lim).all()), f"{what} gradient: worst excess {(err - lim).max().item():.3g}"


class TinyDecoder(nn.Module):
    """Embedding -> 2 blocks (RMSNorm -> up -> GELU -> down, residual) -> RMSNorm -> LM head, in torch."""

    def __init__(self, vocab=37, hidden=8, ffn=10, blocks=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden, eps=1e-6) for _ in range(blocks + 1))
        self.ups = nn.ModuleList(nn.Linear(hidden, ffn) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(ffn, hidden) for _ in range(blocks))
        self.head = nn.Linear(hidden, vocab, bias=False)
        for n in self.norms:
            nn.init.uniform_(n.weight, 0.5, 1.5)

    def forward(self, ids, seq_len=None):
        h = self.embed(ids)
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            n = norm(h)
            h = h + down(F.gelu(up(n, seq_len=seq_len) if seq_len else up(n)))
        n = self.norms[-1](h)
        return self.head(n, seq_len=seq_len) if seq_len else self.head(n)


def check_decoder(dtype=torch.float64, seq_len=7):
    """The torch decoder with sequence parallelism and the vocab-parallel loss equals the unsharded model:
    loss and every gradient (the norms' all-reduced over the group by a hook, as Megatron does)."""
    p = dist.get_world_size()
    tp.set_training_mode(True)
    seed("tdecoder", str(dtype), seq_len)
    model = TinyDecoder().to(dtype)
    ref = copy.deepcopy(model).double()
    model.embed = tpt.VocabParallelEmbedding.from_embedding(model.embed, sequence_parallel=True)
    for i in range(len(model.ups)):
        model.ups[i] = tpt.LinearLayer(model.ups[i], sequence_parallel=True)
        model.downs[i] = tpt.LinearAllreduce(model.downs[i], sequence_parallel=True)
    model.head = tpt.LinearLayer(model.head, name="lm_head", sequence_parallel=True)
    for norm in model.norms:  # each rank's norm gradient covers its rows only
        tpt.allreduce_gradients(norm)
    ids = torch.randint(0, 37, (seq_len, 2))
    targets = torch.randint(0, 37, (seq_len, 2))
    logits = model(ids, seq_len=seq_len)
    assert logits.shape == (seq_len, 2, model.head.local_shape[0])  # never the whole vocabulary
    loss = tpt.vocab_parallel_cross_entropy(logits, targets, label_smoothing=0.1)
    want = F.cross_entropy(ref(ids).reshape(-1, 37), targets.reshape(-1), label_smoothing=0.1)
    what = f"torch decoder p={p}"
    close(loss.reshape(1), want.reshape(1), dtype, what + " loss")
    loss.backward()
    want.backward()
    refs = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        close(full_grad(param), refs[name].grad, dtype, f"{what} grad of {name}")


def check_parallelize_embedding(kind="llama"):
    """parallelize with the embedding_rowwise style: the vocab-parallel embedding in a transformers model,
    the same logits, loss and gradients as the unsharded model."""
    tp.set_training_mode(True)
    model = hf_model(kind, torch.float64)
    ref = copy.deepcopy(model)
    prefix = "model." if hasattr(model, "model") else "transformer."
    name = "embed_tokens" if kind != "gpt2" else "wte"
    plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
            "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise", name: "embedding_rowwise"}
    tied = hf_model(kind, torch.float64)
    tied.lm_head.weight = tied.get_submodule(prefix + name).weight
    try:
        tpt.parallelize(tied, plan=plan)
        raise AssertionError("a tied embedding was sharded")
    except ValueError as exc:
        assert "tied" in str(exc), exc
    tpt.parallelize(model, plan=plan)
    emb = model.get_submodule(prefix + name)
    assert isinstance(emb, tpt.VocabParallelEmbedding), type(emb)
    seed("pe-input", kind)
    ids = torch.randint(0, 97, (2, 7))
    out, expect = model(ids, labels=ids), ref(ids, labels=ids)
    close(out.logits, expect.logits, torch.float64, "parallelize embedding_rowwise logits")
    out.loss.backward()
    expect.loss.backward()
    refs = dict(ref.named_parameters())
    for pname, param in model.named_parameters():
        close(full_grad(param), refs[pname].grad, torch.float64, f"parallelize embedding_rowwise grad of {pname}")
