"""Data movement of any fixed-size NumPy dtype, and of picklable objects, over the C core's collectives.

The C core moves float32, float64, int32 and int64 (the dtypes it also reduces). Broadcast and all-gather
only move bytes, so an array of any other fixed-size dtype (integers, bool, complex, float16, bytes, void,
structured, datetime) is moved as the words of its bytes: a view as int32 when its size is a multiple of 4
bytes and its data aligned, else a padded copy. Before that the ranks all-gather each one's byte count and
dtype, so that a rank whose array differs raises ValueError on every rank (the group stays usable) instead
of a padding that hides the difference. Reductions are not touched: they stay on the dtypes the core reduces.

Objects are pickled (as torch.distributed does): the sizes go first, then the bytes.
"""
import pickle
import zlib

import numpy as np

from . import _C

_NATIVE = frozenset(np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64))
_WORD = np.dtype(np.int32)


def movable(arr, what, op):
    """True when arr is a NumPy array that goes through the byte path (a dtype the C core does not move as
    it is); False when it goes to the C core unchanged (its dtypes, and non-NumPy objects, which the core
    checks itself). Raises TypeError for object dtypes."""
    if not isinstance(arr, np.ndarray):
        return False
    dt = arr.dtype
    if dt.hasobject:
        raise TypeError(f"{op}: {what} has dtype {dt} (Python objects, which have no fixed size): use "
                        "tplinear.distributed.broadcast_object_list or all_gather_object for objects")
    return not (dt in _NATIVE and dt.isnative)


def _bytes_of(arr, what, op, writable):
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous array (use numpy.ascontiguousarray)")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{op}: {what} is read-only")
    return arr.reshape(-1).view(np.uint8)


def _dtype_code(dt):
    return zlib.crc32(dt.str.encode() + repr(dt.descr).encode())


def _agree(handle, nbytes, dt, op):
    """All-gathers (nbytes, dtype) and raises ValueError on every rank when the ranks differ."""
    size = _C.group_info(handle)["size"]
    mine = np.array([nbytes, _dtype_code(dt)], np.int64)
    every = np.zeros(2 * size, np.int64)
    _C.all_gather(handle, every, mine)
    every = every.reshape(size, 2)
    if (every != every[0]).any():
        sizes = ", ".join(f"rank {r}: {int(n)} bytes" for r, n in enumerate(every[:, 0]))
        same = "" if (every[:, 1] == every[0, 1]).all() else " and dtypes"
        raise ValueError(f"{op}: the ranks passed arrays of different sizes{same} ({sizes}; this rank's dtype "
                         f"is {dt}): every rank must pass the same shape and dtype")


def _words(b):
    """A view of the byte array b as int32 words, or None when it needs a padded copy."""
    if b.size % _WORD.itemsize == 0 and b.ctypes.data % _WORD.alignment == 0:
        return b.view(_WORD)
    return None


def _padded(b, nwords):
    w = np.zeros(nwords, _WORD)
    w.view(np.uint8)[:b.size] = b
    return w


def broadcast(handle, arr, root, op="broadcast"):
    b = _bytes_of(arr, "tensor", op, True)
    _agree(handle, b.size, arr.dtype, op)
    broadcast_bytes(handle, b, root)


def broadcast_bytes(handle, b, root):
    w = _words(b)
    if w is not None:
        _C.broadcast(handle, w, root)
        return
    w = _padded(b, -(-b.size // _WORD.itemsize))
    _C.broadcast(handle, w, root)
    b[:] = w.view(np.uint8)[:b.size]


def all_gather(handle, output, input, op="all_gather"):
    if not isinstance(output, np.ndarray) or not isinstance(input, np.ndarray):
        raise TypeError(f"{op}: a {np.asarray(input).dtype if isinstance(input, np.ndarray) else 'NumPy'} "
                        "all-gather needs NumPy arrays for both output and input")
    if output.dtype != input.dtype:
        raise TypeError(f"{op}: output dtype {output.dtype} differs from input dtype {input.dtype}")
    size = _C.group_info(handle)["size"]
    src = _bytes_of(input, "input", op, False)
    dst = _bytes_of(output, "output", op, True)
    if dst.size != src.size * size:
        raise ValueError(f"{op}: output must have {input.size * size} elements (group size {size} x "
                         f"{input.size}), got {output.size}")
    _agree(handle, src.size, input.dtype, op)
    all_gather_bytes(handle, dst, src, size)


def all_gather_bytes(handle, dst, src, size):
    n = src.size
    ws, wd = _words(src), _words(dst)
    if ws is not None and wd is not None:
        _C.all_gather(handle, wd, ws)
        return
    nw = -(-n // _WORD.itemsize)
    out = np.zeros(nw * size, _WORD)
    _C.all_gather(handle, out, _padded(src, nw))
    dst.reshape(size, n)[:] = out.view(np.uint8).reshape(size, nw * _WORD.itemsize)[:, :n]


def broadcast_object_list(handle, object_list, root):
    info = _C.group_info(handle)
    if not isinstance(object_list, list):
        raise TypeError(f"broadcast_object_list: object_list must be a list, got {type(object_list).__name__}")
    lengths = np.zeros(info["size"], np.int64)
    _C.all_gather(handle, lengths, np.array([len(object_list)], np.int64))
    if (lengths != lengths[root]).any():
        raise ValueError("broadcast_object_list: every rank must pass a list of the same length (the root's "
                         f"objects replace its items); the ranks' lengths: {lengths.tolist()}")
    me = info["rank"]
    payloads = [pickle.dumps(o) for o in object_list] if me == root else []
    sizes = np.array([len(p) for p in payloads] if me == root else [0] * len(object_list), np.int64)
    _C.broadcast(handle, sizes, root)
    data = np.frombuffer(b"".join(payloads), np.uint8).copy() if me == root else np.zeros(int(sizes.sum()), np.uint8)
    broadcast_bytes(handle, data, root)
    if me != root:
        off = 0
        for i, n in enumerate(sizes.tolist()):
            object_list[i] = pickle.loads(data[off:off + n].tobytes())
            off += n


def all_gather_object(handle, object_list, obj):
    size = _C.group_info(handle)["size"]
    payload = pickle.dumps(obj)
    sizes = np.zeros(size, np.int64)
    _C.all_gather(handle, sizes, np.array([len(payload)], np.int64))
    m = int(sizes.max())
    mine = np.zeros(m, np.uint8)
    mine[:len(payload)] = np.frombuffer(payload, np.uint8)
    every = np.zeros(m * size, np.uint8)
    all_gather_bytes(handle, every, mine, size)
    if not isinstance(object_list, list) or len(object_list) != size:
        raise ValueError(f"all_gather_object: object_list must be a list of the group's size ({size}), got "
                         f"{len(object_list) if isinstance(object_list, list) else type(object_list).__name__}")
    rows = every.reshape(size, m)
    for r in range(size):
        object_list[r] = pickle.loads(rows[r, :int(sizes[r])].tobytes())
