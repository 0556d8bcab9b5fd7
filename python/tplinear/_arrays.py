"""Where a layer's arrays live and in which dtype, resolved once per layer (a Placement), and the helpers
that read, make, convert and shard arrays accordingly. What each dtype is comes from the C table
(``_C.dtypes()``); the shards are cut by the C core (``_C.shard``), on the GPU for GPU arrays."""
import ml_dtypes  # noqa: F401 - NumPy's "bfloat16" dtype
import numpy as np

from . import _C
from . import _device

DTYPES = _C.dtypes()  # name -> {code, itemsize, floating, host_math, device_math, dtype, ...}, from the C table
HOST_DTYPES = tuple(name for name, d in DTYPES.items() if d["host_math"])  # + float16, bfloat16 (ml_dtypes)
DEVICE_DTYPES = tuple(name for name, d in DTYPES.items() if d["device_math"])  # + float16, bfloat16


def dtype_name(obj):
    """The dtype name of an array (NumPy, DeviceArray, torch, ...), or None when it has no dtype tplinear
    knows."""
    dt = getattr(obj, "dtype", None)
    if dt is None:
        return None
    try:
        return _C.as_dtype(dt).name
    except TypeError:
        return None


def host_dtype(name):
    """The dtype a layer's parameters are drawn in on the host (and a torch half tensor's host copy): half types
    become float32 (then rounded once to the layer's dtype), the others stay."""
    d = DTYPES.get(name)
    return "float32" if d is not None and d["floating"] and d["itemsize"] < 4 else name


def host_array(obj, what):
    """An array (NumPy, a DeviceArray, torch tensors, other array-likes) as a float32 / float64 NumPy array;
    GPU and torch half types become float32. Host arrays are not copied."""
    if isinstance(obj, _device.DeviceArray):
        obj = obj.numpy()  # bfloat16 comes back as float32
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch.Tensor / nn.Parameter
        obj = obj.detach().cpu()
        obj = (obj.float() if host_dtype(dtype_name(obj)) != dtype_name(obj) else obj).numpy()
    if hasattr(obj, "numpy") and not isinstance(obj, np.ndarray) and not hasattr(obj, "__array__"):
        obj = obj.numpy()
    try:
        arr = np.asarray(obj)
    except Exception as exc:  # noqa: BLE001 - report what was given
        raise TypeError(f"{what} must be an array, got {type(obj).__name__}") from exc
    if arr.dtype.name not in HOST_DTYPES:
        raise TypeError(f"{what} must have dtype {', '.join(HOST_DTYPES)} (bfloat16: ml_dtypes), got {arr.dtype} "
                        f"({type(obj).__name__})")
    return arr


class Placement:
    """Where a layer's arrays live (device: a GPU index, or None for host memory) and their dtype name."""

    __slots__ = ("device", "dtype")

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype

    @classmethod
    def resolve(cls, array, device=None, dtype=None):
        """A layer's placement: device= when given ('cpu': host memory), else where `array` (the module's
        weight) lives; dtype= when given, else the array's (on the host, half types become float32, as
        their host copy is; a dtype no layer takes is reported when the array is read)."""
        if device is not None:
            device = None if device == "cpu" else _device.device_index(device)
        else:
            device = _device.where(array)
        if dtype is None:  # the array's own dtype where it can be used here, else float32 (its host copy's)
            name = dtype_name(array)
            usable = name is not None and DTYPES[name]["host_math" if device is None else "device_math"]
            return cls(device, name if usable else "float32")
        try:
            name = _C.as_dtype(dtype).name
        except TypeError:
            name = None
        allowed = HOST_DTYPES if device is None else DEVICE_DTYPES
        if name not in allowed:
            names = [repr(n) for n in allowed]
            names = " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)
            raise TypeError(f"dtype must be {names}{'' if device is None else ' on the GPU'}, got {dtype!r}")
        return cls(device, name)

    @classmethod
    def of(cls, arr):
        """Where arr itself lives, in its own dtype."""
        return cls(_device.where(arr), dtype_name(arr))

    def holds(self, arr):
        """arr lives here, in this dtype (so the C core can read it where it is)."""
        return _device.where(arr) == self.device and dtype_name(arr) == self.dtype

    def readable(self, arr, what):
        """arr itself when it lives here, else its host copy (float32 / float64)."""
        return arr if self.holds(arr) else host_array(arr, what)

    def empty(self, shape):
        if self.device is None:
            return np.empty(shape, dtype=self.dtype)
        return _device.DeviceArray(shape, self.dtype, self.device)

    def zeros(self, shape):
        if self.device is None:
            return np.zeros(shape, dtype=self.dtype)
        return _device.DeviceArray.zeros(shape, self.dtype, self.device)

    def adopt(self, arr, what):
        """arr as this placement's array: itself when it is a contiguous NumPy / device array living here,
        else a placed copy (host arrays: without copying where NumPy can)."""
        if isinstance(arr, (np.ndarray, _device.DeviceArray)) and self.holds(arr):
            contiguous = arr.flags.c_contiguous if isinstance(arr, np.ndarray) else arr.is_contiguous
            if contiguous:
                return arr
        if self.device is None:
            return np.ascontiguousarray(host_array(arr, what), dtype=self.dtype)
        return self.shard(arr, None, what=what)

    def put(self, value, what):
        """A new array placed here holding value (any array; host values are converted to this dtype)."""
        return self.shard(value, None, what=what)

    def shard(self, src, dim, ranges=None, nblocks=1, rank=0, what="array"):
        """A new array placed here holding rank's pieces of src along dim (ranges: (offset, size) for every
        rank and block, rank-major; dim None: all of src). An array that lives here is cut where it is (on
        the GPU for GPU arrays); any other is read through its host copy."""
        here = self.holds(src)
        if not here:
            src = host_array(src, what)
        shape = list(src.shape)
        if dim is not None:
            shape[dim] = sum(size for _, size in ranges[rank * nblocks:(rank + 1) * nblocks])
        out = self.empty(shape) if here else np.empty(shape, dtype=src.dtype)
        if dim is None:
            _C.tensor_copy(out, src)
        else:
            _C.shard(src, dim, ranges, nblocks, rank, out)
        if here:
            return out
        if self.device is None:
            return out if out.dtype.name == self.dtype else out.astype(self.dtype)
        return _device.to_device(out, self.dtype, self.device)

    def __repr__(self):
        return f"Placement({'cpu' if self.device is None else f'cuda:{self.device}'}, {self.dtype})"
