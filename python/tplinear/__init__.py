"""tplinear: tensor-parallel linear layers (DeepSpeed AutoTP semantics) with a C core.

    import tplinear as tp
    lin = tp.Linear(4096, 4096)
    row = tp.LinearAllreduce(lin, mp_group)
    y = row(x); dx = row.backward(dy)
"""
# scipy_openblas32 loads OpenBLAS with RTLD_GLOBAL; the extension resolves its BLAS symbols from it
# (as NumPy does with the same package), so no LD_LIBRARY_PATH or rpath is needed.
import scipy_openblas32 as _openblas  # noqa: F401

from . import _C
from . import distributed
from ._device import DeviceArray, set_allow_tf32, set_stream
from .checkpoint import load_checkpoint, save_checkpoint
from .autotp import (
    Conv_LinearAllreduce,
    Conv_LinearALlreduce,
    LmHeadLinearAllreduce,
    SubParamLinearAllreduce,
    SubParamLinearLayer,
    collect_universal_checkpoint_info,
    conv_LinearLayer,
    fused_LinearLayer,
)
from .layers import Linear, LinearAllreduce, LinearLayer
from .partition import (
    attention_heads,
    get_num_kv_heads,
    get_tp_grain_size,
    is_autotp_training_mode,
    is_training_mode,
    set_autotp_mode,
    set_num_kv_heads,
    set_tp_grain_size,
    set_training_mode,
    shard_ranges,
)
from .parameter import GatherReplacedLayerParams, Parameter

CommError = _C.CommError
__version__ = _C.VERSION


def cuda_available():
    """True when this build has the CUDA path and a GPU is visible."""
    return bool(_C.cuda_available())


def set_num_threads(n):
    """BLAS threads of this process; n <= 0 picks cores / local ranks."""
    _C.set_num_threads(int(n))


def get_num_threads():
    return _C.get_num_threads()


__all__ = [
    "CommError", "Conv_LinearALlreduce", "Conv_LinearAllreduce", "DeviceArray", "GatherReplacedLayerParams", "Linear",
    "LinearAllreduce", "LinearLayer", "LmHeadLinearAllreduce", "Parameter", "SubParamLinearAllreduce",
    "SubParamLinearLayer", "attention_heads", "collect_universal_checkpoint_info", "conv_LinearLayer",
    "fused_LinearLayer", "cuda_available", "distributed", "get_num_kv_heads", "get_num_threads", "get_tp_grain_size",
    "is_autotp_training_mode", "is_training_mode", "load_checkpoint", "save_checkpoint", "set_autotp_mode",
    "set_num_kv_heads", "set_allow_tf32", "set_num_threads", "set_stream", "set_tp_grain_size", "set_training_mode",
    "shard_ranges",
]
