"""Checks that the ranks of a save or a load mean the same checkpoint, before anything is written or read.

A checkpoint is one directory that every rank sees (world rank 0 writes the consolidated files and the
manifest, each rank its own shard file in the sharded layout). Ranks that pass different paths (pytest's
per-rank ``tmp_path``, a path built from the rank) or the same path on disks of their own (node-local
``/tmp``) would otherwise fail late and unclearly: one rank's FileNotFoundError while the others report
"save failed on world rank(s) [1]", or a save that seems to succeed and fails only at load ("file
rank00001-of-00002-... is missing"). Here every rank raises the same ValueError first, naming what
differed.
"""
import os
import secrets
import zlib

import numpy as np

from . import distributed as dist


def _words(world, value):
    every = np.zeros(world.size, dtype=np.int64)
    dist.all_gather_into_tensor(every, np.array([value], dtype=np.int64), group=world)
    return every.tolist()


def _same_path(world, path, what):
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    words = _words(world, zlib.crc32(text.encode("utf-8", "surrogateescape")) * 4096 + len(text) % 4096)
    if len(set(words)) == 1:
        return text
    paths = [None] * world.size
    dist.all_gather_object(paths, text, group=world)
    listed = ", ".join(f"rank {r}: {p!r}" for r, p in enumerate(paths))
    raise ValueError(f"{what}: the ranks passed different paths ({listed}); every rank must pass the same path, "
                     "one directory that all of them see (a shared filesystem), e.g. a path chosen on rank 0 and "
                     "broadcast, not a per-rank temporary directory")


def world():
    """The world a save or load agrees over, or None for a process alone (no world, or a world of one)."""
    if not dist.is_initialized():
        return None
    w = dist.get_world_group()
    return w if w.size > 1 else None


def _make_directory(path):
    """Makes the checkpoint directory (ValueError where path is something else) and draws a fresh token."""
    if os.fsdecode(path).endswith(".safetensors"):
        raise ValueError(f"checkpoint path {path} ends in .safetensors, the name of one file, but a checkpoint is a "
                         "directory (model.safetensors, the manifest, optimizer and shard files): pass a directory "
                         "path; for a single file of full tensors use safetensors' save_file (load_checkpoint reads "
                         "one)")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    return secrets.randbits(62) + 1


def check_save_path(path, what="save_checkpoint"):
    """Collective over the world: every rank passed the same path, and world rank 0's directory (made
    here) is the one every rank sees: rank 0 leaves a probe file with a fresh token in it, the others look
    for it. ValueError on every rank naming the paths, or the ranks that cannot see rank 0's directory.
    Returns the token as the save's id (16 hex digits), the same on every rank."""
    w = world()
    if w is None:
        return f"{_make_directory(path):016x}"
    text = _same_path(w, path, what)
    token = np.zeros(1, dtype=np.int64)
    probe = None
    if w.rank == 0:
        try:
            token[0] = _make_directory(text)
            probe = os.path.join(text, f".tplinear-probe-{int(token[0]):016x}")
            with open(probe, "w") as f:
                f.write(f"{int(token[0]):016x}")
        except Exception as exc:  # noqa: BLE001 - every rank learns of it below
            token[0] = 0
            failure = exc
    dist.broadcast(token, group=w, group_src=0)
    if token[0] == 0:
        if w.rank == 0:
            raise failure
        raise ValueError(f"{what}: world rank 0 could not create the checkpoint directory {text} (see its error)")
    sees = 1
    if w.rank != 0:
        name = os.path.join(text, f".tplinear-probe-{int(token[0]):016x}")
        try:
            with open(name) as f:
                sees = int(f.read().strip() == f"{int(token[0]):016x}")
        except OSError:
            sees = 0
    every = _words(w, sees)
    if probe is not None:
        try:
            os.unlink(probe)
        except OSError:
            pass
    blind = [r for r, s in enumerate(every) if not s]
    if blind:
        who = ", ".join(f"rank {r}" for r in blind)
        raise ValueError(f"{what}: {who} cannot see rank 0's directory {text}: the path names a different directory "
                         f"on {'that rank' if len(blind) == 1 else 'those ranks'} (a node-local disk, or a relative "
                         "path from another working directory). A checkpoint is one directory that every rank sees: "
                         "save to a shared filesystem")
    return f"{int(token[0]):016x}"


def _identity(path):
    """What this rank sees at path: its manifest's save id, or its safetensors / index files and sizes."""
    try:
        if os.path.isfile(path):
            return f"file {os.path.getsize(path)}"
        if not os.path.isdir(path):
            return "missing"
        manifest = os.path.join(path, "tplinear.json")
        if os.path.isfile(manifest):
            import json
            with open(manifest) as f:
                return "manifest " + str(json.load(f).get("save_id"))
        names = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".safetensors.index.json")))
        return "files " + " ".join(f"{n}:{os.path.getsize(os.path.join(path, n))}" for n in names)
    except (OSError, ValueError) as exc:
        return f"unreadable {type(exc).__name__}"


def check_load_path(path, what="load_checkpoint"):
    """Collective over the world: every rank passed the same path and sees the same checkpoint there
    (the same save, or the same files: a copy on each node is fine). ValueError on every rank otherwise."""
    w = world()
    if w is None or not isinstance(path, (str, bytes, os.PathLike)):
        return
    text = _same_path(w, path, what)
    mine = _identity(text)
    words = _words(w, zlib.crc32(mine.encode()))
    if len(set(words)) == 1:
        return
    seen = [None] * w.size
    dist.all_gather_object(seen, mine, group=w)
    missing = [r for r, s in enumerate(seen) if s == "missing"]
    if missing and len(missing) < w.size:
        who = ", ".join(f"rank {r}" for r in missing)
        raise ValueError(f"{what}: {who} cannot see the checkpoint at {text} that rank(s) "
                         f"{[r for r in range(w.size) if r not in missing]} see: every rank must see the checkpoint "
                         "(a shared filesystem, or a copy on every node)")
    raise ValueError(f"{what}: the ranks see different checkpoints at {text} (" +
                     ", ".join(f"rank {r}: {s}" for r, s in enumerate(seen)) + "): every rank must load the same save")
