"""The checkpoint engine: safetensors files of named tensors that are split across the ranks of a group
or replicated on them, written consolidated (full tensors, Hugging Face compatible, streamed one tensor at
a time) or sharded (each rank its own pieces, no gather), and read back at any group size by slice reads.

It knows nothing of layers or frameworks. A caller (``checkpoint.py`` for NumPy layers, replicated arrays
and optimizer state; ``tplinear.torch`` for modules) describes each tensor as an :class:`Entry`: its name,
full shape and dtype, the dim it is split along (or None: replicated), every rank's pieces along that dim,
its group, and how to get and store this rank's shard as a NumPy array.

A checkpoint is a directory:

- ``tplinear.json``: the manifest, written last (layout, the files, a save id, the user's metadata);
- consolidated: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  past ``max_shard_size``), what ``transformers`` loads, and the same for ``optimizer*`` (optimizer state);
- sharded: ``rank0000r-of-0000w-<id>.safetensors`` per rank, whose header says which part of which tensor
  each stored array is (global shape, boxes, split dim, partition ranges, mode, group size).

A directory without a manifest is read as a Hugging Face ``save_pretrained`` directory.

Its names without a leading underscore are what the rest of the package uses (``checkpoint.py``'s old
``.npz`` format reuses ``gather_to_writer``, ``agree_ok`` and ``slices``); the others are this module's own.
"""
import json
import math
import functools
import os
import re
import secrets
import struct
import sys

import numpy as np
from safetensors import SafetensorError, safe_open

from . import _ckpt_paths
from . import distributed as dist

MANIFEST = "tplinear.json"
FORMAT = "tplinear-checkpoint"
VERSION = 1
SECTIONS = ("model", "optimizer")
OPTIMIZER_PREFIX = "optimizer/"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' long-standing default

# safetensors dtype codes <-> NumPy dtypes (ml_dtypes brings bfloat16 and the float8 types to NumPy, and
# lets safetensors' NumPy API read them). Built on first use: importing ml_dtypes costs about a second of CPU,
# which every rank of every world would otherwise pay at `import tplinear`.
@functools.cache
def codes():
    """{safetensors dtype code: NumPy dtype}."""
    import ml_dtypes
    return {
        "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
        "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
        "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
        "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
        "BOOL": np.dtype(np.bool_),
    }


@functools.cache
def _names():
    return {dt: code for code, dt in codes().items()}


def np_dtype(dtype):
    """A NumPy dtype from a NumPy dtype, a name ('bfloat16' included) or a safetensors code."""
    if isinstance(dtype, str) and dtype in codes():
        return codes()[dtype]
    if str(dtype) == "bfloat16":
        return codes()["BF16"]
    return np.dtype(dtype)


def st_code(dtype, what="tensor"):
    dt = np_dtype(dtype)
    if dt.byteorder == ">":
        raise TypeError(f"{what}: big-endian arrays cannot be stored in safetensors files")
    code = _names().get(dt.newbyteorder("="))
    if code is None:
        raise TypeError(f"{what} has dtype {dt}, which safetensors files cannot hold")
    return code


# ------------------------------------------------------------------------------------------- entries


class Entry:
    """One named tensor as this rank holds it.

    name: the key in the checkpoint ("fc1.weight"; optimizer state under "optimizer/<state>/<param>").
    shape: the full (global) shape; dtype: a NumPy dtype (bfloat16 from ml_dtypes).
    dim: the dim the tensor is split along across group, or None when every rank of group holds all of it.
    ranges: every rank's pieces along dim, [[(offset, size), ...] for each rank of group]; a rank's shard is
      its pieces one after another (several per rank for packed QKV / gate-up). None when replicated.
    group: the ProcessGroup it is split or replicated over; rank: this rank's index in it.
    get(): this rank's shard as a NumPy array of dtype (pieces in order along dim).
    put(arr): stores arr, a NumPy array holding this rank's shard, after a load.
    buffer(): a writable C-contiguous NumPy array of the shard's shape and dtype that a load may fill in
      place (the live storage), or None (the load allocates one and calls put).
    blocks: the sizes of packed blocks along dim 0 (a key_map may store them under separate keys).
    info: JSON-serialisable facts recorded with the tensor (mode, layer kind, ...).
    """

    __slots__ = ("name", "shape", "dtype", "dim", "ranges", "group", "rank", "get", "put", "buffer", "blocks",
                 "info")

    def __init__(self, name, shape, dtype, dim, ranges, group, rank, get, put, buffer=None, blocks=None,
                 info=None):
        self.name, self.shape, self.dtype = str(name), tuple(int(s) for s in shape), np_dtype(dtype)
        self.dim, self.group, self.rank = dim, group, int(rank)
        self.ranges = None if dim is None else [[(int(o), int(s)) for o, s in rp] for rp in ranges]
        self.get, self.put = get, put
        self.buffer = buffer or (lambda: None)
        self.blocks = None if blocks is None else [int(b) for b in blocks]
        self.info = dict(info or {})

    @property
    def section(self):
        return "optimizer" if self.name.startswith(OPTIMIZER_PREFIX) else "model"

    @property
    def local_shape(self):
        if self.dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.dim] = sum(s for _, s in self.ranges[self.rank])
        return tuple(shape)

    def boxes(self):
        """This rank's pieces as boxes: (global start, start in the shard, size), one per piece."""
        n = len(self.shape)
        if self.dim is None:
            return [((0,) * n, (0,) * n, self.shape)]
        out, at = [], 0
        for off, size in self.ranges[self.rank]:
            g, loc, sz = [0] * n, [0] * n, list(self.shape)
            g[self.dim], loc[self.dim], sz[self.dim] = off, at, size
            out.append((tuple(g), tuple(loc), tuple(sz)))
            at += size
        return out

    def describe(self):
        """The tensor's partition, recorded in sharded files (a universal checkpoint's metadata)."""
        d = {"shape": list(self.shape), "dtype": st_code(self.dtype, self.name), "dim": self.dim,
             "group_size": self.group.size if self.group is not None else 1}
        if self.dim is not None:
            d["ranges"] = [[list(p) for p in rp] for rp in self.ranges]
        if self.blocks is not None:
            d["blocks"] = self.blocks
        d.update(self.info)
        return d


def _intersect(a_start, a_size, b_start, b_size):
    """The overlap of two boxes as (start, size), or None when it is empty."""
    start, size = [], []
    for a0, an, b0, bn in zip(a_start, a_size, b_start, b_size):
        lo, hi = max(a0, b0), min(a0 + an, b0 + bn)
        if hi <= lo:
            return None
        start.append(lo)
        size.append(hi - lo)
    return tuple(start), tuple(size)


def slices(start, size):
    """A box (start, size) as a tuple of slices, to index an array with."""
    return tuple(slice(s, s + n) for s, n in zip(start, size))


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))


def _sub(a, b):
    return tuple(x - y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- key maps


def _segments(entry, key_map, source_shapes=None):
    """Where the entry lives in the files: [(key, shape of that key, start of the key within the entry)].

    key_map maps an entry's name to another key, or to a list of keys that are its packed blocks along
    dim 0 (a fused QKV layer from separate q/k/v tensors). On save the block sizes come from the entry; on
    load from the files (source_shapes)."""
    target = key_map(entry.name) if callable(key_map) else (key_map or {}).get(entry.name)
    zero = (0,) * len(entry.shape)
    if target is None or isinstance(target, str):
        return [(entry.name if target is None else target, entry.shape, zero)]
    keys = list(target)
    if not keys or not all(isinstance(k, str) for k in keys) or not entry.shape:
        raise ValueError(f"key_map[{entry.name!r}] must be a key or a non-empty list of keys (the blocks of a "
                         f"packed dim 0), got {target!r}")
    if source_shapes is None:
        sizes = entry.blocks
        if sizes is None or len(sizes) != len(keys):
            raise ValueError(f"key_map[{entry.name!r}] names {len(keys)} keys, but {entry.name} has "
                             f"{'no packed blocks' if sizes is None else f'{len(sizes)} packed blocks {sizes}'}")
    else:
        sizes = [source_shapes[k][0] if source_shapes.get(k) else 0 for k in keys]
    out, at = [], 0
    for key, size in zip(keys, sizes):
        out.append((key, (size,) + entry.shape[1:], (at,) + zero[1:]))
        at += size
    return out


# ------------------------------------------------------------------------------------------- files


class AtomicFile:
    """A file written under a temporary name in the target's directory (created with O_EXCL | O_NOFOLLOW,
    an unguessable name), fsynced and renamed over the target on commit(), removed on abort()."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        folder, base = os.path.split(self.path)
        self.tmp = os.path.join(folder, f".{base}.{secrets.token_hex(8)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.tmp, flags, 0o666)
        try:
            self.file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            os.unlink(self.tmp)
            raise

    def write(self, data):
        self.file.write(data)

    def commit(self):
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(os.path.dirname(self.path))

    def abort(self):
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj):
    with AtomicFile(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False).encode() + b"\n")


class _TensorFile:
    """A safetensors file written one tensor at a time: the header (every key's dtype, shape and offsets)
    first, then each tensor's bytes in header order, so no more than one tensor is ever in memory."""

    def __init__(self, path, items, metadata):
        """items: [(key, dtype, shape)] in the order the tensors will be written."""
        header, at = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}, 0
        self.order = []
        for key, dtype, shape in items:
            n = math.prod(shape) * np_dtype(dtype).itemsize
            header[key] = {"dtype": st_code(dtype, key), "shape": list(shape), "data_offsets": [at, at + n]}
            self.order.append((key, n))
            at += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # as safetensors pads: the data starts 8-byte aligned
        self.size = 8 + len(raw) + at
        self.next = 0
        self.file = AtomicFile(path)
        try:
            self.file.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.file.abort()
            raise

    def write(self, key, arr):
        want, n = self.order[self.next]
        if key != want or arr.nbytes != n:
            raise RuntimeError(f"internal: writing {key} ({arr.nbytes} bytes) where {want} ({n} bytes) is due")
        if arr.nbytes:
            self.file.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        self.next += 1

    def commit(self):
        if self.next != len(self.order):
            raise RuntimeError(f"internal: {len(self.order) - self.next} tensors of {self.file.path} not written")
        self.file.commit()

    def abort(self):
        self.file.abort()


def parse_size(size):
    """max_shard_size as bytes: an int, or a string such as '5GB', '500MB', '2GiB' (as transformers)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be >= 1 byte, got {size}")
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if m is None or (m.group(3) and not m.group(2)):
        raise ValueError(f"max_shard_size must be a number of bytes or a size such as '5GB', got {size!r}")
    unit = (1024 if m.group(3) else 1000) ** "_KMGT".index(m.group(2) or "_")
    return parse_size(max(1, int(float(m.group(1)) * unit)))


# ------------------------------------------------------------------------------------------- progress


class _Progress:
    """A tqdm bar in bytes (and bytes/s) on world rank 0 for operations that last over a second."""

    def __init__(self, total, desc, enabled):
        self.bar = None
        if enabled and total > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, delay=1.0,
                            file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _world_rank():
    return dist.get_rank()


# ------------------------------------------------------------------------------------------- save


def check_entries(entries):
    seen = set()
    for e in entries:
        if e.name in seen:
            raise ValueError(f"two tensors are both named {e.name!r}")
        if e.name == "__metadata__":
            raise ValueError("'__metadata__' is reserved by safetensors and cannot name a tensor")
        seen.add(e.name)
        st_code(e.dtype, e.name)


def save(path, entries, layout="consolidated", metadata=None, key_map=None, max_shard_size=None, progress=True,
         extra=None):
    """Writes entries to the directory path. Collective over the world: every rank calls it, with the
    entries it holds (the same names in the same order on the ranks of each group). metadata: the user's
    (JSON), returned by load; extra: the caller's own facts (JSON, e.g. optimizer hyperparameters), read
    back as Checkpoint(path).extra."""
    if layout not in ("consolidated", "sharded"):
        raise ValueError(f"layout must be 'consolidated' or 'sharded', got {layout!r}")
    path = os.fspath(path)
    check_entries(entries)
    user = {} if metadata is None else metadata
    if not isinstance(user, dict):
        raise TypeError(f"metadata must be a dict (JSON-serialisable), got {type(user).__name__}")
    try:
        json.dumps(user)
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata must be JSON-serialisable: {exc}") from exc
    limit = parse_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    world = dist.get_world_group()
    save_id = _ckpt_paths.check_save_path(path)  # one path, one directory every rank sees, or ValueError on all
    if layout == "sharded":
        files = _save_sharded(path, entries, key_map, save_id, world, progress)
    else:
        files = _save_consolidated(path, entries, key_map, save_id, world, limit, progress)
    failure = None
    if world.rank == 0:
        try:
            write_json(os.path.join(path, MANIFEST), {
                "format": FORMAT, "version": VERSION, "layout": layout, "save_id": save_id,
                "world_size": world.size, "files": files, "metadata": user, "extra": extra or {}})
            _remove_stale(path, files)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            failure = exc
    agree_ok(world, failure, "writing the manifest")


def agree_ok(world, failure, what):
    """Every rank learns whether any rank failed (so none waits or commits alone); raises on all of them."""
    dist.agree_on_failure(world, failure, "checkpoint save failed on world rank(s) {ranks} while "
                          + what.replace("{", "{{").replace("}", "}}")
                          + " (see their errors)")


def _remove_stale(path, files):
    """Files of earlier saves into this directory that the new manifest does not name."""
    keep = {f for section in files.values() for f in section}
    pattern = re.compile(r"(model|optimizer)(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|"
                         r"rank\d{5}-of-\d{5}-[0-9a-f]{16}\.safetensors")
    for name in os.listdir(path):
        if name not in keep and pattern.fullmatch(name):
            try:
                os.unlink(os.path.join(path, name))
            except FileNotFoundError:
                pass


def _host(entry, arr):
    """arr (what entry.get() returned) as a C-contiguous NumPy array of the entry's shard."""
    arr = np.asarray(arr)
    if arr.dtype != entry.dtype:
        arr = arr.astype(entry.dtype)
    if tuple(arr.shape) != entry.local_shape:
        raise ValueError(f"{entry.name}: this rank's array has shape {tuple(arr.shape)}, its shard is "
                         f"{entry.local_shape}")
    return np.ascontiguousarray(arr)


def _save_sharded(path, entries, key_map, save_id, world, progress):
    """Each rank writes its pieces (replicated tensors: the group's rank 0) to its own file. No gather."""
    name = f"rank{world.rank:05d}-of-{world.size:05d}-{save_id}.safetensors"
    failure, items, described, jobs = None, [], {}, []
    try:
        for e in entries:
            if e.dim is None and e.rank != 0:
                continue
            for key, kshape, kstart in _segments(e, key_map):
                boxes = []  # this rank's pieces that fall in this key: (start in key, start in shard, size)
                for g, loc, size in e.boxes():
                    hit = _intersect(g, size, kstart, kshape)
                    if hit is not None:
                        boxes.append((_sub(hit[0], kstart), _add(loc, _sub(hit[0], g)), hit[1]))
                if not boxes and e.dim is not None:
                    continue
                axis = e.dim if e.dim is not None else 0
                stored, at, local_boxes = list(boxes[0][2]), 0, []
                for kg, loc, size in boxes:  # the stored array: these pieces one after another along axis
                    lb = [0] * len(size)
                    if lb:
                        lb[axis] = at
                        at += size[axis]
                    local_boxes.append([list(kg), lb, list(size)])
                if stored:
                    stored[axis] = at
                desc = e.describe()
                desc.update(shape=list(kshape), boxes=local_boxes, entry=e.name)
                described[key] = desc
                items.append((key, e.dtype, tuple(stored)))
                jobs.append((key, e, boxes))
        if len(set(k for k, _, _ in items)) != len(items):
            raise ValueError("key_map sends two tensors to the same key")
        meta = {"format": "tplinear-sharded",
                "tplinear": json.dumps({"save_id": save_id, "rank": world.rank, "world_size": world.size,
                                        "tensors": described}, separators=(",", ":"))}
        out = _TensorFile(os.path.join(path, name), items, meta)
        bar = _Progress(out.size, f"save {name}", progress and world.rank == 0)
        try:
            for key, e, boxes in jobs:
                shard = _host(e, e.get())
                parts = [shard[slices(loc, size)] for _, loc, size in boxes]
                arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=e.dim or 0)
                out.write(key, arr)
                bar.update(arr.nbytes)
                del shard, parts, arr
            out.commit()
        except BaseException:
            out.abort()
            raise
        finally:
            bar.close()
    except Exception as exc:  # noqa: BLE001 - reported on every rank
        failure = exc
    try:
        agree_ok(world, failure, "writing its shard file")
    except BaseException:
        if failure is None:  # another rank failed: this rank's new file belongs to no checkpoint
            _unlink(os.path.join(path, name))
        raise
    return {"sharded": [f"rank{r:05d}-of-{world.size:05d}-{save_id}.safetensors" for r in range(world.size)]}


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _plan_files(section, entries, segs, limit):
    """Consolidated files of one section: a new file when the next entry would pass limit (an entry is
    never split across files); tensors ordered by itemsize within a file, so every tensor stays aligned."""
    groups, size = [[]], 0
    for e in entries:
        n = sum(math.prod(s) for _, s, _ in segs[e.name]) * e.dtype.itemsize
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += n
    if not groups[-1]:
        return []
    plan = []
    for i, group in enumerate(groups):
        group = sorted(group, key=lambda e: -e.dtype.itemsize)  # stable: the caller's order otherwise
        name = f"{section}.safetensors" if len(groups) == 1 else f"{section}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        plan.append((name, group))
    return plan


def _save_consolidated(path, entries, key_map, save_id, world, limit, progress):
    """World rank 0 writes full tensors, one at a time: each is gathered from its group's ranks (one
    broadcast per other rank holding a piece), written, freed. Entries whose group does not reach world
    rank 0 (another data-parallel replica) are not written."""
    mine = [e for e in entries if e.group is None or 0 in e.group.ranks]
    segs = {e.name: _segments(e, key_map) for e in mine}
    keys = [k for e in mine for k, _, _ in segs[e.name]]
    if len(set(keys)) != len(keys):
        raise ValueError("key_map sends two tensors to the same key")
    plans = {s: _plan_files(s, [e for e in mine if e.section == s], segs, limit) for s in SECTIONS}
    files = {}
    for s in SECTIONS:
        names = [fname for fname, _ in plans[s]] + ([f"{s}.safetensors.index.json"] if len(plans[s]) > 1 else [])
        if names:
            files[s] = names
    order = [(fname, group) for s in SECTIONS for fname, group in plans[s]]
    _check_same_plan(world, [e for _, group in order for e in group if e.dim is not None and e.group.size > 1])
    writer = world.rank == 0
    failure, outs = None, []
    total = sum(math.prod(e.shape) * e.dtype.itemsize for e in mine)
    bar = _Progress(total, "save", progress and writer)
    try:
        for fname, group in order:
            out = None
            if writer and failure is None:
                try:
                    items = [(k, e.dtype, s) for e in group for k, s, _ in segs[e.name]]
                    out = _TensorFile(os.path.join(path, fname), items, {"format": "pt", "tplinear_save_id": save_id})
                    outs.append(out)
                except Exception as exc:  # noqa: BLE001 - reported on every rank below
                    failure = exc
            for e in group:
                try:
                    full = gather_to_writer(e, world)
                except Exception as exc:  # noqa: BLE001 - keep the collectives in step, report later
                    failure, full = failure or exc, None
                if out is not None and full is not None and failure is None:
                    try:
                        for key, kshape, kstart in segs[e.name]:
                            out.write(key, full[slices(kstart, kshape)])
                    except Exception as exc:  # noqa: BLE001
                        failure = exc
                    bar.update(full.nbytes)
                del full
    finally:
        bar.close()
    if failure is None and writer:
        try:
            for out in outs:
                out.commit()
            for s in SECTIONS:
                if len(plans[s]) > 1:
                    write_json(os.path.join(path, f"{s}.safetensors.index.json"), {
                        "metadata": {"total_size": sum(math.prod(sh) * e.dtype.itemsize for _, g in plans[s]
                                                       for e in g for _, sh, _ in segs[e.name])},
                        "weight_map": {k: fname for fname, g in plans[s] for e in g for k, _, _ in segs[e.name]}})
        except Exception as exc:  # noqa: BLE001
            failure = exc
    if failure is not None:
        for out in outs:
            out.abort()
    agree_ok(world, failure, "gathering or writing the consolidated files")
    return files


def _check_same_plan(world, gathered):
    """The ranks that feed the consolidated files must gather the same tensors in the same order (else the
    broadcasts would pair different tensors): one all-gather of a digest of names, shapes, dtypes and
    partitions (ranks that gather nothing, such as other data-parallel replicas, send 0)."""
    if world.size == 1:
        return
    import hashlib

    text = repr([(e.name, e.shape, e.dtype.str, e.dim, e.ranges) for e in gathered]).encode()
    word = int.from_bytes(hashlib.sha256(text).digest()[:7], "little") if gathered else 0
    every = np.zeros(world.size, dtype=np.int64)
    dist.all_gather_into_tensor(every, np.array([word], dtype=np.int64), group=world)
    if len(set(int(v) for v in every if v != 0)) > 1:
        ref = int(every[0]) or next(int(v) for v in every if v != 0)
        differ = [r for r in range(world.size) if every[r] not in (0, ref)]
        raise ValueError(f"ranks pass different tensors to save_checkpoint (world ranks {differ} differ from "
                         "the others in names, shapes, dtypes or partitions): every rank of a group must pass "
                         "the same layers, arrays and optimizer state")


def gather_to_writer(e, world):
    """The full tensor on world rank 0 (None elsewhere): rank 0 places its own pieces, and every other
    rank of the group broadcasts its shard's bytes in turn (sent and received in place where they line
    up). Replicated tensors come from rank 0 itself."""
    writer = world.rank == 0
    if e.dim is None or e.group.size == 1:
        return _host(e, e.get()) if writer else None
    g = e.group
    root = g.ranks.index(0)
    full = np.empty(e.shape, dtype=e.dtype) if writer else None
    failure = None
    try:
        mine = _host(e, e.get())
    except Exception as exc:  # noqa: BLE001 - send zeros so the others' broadcasts stay paired, then raise
        failure, mine = exc, np.zeros(e.local_shape, dtype=e.dtype)
    for r in range(g.size):
        shape = list(e.shape)
        shape[e.dim] = sum(s for _, s in e.ranges[r])
        nbytes = math.prod(shape) * e.dtype.itemsize
        piece = mine if r == e.rank else None
        if r != root and nbytes:
            direct = writer and e.dim == 0 and len(e.ranges[r]) == 1 and nbytes % 4 == 0
            if r == e.rank and nbytes % 4 == 0:
                words = mine.reshape(-1).view(np.uint8).view(np.int32)
            elif direct:  # rank r's rows are one contiguous block of the full tensor: receive into it
                off, size = e.ranges[r][0]
                words = full[off:off + size].reshape(-1).view(np.uint8).view(np.int32)
            else:
                words = np.empty(-(-nbytes // 4), dtype=np.int32)
                if r == e.rank:
                    words.view(np.uint8)[:nbytes] = mine.reshape(-1).view(np.uint8)
            dist.broadcast(words, r, group=g)
            if direct:
                continue
            piece = words.view(np.uint8)[:nbytes].view(e.dtype).reshape(shape)
        if writer and nbytes:
            at = 0
            for off, size in e.ranges[r]:
                src = [slice(None)] * len(shape)
                dst = [slice(None)] * len(shape)
                src[e.dim], dst[e.dim] = slice(at, at + size), slice(off, off + size)
                full[tuple(dst)] = piece[tuple(src)]
                at += size
    if failure is not None:
        raise failure
    return full


# ------------------------------------------------------------------------------------------- read


class _Piece:
    __slots__ = ("file", "key", "start", "local", "size")

    def __init__(self, file, key, start, local, size):
        self.file, self.key, self.start, self.local, self.size = file, key, tuple(start), tuple(local), tuple(size)


class _Source:
    """One logical tensor of a checkpoint: its full shape, dtype and the stored pieces that make it up."""

    __slots__ = ("key", "shape", "dtype", "code", "pieces")

    def __init__(self, key, shape, code):
        self.key, self.shape, self.code, self.pieces = key, tuple(shape), code, []
        self.dtype = codes().get(code)


class Checkpoint:
    """An opened checkpoint (a tplinear directory, a Hugging Face directory or one .safetensors file):
    the index of its tensors, read from the headers only. Files stay memory-mapped until close()."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.handles = {}
        self.fds = {}
        self.sources = {}
        self.metadata = {}
        self.extra = {}
        self.layout = None
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def close(self):
        for h in self.handles.values():
            try:
                h.__exit__(None, None, None)
            except Exception:  # noqa: BLE001
                pass
        for fd, _ in self.fds.values():
            os.close(fd)
        self.handles, self.fds = {}, {}

    def release(self, name):
        h = self.handles.pop(name, None)
        if h is not None:
            h.__exit__(None, None, None)
        fd = self.fds.pop(name, None)
        if fd is not None:
            os.close(fd[0])

    def read_into(self, name, key, start, dest, dst_start, size):
        """Reads the box (start, size) of a stored tensor straight into dest at dst_start with pread, in
        runs contiguous in both (one run for a whole shard, a row each for a column range), when the
        dtypes match and the runs are long enough; False when get_slice should do it instead."""
        if name not in self.fds:
            path = name if os.path.isabs(name) else os.path.join(self.folder, name)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:  # safe_open has checked this header already; only the offsets are needed
                n = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
                header = json.loads(os.pread(fd, n, 8))
                tensors = {k: (8 + n + v["data_offsets"][0], tuple(v["shape"]), v["dtype"])
                           for k, v in header.items() if k != "__metadata__"}
            except BaseException:
                os.close(fd)
                raise
            self.fds[name] = (fd, tensors)
        fd, tensors = self.fds[name]
        begin, shape, code = tensors[key]
        if codes().get(code) != dest.dtype or not dest.flags.c_contiguous:
            return False
        runs = _runs(start, shape, dst_start, dest.shape, size, dest.dtype.itemsize)
        if runs is None:
            return False
        src_offs, dst_offs, length = runs
        item = dest.dtype.itemsize
        flat = dest.reshape(-1).view(np.uint8)
        for so, do in zip(src_offs.tolist(), dst_offs.tolist()):
            view = memoryview(flat[do * item:(do + length) * item])
            at, done = begin + so * item, 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], at + done)
                if got <= 0:
                    raise ValueError(f"{name}: {key!r} ends early (was the file truncated while being read?)")
                done += got
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self, name):
        """A safe_open handle of a file of the checkpoint (memory-mapped; only its header is read)."""
        if name not in self.handles:
            if os.path.isabs(name):  # the single-file case
                full = name
            elif not name or "/" in name or os.sep in name or name in (".", ".."):
                raise ValueError(f"checkpoint {self.path}: bad file name {name!r} (files live in its directory)")
            else:
                full = os.path.join(self.folder, name)
            if not os.path.isfile(full):
                raise ValueError(f"checkpoint {self.path}: file {name} is missing")
            try:
                h = safe_open(full, framework="np")
                h.__enter__()
            except (SafetensorError, OSError, ValueError) as exc:
                raise ValueError(f"{full}: not a valid safetensors file ({exc})") from exc
            self.handles[name] = h
        return self.handles[name]

    def _index(self):
        if os.path.isfile(self.path):
            self.folder = os.path.dirname(os.path.abspath(self.path))
            self.layout = "consolidated"
            self._add_full(os.path.abspath(self.path))
            return
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"no checkpoint at {self.path}")
        self.folder = self.path
        manifest = os.path.join(self.path, MANIFEST)
        if os.path.isfile(manifest):
            return self._index_manifest(manifest)
        found = False
        for section in SECTIONS:
            index = os.path.join(self.path, f"{section}.safetensors.index.json")
            single = os.path.join(self.path, f"{section}.safetensors")
            if os.path.isfile(index):
                self._add_index(index)
                found = True
            elif os.path.isfile(single):
                self._add_full(f"{section}.safetensors")
                found = True
        if not found:
            raise FileNotFoundError(f"no checkpoint in {self.path}: expected {MANIFEST} (tplinear), "
                                    "model.safetensors or model.safetensors.index.json (Hugging Face)")
        self.layout = "consolidated"

    def _index_manifest(self, manifest):
        try:
            with open(manifest, "rb") as f:
                info = json.loads(f.read(1 << 24))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{manifest}: not a valid tplinear manifest ({exc})") from exc
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError(f"{manifest}: not a tplinear checkpoint manifest")
        if not isinstance(info.get("version"), int) or info["version"] > VERSION:
            raise ValueError(f"{manifest}: format version {info.get('version')!r} is newer than this tplinear "
                             f"reads ({VERSION}); upgrade tplinear")
        self.layout, self.save_id = info.get("layout"), info.get("save_id")
        meta, extra = info.get("metadata", {}), info.get("extra", {})
        self.metadata = meta if isinstance(meta, dict) else {}
        self.extra = extra if isinstance(extra, dict) else {}
        files = info.get("files")
        if self.layout not in ("consolidated", "sharded") or not isinstance(files, dict):
            raise ValueError(f"{manifest}: bad layout {self.layout!r} or file list")
        for section, names in files.items():
            if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n for n in names):
                raise ValueError(f"{manifest}: bad file list for {section!r}")
            for name in names:
                if name.endswith(".index.json"):
                    continue
                if self.layout == "sharded":
                    self._add_sharded(name)
                else:
                    self._add_full(name)
        if self.layout == "sharded":
            for src in self.sources.values():
                self._check_cover(src)

    def _check_id(self, name, got):
        want = getattr(self, "save_id", None)
        if want is not None and got != want:
            raise ValueError(f"checkpoint {self.path}: {name} belongs to another save ({got}) than the manifest "
                             f"({want}); an interrupted save over an older checkpoint?")

    def _add_index(self, index):
        try:
            with open(index, "rb") as f:
                weight_map = json.loads(f.read(1 << 26))["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from exc
        for name in sorted(set(weight_map.values())):
            keys = self._add_full(name)
            for key in keys:
                if weight_map.get(key) != name:
                    raise ValueError(f"{index}: {name} holds {key!r}, which the index does not place there")
        for key, name in weight_map.items():
            if key not in self.sources:
                raise ValueError(f"{index}: {key!r} should be in {name}, which does not hold it")

    def _add_full(self, name):
        h = self.open(name)
        self._check_id(name, (h.metadata() or {}).get("tplinear_save_id"))
        keys = list(h.keys())
        for key in keys:
            if key in self.sources:
                raise ValueError(f"checkpoint {self.path}: {key!r} is stored twice (in {name} and "
                                 f"{self.sources[key].pieces[0].file})")
            sl = h.get_slice(key)
            src = _Source(key, sl.get_shape(), sl.get_dtype())
            src.pieces.append(_Piece(name, key, (0,) * len(src.shape), (0,) * len(src.shape), src.shape))
            self.sources[key] = src
        return keys

    def _add_sharded(self, name):
        h = self.open(name)
        try:
            desc = json.loads((h.metadata() or {})["tplinear"])
            tensors = desc["tensors"]
            if not isinstance(tensors, dict):
                raise TypeError("'tensors' is not a dict")
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{name}: no valid tplinear shard description in its header ({exc!r})") from exc
        self._check_id(name, desc.get("save_id"))
        stored = set(h.keys())
        for key, d in tensors.items():
            if key not in stored:
                raise ValueError(f"{name}: its header describes {key!r} but holds no such tensor")
            sl = h.get_slice(key)
            stored_shape, code = tuple(sl.get_shape()), sl.get_dtype()
            shape = _ints(d.get("shape") if isinstance(d, dict) else None)
            boxes = d.get("boxes") if isinstance(d, dict) else None
            boxes = [tuple(_ints(v, len(shape)) for v in b) if isinstance(b, list) and len(b) == 3 else None
                     for b in boxes] if isinstance(boxes, list) and shape is not None else None
            if boxes is None or any(b is None or None in b for b in boxes):
                raise ValueError(f"{name}: bad description of {key!r} (shape and boxes of ints expected)")
            src = self.sources.get(key)
            if src is None:
                src = self.sources[key] = _Source(key, shape, code)
            elif src.shape != shape or src.code != code:
                raise ValueError(f"checkpoint {self.path}: {key!r} is {src.shape} {src.code} in one file and "
                                 f"{shape} {code} in {name}")
            for g, loc, sz in boxes:
                ok = (len(stored_shape) == len(shape)
                      and all(0 <= a and a + n <= m for a, n, m in zip(g, sz, shape))
                      and all(0 <= a and a + n <= m for a, n, m in zip(loc, sz, stored_shape)))
                if not ok:
                    raise ValueError(f"{name}: a piece of {key!r} lies outside the tensor")
                if any(p.start == g and p.size == sz for p in src.pieces):
                    continue  # the same piece from a data-parallel replica
                src.pieces.append(_Piece(name, key, g, loc, sz))

    def _check_cover(self, src):
        """The pieces of a sharded tensor are disjoint and cover it (no rank file missing)."""
        total = 0
        for i, p in enumerate(src.pieces):
            total += math.prod(p.size)
            for q in src.pieces[:i]:
                if _intersect(p.start, p.size, q.start, q.size) is not None:
                    raise ValueError(f"checkpoint {self.path}: pieces of {src.key!r} in {p.file} and {q.file} overlap")
        if total != math.prod(src.shape):
            raise ValueError(f"checkpoint {self.path}: the pieces of {src.key!r} cover {total} of its "
                             f"{math.prod(src.shape)} elements (a rank's file is missing?)")


def _runs(src_start, src_shape, dst_start, dst_shape, size, item, min_bytes=4096, max_runs=1 << 16):
    """A box as runs contiguous in both C-ordered tensors: (source element offsets, destination element
    offsets, run length), or None when the runs would be too many or too short to beat get_slice."""
    nd = len(size)
    if nd == 0:
        return np.zeros(1, np.int64), np.zeros(1, np.int64), 1
    k = nd - 1  # the dims after k are whole in both tensors: they join the run
    while k > 0 and size[k] == src_shape[k] == dst_shape[k]:
        k -= 1
    length, count = math.prod(size[k:]), math.prod(size[:k])
    if length == 0 or count > max_runs or (count > 1 and length * item < min_bytes):
        return None

    def offsets(start, shape):
        strides = [math.prod(shape[d + 1:]) for d in range(nd)]
        offs = np.full(1, sum(start[d] * strides[d] for d in range(nd)), np.int64)
        for d in range(k):
            offs = (offs[:, None] + np.arange(size[d], dtype=np.int64)[None, :] * strides[d]).reshape(-1)
        return offs

    return offsets(src_start, src_shape), offsets(dst_start, dst_shape), length


def _ints(v, n=None):
    """v as a tuple of non-negative ints (of length n when given), or None."""
    if not isinstance(v, list) or (n is not None and len(v) != n):
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        return None
    return tuple(v)


def load(path, entries, strict=True, cast=False, key_map=None, progress=True, sections=None, ignore=()):
    """Fills entries from the checkpoint at path (any layout, any group size; an open Checkpoint too),
    reading only the bytes of this rank's pieces. Every name, shape and dtype is checked from the headers
    before any data is read. Not collective. Returns the checkpoint's user metadata.

    sections: the parts of the checkpoint whose keys strict checks ("model", "optimizer"); by default
    the model and the sections of the entries. ignore: keys strict does not count as unused (tied
    weights that the caller holds under another key)."""
    check_entries(entries)
    if isinstance(path, Checkpoint):
        return _load(path, entries, strict, cast, key_map, progress, sections, ignore)
    with Checkpoint(path) as ck:
        return _load(ck, entries, strict, cast, key_map, progress, sections, ignore)


def _load(ck, entries, strict, cast, key_map, progress, sections, ignore):
    asked = set(sections) if sections is not None else {e.section for e in entries} | {"model"}
    plan = _plan(ck, entries, strict, cast, key_map, asked, set(ignore))
    total = sum(n for _, _, ops in plan for *_, n in ops)
    bar = _Progress(total, f"load {os.path.basename(os.path.abspath(ck.path))}", progress and _world_rank() == 0)
    last = {file: i for i, (_, _, ops) in enumerate(plan) for file, *_ in ops}
    try:
        for i, (e, shape, ops) in enumerate(plan):
            dest = e.buffer()
            if dest is None or tuple(dest.shape) != shape or dest.dtype != e.dtype:
                dest = np.empty(shape, dtype=e.dtype)
            for file, key, src_start, dst_start, size, n in ops:
                if not ck.read_into(file, key, src_start, dest, dst_start, size):
                    h = ck.handles[file]
                    part = h.get_slice(key)[slices(src_start, size)] if size else h.get_tensor(key)
                    dest[slices(dst_start, size)] = part
                    del part
                bar.update(n)
            e.put(dest)
            del dest
            for file in {op[0] for op in ops if last[op[0]] == i}:
                ck.release(file)  # unmap a file once read: its pages leave this process's RSS
    finally:
        bar.close()
    return dict(ck.metadata)


def _plan(ck, entries, strict, cast, key_map, asked, ignore):
    """For each entry, the slice reads that fill this rank's shard; every problem found from the headers
    raises here, before any data is read."""
    missing, wrong_shape, wrong_dtype, used, plan = [], [], [], set(), []
    shapes = {k: s.shape for k, s in ck.sources.items()}
    for e in entries:
        mapped = e.section == "model"
        segs = _segments(e, key_map if mapped else None, shapes)
        absent = [k for k, _, _ in segs if k not in ck.sources]
        if absent and not strict:
            continue  # strict=False: what the checkpoint lacks keeps its value
        if absent:
            missing.extend(k if k == e.name else f"{k} (for {e.name})" for k in absent)
            continue
        used.update(k for k, _, _ in segs)
        if len(segs) == 1:
            got = ck.sources[segs[0][0]].shape
            if got != e.shape:
                wrong_shape.append(f"{segs[0][0]}: checkpoint {got}, {e.name} {e.shape}")
                continue
        else:
            rest = [ck.sources[k].shape for k, _, _ in segs]
            if any(len(s) != len(e.shape) or s[1:] != e.shape[1:] for s in rest) or sum(s[0] for s in rest) != e.shape[0]:
                wrong_shape.append(f"{[k for k, _, _ in segs]}: checkpoint {rest} do not stack along dim 0 into "
                                   f"{e.name} {e.shape}")
                continue
        for k, _, _ in segs:
            src = ck.sources[k]
            if src.dtype is None:
                raise TypeError(f"checkpoint {ck.path}: {k!r} has dtype {src.code}, which tplinear cannot read")
            if src.dtype != e.dtype and not cast:
                wrong_dtype.append(f"{k}: checkpoint {src.code}, {e.name} {st_code(e.dtype, e.name)}")
        ops = []
        for g, loc, size in e.boxes():
            for key, kshape, kstart in segs:
                hit = _intersect(g, size, kstart, kshape)
                if hit is None:
                    continue
                kg = _sub(hit[0], kstart)
                for p in ck.sources[key].pieces:
                    part = _intersect(kg, hit[1], p.start, p.size)
                    if part is None:
                        continue
                    src_start = _add(p.local, _sub(part[0], p.start))
                    dst_start = _add(loc, _sub(_add(part[0], kstart), g))
                    n = math.prod(part[1]) * e.dtype.itemsize
                    ops.append((p.file, p.key, src_start, dst_start, part[1], n))
        plan.append((e, e.local_shape, ops))
    extra = []
    if strict:
        extra = sorted(k for k in ck.sources if k not in used and k not in ignore
                       and ("optimizer" if k.startswith(OPTIMIZER_PREFIX) else "model") in asked)
    if missing or extra or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {', '.join(map(repr, missing[:20]))}"
                         + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""))
        if extra:
            parts.append(f"in the checkpoint but not loaded: {', '.join(map(repr, extra[:20]))}"
                         + (f" and {len(extra) - 20} more" if len(extra) > 20 else "")
                         + " (strict=False ignores them)")
        if wrong_shape:
            parts.append("shapes differ: " + "; ".join(wrong_shape[:20]))
        raise ValueError(f"cannot load {ck.path}: " + "; ".join(parts))
    if wrong_dtype:
        raise TypeError(f"cannot load {ck.path}: dtypes differ (cast=True converts): " + "; ".join(wrong_dtype[:20]))
    return plan
