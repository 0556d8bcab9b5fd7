"""Single-process layers (a world of one) against a float64 NumPy reference."""
import numpy as np
import pytest

import tplinear as tp
from conftest import TOL, rel_err

SHAPES = [(), (5,), (3, 4)]  # leading dims: input of 1, 2 and 3 dims


def reference(x, w, b, dy):
    x, w, dy = (np.asarray(a, dtype=np.float64) for a in (x, w, dy))
    y = x @ w.T + (0 if b is None else np.asarray(b, dtype=np.float64))
    dx = dy @ w
    dw = dy.reshape(-1, w.shape[0]).T @ x.reshape(-1, w.shape[1])
    db = dy.reshape(-1, w.shape[0]).sum(axis=0)
    return y, dx, dw, db


def make_layer(kind, lin):
    if kind == "linear":
        return lin
    if kind == "row":
        return tp.LinearAllreduce(lin, None)
    return tp.LinearLayer(lin)


@pytest.mark.parametrize("kind", ["linear", "row", "column"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_matches_reference(kind, dtype, lead, bias, rng):
    lin = tp.Linear(24, 13, bias=bias, dtype=dtype, seed=int(rng.integers(1 << 30)))
    w_full = lin.weight.data.copy()
    b_full = None if lin.bias is None else lin.bias.data.copy()
    layer = make_layer(kind, lin)
    x = rng.standard_normal(lead + (24,)).astype(dtype)
    dy = rng.standard_normal(lead + (13,)).astype(dtype)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, w_full, b_full, dy)
    y = layer(x)
    assert y.shape == lead + (13,) and y.dtype == np.dtype(dtype)
    assert rel_err(y, y_ref) < TOL[dtype]
    dx = layer.backward(dy, retain=True)  # kept for the second backward below
    assert dx.shape == x.shape
    assert rel_err(dx, dx_ref) < TOL[dtype]
    assert rel_err(layer.weight.grad, dw_ref) < TOL[dtype]
    if bias:
        assert rel_err(layer.bias.grad, db_ref) < TOL[dtype]
    else:
        assert layer.bias is None
    layer.backward(dy)  # gradients accumulate (retain=True above kept the input)
    assert rel_err(layer.weight.grad, 2 * dw_ref) < TOL[dtype]


@pytest.mark.parametrize("kind", ["row", "column"])
def test_zero_size_batch(kind):
    layer = make_layer(kind, tp.Linear(8, 6))
    y = layer(np.zeros((0, 8), dtype=np.float32))
    assert y.shape == (0, 6)
    dx = layer.backward(np.zeros((0, 6), dtype=np.float32))
    assert dx.shape == (0, 8)
    assert np.all(layer.weight.grad == 0) and np.all(layer.bias.grad == 0)


@pytest.mark.parametrize("kind", ["row", "column"])
@pytest.mark.parametrize("layout", ["fortran", "strided", "transposed-3d", "negative"])
def test_non_contiguous_inputs(kind, layout, rng):
    lin = tp.Linear(16, 9, dtype="float64", seed=3)
    layer = make_layer(kind, lin)
    base = rng.standard_normal((7, 32))
    x = {
        "fortran": np.asfortranarray(base[:, :16]),
        "strided": base[:, ::2],
        "transposed-3d": rng.standard_normal((16, 3, 5)).transpose(1, 2, 0),
        "negative": base[::-1, 16:],
    }[layout]
    assert not x.flags.c_contiguous
    dy = rng.standard_normal(x.shape[:-1] + (9,))
    y_ref, dx_ref, dw_ref, db_ref = reference(x, lin.weight.data, lin.bias.data, dy)
    assert rel_err(layer(x), y_ref) < 1e-12
    dy_nc = np.asfortranarray(dy) if dy.ndim == 2 else dy
    assert rel_err(layer.backward(dy_nc), dx_ref) < 1e-12
    assert rel_err(layer.weight.grad, dw_ref) < 1e-12


def test_initialisation_distribution_and_determinism():
    a = tp.Linear(400, 300, seed=7)
    b = tp.Linear(400, 300, seed=7)
    c = tp.Linear(400, 300, seed=8)
    bound = 1 / np.sqrt(400)
    w = a.weight.data
    assert w.dtype == np.float32 and w.shape == (300, 400)
    assert np.array_equal(w, b.weight.data) and not np.array_equal(w, c.weight.data)
    assert w.min() >= -bound and w.max() <= bound
    assert abs(w.mean()) < 0.01 * bound and abs(w.std() - bound / np.sqrt(3)) < 0.01 * bound
    assert np.all(np.abs(a.bias.data) <= bound) and not np.array_equal(a.bias.data, w[0])
    # float64 draws the same numbers (to float32 rounding)
    d = tp.Linear(400, 300, dtype="float64", seed=7)
    assert np.allclose(d.weight.data, w, rtol=0, atol=1e-7)


def test_module_with_numpy_attributes(rng):
    class M:
        weight = rng.standard_normal((5, 4))
        bias = rng.standard_normal(5)

    x = rng.standard_normal((3, 4))
    for layer in (tp.LinearAllreduce(M(), None), tp.LinearLayer(M())):
        assert rel_err(layer(x), x @ M.weight.T + M.bias) < 1e-12


# ---------------------------------------------------------------------------------------- bad input


@pytest.fixture(params=["row", "column", "linear"])
def layer32(request):
    return make_layer(request.param, tp.Linear(8, 4, seed=1))


def test_wrong_last_dim(layer32):
    with pytest.raises(ValueError, match=r"last dimension must be 8 .*got 7"):
        layer32(np.zeros((3, 7), dtype=np.float32))


def test_int_and_object_arrays(layer32):
    with pytest.raises(TypeError, match="int64.*float32|float32.*int64"):
        layer32(np.zeros((3, 8), dtype=np.int64))
    with pytest.raises(TypeError, match="dtype"):
        layer32(np.empty((3, 8), dtype=object))


def test_mismatched_dtype(layer32):
    with pytest.raises(TypeError, match="input has dtype float64, expected float32"):
        layer32(np.zeros((3, 8), dtype=np.float64))


def test_not_an_array(layer32):
    with pytest.raises(TypeError, match="must be an array.*got list"):
        layer32([[0.0] * 8])
    with pytest.raises(TypeError, match="must be an array.*got str"):
        layer32("x")


def test_zero_dim_input(layer32):
    with pytest.raises(ValueError, match="at least 1 dimension"):
        layer32(np.float32(1.0) * np.ones((), dtype=np.float32))


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        tp.LinearLayer(tp.Linear(4, 4)).backward(np.zeros(4, dtype=np.float32))


def test_wrong_grad_shape(rng):
    layer = tp.LinearAllreduce(tp.Linear(8, 4), None)
    layer(np.zeros((3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="grad_output's last dimension must be 4"):
        layer.backward(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"leading dimensions \(2,\) but the input of forward\(\) had \(3,\)"):
        layer.backward(np.zeros((2, 4), dtype=np.float32))
    layer.backward(np.zeros((3, 4), dtype=np.float32))  # the rejected calls kept the saved input


@pytest.mark.parametrize("kind", ["linear", "row", "column"])
def test_a_second_backward_needs_a_new_forward_or_retain(kind, rng):
    """torch's contract: backward releases what forward saved, so calling it again raises instead of
    accumulating the same gradient twice; retain=True (retain_graph) keeps it for one more backward."""
    lin = tp.Linear(6, 5, dtype="float64", seed=2)
    layer = make_layer(kind, lin)
    x, dy = rng.standard_normal((4, 6)), rng.standard_normal((4, 5))
    layer(x)
    layer.backward(dy, retain=True)
    once = layer.weight.grad.copy()
    layer.backward(dy)
    assert np.allclose(layer.weight.grad, 2 * once)
    with pytest.raises(RuntimeError, match="second time without a new forward.*retain=True"):
        layer.backward(dy)
    assert np.allclose(layer.weight.grad, 2 * once)
    layer(x)
    layer.backward(dy)
    assert np.allclose(layer.weight.grad, 3 * once)


def test_reprs():
    assert repr(tp.Linear(4, 3, bias=False, dtype="float64")) == \
        "Linear(in_features=4, out_features=3, bias=False, dtype=float64)"
    tp.set_training_mode(False)
    assert repr(tp.LinearLayer(tp.Linear(8, 4100), name="q")) == (
        "LinearLayer(in_features=8, out_features=4100, shard=4100/4100 at rank 0 of 1, mode=inference, bias=True, "
        "name='q')")
    tp.set_training_mode(True)
    try:
        layer = tp.LinearAllreduce(tp.Linear(64, 8), num_heads=8, num_kv_heads=2, head_dim=8, tp_grain_size=4)
        assert repr(layer) == (
            "LinearAllreduce(in_features=64, out_features=8, shard=64/64 at rank 0 of 1, mode=training, bias=True, "
            "num_heads=8, num_kv_heads=2, head_dim=8, tp_grain_size=4)")
    finally:
        tp.set_training_mode(False)


@pytest.mark.parametrize("cls", [tp.LinearAllreduce, tp.LinearLayer])
def test_wrong_module_shapes(cls):
    class Bad1:
        weight = np.zeros((4,), dtype=np.float32)
        bias = None

    class Bad2:
        weight = np.zeros((4, 3), dtype=np.float32)
        bias = np.zeros((5,), dtype=np.float32)

    class Bad3:
        weight = np.zeros((4, 3), dtype=np.int32)
        bias = None

    class Bad4:
        weight = np.zeros((4, 3), dtype=np.float32)
        bias = np.zeros((4,), dtype=np.float64)

    with pytest.raises(ValueError, match=r"2-d \[out_features, in_features\], got shape \(4,\)"):
        cls(Bad1())
    with pytest.raises(ValueError, match=r"bias must be 1-d of size 4 .*got shape \(5,\)"):
        cls(Bad2())
    with pytest.raises(TypeError, match=r"float32, float64, float16, bfloat16 \(bfloat16: ml_dtypes\), got int32"):
        cls(Bad3())
    with pytest.raises(TypeError, match="bias has dtype float64 but module.weight has float32"):
        cls(Bad4())
    with pytest.raises(TypeError, match="module.weight"):
        cls(object())


def test_linear_arguments():
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        tp.Linear(0, 3)
    with pytest.raises(TypeError, match="dtype must be one of 'float32', 'float64', 'float16', 'bfloat16', got 'int8'"):
        tp.Linear(3, 3, dtype="int8")


@pytest.mark.parametrize("cls", [tp.LinearAllreduce, tp.LinearLayer])
def test_layer_dtype_and_device_arguments(cls, rng):
    """dtype= converts the module's parameters (default: the module's dtype); 'cuda' needs a GPU; the module
    itself is never changed."""
    lin = tp.Linear(6, 4, seed=2)
    w32 = lin.weight.data.copy()
    layer = cls(lin, dtype="float64")
    assert layer.weight.data.dtype == np.float64 and layer.bias.data.dtype == np.float64
    np.testing.assert_array_equal(layer.weight.data, w32.astype(np.float64))
    x = rng.standard_normal((3, 6))
    assert rel_err(layer(x), x @ w32.T.astype(np.float64) + lin.bias.data) < 1e-12
    assert cls(lin).weight.data.dtype == np.float32 and cls(lin, device="cpu").weight.data.dtype == np.float32
    assert lin.weight.data.dtype == np.float32 and np.array_equal(lin.weight.data, w32)
    half = cls(lin, dtype="bfloat16")  # on the host too since issue 27: rounded once (ml_dtypes' bfloat16)
    assert half.weight.data.dtype.name == "bfloat16"
    assert np.array_equal(half.weight.data.view(np.uint16), w32.astype(half.weight.data.dtype).view(np.uint16))
    with pytest.raises(TypeError, match="dtype must be one of 'float32', 'float64', 'float16', 'bfloat16', got 'int32'"):
        cls(lin, dtype="int32")
    with pytest.raises(ValueError, match="device must be"):
        cls(lin, device="tpu")


def test_from_weights_uses_the_given_shard_in_place():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    layer = tp.LinearLayer.from_weights(weight=w)
    assert layer.weight.data is w  # skip_partition: the shard is the module's array (as np.ascontiguousarray)
    strided = np.arange(24, dtype=np.float32).reshape(3, 8)[:, ::2]
    copy = tp.LinearLayer.from_weights(weight=strided).weight.data
    assert copy.flags.c_contiguous and np.array_equal(copy, strided)


def test_deepspeed_classes_refuse_from_init():
    """Their constructors change the split, so from_init would initialise the wrong rows."""
    from tplinear import autotp

    for cls in (autotp.LmHeadLinearAllreduce, autotp.SubParamLinearLayer, autotp.SubParamLinearAllreduce,
                autotp.fused_LinearLayer, autotp.conv_LinearLayer, autotp.Conv_LinearALlreduce):
        with pytest.raises(TypeError, match="from_init is not available"):
            cls.from_init(4, 4)


def test_conv_layers_reject_bad_modules_and_gpu_placement():
    from tplinear import autotp

    class Conv:
        weight = np.zeros((4, 6))
        bias = np.zeros(4)  # Conv1D's bias has out_features = weight.shape[1] = 6 entries
    with pytest.raises(ValueError, match="size 6"):
        autotp.conv_LinearLayer(Conv())
    Conv.bias = np.zeros(6)
    layer = autotp.conv_LinearLayer(Conv())
    assert (layer.in_features, layer.out_features, layer.local_shape) == (4, 6, (4, 6))
    if tp.cuda_available():
        with pytest.raises(NotImplementedError, match="host arrays only"):
            autotp.conv_LinearLayer(Conv(), device="cuda")
