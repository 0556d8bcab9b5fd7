"""Checks that run inside each rank of a world spawned by tests/test_torch.py.

Every rank builds the same full modules from the same seed, keeps an unsharded float64 copy as the
reference, tensor-parallelises the other, and compares outputs, input gradients and every parameter's
gradient (gathered) against the reference. Inputs are fresh on every test run (TPLINEAR_TEST_SEED).
"""
import copy
import os
import warnings
import zlib

import torch
from torch import nn

import tplinear as tp
import tplinear.distributed as dist
import tplinear.torch as tpt

warnings.filterwarnings("ignore")
SEED = int(os.environ.get("TPLINEAR_TEST_SEED", "0"))
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Parameters after AdamW steps, float64: Adam divides each gradient element by its own running RMS (+ eps 1e-8),
# so a gradient element that is ~0 in exact arithmetic moves its weight by up to lr * rounding / eps; a
# different (equally right) summation order -- another BLAS kernel, another CPU -- gives the weights a norm-wise
# relative error of a few 1e-12 (seen: 3.95e-12 on GPT-2's c_proj). A wrong clip or a lost reduction errs by
# 1e-3 or more.
TOL_AFTER_ADAM = 1e-9


def seed(*key):
    torch.manual_seed((SEED * 1000003 + zlib.crc32(repr(key).encode())) % (2**63))


def rel(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    den = ref.norm().item()
    return (got - ref).norm().item() / (den if den > 0 else 1.0)


def close(got, ref, dtype, what, tol=None):
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = rel(got, ref)
    tol = TOL[dtype] if tol is None else tol
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"
    return err


def init(timeout=120.0):
    dist.init_process_group(timeout=timeout)
    torch.set_num_threads(1)
    return dist.get_rank(), dist.get_world_size()


def full_grad(param):
    """param's gradient as the full tensor (gathered when param is a shard)."""
    layer = getattr(param, "tp_layer", None)
    return param.grad if layer is None else layer.full_tensor(param, param.grad)


def close_grads(model, ref, what, tol):
    """Every parameter's gradient (gathered) against the unsharded ref's; where ref's is zero or absent, so
    must model's be."""
    refs = dict(ref.named_parameters())
    for name, q in model.named_parameters():
        g, rg = full_grad(q), refs[name].grad
        if rg is None or rg.abs().max() == 0:
            assert g is None or g.abs().max() == 0, f"{what}: {name} has a gradient the reference lacks"
            continue
        close(g, rg, torch.float64, f"{what} grad of {name}", tol)


def pieces_index(layer, r=None):
    """The indices of rank r's pieces along the split dim."""
    r = layer.tp_index if r is None else r
    return torch.cat([torch.arange(o, o + s) for o, s in layer.shard_ranges()[r]] or [torch.zeros(0, dtype=torch.long)])


# ---------------------------------------------------------------------------------------------- layers


class Conv1D(nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils): y = x @ W + b with W stored [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def check_layer(kind, dtype, training, in_f, out_f, lead=(5,), bias=True, **opts):
    """kind: row, col, conv_row, conv_col. opts: input_is_parallel / gather_output / tp_overlap_comm /
    block_sizes / heads."""
    tp.set_training_mode(training)
    seed("layer", kind, str(dtype), training, in_f, out_f, lead, bias, tuple(sorted(opts.items())))
    conv = kind.startswith("conv")
    src = (Conv1D(out_f, in_f) if conv else nn.Linear(in_f, out_f, bias=bias)).to(dtype)
    ref = copy.deepcopy(src).double()
    w_full = (ref.weight.t() if conv else ref.weight).detach()
    row = kind.endswith("row")
    cls = {"row": tpt.LinearAllreduce, "col": tpt.LinearLayer, "conv_row": tpt.Conv_LinearALlreduce,
           "conv_col": tpt.conv_LinearLayer}[kind]
    layer = cls(src, **opts)
    assert layer.weight is not None and getattr(layer.weight, "ds_is_replaced_module", False)
    idx = pieces_index(layer)
    expect_w = w_full[:, idx] if row else w_full[idx]
    assert torch.equal(layer.weight.detach().double(), expect_w), "shard is not this rank's pieces"
    x = torch.randn(*lead, in_f, dtype=dtype)
    gathered_out = opts.get("gather_output", False)
    parallel_in = row and opts.get("input_is_parallel", True)
    xin = x[..., idx].contiguous() if parallel_in else x
    xin = xin.clone().requires_grad_()
    y = layer(xin)
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    out_ref = y64 if (row or gathered_out) else y64[..., idx]
    close(y, out_ref, dtype, f"{kind} forward")
    dy = torch.randn(out_ref.shape, dtype=dtype)
    y.backward(dy)
    full_dy = dy if (row or gathered_out) else None
    if full_dy is None:  # a column layer's partitioned output: each rank's dY is its own slice of the full dY
        full_dy = torch.zeros(y64.shape, dtype=dtype)
        full_dy[..., idx] = dy
        full_dy = _sum_over_ranks(full_dy)
    y64.backward(full_dy.double())
    dx_ref = x64.grad[..., idx] if parallel_in else x64.grad
    close(xin.grad, dx_ref, dtype, f"{kind} dX")
    close(full_grad(layer.weight), ref.weight.grad.t() if conv else ref.weight.grad, dtype, f"{kind} dW")
    if layer.bias is not None:
        close(full_grad(layer.bias), ref.bias.grad, dtype, f"{kind} db")
    return layer


def _sum_over_ranks(t):
    t = t.contiguous()
    dist.all_reduce(t.numpy())
    return t


def check_mlp(dtype, training, hidden, inner, lead=(3, 4)):
    """column -> SiLU -> row with autograd, against the float64 block."""
    tp.set_training_mode(training)
    seed("mlp", str(dtype), training, hidden, inner)
    fc1, fc2 = nn.Linear(hidden, inner).to(dtype), nn.Linear(inner, hidden).to(dtype)
    r1, r2 = copy.deepcopy(fc1).double(), copy.deepcopy(fc2).double()
    col, row = tpt.LinearLayer(fc1), tpt.LinearAllreduce(fc2)
    x = torch.randn(*lead, hidden, dtype=dtype)
    xa, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    loss = row(torch.nn.functional.silu(col(xa))).square().mean()
    ref = r2(torch.nn.functional.silu(r1(x64))).square().mean()
    close(loss.reshape(1), ref.reshape(1), dtype, "mlp loss")
    loss.backward()
    ref.backward()
    close(xa.grad, x64.grad, dtype, "mlp dX")
    for name, mine, theirs in (("fc1.weight", col.weight, r1.weight), ("fc1.bias", col.bias, r1.bias),
                               ("fc2.weight", row.weight, r2.weight), ("fc2.bias", row.bias, r2.bias)):
        close(full_grad(mine), theirs.grad, dtype, f"mlp {name} grad")


def run_layer_checks(in_f, out_f):
    p = dist.get_world_size()
    for training in (True, False):
        for dtype in (torch.float32, torch.float64):
            for lead in ((), (5,), (2, 3)):
                for bias in (True, False):
                    check_layer("row", dtype, training, in_f, out_f, lead, bias)
                    check_layer("col", dtype, training, in_f, out_f, lead, bias)
            check_layer("row", dtype, training, in_f, out_f, input_is_parallel=False)
            check_layer("col", dtype, training, in_f, out_f, gather_output=True)
            check_layer("col", dtype, training, in_f, out_f, tp_overlap_comm=True)
            check_layer("col", dtype, training, in_f, out_f, lead=(0,))
            check_layer("conv_row", dtype, training, in_f, out_f)
            check_layer("conv_col", dtype, training, in_f, out_f)
            check_mlp(dtype, training, in_f, out_f)
        # packed QKV with grouped-query heads (12 query heads, 4 KV heads, head_dim 4): Q follows its KV group
        lay = check_layer("col", torch.float32, training, 24, 80, block_sizes=[48, 16, 16], num_heads=12,
                          num_kv_heads=4, head_dim=4)
        q, k, v = lay.shard_ranges()[lay.tp_index]
        qh = range(q[0] // 4, (q[0] + q[1]) // 4)
        kh = range((k[0] - 48) // 4, (k[0] - 48 + k[1]) // 4)
        assert [h // 3 for h in qh] == [h for h in kh for _ in range(3)], (qh, kh)
        check_layer("col", torch.float64, training, 24, 64, block_sizes=[32, 32])  # gate/up
    print(f"rank {dist.get_rank()} of {p}: torch layer checks passed", flush=True)


# ---------------------------------------------------------------------------------------------- half precision

U = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff of the half dtype
ETA = {torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25}  # half its smallest subnormal


def close_half(got, ref, terms, k, roundings, dtype, what):
    """Per element, against ref (the unsharded float32 nn.Linear from the same half values, rounded once to
    dtype): both sums accumulate k terms in float32 (each within (k + 1) 2^-24 sum|terms| of the exact sum),
    and each rounding to dtype -- ours and ref's -- moves a value by at most u times its size (<= sum|terms|):
    |got - ref| <= roundings u sum|terms| + 2 (k + 1) 2^-24 sum|terms| (+ 1 % slack, + subnormal halves)."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs()
    lim = 1.01 * (roundings * U[dtype] + 2 * (k + 1) * 2.0 ** -24) * terms + roundings * ETA[dtype]
    assert bool((err <= lim).all()), f"{what}: worst excess {(err - lim).max().item():.3g} (err {err.max().item():.3g})"


def same_bits_everywhere(t):
    t = t.detach().reshape(-1).contiguous()
    every = torch.zeros(dist.get_world_size() * t.numel(), dtype=t.dtype)
    dist.all_gather_into_tensor(every, t)
    assert torch.equal(every.view(torch.int16), t.view(torch.int16).repeat(dist.get_world_size())), "ranks differ"


def check_half_layer(kind, dtype, training, in_f, out_f, lead=(5,), bias=True, **opts):
    """A bfloat16 / float16 row or column layer: output, dX, dW, db in the parameter dtype, each element within
    close_half's bound of the unsharded float32 nn.Linear rounded once. Roundings counted: a local GEMM 1 (+ the
    reference's 1); an all-reduce of rounded partial sums 2 more (the partials, their float32 sum); the row
    layer's bias added after the reduction 1 more. The row layer's output is the same bits on every rank."""
    tp.set_training_mode(training)
    seed("half", kind, str(dtype), training, in_f, out_f, lead, bias, tuple(sorted(opts.items())))
    src = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    ref = copy.deepcopy(src).float()
    row = kind == "row"
    layer = (tpt.LinearAllreduce if row else tpt.LinearLayer)(src, **opts)
    assert layer.weight.dtype == dtype and (layer.bias is None or layer.bias.dtype == dtype)
    idx = pieces_index(layer)
    gathered_out = opts.get("gather_output", False)
    parallel_in = row and opts.get("input_is_parallel", True)
    x = torch.randn(*lead, in_f).to(dtype)
    dy_full = torch.randn(*lead, out_f).to(dtype)  # the same on every rank (same seed)
    xin = (x[..., idx] if parallel_in else x).clone().requires_grad_()
    y = layer(xin)
    x32 = x.float().requires_grad_()
    y32 = ref(x32)
    y32.backward(dy_full.float())
    out_idx = slice(None) if (row or gathered_out) else idx
    y.backward(dy_full[..., out_idx].contiguous())
    w64, x64, dy64 = ref.weight.detach().double(), x.double(), dy_full.double()
    ty = x64.abs() @ w64.abs().t() + (ref.bias.detach().double().abs() if bias else 0)
    p = layer.tp_world_size
    reduced = 2 if p > 1 else 0
    close_half(y, y32.to(dtype)[..., out_idx], ty[..., out_idx], in_f, 2 + (reduced + 1 if row else 0), dtype,
               f"{kind} forward")
    if row:
        same_bits_everywhere(y)
    tdx = dy64.abs() @ w64.abs()
    dx_ref, tdx = (x32.grad[..., idx], tdx[..., idx]) if parallel_in else (x32.grad, tdx)
    close_half(xin.grad, dx_ref.to(dtype), tdx, out_f, 2 + (0 if row else reduced), dtype, f"{kind} dX")
    m = x.reshape(-1, in_f).shape[0]
    tdw = dy64.reshape(-1, out_f).abs().t() @ x64.reshape(-1, in_f).abs()
    assert layer.weight.grad.dtype == dtype
    close_half(full_grad(layer.weight), ref.weight.grad.to(dtype), tdw, m, 2, dtype, f"{kind} dW")
    if bias:
        assert layer.bias.grad.dtype == dtype
        close_half(full_grad(layer.bias), ref.bias.grad.to(dtype), dy64.reshape(-1, out_f).abs().sum(0), m, 2, dtype,
                   f"{kind} db")
    return layer


def check_half_gather(dtype):
    """GatherReplacedLayerParams on a bfloat16 / float16 layer split unevenly: inside, the whole tensors in
    their dtype, the source module's bits; an edit made there persists in the shards; the same on every rank."""
    tp.set_training_mode(False)
    seed("half-gather", str(dtype))
    src = nn.Linear(100, 70).to(dtype)
    full_w, full_b = src.weight.detach().clone(), src.bias.detach().clone()
    col = tpt.LinearLayer(src)
    with tpt.GatherReplacedLayerParams(col.parameters(), col):
        assert col.weight.dtype == dtype and torch.equal(col.weight.detach(), full_w)
        assert torch.equal(col.bias.detach(), full_b)
        same_bits_everywhere(col.weight)
        with torch.no_grad():
            col.weight.mul_(2)  # exact in any binary format
    assert col.weight.shape == col.local_shape and torch.equal(col.weight.detach(), 2 * full_w[pieces_index(col)])


def run_half_layer_checks(in_f, out_f):
    """bfloat16 and float16 CPU modules (issue 27 item 3), a slice of run_layer_checks' shapes and options."""
    for dtype in (torch.bfloat16, torch.float16):
        for training in (True, False):
            for lead in ((), (2, 3)):
                check_half_layer("row", dtype, training, in_f, out_f, lead)
                check_half_layer("col", dtype, training, in_f, out_f, lead, bias=False)
        check_half_layer("row", dtype, True, in_f, out_f, input_is_parallel=False, bias=False)
        check_half_layer("col", dtype, True, in_f, out_f, gather_output=True)
        check_half_layer("col", dtype, True, in_f, out_f, lead=(0,))
        # K = 4096 + 7: float32 accumulation over a long dot product, decode-shaped (one row)
        check_half_layer("row", dtype, True, 4096 + 7, 9, lead=(1,))
        check_half_gather(dtype)
    print(f"rank {dist.get_rank()}: half-precision layer checks passed", flush=True)


# ---------------------------------------------------------------------------------------------- zero-copy


def check_zero_copy():
    """The C core reads and writes the tensors' own memory: every pointer it is handed is the data
    pointer of the torch tensor involved (input, weight, bias, output; dY, saved input, dX, dW, db), and a
    weight gradient lands in .grad without a copy."""
    from tplinear.torch import _ops

    tp.set_training_mode(True)
    seen = []
    real = _ops._C

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if name not in ("row_forward", "row_backward", "col_forward", "col_backward"):
                return fn

            def wrapped(*args):
                seen.append((name, [real.tensor_info(a)["data"] if hasattr(a, "shape") else None for a in args[1:]]))
                out = fn(*args)
                return out
            return wrapped

    _ops._C = Spy()
    try:
        seed("zero-copy")
        col = tpt.LinearLayer(nn.Linear(16, 24))
        row = tpt.LinearAllreduce(nn.Linear(24, 16))
        x = torch.randn(3, 16, requires_grad=True)   # requires grad: must go in without a copy too
        h = col(x)
        y = row(h)
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
    finally:
        _ops._C = real
    calls = dict((name, ptrs) for name, ptrs in seen)
    ptr = torch.Tensor.data_ptr
    assert calls["col_forward"] == [ptr(x), ptr(col.weight), ptr(col.bias), ptr(h)], calls["col_forward"]
    assert calls["row_forward"] == [ptr(h), ptr(row.weight), ptr(row.bias), ptr(y)], calls["row_forward"]
    dy, xs, w, dx, dw, db = calls["row_backward"][:6]
    assert (dy, xs, w, dw, db) == (ptr(grad_y), ptr(h), ptr(row.weight), ptr(row.weight.grad), ptr(row.bias.grad))
    dy2, xs2, w2, dx2, dw2, db2 = calls["col_backward"][:6]
    assert (dy2, xs2, w2, dx2, dw2, db2) == (dx, ptr(x), ptr(col.weight), ptr(x.grad), ptr(col.weight.grad),
                                             ptr(col.bias.grad))
    # the next step reuses the gradient buffers once optimizer.zero_grad() let go of them
    before = (ptr(col.weight.grad), ptr(row.weight.grad))
    for p in list(col.parameters()) + list(row.parameters()):
        p.grad = None
    row(col(x)).backward(grad_y)
    assert (ptr(col.weight.grad), ptr(row.weight.grad)) == before, "gradient buffers were not reused"
    # ... and accumulating into a kept .grad gives the sum, not a buffer overwritten in place
    g1 = row.weight.grad.clone()
    row(col(x)).backward(grad_y)
    close(row.weight.grad, 2 * g1, torch.float32, "accumulated grad")
    print(f"rank {dist.get_rank()}: zero-copy checks passed", flush=True)


def check_grad_assign():
    """The C core writes a fresh weight gradient in one pass (assign=True, no zeroing first): a reused buffer's
    old contents never show (the free buffers are poisoned with NaN here), and backwards without zero_grad
    add up as torch's .grad does. Wide shards (in 4096: dW written by row blocks in openblas.c at up to 32
    tokens) at 8 and 40 tokens, float32 and float64, against float64 torch; with and without dX (the second
    and third steps take an input that does not require grad)."""
    tp.set_training_mode(True)
    for dtype in (torch.float32, torch.float64):
        for kind in ("col", "row"):
            for tokens in (8, 40):
                seed("grad-assign", str(dtype), kind, tokens)
                src = nn.Linear(4096, 48).to(dtype)
                ref = copy.deepcopy(src).double()
                layer = (tpt.LinearLayer if kind == "col" else tpt.LinearAllreduce)(src)
                idx = pieces_index(layer)
                what = f"{kind} {dtype} {tokens} tokens"

                def step(x_grad):
                    x = torch.randn(tokens, 4096, dtype=dtype)
                    dy = torch.randn(tokens, 48, dtype=dtype)
                    xin = (x[:, idx] if kind == "row" else x).clone().requires_grad_(x_grad)
                    y = layer(xin)
                    y.backward(dy[:, idx] if kind == "col" else dy)
                    ref(x.double()).backward(dy.double())

                step(True)
                close(full_grad(layer.weight), ref.weight.grad, dtype, f"{what}: dW")
                close(full_grad(layer.bias), ref.bias.grad, dtype, f"{what}: db")
                # optimizer.zero_grad(): the buffers go back to the layer; poison them
                layer.weight.grad = layer.bias.grad = None
                ref.zero_grad()
                free = {b.data_ptr() for bufs in layer._grads._free.values() for b in bufs}
                for bufs in layer._grads._free.values():
                    for b in bufs:
                        b.fill_(float("nan"))
                step(False)
                assert layer.weight.grad.data_ptr() in free, f"{what}: the gradient buffer was not reused"
                close(full_grad(layer.weight), ref.weight.grad, dtype, f"{what}: dW from a reused buffer")
                close(full_grad(layer.bias), ref.bias.grad, dtype, f"{what}: db from a reused buffer")
                step(False)  # no zero_grad: .grad accumulates
                close(full_grad(layer.weight), ref.weight.grad, dtype, f"{what}: accumulated dW")
                close(full_grad(layer.bias), ref.bias.grad, dtype, f"{what}: accumulated db")
    print(f"rank {dist.get_rank()}: gradient assign checks passed", flush=True)


# ---------------------------------------------------------------------------------------------- parameters


def check_params_and_optimizer():
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(False)
    seed("params")
    lin = nn.Linear(100, 70)  # uneven at 3 ranks (inference grain 64 leaves some ranks little or nothing)
    full_w, full_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    w_obj = lin.weight
    col = tpt.LinearLayer(lin)
    assert col.weight is w_obj, "the source module's Parameter object is kept (its data replaced by the shard)"
    assert col.weight.untyped_storage().nbytes() == col.weight.numel() * 4, "the full weight is still referenced"
    assert col.weight.shape == col.local_shape and col.full_shape == (70, 100)
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0
    for params in ([col.weight, col.bias], col.weight, (q for q in col.parameters()), col.parameters()):
        with tpt.GatherReplacedLayerParams(params, col):
            assert torch.equal(col.weight.detach(), full_w)
    with tpt.GatherReplacedLayerParams(list(col.parameters()), col):
        assert torch.equal(col.bias.detach(), full_b)
        sd = col.state_dict()
        assert torch.equal(sd["weight"], full_w)
        with torch.no_grad():
            col.weight.add_(1.0)  # an edit made while gathered persists in the shard
    idx = pieces_index(col)
    assert torch.equal(col.weight.detach(), full_w[idx] + 1.0)
    try:
        with tpt.GatherReplacedLayerParams(col.parameters(), col):
            raise KeyError("body")
    except KeyError:
        pass
    assert col.weight.shape == col.local_shape, "not re-partitioned after the body raised"
    # DeepSpeed's own context manager works on these parameters (its hooks are on them)
    try:
        from deepspeed.module_inject.layers import GatherReplacedLayerParams as DSGather
    except Exception:  # noqa: BLE001 - deepspeed is optional
        DSGather = None
    if DSGather is not None:
        with DSGather([col.weight, col.bias], col):
            assert torch.equal(col.weight.detach(), full_w + 1.0)
        assert col.weight.shape == col.local_shape
    # torch.optim works unchanged on shards: AdamW on the shards equals AdamW on the full layer's slices
    tp.set_training_mode(True)
    seed("optim")
    src = nn.Linear(12, 8 * p + 1)
    ref = copy.deepcopy(src)
    layer = tpt.LinearLayer(src)
    opt, ropt = torch.optim.AdamW(layer.parameters(), lr=0.1), torch.optim.AdamW(ref.parameters(), lr=0.1)
    x = torch.randn(6, 12)
    for _ in range(3):
        opt.zero_grad()
        ropt.zero_grad()
        out = layer(x)
        idx = pieces_index(layer)
        (out * out).sum().backward()
        (ref(x)[..., idx] ** 2).sum().backward()  # only this rank's outputs: the shard's gradient
        opt.step()
        ropt.step()
    close(layer.weight, ref.weight[idx], torch.float32, "AdamW step on the shard")
    print(f"rank {r}: parameter checks passed", flush=True)


def check_bad_input():
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(True)
    row = tpt.LinearAllreduce(nn.Linear(8 * p, 4))
    if p > 1:
        _raises(ValueError, lambda: row(torch.zeros(2, 8 * p)), "last dimension must be 8")
    col = tpt.LinearLayer(nn.Linear(8, 4 * p))
    _raises(ValueError, lambda: col(torch.zeros(2, 9)), "must be 8")
    _raises(TypeError, lambda: col(torch.zeros(2, 8, dtype=torch.float64)), "float64")
    _raises(TypeError, lambda: col(torch.zeros(2, 8, dtype=torch.bfloat16)), "bfloat16")  # not the weight's dtype
    _raises(TypeError, lambda: tpt.LinearLayer(nn.Linear(8, 8).to(torch.complex64)), "complex64", "bfloat16")
    _raises(TypeError, lambda: tpt.LinearLayer(object()), ".weight")
    _raises(TypeError, lambda: tpt.LinearLayer(nn.Linear(8, 8), mp_group="world"), "ProcessGroup")
    if p > 1:
        tp.set_training_mode(r == 0)  # ranks that disagree raise on every rank
        _raises(ValueError, lambda: tpt.LinearLayer(nn.Linear(16, 64 * p)), "training mode")
        tp.set_training_mode(True)
    print(f"rank {r}: bad-input checks passed", flush=True)


def _raises(exc, fn, *words):
    try:
        fn()
    except exc as e:
        for w in words:
            assert w in str(e), f"{str(e)!r} lacks {w!r}"
        return
    raise AssertionError(f"{fn} did not raise {exc.__name__}")


# ---------------------------------------------------------------------------------------------- Hugging Face


def hf_model(kind, dtype=torch.float32):
    """A tiny transformers model from a config (no download), the same on every rank."""
    import transformers
    from transformers import logging

    logging.set_verbosity_error()
    common = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, max_position_embeddings=64,
                  tie_word_embeddings=False)
    if kind == "llama":  # grouped-query attention: 12 query heads in 4 KV groups
        cfg = transformers.LlamaConfig(intermediate_size=88, num_attention_heads=12, num_key_value_heads=4,
                                       head_dim=8, **common)
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":  # biased q/k/v, 2 KV heads: ranks beyond them hold no heads
        cfg = transformers.Qwen2Config(intermediate_size=72, num_attention_heads=6, num_key_value_heads=2, **common)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "qwen3":  # per-head q_norm / k_norm: replicated_with_grad_allreduce
        cfg = transformers.Qwen3Config(intermediate_size=72, num_attention_heads=6, num_key_value_heads=3,
                                       head_dim=8, **common)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "gpt2":  # Conv1D (weights [in, out]), fused c_attn, no plan of its own: name rules
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=6, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "sdpa"  # in the model's dtype (eager attention's softmax runs in float32)
    seed("hf", kind)
    return cls(cfg).to(dtype)


def ref_grad(ref_param, param):
    """The reference gradient laid out like param (a Conv1D weight became [out, in])."""
    g = ref_param.grad
    layer = getattr(param, "tp_layer", None)
    return g.t() if layer is not None and layer._conv1d and g.dim() == 2 else g


def check_hf(kind, dtype, training, batch=2, seq=7):
    tp.set_training_mode(training)
    model = hf_model(kind, dtype)
    ref = copy.deepcopy(model).double()
    # fewer KV heads than ranks (qwen2's 2 at 3 ranks): the default kv_heads="auto" replicates K / V; "whole"
    # (DeepSpeed's rule) leaves a rank with no heads (zero-width shards): both, in float32 and float64
    tpt.parallelize(model, kv_heads="whole" if dtype == torch.float64 else "auto")
    assert tpt.tp_modules(model), "nothing was parallelized"
    seed("hf-input", kind)
    ids = torch.randint(0, 97, (batch, seq))
    out = model(ids, labels=ids)
    expect = ref(ids, labels=ids)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    what = f"{kind} {'training' if training else 'inference'} mode {dtype} p={dist.get_world_size()}"
    close(out.logits, expect.logits, dtype, f"{what} logits", tol)
    # transformers computes the loss in float32 whatever the model's dtype
    close(out.loss.reshape(1), expect.loss.reshape(1), dtype, f"{what} loss", max(tol, 1e-7))
    out.loss.backward()
    expect.loss.backward()
    refs = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        close(full_grad(param), ref_grad(refs[name], param), dtype, f"{what} grad of {name}", tol)
    return model


def check_hf_half(kind, dtype, batch=2, seq=7, lr=0.05):
    """A bfloat16 / float16 model parallelized on the CPU against the unsharded float64 model: logits, loss,
    every parameter's gradient (gathered), and the loss after one SGD step. Tolerance: the sharded model may
    be at most twice as far (norm-wise) from the float64 model as torch's own unsharded model in the same
    dtype is, plus 2u of the reference's norm -- the parallel layers round a row layer's partial sums once more
    (close_half), so its errors are of the dtype's size, not more; a wrong shard or a lost reduction errs by
    O(1)."""
    tp.set_training_mode(True)
    model = hf_model(kind, dtype)
    same = copy.deepcopy(model)  # torch's unsharded model in dtype
    ref = copy.deepcopy(model).double()
    tpt.parallelize(model)
    assert tpt.tp_modules(model), "nothing was parallelized"
    assert all(prm.dtype == dtype for prm in model.parameters())
    seed("hf-input", kind)
    ids = torch.randint(0, 97, (batch, seq))
    what = f"{kind} {dtype} p={dist.get_world_size()}"
    outs = [m(ids, labels=ids) for m in (model, same, ref)]
    assert outs[0].logits.dtype == dtype

    def within(got, torch_same, exact, name):
        tol = 2 * rel(torch_same, exact) + 2 * U[dtype]
        close(got, exact, dtype, f"{what} {name}", tol)

    within(outs[0].logits, outs[1].logits, outs[2].logits, "logits")
    within(outs[0].loss.reshape(1), outs[1].loss.reshape(1), outs[2].loss.reshape(1), "loss")
    for out in outs:
        out.loss.backward()
    sames, refs = dict(same.named_parameters()), dict(ref.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad.dtype == dtype, f"{what} grad of {name}: {param.grad.dtype}"
        within(full_grad(param), sames[name].grad, ref_grad(refs[name], param), f"grad of {name}")
    for m in (model, same, ref):
        torch.optim.SGD(m.parameters(), lr=lr).step()
    with torch.no_grad():
        losses = [m(ids, labels=ids).loss.reshape(1) for m in (model, same, ref)]
    within(*losses, "loss after an SGD step")
    same_bits_everywhere(losses[0].to(dtype))
    print(f"rank {dist.get_rank()}: {what} checks passed (loss {losses[0].item():.4f})", flush=True)


def check_no_full_weights(kind):
    """After parallelize, every sharded parameter's storage holds only its shard, and the rank holds
    the model's replicated bytes plus its shards only."""
    model = hf_model(kind)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tpt.parallelize(model)
    layers = tpt.tp_modules(model)
    sharded = replicated = 0
    for p in model.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), \
            f"a parameter of shape {tuple(p.shape)} keeps a storage of {p.untyped_storage().nbytes()} bytes"
        if getattr(p, "tensor_model_parallel", False):
            sharded += p.numel() * p.element_size()
        else:
            replicated += p.numel() * p.element_size()
    full_sharded = sum(l.weight.numel() * 0 + l.full_shape[0] * l.full_shape[1] * 4 for l in layers.values())
    p_ = dist.get_world_size()
    if p_ > 1:
        assert sharded < full_sharded, (sharded, full_sharded)
    assert sharded + replicated <= full_bytes
    total = torch.tensor([float(sharded)])
    dist.all_reduce(total.numpy())
    col_bias = sum(l.out_features * 4 for l in layers.values() if isinstance(l, tpt.LinearLayer) and l.bias is not None)
    assert int(total.item()) == full_sharded + col_bias, (int(total.item()), full_sharded, col_bias)
    print(f"rank {dist.get_rank()}: {kind}: {sharded} sharded + {replicated} replicated bytes of {full_bytes}",
          flush=True)


# ---------------------------------------------------------------------------------------------- sharded norms


class _OnePlusNorm(nn.RMSNorm):  # Gemma's form, (1 + w) * x / rms(x): not a plain RMSNorm, stays whole
    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class _EpsOutsideNorm(nn.RMSNorm):  # x / (rms(x) + eps): another eps, stays whole
    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


def check_sharded_norm():
    """tplinear.torch.norms.ShardedNorm (RMSNorm, LayerNorm with and without bias) on this rank's features
    against torch's norm over the full width: output, input gradient, weight / bias gradients (gathered),
    float64 and float32, uneven pieces, pieces of two blocks ([a | b] split block by block), a rank with no
    features (inference grain at 3 ranks); norm_kind tells the plain norms from the others."""
    from tplinear.partition import shard_ranges
    from tplinear.torch import norms

    p, r = dist.get_world_size(), dist.get_rank()
    group = dist.resolve_group(None)
    width = 70
    assert norms.norm_kind(nn.RMSNorm(width, eps=1e-6), width) == "rms"
    assert norms.norm_kind(nn.LayerNorm(width), width) == "layer"
    assert norms.norm_kind(nn.LayerNorm(width, bias=False), width) == "layer"
    assert norms.norm_kind(nn.RMSNorm(width, eps=1e-6), width + 1) is None
    for other in (_OnePlusNorm(width, eps=1e-6), _EpsOutsideNorm(width, eps=1e-6), nn.RMSNorm(width),
                  nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)):
        assert norms.norm_kind(other, width) is None, other
    splits = [(70, shard_ranges(70, p, training=True)),
              (128, shard_ranges(128, p, training=False)),  # a zero-width rank at p = 3
              (70, [[rg[0], (35 + rg[0][0], rg[0][1])] for rg in shard_ranges(35, p, training=True)])]
    for dtype in (torch.float64, torch.float32):
        for width, pieces in splits:
            for make in (lambda: nn.RMSNorm(width, eps=1e-5), lambda: nn.LayerNorm(width, eps=1e-5),
                         lambda: nn.LayerNorm(width, eps=1e-5, bias=False)):
                seed("norm", width, len(pieces[0]), dtype)
                ref = make().to(dtype)
                with torch.no_grad():
                    for q in ref.parameters():
                        q.copy_(torch.randn_like(q))
                x = torch.randn(2, 5, width, dtype=dtype) * 3 + 1
                x[0, 0] *= 1e-3  # a row whose mean square is about eps
                mine = copy.deepcopy(ref)
                kind = norms.norm_kind(mine, width)
                sharded = norms.ShardedNorm.from_module(mine, group, pieces, kind)
                idx = torch.cat([torch.arange(o, o + s) for o, s in pieces[r]])
                xr = x[..., idx].clone().requires_grad_(True)
                x = x.requires_grad_(True)
                dy = torch.randn(2, 5, width, dtype=dtype)
                y = ref(x)
                (y * dy).sum().backward()
                yr = sharded(xr)
                (yr * dy[..., idx]).sum().backward()
                what = f"{kind} width {width} {len(pieces[0])} block(s) {dtype}"
                tol = TOL[dtype] * (10 if dtype == torch.float32 else 1e3)
                close(yr, y[..., idx], dtype, f"{what}: output", tol)
                close(xr.grad, x.grad[..., idx], dtype, f"{what}: input gradient", tol)
                for name, q in sharded.named_parameters():
                    assert q.shape == (len(idx),), (name, q.shape)
                    close(full_grad(q), getattr(ref, name).grad, dtype, f"{what}: {name} gradient", tol)
    print(f"rank {r}: sharded norm checks passed", flush=True)
