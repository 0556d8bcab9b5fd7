"""bfloat16 and float16 on the host: the C core's linear ops (_C.linear_forward / linear_backward) against a
float64 reference within the bound of float32 accumulation and one rounding (tests/c/test_half.c states it),
and against torch's own CPU F.linear and its autograd in the same dtype on the same values, within the same
bound. The kernels' paths (vector and plain C, TPLINEAR_HALF_SIMD) and the conversions are tested in C."""
import numpy as np
import pytest

from tplinear import _C

torch = pytest.importorskip("torch")

U = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff of the output's dtype
ETA = {torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25}  # half the smallest subnormal


def bound(terms_abs, k, ref, dt):
    """Per element: float32 accumulation of k terms and one more (bias or old gradient), then one rounding."""
    return (k + 1) * 2.0 ** -24 * 1.01 * terms_abs + U[dt] * np.abs(ref) + ETA[dt]


def check(got, ref, terms_abs, k, dt, what):
    got = got.detach().double().numpy()
    err = np.abs(got - ref)
    lim = bound(terms_abs, k, ref, dt)
    assert (err <= lim).all(), f"{what}: worst excess {np.max(err - lim):.3g} (err {err.max():.3g})"


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("m, k, n", [(1, 4096 + 7, 33), (5, 37, 19), (70, 300, 600), (3, 1, 0)])
def test_linear_ops_match_float64_and_torch(dt, m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g).to(dt)
    w = (torch.randn(n, k, generator=g) / 8).to(dt)
    b = torch.randn(n, generator=g).to(dt)
    dy = torch.randn(m, n, generator=g).to(dt)
    xd, wd, bd, dyd = (t.double().numpy() for t in (x, w, b, dy))
    # ours: Y (bias in the weight's dtype), dX, dW and db assigned; X read through a transposed view
    xt = x.t().contiguous().t()
    y, dx, dw, db = (torch.empty(s, dtype=dt) for s in ((m, n), (m, k), (n, k), (n,)))
    _C.linear_forward(xt, w, b, y)
    _C.linear_backward(dy, xt, w, dx, dw, db, True)
    # torch's, in the same dtype on the CPU
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    yr = torch.nn.functional.linear(xr, wr, br)
    yr.backward(dy)
    refs = {
        "y": (xd @ wd.T + bd, np.abs(xd) @ np.abs(wd).T + np.abs(bd), k),
        "dx": (dyd @ wd, np.abs(dyd) @ np.abs(wd), n),
        "dw": (dyd.T @ xd, np.abs(dyd).T @ np.abs(xd), m),
        "db": (dyd.sum(0), np.abs(dyd).sum(0), m),
    }
    for name, ours, theirs in (("y", y, yr), ("dx", dx, xr.grad), ("dw", dw, wr.grad), ("db", db, br.grad)):
        ref, terms, kk = refs[name]
        assert ours.dtype == dt
        check(ours, ref, terms, kk, dt, f"tplinear {name}")
        # torch's own result meets the same bound (the bound is not looser than what torch does), and ours
        # is within twice it of torch's
        check(theirs, ref, terms, kk, dt, f"torch {name}")
        assert (np.abs(ours.double().numpy() - theirs.detach().double().numpy()) <= 2 * bound(terms, kk, ref, dt)).all()


def test_accumulating_gradients_round_once():
    """dW += dY^T X in bfloat16: the old gradient joins the float32 sum (one rounding), so adding a gradient
    whose every term is far below the old value's half-ulp still moves it when they add up past it."""
    m, k, n = 64, 3, 2
    x = torch.full((m, k), 2.0 ** -6, dtype=torch.bfloat16)
    dy = torch.ones(m, n, dtype=torch.bfloat16)
    dw = torch.ones(n, k, dtype=torch.bfloat16)  # ulp of 1.0 in bfloat16: 2^-7; the sum is 64 * 2^-6 = 1
    db = torch.zeros(n, dtype=torch.bfloat16)
    _C.linear_backward(dy, x, torch.zeros(n, k, dtype=torch.bfloat16), None, dw, db)
    assert (dw == 2).all() and (db == 64).all()


def test_mixed_dtypes_are_refused():
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        _C.linear_forward(x, torch.zeros(4, 3), None, torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float16"):
        _C.linear_forward(np.zeros((2, 3), np.float16), torch.zeros(4, 3, dtype=torch.bfloat16), None,
                          torch.zeros(2, 4, dtype=torch.bfloat16))
