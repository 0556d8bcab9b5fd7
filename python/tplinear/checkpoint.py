"""Checkpoints of tensor-parallel layers, replicated arrays and optimizer state.

``save_checkpoint`` / ``load_checkpoint`` write and read safetensors checkpoints (the format to use) through
the engine in ``_ckpt.py``: consolidated (full tensors, a directory ``transformers`` loads) or sharded (each
rank its pieces), loaded at any group size by slice reads. This module describes NumPy layers, arrays and
optimizer state to that engine, and still reads (and, deprecated, writes) the ``.npz`` files of earlier
versions. (One layer's consolidated state dicts are its own methods, in ``layers.py``.)
"""
import os
import warnings
import zipfile
import zlib

import numpy as np

from . import _ckpt, _ckpt_paths
from . import _layout
from . import distributed as dist
from ._device import DeviceArray
from .layers import TPLayer


# ---------------------------------------------------------------------------------------------- files


def save_checkpoint(path, layers, layout="consolidated", arrays=None, optimizer_state=None, metadata=None,
                    key_map=None, max_shard_size=None, progress=True):
    """Saves {name: layer}, replicated arrays, optimizer state and metadata to the directory path, in
    safetensors files. Collective over the world: every rank calls it with the same names.

    layout="consolidated": full tensors under their keys ("<name>.weight", "<name>.bias", the arrays' names)
      in model.safetensors (numbered files and model.safetensors.index.json past max_shard_size, default
      5 GB), a directory transformers loads; optimizer state in optimizer*.safetensors. World rank 0 writes,
      gathering one tensor at a time.
    layout="sharded": every rank writes its own pieces and their partition (global shape, ranges, mode,
      group size) to its own file; nothing is gathered.
    arrays: {name: NumPy array} replicated on every rank (norms, embeddings); world rank 0's are saved.
    optimizer_state: {state: {param key: array}} ("exp_avg": {"fc1.weight": m, ...}): an array shaped like
      the parameter's shard follows its partition; a 0-d array is replicated.
    metadata: a JSON-serialisable dict (step, RNG state, ...), returned by load_checkpoint.
    key_map: {key: other key, or [keys]} (or a callable) renames keys in the files; a list stores a packed
      layer's blocks (fused QKV, gate/up) as separate tensors.
    Files are written atomically (a temporary file, fsync, rename); the manifest tplinear.json last, so an
    interrupted save leaves the previous checkpoint readable or fails clearly. A progress bar shows on rank
    0 when a save lasts over a second (progress=False: never).

    A path ending in .npz writes the old single-file format (deprecated: it reads back only into layers).
    """
    if _is_npz(path):
        if arrays or optimizer_state or metadata or key_map or layout != "consolidated":
            raise ValueError(".npz checkpoints hold layers only: save to a directory (safetensors) instead")
        warnings.warn(".npz checkpoints are deprecated: save to a directory, which writes safetensors files",
                      DeprecationWarning, stacklevel=2)
        return _save_npz(path, _entries(layers, None, None))
    _ckpt.save(path, _entries(layers, arrays, optimizer_state), layout=layout, metadata=metadata, key_map=key_map,
               max_shard_size=max_shard_size, progress=progress)


def load_checkpoint(path, layers, arrays=None, optimizer_state=None, strict=True, cast=False, key_map=None,
                    progress=True):
    """Loads a checkpoint into {name: layer} (each rank keeps its shards, at any group size and in either
    mode), fills arrays and the optimizer state's arrays in place, and returns the saved metadata.

    path: a save_checkpoint directory (either layout), a Hugging Face save_pretrained directory
      (model.safetensors or an index of numbered files), a single .safetensors file, or an old .npz file.
    Only the bytes of this rank's pieces are read (the files are memory-mapped). Every key, shape and
    dtype is checked from the headers before any data is read: a key missing from the checkpoint, or one
    the checkpoint has that nothing loads (strict=False: allowed), raises ValueError naming it; a dtype
    other than the layer's raises TypeError unless cast=True.
    key_map: {key: checkpoint key, or [checkpoint keys]} (or a callable) reads a key under another name;
      a list is stacked along dim 0 (separate q/k/v tensors into a fused QKV layer, gate and up into one).
    Collective over the world only for one check before anything is read: every rank passed the same path
    and sees the same checkpoint there (ValueError on every rank naming what differed).
    """
    _ckpt_paths.check_load_path(path)
    entries = _entries(layers, arrays, optimizer_state)
    if _is_npz(path):
        if arrays or optimizer_state or key_map:
            raise ValueError(".npz checkpoints hold layers only")
        return _load_npz(path, entries, strict, cast)
    sections = ("model", "optimizer") if optimizer_state is not None else ("model",)
    return _ckpt.load(path, entries, strict=strict, cast=cast, key_map=key_map, progress=progress, sections=sections)


def _is_npz(path):
    return os.fspath(path).endswith(".npz")


# ---------------------------------------------------------------------------------------------- entries


def _entries(layers, arrays, optimizer_state):
    """Layers, arrays and optimizer state as the engine's entries (see _ckpt.Entry)."""
    entries = [e for lname, layer in _named_layers(layers) for e in _layout.checkpoint_entries(lname, layer, NumpyTensors)]
    world = dist.get_world_group()
    if arrays is not None:
        if not isinstance(arrays, dict):
            raise TypeError(f"arrays must be a dict of name -> NumPy array, got {type(arrays).__name__}")
        for name, arr in arrays.items():
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"arrays[{name!r}] must be a NumPy array, got {type(arr).__name__}")
            entries.append(_ckpt.Entry(name, arr.shape, arr.dtype, None, None, world, world.rank,
                                       get=lambda a=arr: a, put=_filler(arr, f"arrays[{name!r}]"),
                                       buffer=_inplace(arr), info={"kind": "array"}))
    if optimizer_state is not None:
        entries += _optimizer_entries(optimizer_state, {e.name: e for e in entries})
    return entries


class NumpyTensors:
    """How a NumPy layer's parameter data (NumPy or DeviceArray) becomes and takes NumPy arrays (the `tensors`
    of _layout.checkpoint_entries); the torch half has its own (tplinear.torch.checkpoint.TorchTensors)."""

    @staticmethod
    def dtype(layer, param):
        return _ckpt.np_dtype(layer._place.dtype)

    @staticmethod
    def host(layer, param):
        data = param.data
        if isinstance(data, DeviceArray):
            return data.numpy()  # bfloat16 comes back as float32 (exactly) and is stored as bfloat16 again
        return np.asarray(data)

    @staticmethod
    def live(layer, param, dtype):
        """The data itself when a load can write into it in place."""
        data = param.data
        if isinstance(data, np.ndarray) and data.dtype == dtype and data.flags.c_contiguous and data.flags.writeable:
            return data
        return None

    @staticmethod
    def store(layer, param, arr):
        if arr is param.data:
            return
        if arr.dtype.name not in ("float32", "float64"):
            arr = arr.astype(np.float32)  # half types travel to the GPU as float32 (exact)
        param.data = layer._place.put(arr, "checkpoint")


def _optimizer_entries(optimizer_state, params):
    if not isinstance(optimizer_state, dict):
        raise TypeError("optimizer_state must be a dict {state name: {parameter key: array}}, got "
                        f"{type(optimizer_state).__name__}")
    out = []
    for state, per in optimizer_state.items():
        if not isinstance(state, str) or not state or "/" in state:
            raise ValueError(f"optimizer_state: state names must be non-empty strings without '/', got {state!r}")
        if not isinstance(per, dict):
            raise TypeError(f"optimizer_state[{state!r}] must be a dict {{parameter key: array}}, "
                            f"got {type(per).__name__}")
        for pkey, arr in per.items():
            what = f"optimizer_state[{state!r}][{pkey!r}]"
            base = params.get(pkey)
            if base is None:
                raise ValueError(f"{what}: no parameter is named {pkey!r} (keys are '<layer>.weight', "
                                 "'<layer>.bias' and the arrays' names)")
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"{what} must be a NumPy array, got {type(arr).__name__}")
            name = f"{_ckpt.OPTIMIZER_PREFIX}{state}/{pkey}"
            common = dict(get=lambda a=arr: a, put=_filler(arr, what), buffer=_inplace(arr), info={"kind": "optimizer"})
            if tuple(arr.shape) == base.local_shape:  # follows the parameter's partition
                out.append(_ckpt.Entry(name, base.shape, arr.dtype, base.dim, base.ranges, base.group, base.rank,
                                       blocks=base.blocks, **common))
            elif arr.ndim == 0:
                out.append(_ckpt.Entry(name, (), arr.dtype, None, None, base.group, base.rank, **common))
            else:
                raise ValueError(f"{what} has shape {arr.shape}: optimizer state must have the shape of this rank's "
                                 f"shard of {pkey!r} {base.local_shape}, or be 0-d")
    return out


def _inplace(arr):
    return lambda: arr if arr.flags.c_contiguous and arr.flags.writeable else None


def _filler(arr, what):
    def put(value):
        if value is arr:
            return
        if not arr.flags.writeable:
            raise ValueError(f"{what} is read-only: a load fills arrays in place")
        arr[...] = value
    return put


def _named_layers(layers):
    if layers is None:
        return
    if not isinstance(layers, dict):
        raise TypeError(f"layers must be a dict of name -> layer, got {type(layers).__name__}")
    for lname, layer in layers.items():
        if not isinstance(layer, TPLayer):
            raise TypeError(f"layers[{lname!r}] is a {type(layer).__name__}, not a tplinear layer "
                            "(pass replicated NumPy arrays as arrays=)")
        yield lname, layer


# ---------------------------------------------------------------------------------------------- .npz (old)


def _save_npz(path, entries):
    """The old format: full tensors in one .npz, written by world rank 0 one tensor at a time."""
    world = dist.get_world_group()
    failure, out, zf = None, None, None
    if world.rank == 0:
        try:
            out = _ckpt.AtomicFile(path)
            zf = zipfile.ZipFile(out.file, "w", allowZip64=True)
        except Exception as exc:  # noqa: BLE001 - reported on every rank
            failure = exc
    for e in entries:
        full = _ckpt.gather_to_writer(e, world)
        if zf is not None and failure is None:
            try:
                with zf.open(f"{e.name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, full, allow_pickle=False)
            except Exception as exc:  # noqa: BLE001
                failure = exc
        del full
    if out is not None:
        try:
            if failure is None:
                zf.close()
                out.commit()
        except Exception as exc:  # noqa: BLE001
            failure = exc
        if failure is not None:
            try:
                if zf is not None:
                    zf.close()
            except Exception:  # noqa: BLE001 - the file is removed anyway
                pass
            out.abort()
    _ckpt.agree_ok(world, failure, "writing the .npz file")


# what zipfile, zlib and numpy raise for a damaged or unusual archive member
_ZIP_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


def _npz_member(zf, path, member, header_only):
    """A member's (shape, dtype) from its .npy header, or its array; any damage is a ValueError."""
    try:
        with zf.open(member) as f:
            if not header_only:
                return np.lib.format.read_array(f, allow_pickle=False)
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            return tuple(shape), dtype
    except _ZIP_ERRORS as exc:
        raise ValueError(f"{path}: {member} is damaged or not a plain .npy member ({exc})") from exc


def _load_npz(path, entries, strict, cast):
    """Reads an old .npz checkpoint: every member's shape and dtype from its header first, then one full
    tensor at a time (a compressed member cannot be read in slices), keeping this rank's pieces."""
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
    except _ZIP_ERRORS as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    with zf:
        members = {n[:-4]: n for n in names if n.endswith(".npy")}
        problems = []
        if not strict:
            entries = [e for e in entries if e.name in members]
        for e in entries:
            if e.name not in members:
                problems.append(f"missing from the checkpoint: {e.name!r}")
                continue
            shape, dtype = _npz_member(zf, path, members[e.name], header_only=True)
            if dtype.hasobject:
                raise ValueError(f"{path}: {e.name!r} holds Python objects; checkpoints hold numbers only")
            if shape != e.shape:
                problems.append(f"{e.name!r} has shape {shape} in the checkpoint, the layer's full shape is {e.shape}")
            elif dtype != e.dtype and not cast:
                raise TypeError(f"{path}: {e.name!r} is {dtype} in the checkpoint but the layer is {e.dtype} "
                                "(cast=True converts)")
        extra = sorted(set(members) - {e.name for e in entries}) if strict else []
        if extra:
            problems.append(f"in the checkpoint but not loaded: {', '.join(map(repr, extra))} (strict=False ignores them)")
        if problems:
            raise ValueError(f"cannot load {path}: " + "; ".join(problems))
        for e in entries:
            full = _npz_member(zf, path, members[e.name], header_only=False)
            if full.shape != e.shape:
                raise ValueError(f"{path}: {members[e.name]} holds {full.shape}, its header said {e.shape}")
            dest = np.empty(e.local_shape, dtype=e.dtype)
            for g, loc, size in e.boxes():
                dest[_ckpt.slices(loc, size)] = full[_ckpt.slices(g, size)]
            del full
            e.put(dest)
    return {}
