"""The GPU path's host-side pieces, runnable without a GPU: the CUDA build itself, DLPack in and out
(NumPy is a CPU DLPack producer and consumer), __cuda_array_interface__ parsing, device dispatch and the
errors of a machine without a GPU. tests/test_gpu.py has the tests that need one."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import tplinear as tp
from tplinear import _C, _device
from conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import buildcfg  # noqa: E402

NO_GPU = not tp.cuda_available()


class DLPackOnly:
    """Hides the buffer protocol: tplinear must go through __dlpack__ / __dlpack_device__."""

    def __init__(self, arr, versioned=True):
        self.arr, self.versioned, self.calls = arr, versioned, []
        self.shape, self.dtype = arr.shape, arr.dtype

    def __dlpack_device__(self):
        return self.arr.__dlpack_device__()

    def __dlpack__(self, stream=None, **kwargs):
        self.calls.append(dict(kwargs, stream=stream))
        if not self.versioned and "max_version" in kwargs:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        return self.arr.__dlpack__(stream=stream, **kwargs)


class FakeCAI:
    """A __cuda_array_interface__ producer with a made-up pointer (never dereferenced here)."""

    def __init__(self, shape, typestr="<f4", ptr=0x7F0000001000, strides=None, readonly=False, **extra):
        self.shape = shape
        self.__cuda_array_interface__ = dict(shape=shape, typestr=typestr, data=(ptr, readonly), version=3,
                                             strides=strides, **extra)


# ---------------------------------------------------------------------------------------------- the build


@pytest.mark.skipif(os.environ.get("TPLINEAR_CUDA") == "0", reason="TPLINEAR_CUDA=0 builds the CPU-only path")
def test_cuda_path_is_compiled_when_a_toolkit_is_found():
    """CI on a CPU machine compiles and links the CUDA path: a broken GPU build is a red CI."""
    if buildcfg.cuda_home() is None:
        pytest.skip("no CUDA toolkit on this machine (CUDA_HOME or /usr/local/cuda)")
    assert _C.cuda_compiled(), "a CUDA toolkit is installed but the extension was built without the CUDA path"


def test_cuda_available_matches_device_count():
    assert tp.cuda_available() is (_C.cuda_device_count() > 0)
    assert isinstance(tp.cuda_available(), bool)


@pytest.mark.skipif(not NO_GPU, reason="checks the behaviour of a machine without a GPU")
def test_no_gpu_errors_are_clear():
    assert tp.cuda_available() is False
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        _device.DeviceArray((2, 2))
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        tp.Linear(4, 3, device="cuda")


# ---------------------------------------------------------------------------------------------- DLPack in


@pytest.mark.parametrize("versioned", [True, False])
def test_dlpack_cpu_producer_is_zero_copy(versioned):
    base = np.arange(60, dtype=np.float64).reshape(5, 12)
    view = base[1:, 2:9]  # strided view with an offset
    src = DLPackOnly(view, versioned)
    info = _C.tensor_info(src)
    assert info["data"] == view.ctypes.data
    assert info["shape"] == view.shape
    assert info["strides"] == tuple(s // 8 for s in view.strides)
    assert info["dtype"] == "float64" and info["device"] == ("cpu", 0)
    # CPU producers get stream=None, as the protocol says; unversioned producers get a retry without max_version
    assert src.calls[0]["stream"] is None
    assert ("max_version" in src.calls[-1]) is versioned


def test_dlpack_capsule_is_consumed_and_released():
    arr = np.ones((4, 4), dtype=np.float32)
    before = sys.getrefcount(arr)
    for _ in range(20):
        _C.tensor_info(DLPackOnly(arr))
        _C.tensor_info(DLPackOnly(arr, versioned=False))
    assert sys.getrefcount(arr) == before  # the deleter ran every time


def test_dlpack_read_only_is_refused_for_outputs():
    arr = np.ones(3, dtype=np.float32)
    arr.flags.writeable = False
    assert _C.tensor_info(DLPackOnly(arr))["data"] == arr.ctypes.data  # reading is fine
    with pytest.raises(ValueError, match="read-only"):
        _C.tensor_info(DLPackOnly(arr), True)


def test_dlpack_dtypes():
    assert _C.tensor_info(DLPackOnly(np.ones(2, np.float16)))["dtype"] == "float16"
    assert _C.tensor_info(DLPackOnly(np.ones(2, np.int64)))["dtype"] == "int64"
    with pytest.raises(TypeError, match="unsupported DLPack dtype"):
        _C.tensor_info(DLPackOnly(np.ones(2, np.uint8)))
    with pytest.raises(TypeError, match="DLPack"):
        _C.tensor_info(DLPackOnly(np.ones(2, np.complex64)))


def test_layer_takes_dlpack_inputs(rng):
    lin = tp.Linear(16, 7, seed=3)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    y_ref = lin(x).copy()
    y = lin(DLPackOnly(x))
    assert rel_err(y, y_ref) < 1e-6
    dy = rng.standard_normal((3, 7)).astype(np.float32)
    dx = lin.backward(DLPackOnly(dy))
    assert rel_err(dx, dy.astype(np.float64) @ lin.weight.data.astype(np.float64)) < 1e-5


def test_an_input_in_another_dtype_than_the_weight_is_a_type_error():
    lin = tp.Linear(4, 3)
    with pytest.raises(TypeError, match="float16"):
        lin(DLPackOnly(np.ones((2, 4), np.float16)))


def test_producer_without_dlpack_device_is_rejected():
    class Broken:
        shape = (2,)

        def __dlpack__(self, stream=None):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="__dlpack_device__"):
        _C.tensor_info(Broken())


# ---------------------------------------------------------------------------------------------- DLPack out


class Exporter:
    """Exports a NumPy array's memory through tplinear's DLPack exporter (CPU device)."""

    def __init__(self, arr):
        self.arr = arr

    def __dlpack_device__(self):
        return (1, 0)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        versioned = max_version is not None and max_version[0] >= 1
        return _C.dlpack_export(self.arr, self.arr.ctypes.data, 1, 0, self.arr.dtype.name, self.arr.shape,
                                versioned, False)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "int64"])
def test_dlpack_export_is_consumed_by_numpy_without_copy(dtype):
    arr = np.arange(24).reshape(2, 3, 4).astype(dtype)
    before = sys.getrefcount(arr)
    out = np.from_dlpack(Exporter(arr))
    assert out.ctypes.data == arr.ctypes.data and out.shape == arr.shape and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)
    assert sys.getrefcount(arr) > before  # the consumer keeps the owner alive
    del out
    assert sys.getrefcount(arr) == before  # ... and releases it through our deleter


def test_dlpack_export_unconsumed_capsule_frees_itself():
    arr = np.ones(5, np.float32)
    before = sys.getrefcount(arr)
    for versioned in (True, False):
        cap = _C.dlpack_export(arr, arr.ctypes.data, 1, 0, "float32", arr.shape, versioned, False)
        del cap
    assert sys.getrefcount(arr) == before


def test_dlpack_export_round_trips_through_tplinear():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    info = _C.tensor_info(Exporter(arr))
    assert info["data"] == arr.ctypes.data and info["shape"] == (2, 3) and info["strides"] == (3, 1)


# ---------------------------------------------------------------------------------------------- __cuda_array_interface__


@pytest.mark.skipif(not NO_GPU, reason="made-up pointers are only safe where no GPU can look at them")
def test_cai_parsing():
    info = _C.tensor_info(FakeCAI((3, 4), "<f2", ptr=0x7F0000002000))
    assert info == {"data": 0x7F0000002000, "dtype": "float16", "shape": (3, 4), "strides": (4, 1),
                    "device": ("cuda", 0)}
    info = _C.tensor_info(FakeCAI((3, 4), "<f4", strides=(4, 48)))  # column-major, bytes -> elements
    assert info["strides"] == (1, 12)
    assert _C.tensor_info(FakeCAI((0,), "<f8", ptr=0))["shape"] == (0,)
    # stream None / absent: nothing to order; the current stream (1: legacy default) is no-op too
    assert _C.tensor_info(FakeCAI((2,), stream=None))["device"] == ("cuda", 0)
    assert _C.tensor_info(FakeCAI((2,), stream=1))["device"] == ("cuda", 0)


@pytest.mark.parametrize("cai, exc, match", [
    (dict(shape=(2,), typestr="<f4", data=(0x1000, False), version=3, mask=object()), ValueError, "masked"),
    (dict(shape=(2,), typestr="<c8", data=(0x1000, False), version=3), TypeError, "typestr"),
    (dict(shape=(2,), typestr="<f4", data=(0x1000, False), version=3, stream=0), ValueError, "stream 0"),
    (dict(shape=(2,), typestr="<f4", data=(0x1000, False), version=3, strides=(6,)), ValueError, "multiple"),
    (dict(shape=(2,), typestr="<f4", version=3), TypeError, "data"),
    (dict(shape=[2], typestr="<f4", data=(0x1000, False), version=3), TypeError, "shape"),
])
def test_cai_errors(cai, exc, match):
    """Every case is refused from the dict alone, before CUDA is asked where the made-up pointer lives, so
    it runs on GPU machines too (there the stream-0 case used to meet 'points at host memory' first)."""
    obj = FakeCAI((2,))
    obj.__cuda_array_interface__ = cai
    with pytest.raises(exc, match=match):
        _C.tensor_info(obj)


def test_cai_read_only_is_refused_for_outputs():
    with pytest.raises(ValueError, match="read-only"):
        _C.tensor_info(FakeCAI((2,), readonly=True), True)


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.mark.skipif(not NO_GPU, reason="made-up pointers are only safe where no GPU can look at them")
def test_mixing_host_and_device_arrays_is_a_clear_error():
    lin = tp.Linear(4, 3)
    x = FakeCAI((2, 4))
    with pytest.raises(ValueError, match="input is on cuda:0 but the weight is on cpu"):
        lin(x)
    y = np.empty((2, 3), np.float32)
    with pytest.raises(ValueError, match="on cuda:0 but the weight is on cpu"):
        _C.linear_forward(np.ones((2, 4), np.float32), lin.weight.data, None, FakeCAI((2, 3)))
    del y


@pytest.mark.skipif(not NO_GPU, reason="checks the error of a machine without a GPU")
def test_all_device_operands_without_a_gpu_is_a_clear_error():
    w, x, y = FakeCAI((3, 4)), FakeCAI((2, 4)), FakeCAI((2, 3))
    with pytest.raises((RuntimeError, NotImplementedError), match="no CUDA GPU|without CUDA"):
        _C.linear_forward(x, w, None, y)


# ---------------------------------------------------------------------------------------------- host helpers


def _bf16_reference(a):
    """NumPy's reading of float32 -> bfloat16: round to nearest even, any NaN -> the quiet NaN 0x7FC0."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), np.uint16(0x7FC0), rounded)


def _bf16_bits(a):
    out = np.empty(np.shape(a), np.uint16)
    _C.float32_to_bfloat16(np.ascontiguousarray(a, dtype=np.float32), out)
    return out


def _bf16_to_float32(bits):
    out = np.empty(np.shape(bits), np.float32)
    _C.bfloat16_to_float32(np.ascontiguousarray(bits, dtype=np.uint16), out)
    return out


def test_bfloat16_host_conversion():
    vals = np.array([1.0, -2.5, 3.140625, 1e-3, 65504.0, 0.0], dtype=np.float32)
    back = _bf16_to_float32(_bf16_bits(vals))
    assert np.all(np.abs(back - vals) <= np.abs(vals) * 2.0**-8)
    inf = np.array([np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(_bf16_to_float32(_bf16_bits(inf)), inf)
    assert np.isnan(_bf16_to_float32(_bf16_bits(np.array([np.nan], np.float32))))[0]
    # round to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 -> 1
    assert _bf16_to_float32(_bf16_bits(np.array([1 + 2.0**-8], np.float32)))[0] == 1.0


def test_bfloat16_rounding_matches_numpy_on_every_kind_of_bit_pattern(rng):
    """The C conversion against NumPy's arithmetic on random bit patterns (normals, subnormals, ties,
    infinities, NaNs with any payload and sign, the largest finite values that round up to inf)."""
    u = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    u[:4096] = (u[:4096] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exact ties
    u[4096:8192] &= np.uint32(0x807FFFFF)  # subnormals and zeros
    u[8192:8200] = [0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7FC00000, 0xFFFFFFFF, 0x7F800001, 0x00000001]
    a = u.view(np.float32)
    np.testing.assert_array_equal(_bf16_bits(a), _bf16_reference(a))
    # widening is exact: every bfloat16 pattern is the top half of its float32
    bits = np.arange(2**16, dtype=np.uint16)
    np.testing.assert_array_equal(_bf16_to_float32(bits).view(np.uint32), bits.astype(np.uint32) << 16)
    with pytest.raises(ValueError, match="as many"):
        _C.float32_to_bfloat16(np.zeros(3, np.float32), np.empty(2, np.uint16))
    with pytest.raises(ValueError, match="4-byte"):
        _C.float32_to_bfloat16(np.zeros(3, np.float64), np.empty(3, np.uint16))


def test_device_dtypes():
    assert _device.as_dtype("bfloat16") == "bfloat16"
    assert _device.as_dtype("torch.float16") == np.float16
    assert _device.as_dtype(np.float32) == np.float32
    with pytest.raises(TypeError):
        _device.as_dtype("float8")


def test_gpu_benchmark_parses_and_skips_cleanly_without_a_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_linear.py"), "--json", str(out)]
    if not NO_GPU:  # a smoke run of the benchmark's code path, not a measurement
        cmd += ["--size", "256", "--iters", "2", "--warmup", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if NO_GPU:
        assert "skip" in proc.stdout.lower()
        import json

        assert "skipped" in json.loads(out.read_text())


def test_device_array_views_and_export_metadata():
    """DeviceArray bookkeeping without touching memory: a made-up pointer on device 0."""
    a = _device.DeviceArray._borrow(object(), 1 << 20, (4, 6, 8), "float32", 0)
    assert a.strides == (48, 8, 1) and a.is_contiguous and a.nbytes == 4 * 6 * 8 * 4
    v = a[..., 2:5]
    assert v.shape == (4, 6, 3) and v.strides == (48, 8, 1) and not v.is_contiguous
    assert v.ptr == a.ptr + 2 * 4
    r = a[1]
    assert r.shape == (6, 8) and r.is_contiguous and r.ptr == a.ptr + 48 * 4
    assert a[1:3, :, -1].shape == (2, 6) and a[1:3, :, -1].strides == (48, 8)
    with pytest.raises(IndexError):
        a[..., ::2]
    with pytest.raises(IndexError):
        a[4]
    # what a consumer sees through DLPack and the CUDA Array Interface
    info = _C.tensor_info(v)
    assert info == {"data": v.ptr, "dtype": "float32", "shape": (4, 6, 3), "strides": (48, 8, 1),
                    "device": ("cuda", 0)}
    cai = v.__cuda_array_interface__
    assert cai["strides"] == (192, 32, 4) and cai["data"] == (v.ptr, False) and cai["version"] == 3
    assert a.__cuda_array_interface__["strides"] is None
    bf = _device.DeviceArray._borrow(object(), 1 << 20, (2, 3), "bfloat16", 0)
    assert _C.tensor_info(bf)["dtype"] == "bfloat16"
    assert not hasattr(bf, "__cuda_array_interface__")  # no typestr for bfloat16: DLPack only
    with pytest.raises(BufferError):
        a.__dlpack__(dl_device=(1, 0))


# ---------------------------------------------------------------------------------------------- issue 25's CPU-visible defects


def test_errors_survive_the_release_of_dlpack_arguments(world_of_one):
    """A pending error (a later argument's, or a check on the DLPack argument itself) is what the caller
    sees: releasing the consumed capsule used to clear it, and the call returned NULL without an exception
    (SystemError)."""
    x = np.ones((2, 4), np.float32)
    w = np.ones((3, 4), np.float32)
    with pytest.raises(TypeError, match="must be an array"):
        _C.linear_forward(DLPackOnly(x), w, None, "not an array")  # a later argument fails
    with pytest.raises(ValueError, match="C-contiguous"):  # a check on the DLPack argument itself
        _C.all_reduce(world_of_one._handle, DLPackOnly(np.ones((4, 4))[:, ::2]), "sum")


def test_numpy_api_layers_take_torch_modules_on_the_cpu(world_of_one, rng):
    """tp.LinearLayer / tp.LinearAllreduce(nn.Linear(...)): the module's nn.Parameters require grad, and
    torch refuses to export those through DLPack (BufferError); tplinear reads them through detach()."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    mod = torch.nn.Linear(8, 6)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    ref = (x.astype(np.float64) @ mod.weight.detach().double().numpy().T + mod.bias.detach().double().numpy())
    for cls in (tp.LinearLayer, tp.LinearAllreduce):
        layer = cls(mod)
        np.testing.assert_array_equal(np.asarray(layer.weight.data), mod.weight.detach().numpy())
        assert rel_err(layer(x), ref) < 1e-6
    assert mod.weight.requires_grad and mod.weight.grad is None  # the module is read, never changed
    # the detached read is zero-copy, and any other BufferError is still reported as itself
    w = mod.weight
    assert _C.tensor_info(w)["data"] == w.data_ptr()
    with pytest.raises(BufferError, match="conjugate"):
        _C.tensor_info(torch.ones(2, dtype=torch.complex64).conj())


class CudaClaim:
    """A DLPack producer that claims GPU memory (kDLCUDA) at a made-up address: tplinear must refuse it by
    its device before anything dereferences the pointer."""

    def __init__(self, shape, ptr=0x7F0000001000):
        self.shape, self.ptr, self.owner = shape, ptr, np.empty(0, np.float32)

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, max_version=None, **kwargs):
        versioned = max_version is not None and max_version[0] >= 1
        return _C.dlpack_export(self.owner, self.ptr, 2, 0, "float32", self.shape, versioned, False)


def test_a_host_group_of_one_refuses_gpu_memory_before_any_copy(tmp_path):
    """A CPU world of one ('self' backend) used to skip the device check (groups of one), so the
    sequence-parallel reduce-scatter memmove'd the device pointers on the host: a segfault. Run in a child
    so that such a crash is a failed test, not a dead session."""
    script = tmp_path / "child.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import numpy as np
import tplinear as tp
from tplinear import _C
from test_dlpack import CudaClaim
g = tp.distributed.init_process_group(timeout=10)
assert g.backend == "self", g.backend
h = g._handle
calls = [
    lambda: _C.reduce_scatter_rows(h, CudaClaim((4, 3)), [(0, 4)], CudaClaim((4, 3), ptr=0x7F0000009000)),
    lambda: _C.row_forward(h, CudaClaim((2, 4)), CudaClaim((3, 4)), None, CudaClaim((2, 3))),
    lambda: _C.col_forward_sp(h, CudaClaim((2, 4)), CudaClaim((3, 4)), None, [(0, 2)], CudaClaim((2, 3))),
    lambda: _C.gather(h, CudaClaim((3, 4)), 0, [(0, 3)], 1, CudaClaim((3, 4), ptr=0x7F0000009000)),
    lambda: _C.reduce_scatter(h, CudaClaim((4,)), CudaClaim((4,), ptr=0x7F0000009000), "sum"),
]
for call in calls:
    try:
        call()
    except ValueError as e:
        assert "nccl" in str(e) and "'self'" in str(e), e
    else:
        raise AssertionError("GPU memory was taken by a host group of one")
print("refused")
""")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and "refused" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_stream_for_uses_the_tensors_stream_for_one_call_and_gives_ours_back(monkeypatch):
    """tplinear.torch and the collectives run a call on torch tensors on torch's current stream and restore
    tplinear's stream afterwards, also when the call raises (the old on_stream set it for good: after one
    call inside `with torch.cuda.stream(s)`, every later collective ran on s)."""
    from tplinear.torch import _ops
    torch = pytest.importorskip("torch")
    assert _device.torch_stream(torch.ones(2)) is None and _device.torch_stream(np.ones(2)) is None
    streams = {"a": 0x5000, "b": 0}  # 0: torch's legacy default stream
    monkeypatch.setattr(_device, "torch_stream", lambda obj: streams.get(obj) if isinstance(obj, str) else None)
    before = _C.cuda_get_stream()
    try:
        _C.cuda_set_stream(0x7000)
        with _ops.on_stream("a"):
            assert _C.cuda_get_stream() == 0x5000
        assert _C.cuda_get_stream() == 0x7000
        with _device.stream_for(None, "b", "a"):  # the first tensor's stream
            assert _C.cuda_get_stream() == 0
        assert _C.cuda_get_stream() == 0x7000
        with pytest.raises(KeyError), _device.stream_for("a"):
            raise KeyError("the call failed")
        assert _C.cuda_get_stream() == 0x7000
        with _device.stream_for(np.ones(2)):  # not a CUDA torch tensor: tplinear's own stream
            assert _C.cuda_get_stream() == 0x7000
    finally:
        _C.cuda_set_stream(before or None)


@pytest.mark.skipif(not _C.cuda_compiled(), reason="streams are settings of a CUDA build")
@pytest.mark.skipif(_C.cuda_device_count() == 1, reason="cuda:1 does not exist on a machine with one GPU (its "
                    "stream is refused); test_gpu.py::test_each_device_keeps_its_own_stream covers two")
def test_each_gpu_has_a_stream_of_its_own(monkeypatch):
    """A stream belongs to one GPU, so tplinear keeps one per device: setting cuda:1's (directly, from a
    stream object's own device, or for one call on a tensor on cuda:1) leaves cuda:0's as it was (before, one
    process-wide stream served every device). Made-up handles: nothing is enqueued on them."""
    class OnCuda1:  # stands for a torch tensor or stream on cuda:1
        device = types.SimpleNamespace(type="cuda", index=1)
        cuda_stream = 0x6000

    before = [_C.cuda_get_stream(d) for d in (0, 1)]
    monkeypatch.setattr(_device, "torch_stream", lambda obj: 0x5000 if isinstance(obj, OnCuda1) else None)
    try:
        _C.cuda_set_stream(0x7000, 0)
        _C.cuda_set_stream(0x9000, 1)
        assert (_device.get_stream(0), _device.get_stream(1)) == (0x7000, 0x9000)
        with _device.stream_for(np.ones(2), OnCuda1()):  # the call's stream, on the tensor's GPU only
            assert (_device.get_stream(0), _device.get_stream(1)) == (0x7000, 0x5000)
        assert (_device.get_stream(0), _device.get_stream(1)) == (0x7000, 0x9000)
        _device.set_stream(OnCuda1())  # a stream object: set for its own device
        assert (_device.get_stream(0), _device.get_stream("cuda:1")) == (0x7000, 0x6000)
        _device.set_stream(None, device=1)
        assert (_device.get_stream(0), _device.get_stream(1)) == (0x7000, 0)
        with pytest.raises(ValueError, match="at most 64 devices"):
            _C.cuda_set_stream(0x7000, 64)
    finally:
        for d, s in enumerate(before):
            _C.cuda_set_stream(s or None, d)
