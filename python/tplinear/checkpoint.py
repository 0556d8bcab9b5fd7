"""Checkpoints of tensor-parallel layers: consolidated (full) state dicts, gathered from and sliced back
into every rank's shards, and files of them that reload at any group size."""
import os

import numpy as np

from . import distributed as dist
from ._arrays import host_array
from .parameter import GatherReplacedLayerParams, data_of


def consolidated_state_dict(layer):
    """The layer's full parameters as NumPy arrays (half types as float32). Collective over its group."""
    with GatherReplacedLayerParams(layer.parameters(), layer):
        return {k: np.array(host_array(v, k), copy=True) for k, v in layer.state_dict().items()}


def load_consolidated_state_dict(layer, state_dict):
    """Loads full parameters into the layer, which keeps this rank's shards (any group size)."""
    for key, param in (("weight", layer.weight), ("bias", layer.bias)):
        if param is None:
            continue
        if key not in state_dict:
            raise ValueError(f"checkpoint is missing {key!r}")
        what = f"checkpoint[{key!r}]"
        value = layer._place.readable(data_of(state_dict[key]), what)
        full = layer._full_shape if key == "weight" else [layer.out_features]
        if list(value.shape) != list(full):
            raise ValueError(f"{what} has shape {tuple(value.shape)}, the layer's full shape is {tuple(full)}")
        param.data = layer._piece(param, value, what)


def save_checkpoint(path, layers):
    """Saves full (consolidated) parameters of {name: layer} to one .npz on rank 0 of the world, atomically.
    Collective: every rank calls it. Reloads at any other group size with load_checkpoint."""
    arrays = {}
    for lname, layer in _named_layers(layers):
        for key, value in layer.consolidated_state_dict().items():
            arrays[f"{lname}.{key}"] = value
    if dist.get_rank() == 0:
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    dist.barrier()


def load_checkpoint(path, layers):
    """Loads a save_checkpoint file into {name: layer}, each rank keeping its shards."""
    with np.load(path) as data:
        for lname, layer in _named_layers(layers):
            prefix = f"{lname}."
            layer.load_consolidated_state_dict({k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)})


def _named_layers(layers):
    from .layers import _TPLayer  # layers.py imports this module

    if not isinstance(layers, dict):
        raise TypeError(f"layers must be a dict of name -> layer, got {type(layers).__name__}")
    for lname, layer in layers.items():
        if not isinstance(layer, _TPLayer):
            raise TypeError(f"layers[{lname!r}] is a {type(layer).__name__}, not a tplinear layer")
        yield lname, layer
