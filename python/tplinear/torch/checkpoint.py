"""Checkpoints of torch models whose linear layers are tplinear.torch modules, with their torch.optim
optimizers: the same safetensors checkpoints as the NumPy API (tplinear._ckpt), so either layout loads at
any group size, and a Hugging Face ``save_pretrained`` directory loads into a tensor-parallel model.

Keys are the model's state_dict keys. A tplinear layer's weight and bias follow its partition; every
other tensor of the state dict (embeddings, norms, buffers) is replicated. Optimizer state tensors shaped
like a parameter's shard follow its partition, 0-d ones (Adam's step) are replicated, and the param groups'
hyperparameters are kept in the manifest.
"""
import functools

import numpy as np
import torch

from .. import _ckpt, _ckpt_paths
from .. import _layout
from .. import distributed as dist
from .modules import TPModule
from .moe import ExpertShard

# torch dtypes NumPy has no native type for: the integer type of the same size that carries their bits (built
# on first use, as tplinear._ckpt's codes: ml_dtypes is slow to import)
@functools.cache
def _bits():
    import ml_dtypes
    bits = {torch.bfloat16: (torch.int16, np.int16, ml_dtypes.bfloat16)}
    for name, real in (("float8_e4m3fn", ml_dtypes.float8_e4m3fn), ("float8_e5m2", ml_dtypes.float8_e5m2)):
        if hasattr(torch, name):
            bits[getattr(torch, name)] = (torch.uint8, np.uint8, real)
    return bits


def np_dtype(t):
    """The NumPy dtype of a tensor's elements (bfloat16 and float8 from ml_dtypes)."""
    if t.dtype in _bits():
        return np.dtype(_bits()[t.dtype][2])
    try:
        return _ckpt.np_dtype(str(t.dtype).replace("torch.", ""))
    except TypeError as exc:
        raise TypeError(f"a tensor of dtype {t.dtype} cannot be stored in a checkpoint") from exc


def torch_dtype(dtype):
    dtype = np.dtype(dtype)
    for td, (_, _, md) in _bits().items():
        if dtype == np.dtype(md):
            return td
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def to_numpy(t):
    """A tensor as a NumPy array (sharing memory with a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype in _bits():
        carrier, np_carrier, real = _bits()[t.dtype]
        return t.view(carrier).numpy().view(np_carrier).view(real)
    return t.numpy()


def from_numpy(arr):
    arr = np.ascontiguousarray(arr)
    for td, (carrier, np_carrier, real) in _bits().items():
        if arr.dtype == np.dtype(real):
            return torch.from_numpy(arr.view(np_carrier)).view(td)
    return torch.from_numpy(arr)


def _copy_into(t, arr):
    with torch.no_grad():
        t.copy_(from_numpy(arr).reshape(t.shape))


def _live(t, dtype):
    """The tensor's own memory as a NumPy array when a load can fill it in place (contiguous, on the CPU)."""
    if t.device.type == "cpu" and t.is_contiguous() and np_dtype(t) == dtype:
        return to_numpy(t)
    return None


class TorchTensors:
    """How a tplinear.torch module's parameters become and take NumPy arrays (the `tensors` of _layout.checkpoint_entries)."""

    @staticmethod
    def dtype(layer, param):
        return np_dtype(param)

    @staticmethod
    def host(layer, param):
        return to_numpy(param)

    @staticmethod
    def live(layer, param, dtype):
        return _live(param, dtype)

    @staticmethod
    def store(layer, param, arr):
        _copy_into(param, arr)


def _tensor_entry(name, t, group, like=None):
    """An entry for a plain tensor: replicated on group, split as its tp_layer says (a parameter split in place),
    or (like: a parameter's entry) split as it is."""
    common = dict(get=lambda: to_numpy(t), put=lambda a: _copy_into(t, a), buffer=lambda: _live(t, np_dtype(t)))
    part = getattr(t, "tp_layer", None)
    if like is None and isinstance(part, ExpertShard):  # split in place: MoE experts, sharded norms, SSM mixers
        dim, ranges, full = part.layout()
        shape = list(t.shape)
        shape[dim] = full
        return _ckpt.Entry(name, shape, np_dtype(t), dim, ranges, part.mp_group, part.tp_index, **common)
    if like is None:
        return _ckpt.Entry(name, t.shape, np_dtype(t), None, None, group, group.rank if group else 0, **common)
    return _ckpt.Entry(name, like.shape, np_dtype(t), like.dim, like.ranges, like.group, like.rank, blocks=like.blocks,
                       **common)


def _model_entries(model):
    """Entries of every tensor in model.state_dict() (tplinear layers' split by their partition, the rest
    replicated on the world), and the keys of tensors tied to an earlier key: stored once, under the
    first key, as transformers' save_pretrained does."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    world = dist.get_world_group()
    entries, layered, tied = [], set(), []
    for mname, module in model.named_modules():
        if isinstance(module, TPModule):
            for e in _layout.checkpoint_entries(mname, module, TorchTensors):
                entries.append(e)
                layered.add(e.name)
    seen = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key in layered or t is None:
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            tied.append(key)
            continue
        if ident is not None:
            seen.add(ident)
        entries.append(_tensor_entry(key, t, world))
    return entries, tied


def _param_names(model):
    return {id(p): n for n, p in model.named_parameters()}


def _optimizer_save(optimizer, model, by_key):
    """Entries of the optimizer's state tensors and the JSON facts of its param groups."""
    names = _param_names(model)
    entries, groups, scalars = [], [], {}
    for group in optimizer.param_groups:
        pnames = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise ValueError("the optimizer holds a parameter that is not among model.named_parameters()")
            pnames.append(name)
            base = by_key[name]
            for state, value in optimizer.state.get(p, {}).items():
                what = f"optimizer state {state!r} of {name}"
                if not torch.is_tensor(value):
                    scalars.setdefault(name, {})[state] = _jsonable(value, what)
                    continue
                if "/" in state:
                    raise ValueError(f"{what}: state names must not contain '/'")
                key = f"{_ckpt.OPTIMIZER_PREFIX}{state}/{name}"
                if tuple(value.shape) == base.local_shape:
                    entries.append(_tensor_entry(key, value, base.group, like=base))
                elif value.dim() == 0:
                    entries.append(_tensor_entry(key, value, base.group))
                else:
                    raise ValueError(f"{what} has shape {tuple(value.shape)}: a state tensor must have the shape of "
                                     f"this rank's shard {base.local_shape} or be 0-d")
        groups.append({"params": pnames, **{k: _jsonable(v, f"param group option {k!r}") for k, v in group.items()
                                            if k != "params"}})
    return entries, {"param_groups": groups, "scalars": scalars, "class": type(optimizer).__name__}


def _jsonable(v, what):
    if torch.is_tensor(v) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x, what) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"{what} is a {type(v).__name__}, which a checkpoint cannot hold")


def save_checkpoint(path, model, optimizer=None, layout="consolidated", metadata=None, key_map=None,
                    max_shard_size=None, progress=True):
    """Saves a model with tplinear.torch layers (and optionally its torch.optim optimizer) to the
    directory path, in safetensors files. Collective over the world: every rank calls it.

    layout="consolidated": full tensors under the state_dict keys, in model.safetensors (numbered files
    and model.safetensors.index.json past max_shard_size), a directory transformers' from_pretrained
    loads (add the model's config.json); world rank 0 writes, gathering one tensor at a time.
    layout="sharded": every rank writes its own pieces and their partition; nothing is gathered.
    metadata: a JSON-serialisable dict returned by load_checkpoint. See tplinear.save_checkpoint for
    key_map and the rest."""
    entries, _ = _model_entries(model)
    extra = {}
    if optimizer is not None:
        opt_entries, extra["optimizer"] = _optimizer_save(optimizer, model, {e.name: e for e in entries})
        entries += opt_entries
    _ckpt.save(path, entries, layout=layout, metadata=metadata, key_map=key_map, max_shard_size=max_shard_size,
               progress=progress, extra=extra)


def load_checkpoint(path, model, optimizer=None, strict=True, cast=False, key_map=None, progress=True):
    """Loads a checkpoint into a model with tplinear.torch layers (each rank reads only its shards, at any
    group size), and optionally its optimizer's state and hyperparameters; returns the saved metadata.

    path: a save_checkpoint directory (either layout, saved at any group size), a Hugging Face
    save_pretrained directory, or one .safetensors file. Parameters are filled in place. A key missing
    from the checkpoint, or one that nothing loads, raises ValueError naming it (strict=False: loads what
    both have); a dtype other than the tensor's raises TypeError unless cast=True. The optimizer's state
    is rebuilt from the checkpoint: it needs the same parameters in the same param groups. Collective over
    the world only for one check before anything is read: every rank passed the same path and sees the same
    checkpoint there (ValueError on every rank naming what differed)."""
    _ckpt_paths.check_load_path(path)
    entries, tied = _model_entries(model)
    with _ckpt.Checkpoint(path) as ck:
        created = []
        if optimizer is not None:
            opt_entries, created = _optimizer_load_entries(ck, optimizer, model, {e.name: e for e in entries}, strict)
            entries += opt_entries
        sections = ("model", "optimizer") if optimizer is not None else ("model",)
        meta = _ckpt.load(ck, entries, strict=strict, cast=cast, key_map=key_map, progress=progress,
                          sections=sections, ignore=tied)
        if optimizer is not None:
            _optimizer_restore(ck, optimizer, model, created, strict)
    return meta


def _optimizer_load_entries(ck, optimizer, model, by_key, strict):
    """Entries for the optimizer state the checkpoint holds for the optimizer's parameters: new tensors,
    shaped like each parameter's shard (or 0-d), in the checkpoint's dtype."""
    names = _param_names(model)
    params = {names[id(p)]: (p, group) for group in optimizer.param_groups for p in group["params"] if id(p) in names}
    entries, created = [], []
    for key, src in ck.sources.items():
        if not key.startswith(_ckpt.OPTIMIZER_PREFIX) or key.count("/") < 2:
            continue
        _, state, name = key.split("/", 2)
        if name not in params:
            continue  # not this optimizer's: strict reports it as not loaded
        p, group = params[name]
        base = by_key[name]
        if src.dtype is None:
            raise TypeError(f"checkpoint {ck.path}: {key!r} has dtype {src.code}, which tplinear cannot read")
        if src.shape == base.shape:
            t = torch.empty(base.local_shape, dtype=torch_dtype(src.dtype), device=p.device)
            entries.append(_tensor_entry(key, t, base.group, like=base))
        elif src.shape == ():
            on_device = group.get("capturable") or group.get("fused")  # torch keeps step on the CPU otherwise
            t = torch.zeros((), dtype=torch_dtype(src.dtype), device=p.device if on_device else "cpu")
            entries.append(_tensor_entry(key, t, base.group))
        else:
            raise ValueError(f"checkpoint {ck.path}: {key!r} has shape {src.shape}; optimizer state must be shaped "
                             f"like {name} {base.shape} or be 0-d")
        created.append((p, state, t))
    return entries, created


def _optimizer_restore(ck, optimizer, model, created, strict):
    saved = ck.extra.get("optimizer") if isinstance(ck.extra, dict) else None
    names = _param_names(model)
    for p, state, t in created:
        optimizer.state[p][state] = t
    if not isinstance(saved, dict):
        if strict and created:
            raise ValueError(f"checkpoint {ck.path} has optimizer state but no param groups")
        return
    for name, values in (saved.get("scalars") or {}).items():
        for p in (p for g in optimizer.param_groups for p in g["params"] if names.get(id(p)) == name):
            optimizer.state[p].update(values)
    groups = saved.get("param_groups") or []
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(groups)} param groups, this one "
                         f"{len(optimizer.param_groups)}")
    for i, (have, want) in enumerate(zip(optimizer.param_groups, groups)):
        mine = [names.get(id(p)) for p in have["params"]]
        if strict and mine != want.get("params"):
            raise ValueError(f"param group {i} holds {mine} here but {want.get('params')} in the checkpoint")
        for k, v in want.items():
            if k == "params":
                continue
            cur = have.get(k)
            if torch.is_tensor(cur):
                cur.fill_(v)
            else:
                have[k] = tuple(v) if isinstance(cur, tuple) and isinstance(v, list) else v
