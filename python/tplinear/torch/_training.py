"""What the layers themselves do for a training loop (the user-facing calls are in training.py): autocast,
and their state after ``copy.deepcopy``. Kept apart from modules.py so that the layers' file only calls in."""
import torch

from .. import _layout
from .._arrays import DTYPES, dtype_name
from . import _ops


# ------------------------------------------------------------------------------------------ autocast


def _autocast_dtype(device_type):
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # pragma: no cover - torch < 2.4 has no per-device form
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def _layer_name(layer):
    return f"{type(layer).__name__} {layer.name!r}" if getattr(layer, "name", None) else type(layer).__name__


def autocast_args(layer, x, sequence_parallel=False):
    """(x, weight, bias) for layer's GEMM: as they are outside torch.autocast; under
    ``torch.autocast(device_type, dtype)`` for the weight's device, each of the three that is not float64 cast
    to the autocast dtype, as torch casts nn.Linear's arguments under autocast (float64 is never cast: a
    float64 model computes in float64; the output is in the dtype computed in, and the gradients flow back to
    the parameters in their own dtype through the casts). A dtype the C core cannot compute in on that device
    is a TypeError naming the layer, the dtype and what to do."""
    weight, bias = layer.weight, layer.bias
    dt = _autocast_dtype(weight.device.type)
    if dt is None or not dt.is_floating_point:
        return x, weight, bias
    if (weight.dtype in (dt, torch.float64)) and x.dtype in (dt, torch.float64):
        return x, weight, bias  # nothing to cast
    dev = weight.device.type
    name = dtype_name(torch.empty(0, dtype=dt))
    math = "device_math" if weight.is_cuda else "host_math"
    if name is None or not DTYPES[name][math]:
        takes = ", ".join(n for n, d in DTYPES.items() if d[math])
        raise TypeError(
            f"{_layer_name(layer)} runs under torch.autocast({dev!r}, dtype={dt}), but tplinear's "
            f"{dev.upper()} layers compute in {takes} only, not {str(dt).replace('torch.', '')}. Run the model "
            f"outside autocast on {dev} (its layers then compute in {weight.dtype}), or disable autocast around "
            f"these layers (with torch.autocast({dev!r}, enabled=False): ...), or build the model in a dtype the "
            f"layers take")
    if sequence_parallel and dt != weight.dtype:
        raise TypeError(f"{_layer_name(layer)} is sequence-parallel: it does not follow torch.autocast yet; build it "
                        f"in {dt} or disable autocast around it (with torch.autocast({dev!r}, enabled=False))")

    def cast(t):  # torch's autocast eligibility: floating, not float64
        return t if t is None or t.dtype in (dt, torch.float64) else t.to(dt)

    return cast(x), cast(weight), cast(bias)


# ------------------------------------------------------------------------------------------ copies


def after_copy(layer):
    """A layer made by copy.deepcopy (or unpickled): torch's Parameter copies keep no attributes or hooks,
    so the parameters get their marks again (tp_layer, partition_dim, gather_params, ...); the layer gets its
    own torch.compile operator key and fresh gradient buffers (the original's are not shared)."""
    layer._op_key = _ops.register(layer)
    layer._grads = _ops.GradBuffers()
    weight = layer._parameters.get("weight")
    if weight is not None and getattr(weight, "tp_layer", None) is not layer:
        layer._mark(weight, True, 0 if weight.dim() == 1 else layer._shard_dim)
    bias = layer._parameters.get("bias")
    if bias is not None and getattr(bias, "tp_layer", None) is not layer:
        layer._mark(bias, layer._bias_sharded, 0)
    try:
        for key, meta in layer.universal_checkpoint_meta().items():
            setattr(getattr(layer, key), _layout.UC_META_ATTR, meta)
    except Exception:  # noqa: BLE001 - a layer kind without DeepSpeed's meta
        pass
