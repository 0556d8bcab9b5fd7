"""Parameters of tensor-parallel layers and DeepSpeed's GatherReplacedLayerParams context manager."""
import numpy as np

from ._arrays import host_array


class Parameter:
    """An array with a gradient and the marks DeepSpeed's GatherReplacedLayerParams looks for.

    .data is the array (a shard inside a TP layer, the full tensor while gathered); .grad accumulates.
    """

    def __init__(self, data, requires_grad=True):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.ds_is_replaced_module = False
        self.tp_layer = None

    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)

    def numpy(self):
        return host_array(self.data, "parameter")

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self.data)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def gather_params(self, params_list):
        """DeepSpeed's per-parameter hook: gathers the owning layer's parameters in place."""
        self._layer().gather_params(params_list)

    def _tp_partition(self, params_list):
        self._layer()._tp_partition(params_list)

    def _layer(self):
        if self.tp_layer is None:
            raise ValueError("this parameter does not belong to a tensor-parallel layer")
        return self.tp_layer

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, replaced={self.ds_is_replaced_module})"


def data_of(obj):
    """A Parameter's array, or obj itself."""
    return obj.data if isinstance(obj, Parameter) else obj


def param_list(params):
    """One parameter or an iterable of them, materialised once (a generator is not consumed twice)."""
    if params is None:
        return []
    if isinstance(params, Parameter) or not hasattr(params, "__iter__") or isinstance(params, np.ndarray):
        return [params]
    return [p for p in params if p is not None]


class GatherReplacedLayerParams:
    """Gathers the full parameters of replaced (tensor-parallel) layers on enter and re-partitions them on
    exit, even when the body raises. Accepts one parameter or any iterable (a generator too); does
    nothing when none of them is a replaced parameter or enabled=False. Collective over the layers'
    groups: every rank enters together."""

    def __init__(self, params, module=None, enabled=True):
        self.module = module
        self.enabled = bool(enabled)
        self.params = param_list(params) if self.enabled else []
        self.layers = []
        for p in self.params:
            layer = getattr(p, "tp_layer", None) if getattr(p, "ds_is_replaced_module", False) else None
            if layer is not None and all(layer is not known for known in self.layers):
                self.layers.append(layer)

    def __enter__(self):
        for layer in self.layers:
            layer.gather_params([p for p in self.params if getattr(p, "tp_layer", None) is layer])
        return self

    def __exit__(self, exc_type, exc, tb):
        for layer in self.layers:
            layer._tp_partition([p for p in self.params if getattr(p, "tp_layer", None) is layer])
        return False
