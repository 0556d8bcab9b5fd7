"""GPU arrays owned by tplinear and the GPU runtime's process-wide settings.

A DeviceArray (the C type ``tplinear._C.DeviceArray``) is memory on one GPU that it owns (stream-ordered
cudaMallocAsync on tplinear's current stream, freed with the last array or view on it), exported
zero-copy through DLPack (``torch.from_dlpack(y)``, ``jax.dlpack``) and the CUDA Array Interface v3
(``cupy.asarray(y)``), and copied to the host with ``.numpy()``.

Streams: every GPU operation of tplinear (GEMMs, NCCL collectives, copies) runs on tplinear's stream of
that GPU (one per device: a stream belongs to one GPU), the legacy default stream unless ``set_stream(ptr)``
names another (e.g.
``torch.cuda.current_stream().cuda_stream``). A call on CUDA torch tensors (tplinear.torch, and
tplinear.distributed's collectives) runs on torch's current stream of the tensor's device instead, for that
call only (``stream_for``): torch's later work on that stream is ordered after it, with no host wait.
Inputs are ordered after their producer's stream as the DLPack / CAI protocols say; exported arrays order
the consumer's stream after ours.
"""
import contextlib
import sys

import numpy as np

from . import _C

DeviceArray = _C.DeviceArray
bfloat16 = _C.bfloat16  # the dtype of bfloat16 arrays (NumPy has none); compares equal to "bfloat16"
as_dtype = _C.as_dtype  # a dtype from a name, a NumPy dtype or a torch dtype
device_index = _C.device_index  # 'cuda' / None (this process's GPU), 'cuda:N', N, torch.device -> N

_KDLCUDA, _KDLCUDAMANAGED = 2, 13


def cuda_available():
    return bool(_C.cuda_available())


def where(obj):
    """The GPU index an array lives on, or None for host memory (NumPy, CPU torch, ...)."""
    if isinstance(obj, DeviceArray):
        return obj.device
    dl = getattr(obj, "__dlpack_device__", None)
    if dl is not None and not isinstance(obj, np.ndarray):
        kind, index = dl()
        return int(index) if int(kind) in (_KDLCUDA, _KDLCUDAMANAGED) else None
    if hasattr(obj, "__cuda_array_interface__"):
        return _C.tensor_info(obj)["device"][1]
    return None


def get_stream(device=None):
    """tplinear's stream of a GPU as an int (0: the legacy default stream); device None: the current one."""
    return _C.cuda_get_stream(-1 if device is None else device_index(device))


def set_stream(stream, device=None):
    """Runs tplinear's GPU work on `device` on `stream` (a cudaStream_t as an int, or an object with
    .cuda_stream or .ptr such as torch / CuPy streams; None: the legacy default stream). Each GPU has its
    own stream; device None: the stream object's own device (torch's .device), else the current device."""
    if device is None:
        device = _index_of(stream)
    if stream is not None and not isinstance(stream, int):
        stream = getattr(stream, "cuda_stream", None) or getattr(stream, "ptr", None)
    _C.cuda_set_stream(stream, -1 if device is None else device_index(device))


def _index_of(obj):
    """The CUDA ordinal of a torch tensor or stream (its .device), else None."""
    index = getattr(getattr(obj, "device", None), "index", None)
    return index if isinstance(index, int) else None


def torch_stream(obj):
    """torch's current stream (an int; 0: the legacy default stream) of a CUDA torch tensor's device, or None
    for anything else (host memory, other producers: tplinear's own stream serves them)."""
    torch = sys.modules.get("torch")  # a torch tensor means torch is imported; never import it here
    if torch is None or not isinstance(obj, torch.Tensor) or not obj.is_cuda:
        return None
    return torch.cuda.current_stream(obj.device).cuda_stream


def stream_for(*objs):
    """A context manager: runs the tplinear calls inside on the stream of the first CUDA torch tensor among
    objs (torch_stream), as tplinear's stream of that tensor's GPU, and gives that GPU's stream back
    afterwards, also when the call raises; nothing changes (and nothing is paid) when no object is one."""
    for obj in objs:
        stream = torch_stream(obj)
        if stream is not None:
            index = _index_of(obj)
            return _on_stream(stream, -1 if index is None else index)
    return _NOTHING


_NOTHING = contextlib.nullcontext()


@contextlib.contextmanager
def _on_stream(stream, device):
    before = _C.cuda_get_stream(device)
    _C.cuda_set_stream(stream or None, device)
    try:
        yield
    finally:
        _C.cuda_set_stream(before or None, device)


def set_allow_tf32(allow):
    """float32 GEMMs may use TF32 tensor cores (off by default, as torch's matmul default)."""
    _C.cuda_set_allow_tf32(bool(allow))


def synchronize(device=None):
    """Blocks until tplinear's stream has finished its work on device."""
    _C.cuda_synchronize(device_index(device))


def to_device(arr, dtype=None, device=None):
    """A GPU copy of a host array (a DeviceArray already of that dtype and device is returned as is)."""
    return DeviceArray.to_device(arr, dtype, device)
