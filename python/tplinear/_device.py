"""GPU arrays owned by tplinear: what layers on the GPU return and hold as parameters.

A DeviceArray is C-contiguous memory on one GPU (stream-ordered cudaMallocAsync on tplinear's current
stream), exported zero-copy through DLPack (``torch.from_dlpack(y)``, ``jax.dlpack``) and the CUDA Array
Interface v3 (``cupy.asarray(y)``), and copied to the host with ``.numpy()``.

Streams: every GPU operation of tplinear (GEMMs, NCCL collectives, copies) runs on one process-wide
stream, the legacy default stream unless ``set_stream(ptr)`` names another (e.g.
``torch.cuda.current_stream().cuda_stream``). Inputs are ordered after their producer's stream as the
DLPack / CAI protocols say; exported arrays order the consumer's stream after ours.
"""
import os

import numpy as np

from . import _C

_KDLCUDA = 2


class _BFloat16:
    """The dtype of bfloat16 device arrays (NumPy has none); compares equal to 'bfloat16'."""

    name = "bfloat16"
    itemsize = 2
    kind = "f"

    def __eq__(self, other):
        return other == "bfloat16" or getattr(other, "name", None) == "bfloat16"

    def __hash__(self):
        return hash("bfloat16")

    def __repr__(self):
        return "bfloat16"

    __str__ = __repr__


bfloat16 = _BFloat16()
_NUMPY_DTYPES = ("float32", "float64", "float16", "int32", "int64")
_TYPESTR = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int32": "<i4", "int64": "<i8"}


def as_dtype(d):
    """A device dtype from a name, a NumPy dtype or a torch dtype ('torch.bfloat16')."""
    if isinstance(d, str) or d is bfloat16:
        name = str(d)
    elif "torch." in str(d):
        name = str(d)
    else:
        try:
            name = np.dtype(d).name
        except TypeError:
            name = str(d)
    name = name.replace("torch.", "")
    name = {"half": "float16", "float": "float32", "double": "float64", "bf16": "bfloat16"}.get(name, name)
    if name == "bfloat16":
        return bfloat16
    if name in _NUMPY_DTYPES:
        return np.dtype(name)
    raise TypeError(f"GPU dtype must be one of float32, float64, float16, bfloat16, int32, int64; got {d!r}")


def cuda_available():
    return bool(_C.cuda_available())


def _env_int(names):
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return 0


def default_device():
    """The GPU of this process: LOCAL_RANK (torchrun; OMPI_COMM_WORLD_LOCAL_RANK under mpirun) modulo the
    number of visible GPUs."""
    n = _C.cuda_device_count()
    if n == 0:
        raise RuntimeError("no CUDA GPU is visible to this process" + (
            "" if _C.cuda_compiled() else " (tplinear was built without CUDA)"))
    return _env_int(["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"]) % n


def device_index(device):
    """'cuda' / None -> default_device(); 'cuda:N' or N -> N. 'cpu' is not a GPU."""
    if device is None or device == "cuda":
        return default_device()
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    if isinstance(device, str) and device.startswith("cuda:"):
        return int(device[5:])
    index = getattr(device, "index", None)  # torch.device
    if getattr(device, "type", None) == "cuda":
        return default_device() if index is None else int(index)
    raise ValueError(f"device must be 'cuda', 'cuda:N' or a GPU index, got {device!r}")


def where(obj):
    """The GPU index an array lives on, or None for host memory (NumPy, CPU torch, ...)."""
    if isinstance(obj, DeviceArray):
        return obj.device
    dl = getattr(obj, "__dlpack_device__", None)
    if dl is not None and not isinstance(obj, np.ndarray):
        kind, index = dl()
        return int(index) if int(kind) in (_KDLCUDA, 13) else None
    if hasattr(obj, "__cuda_array_interface__"):
        return _C.tensor_info(obj)["device"][1]
    return None


def is_device(obj):
    return isinstance(obj, DeviceArray)


def get_stream():
    """tplinear's current stream as an int (0: the legacy default stream)."""
    return _C.cuda_get_stream()


def set_stream(stream):
    """Runs tplinear's GPU work on `stream` (a cudaStream_t as an int, or an object with .cuda_stream
    or .ptr such as torch / CuPy streams; None: the legacy default stream)."""
    if stream is not None and not isinstance(stream, int):
        stream = getattr(stream, "cuda_stream", None) or getattr(stream, "ptr", None)
    _C.cuda_set_stream(stream)


def set_allow_tf32(allow):
    """float32 GEMMs may use TF32 tensor cores (off by default, as torch's matmul default)."""
    _C.cuda_set_allow_tf32(bool(allow))


def synchronize(device=None):
    _C.cuda_synchronize(device_index(device))


# ---------------------------------------------------------------------------------------------- bfloat16 on the host


def _bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, np.uint16(0x7FC0), rounded)


def _bf16_to_float32(bits):
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------------------------- the array


def _contiguous_strides(shape):
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


class DeviceArray:
    """An array on one GPU. DeviceArray(shape, dtype, device) allocates uninitialised C-contiguous memory;
    see also zeros(), to_device(), reshape() and basic slicing (views), copy(), numpy().
    strides are in elements; views made by slicing may be non-contiguous."""

    __slots__ = ("_owner", "ptr", "shape", "strides", "dtype", "device", "__weakref__")

    def __init__(self, shape, dtype="float32", device=None, _owner=None, _ptr=None, _strides=None):
        self.shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")
        self.dtype = as_dtype(dtype)
        self.device = device_index(device)
        self.strides = _contiguous_strides(self.shape) if _strides is None else tuple(_strides)
        if _owner is None:
            self._owner, self.ptr = _C.cuda_malloc(self.device, self.nbytes)
        else:
            self._owner, self.ptr = _owner, _ptr

    # -- construction

    @classmethod
    def zeros(cls, shape, dtype="float32", device=None):
        out = cls(shape, dtype, device)
        _C.cuda_zero(out.device, out.ptr, out.nbytes)
        return out

    @classmethod
    def to_device(cls, arr, dtype=None, device=None):
        """Copies a host array (NumPy or anything np.asarray takes) to the GPU, converting to dtype
        (default: the array's own; float32 data can become float16 or bfloat16)."""
        if isinstance(arr, DeviceArray) and (dtype is None or as_dtype(dtype) == arr.dtype):
            if device is None or device_index(device) == arr.device:
                return arr
        host = arr.numpy() if isinstance(arr, DeviceArray) else np.asarray(arr)
        dt = as_dtype(dtype if dtype is not None else host.dtype)
        out = cls(host.shape, dt, device)
        if dt == bfloat16:
            payload = _bf16_bits(host)
        else:
            payload = np.ascontiguousarray(host, dtype=dt)
        if out.nbytes:
            _C.cuda_upload(out.device, out.ptr, memoryview(payload).cast("B"))
        return out

    # -- properties

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __repr__(self):
        view = "" if self.is_contiguous else f", strides={self.strides}"
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device='cuda:{self.device}'{view})"

    @property
    def is_contiguous(self):
        return all(n == 1 or st == c for n, st, c in zip(self.shape, self.strides, _contiguous_strides(self.shape)))

    # -- views and copies

    def __getitem__(self, key):
        """Basic indexing (ints, step-1 slices, one Ellipsis), as a view: x[..., a:b], x[i], x[a:b, :]."""
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            raise IndexError("an index can only have a single ellipsis")
        if Ellipsis in key:
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-d array")
        key = key + (slice(None),) * (self.ndim - len(key))
        offset, shape, strides = 0, [], []
        for k, n, st in zip(key, self.shape, self.strides):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("DeviceArray slices must have step 1")
                offset += start * st
                shape.append(max(stop - start, 0))
                strides.append(st)
            else:
                i = int(k)
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of bounds for size {n}")
                offset += (i % n) * st
        return DeviceArray(shape, self.dtype, self.device, _owner=self._owner,
                           _ptr=self.ptr + offset * self.dtype.itemsize, _strides=strides)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if shape.count(-1) == 1:
            known = 1
            for s in shape:
                if s != -1:
                    known *= s
            shape[shape.index(-1)] = self.size // known if known else 0
        if not self.is_contiguous:
            return self.copy().reshape(shape)
        out = DeviceArray(shape, self.dtype, self.device, _owner=self._owner, _ptr=self.ptr)
        if out.size != self.size:
            raise ValueError(f"cannot reshape {self.shape} into {tuple(shape)}")
        return out

    def copy(self):
        """A C-contiguous copy on the same GPU."""
        out = DeviceArray(self.shape, self.dtype, self.device)
        if self.is_contiguous:
            _C.cuda_copy(self.device, out.ptr, self.ptr, self.nbytes)
        else:
            _C.tensor_copy(out, self)
        return out

    def numpy(self):
        """A host copy (bfloat16 comes back as float32)."""
        if not self.is_contiguous:
            return self.copy().numpy()
        raw_dtype = np.uint16 if self.dtype == bfloat16 else self.dtype
        host = np.empty(self.shape, dtype=raw_dtype)
        if self.nbytes:
            _C.cuda_download(self.device, memoryview(host).cast("B"), self.ptr)
        return _bf16_to_float32(host).reshape(self.shape) if self.dtype == bfloat16 else host

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    # -- DLPack out

    def __dlpack_device__(self):
        return (_KDLCUDA, self.device)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        """DLPack export (Python array API): `stream` is the consumer's stream (None: the legacy default
        stream, -1: no ordering); its work is ordered after everything queued on tplinear's stream."""
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"cannot export a cuda:{self.device} array to DLPack device {tuple(dl_device)}")
        if copy:
            raise BufferError("DeviceArray exports without copying only (copy=True is not supported)")
        if stream is None or stream == 0:  # 0 is disallowed by the protocol; read it as the legacy default
            stream = 1
        if stream != -1:
            mine = _C.cuda_get_stream() or 1
            if stream != mine:
                _C.cuda_stream_order(self.device, stream, True)
        versioned = max_version is not None and tuple(max_version)[0] >= 1
        return _C.dlpack_export(self, self.ptr, _KDLCUDA, self.device, self.dtype.name, self.shape, versioned, False,
                                self.strides)

    @property
    def __cuda_array_interface__(self):
        if self.dtype == bfloat16:
            raise AttributeError("bfloat16 has no __cuda_array_interface__ typestr; use DLPack")
        return {
            "shape": self.shape,
            "typestr": _TYPESTR[self.dtype.name],
            "data": (self.ptr, False),
            "version": 3,
            "strides": None if self.is_contiguous else tuple(st * self.dtype.itemsize for st in self.strides),
            "stream": _C.cuda_get_stream() or 1,
        }


def empty(shape, dtype, device):
    return DeviceArray(shape, dtype, device)


def zeros(shape, dtype, device):
    return DeviceArray.zeros(shape, dtype, device)


def to_device(arr, dtype=None, device=None):
    return DeviceArray.to_device(arr, dtype, device)
