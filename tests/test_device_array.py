"""tplinear._C.DeviceArray's logic that needs no GPU, against NumPy: shapes, strides and views (arrays
over made-up addresses that nothing dereferences), reshape, dtypes, devices, the export protocols'
metadata, lifetimes; and the dtype table every binding reads. tests/test_gpu.py runs the memory side."""
import gc
import sys
import weakref

import numpy as np
import pytest

import tplinear as tp
from tplinear import _C

NO_GPU = not tp.cuda_available()
BASE = 1 << 40  # a made-up device address: only metadata is looked at


def borrowed(shape, dtype="float32", owner=None):
    return _C.DeviceArray._borrow(owner if owner is not None else object(), BASE, shape, dtype, 0)


def numpy_view(key, shape, dtype="float32"):
    """NumPy's answer for the same basic index: (shape, strides in elements, offset in elements)."""
    base = np.zeros(shape, dtype)
    view = base[_as_view(key)]
    item = base.itemsize
    offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    return view.shape, tuple(s // item for s in view.strides), offset // item


def _as_view(key):
    """The key with an Ellipsis, so that NumPy returns a (0-d) view rather than a scalar."""
    key = key if isinstance(key, tuple) else (key,)
    return key if any(k is Ellipsis for k in key) else key + (Ellipsis,)


def check_view(arr, key):
    v = arr[key]
    shape, strides, offset = numpy_view(key, arr.shape, "float64" if arr.dtype.itemsize == 8 else "float32")
    dims = [d for d, n in enumerate(shape) if n != 1]  # NumPy's strides of size-1 dims are not meaningful
    assert v.shape == shape, key
    assert [v.strides[d] for d in dims] == [strides[d] for d in dims], key
    if v.size:
        assert v.ptr - arr.ptr == offset * arr.dtype.itemsize, key
    return v


# ---------------------------------------------------------------------------------------------- the dtype table


def test_dtype_table_agrees_with_numpy():
    table = _C.dtypes()
    assert list(table) == ["float32", "float64", "float16", "bfloat16", "int32", "int64"]
    for name, d in table.items():
        assert d["dtype"] == name and d["dtype"].name == name and d["dtype"].itemsize == d["itemsize"]
        if d["typestr"] is None:  # no NumPy dtype: bfloat16
            assert name == "bfloat16" and d["dlpack"] == (4, 16)
            continue
        np_dtype = np.dtype(d["typestr"])
        assert np_dtype.name == name and np_dtype.itemsize == d["itemsize"]
        assert np_dtype.char in d["formats"] or np_dtype.char in "lq"  # C long vs long long spell int64
        assert d["dlpack"] == ({"f": 2, "i": 0}[np_dtype.kind], 8 * np_dtype.itemsize)
        assert d["dtype"] is np.dtype(name) or d["dtype"] == np.dtype(name)
    host = [n for n, d in table.items() if d["host_math"]]
    assert host == ["float32", "float64", "float16", "bfloat16"]  # the half types since issue 27 item 3
    assert [n for n, d in table.items() if d["device_math"]] == ["float32", "float64", "float16", "bfloat16"]


@pytest.mark.parametrize("spelling, name", [
    ("float32", "float32"), ("float", "float32"), ("double", "float64"), ("half", "float16"), ("bf16", "bfloat16"),
    ("torch.bfloat16", "bfloat16"), ("torch.float16", "float16"), ("int64", "int64"),
    (np.float32, "float32"), (np.dtype("float64"), "float64"), (np.int32, "int32"), (float, "float64"),
])
def test_as_dtype_resolves_every_spelling(spelling, name):
    d = _C.as_dtype(spelling)
    assert d == name and d.name == name
    assert _C.as_dtype(d) is d  # dtype objects resolve to themselves
    if name != "bfloat16":
        assert d == np.dtype(name)


def test_as_dtype_takes_torch_like_dtypes():
    class TorchLike:  # str(torch.float16) is "torch.float16"
        def __str__(self):
            return "torch.float16"

    assert _C.as_dtype(TorchLike()) == np.float16


@pytest.mark.parametrize("bad", ["float8", np.uint8, np.complex64, "torch.uint8", object(), "bfloat"])
def test_as_dtype_rejects_what_tplinear_cannot_hold(bad):
    with pytest.raises(TypeError, match="dtype must be one of float32, float64, float16, bfloat16, int32, int64"):
        _C.as_dtype(bad)


def test_bfloat16_dtype_object():
    bf = _C.bfloat16
    assert bf == "bfloat16" and bf != "float16" and not (bf != "bfloat16")
    assert bf.name == "bfloat16" and bf.itemsize == 2 and bf.kind == "f"
    assert str(bf) == repr(bf) == "bfloat16" and hash(bf) == hash("bfloat16")
    assert bf != np.dtype("float16") and bf == _C.as_dtype("bf16")


# ---------------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("spec, index", [("cuda:3", 3), (2, 2), (0, 0)])
def test_device_index(spec, index):
    assert _C.device_index(spec) == index


def test_device_index_of_a_torch_like_device():
    class Dev:
        type, index = "cuda", 5

    assert _C.device_index(Dev()) == 5


@pytest.mark.parametrize("bad", ["cpu", "cuda:", "cuda:x", "cuda:1x", -1, True, 1.5, "gpu"])
def test_device_index_errors(bad):
    with pytest.raises(ValueError, match="device must be 'cuda', 'cuda:N' or a GPU index"):
        _C.device_index(bad)


@pytest.mark.skipif(not NO_GPU, reason="checks a machine without a GPU")
def test_no_gpu_is_a_clear_error_everywhere():
    for call in (lambda: _C.DeviceArray((2, 3)), lambda: _C.DeviceArray.zeros((2,), "bfloat16"),
                 lambda: _C.DeviceArray.to_device(np.ones(3, np.float32)), lambda: _C.device_index("cuda")):
        with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
            call()
    # arguments are checked before the device is looked at
    with pytest.raises(TypeError, match="dtype must be one of"):
        _C.DeviceArray((2,), "float8")
    with pytest.raises(ValueError, match="negative dimension"):
        _C.DeviceArray((2, -1))
    with pytest.raises(TypeError):
        _C.DeviceArray(3)
    with pytest.raises(TypeError, match="dtype must be one of"):
        _C.DeviceArray.to_device(np.ones(3, np.uint8))
    with pytest.raises(ValueError, match="at most 8 dimensions"):
        _C.DeviceArray((1,) * 9)


# ---------------------------------------------------------------------------------------------- properties


def test_properties():
    a = borrowed((4, 6, 8))
    assert a.shape == (4, 6, 8) and a.strides == (48, 8, 1) and a.ndim == 3 and a.size == 192
    assert a.nbytes == 768 and a.is_contiguous and a.ptr == BASE and a.device == 0 and len(a) == 4
    assert a.dtype == np.float32
    assert repr(a) == "DeviceArray(shape=(4, 6, 8), dtype=float32, device='cuda:0')"
    assert repr(a[:, 1:3]) == "DeviceArray(shape=(4, 2, 8), dtype=float32, device='cuda:0', strides=(48, 8, 1))"
    assert repr(borrowed((3,), "bfloat16")) == "DeviceArray(shape=(3,), dtype=bfloat16, device='cuda:0')"
    s = borrowed(())
    assert s.shape == () and s.size == 1 and s.ndim == 0 and s.is_contiguous
    with pytest.raises(TypeError, match="len\\(\\) of a 0-d array"):
        len(s)
    e = borrowed((0, 5))
    assert e.size == 0 and e.nbytes == 0 and len(e) == 0 and not e
    with pytest.raises(AttributeError):
        a.shape = (1,)


def test_dims_of_size_one_do_not_break_contiguity():
    a = borrowed((5, 1, 4))
    assert a[:, 0:1, :].is_contiguous  # the size-1 dim's stride does not matter
    assert not a[1:4, :, 1:3].is_contiguous and a[1:4].is_contiguous


# ---------------------------------------------------------------------------------------------- views


@pytest.mark.parametrize("key", [
    0, -1, 3, slice(None), slice(1, 3), slice(-2, None), slice(2, 100), slice(5, 2), slice(-100, 2),
    (Ellipsis, slice(2, 5)), (1, Ellipsis), (Ellipsis, 0), (1, 2, 3), (slice(1, 3), slice(None), -1),
    (Ellipsis,), (0, Ellipsis, slice(0, 0)), (slice(None), 2), (Ellipsis, 1, slice(None), 7), np.int64(2),
])
def test_basic_indexing_matches_numpy(key):
    check_view(borrowed((4, 6, 8)), key)


def test_random_indexing_matches_numpy(rng):
    """Chains of random basic indices (views of views) against NumPy's."""
    for _ in range(300):
        ndim = int(rng.integers(1, 5))
        shape = tuple(int(n) for n in rng.integers(0, 6, size=ndim))
        arr = borrowed(shape, rng.choice(["float32", "float64"]))
        ref = np.zeros(shape, "float64" if arr.dtype.itemsize == 8 else "float32")
        for _ in range(int(rng.integers(1, 3))):
            key = []
            for n in arr.shape:
                if rng.random() < 0.3 and n > 0:
                    key.append(int(rng.integers(-n, n)))
                else:
                    lo, hi = (int(v) if v is not None else None for v in rng.choice([None, -7, -1, 0, 1, 2, 9], 2))
                    key.append(slice(lo, hi))
            i, j = sorted(int(v) for v in rng.integers(0, len(key) + 1, size=2))
            if rng.random() < 0.4:  # an Ellipsis standing for a run of dims (maybe none)
                key[i:j] = [Ellipsis]
            elif rng.random() < 0.5:  # trailing dims left out
                key = key[:i]
            key = tuple(key)
            view, ref_view = arr[key], ref[_as_view(key)]
            offset = (ref_view.__array_interface__["data"][0] - ref.__array_interface__["data"][0]) // ref.itemsize
            assert view.shape == ref_view.shape, (shape, key)
            if view.size:
                assert view.ptr - arr.ptr == offset * arr.dtype.itemsize, (shape, key)
                assert all(s == r // ref.itemsize for s, r, n in zip(view.strides, ref_view.strides, view.shape)
                           if n > 1), (shape, key)
                assert view.is_contiguous == ref_view.flags.c_contiguous, (shape, key)
            arr, ref = view, ref_view


@pytest.mark.parametrize("key, match", [
    ((Ellipsis, slice(None, None, 2)), "step 1"), (slice(None, None, -1), "step 1"), (4, "out of bounds"),
    (-5, "out of bounds"), ((0, 0, 0, 0), "too many indices"), ((Ellipsis, Ellipsis), "single ellipsis"),
])
def test_indexing_errors(key, match):
    with pytest.raises(IndexError, match=match):
        borrowed((4, 6, 8))[key]


def test_index_types():
    a = borrowed((4, 6))
    with pytest.raises(TypeError):
        a[1.5]
    with pytest.raises(TypeError):
        a[None]
    with pytest.raises(TypeError):
        a["x"]


def test_iteration_yields_rows():
    a = borrowed((3, 2))
    rows = list(a)
    assert [r.shape for r in rows] == [(2,)] * 3 and [r.ptr - a.ptr for r in rows] == [0, 8, 16]
    assert list(borrowed(())) == []


# ---------------------------------------------------------------------------------------------- reshape


@pytest.mark.parametrize("new", [(24,), (-1,), (2, -1), (2, 3, 4), ((4, 6),), ([3, -1],), (1, 24, 1), (-1, 1)])
def test_reshape_views_match_numpy(new):
    a = borrowed((4, 6))
    r = a.reshape(*new)
    ref = np.zeros((4, 6), np.float32).reshape(*new)
    assert r.shape == ref.shape and r.strides == tuple(s // 4 for s in ref.strides) and r.ptr == a.ptr


def test_reshape_of_empty_and_scalar():
    assert borrowed((0, 3)).reshape(-1, 3).shape == (0, 3)
    assert borrowed((0, 3)).reshape(0, -1).shape == (0, 0)
    assert borrowed(()).reshape(1, 1).shape == (1, 1)
    assert borrowed((1,)).reshape(()).shape == ()


@pytest.mark.parametrize("new, match", [
    ((5, -1), "cannot reshape"), ((7,), "cannot reshape"), ((-1, -1), "one unknown dimension"),
    ((2, -3), "negative dimension"),
])
def test_reshape_errors(new, match):
    with pytest.raises(ValueError, match=match):
        borrowed((4, 6)).reshape(*new)


# ---------------------------------------------------------------------------------------------- lifetimes


def test_views_keep_their_owner_alive():
    owner = object()
    before = sys.getrefcount(owner)
    a = borrowed((4, 4), owner=owner)
    v = a[1:][:, 2:].reshape(-1) if a[1:][:, 2:].is_contiguous else a[1:][:, 2:]
    del a
    gc.collect()
    assert sys.getrefcount(owner) == before + 1  # one reference: the views all hold the owner, once
    w = weakref.ref(v)
    del v
    gc.collect()
    assert w() is None and sys.getrefcount(owner) == before


def test_not_subclassable():
    with pytest.raises(TypeError):
        type("Sub", (_C.DeviceArray,), {})


# ---------------------------------------------------------------------------------------------- export metadata


def test_cuda_array_interface():
    a = borrowed((4, 6, 8))
    cai = a.__cuda_array_interface__
    assert cai == {"shape": (4, 6, 8), "typestr": "<f4", "data": (BASE, False), "version": 3, "strides": None,
                   "stream": 1}
    v = a[..., 2:5]
    assert v.__cuda_array_interface__["strides"] == (192, 32, 4)
    assert borrowed((2,), "int64").__cuda_array_interface__["typestr"] == "<i8"
    with pytest.raises(AttributeError, match="use DLPack"):
        borrowed((2,), "bfloat16").__cuda_array_interface__


class DLPackOf:
    """Hands a DeviceArray's capsule to tplinear's DLPack importer (nothing is dereferenced)."""

    def __init__(self, arr):
        self.arr = arr

    def __dlpack_device__(self):
        return self.arr.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        return self.arr.__dlpack__(**kwargs)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int32", "int64"])
def test_dlpack_export_round_trips_through_the_importer(dtype):
    owner = object()
    before = sys.getrefcount(owner)
    v = borrowed((4, 6, 8), dtype, owner)[1:3, :, 5:]
    info = _C.tensor_info(DLPackOf(v))
    assert info == {"data": v.ptr, "dtype": dtype, "shape": (2, 6, 3), "strides": (48, 8, 1), "device": ("cuda", 0)}
    assert _C.tensor_info(v) == info  # the direct path sees the same
    del v
    gc.collect()
    assert sys.getrefcount(owner) == before  # the consumer's deleter released the producer


def test_dlpack_capsules():
    a = borrowed((2, 3))
    assert a.__dlpack_device__() == (2, 0)
    assert "dltensor_versioned" in repr(a.__dlpack__(max_version=(1, 0), stream=-1))
    assert '"dltensor"' in repr(a.__dlpack__(stream=-1))
    assert '"dltensor"' in repr(a.__dlpack__(None, (0, 8)))
    assert "dltensor_versioned" in repr(a.__dlpack__(dl_device=(2, 0), max_version=(1, 2), stream=-1))
    with pytest.raises(BufferError, match="cuda:0 array to DLPack device"):
        a.__dlpack__(dl_device=(1, 0))
    with pytest.raises(BufferError, match="copy=True"):
        a.__dlpack__(copy=True)
    with pytest.raises(ValueError, match="copy=False"):
        a.__array__(copy=False)


def test_borrow_with_strides():
    a = _C.DeviceArray._borrow(object(), BASE, (3, 4), "float32", 1, (1, 3))  # column-major
    assert a.strides == (1, 3) and not a.is_contiguous and a.device == 1
    assert a.__cuda_array_interface__["strides"] == (4, 12)
    with pytest.raises(ValueError, match="strides must have 2 entries"):
        _C.DeviceArray._borrow(object(), BASE, (3, 4), "float32", 0, (1,))
