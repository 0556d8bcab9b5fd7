"""Fuzzing checkpoint files with Hypothesis: mutated, truncated and made-up safetensors files, sharded
descriptions, manifests and .npz files. Every outcome is a clean ValueError / TypeError or a load whose
values are exactly what the file holds; never a crash, a hang or another exception. Self-contained."""
import json
import os
import shutil
import struct

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tplinear as tp  # noqa: E402
import tplinear.distributed as dist  # noqa: E402

FUZZ = settings(max_examples=int(os.environ.get("TPLINEAR_FUZZ_EXAMPLES", "250")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLEAN = (ValueError, TypeError)


@pytest.fixture(scope="module")
def world():
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        os.environ.pop(k, None)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(timeout=10)
    yield
    dist.destroy_process_group()


def _layers(seed=0):
    tp.set_training_mode(False)
    return {"col": tp.LinearLayer.from_init(6, 10, seed=seed, name="col"),
            "row": tp.LinearAllreduce.from_init(10, 6, seed=seed + 1, name="row")}


@pytest.fixture(scope="module")
def originals(world, tmp_path_factory):
    """A consolidated and a sharded checkpoint of the same small model, and an .npz of it."""
    root = tmp_path_factory.mktemp("fuzz-src")
    layers = _layers()
    arrays = {"norm": np.arange(6, dtype=np.float32)}
    for layout in ("consolidated", "sharded"):
        tp.save_checkpoint(root / layout, layers, layout=layout, arrays=arrays, metadata={"step": 1})
    with pytest.warns(DeprecationWarning):
        tp.save_checkpoint(root / "old.npz", layers)
    return root


def _load(path, **kw):
    layers, norm = _layers(seed=50), np.zeros(6, np.float32)
    try:
        tp.load_checkpoint(path, layers, arrays=None if str(path).endswith(".npz") else {"norm": norm}, progress=False,
                           **kw)
    except CLEAN:
        return None
    return layers, norm


def _check_against_file(folder, got):
    """A load that succeeded holds exactly what safetensors itself reads from the (mutated) files."""
    from safetensors.numpy import load_file

    layers, norm = got
    stored = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            stored.update(load_file(os.path.join(folder, name)))
    untouched = _layers(seed=50)  # strict=False leaves what the file lacks as it was
    for n, layer in layers.items():
        for k in ("weight", "bias"):
            want = stored.get(f"{n}.{k}", getattr(untouched[n], k).data)
            assert np.array_equal(getattr(layer, k).data, want.astype(np.float32)), f"{n}.{k}"
    assert np.array_equal(norm, stored.get("norm", np.zeros(6)).astype(np.float32))


def _copy(src, dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return [os.path.join(dst, f) for f in sorted(os.listdir(dst)) if f.endswith(".safetensors")][0]


@FUZZ
@given(layout=st.sampled_from(["consolidated", "sharded"]),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
       in_header=st.booleans(), cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
       cast=st.booleans())
def test_mutated_safetensors_files(originals, tmp_path, layout, edits, in_header, cast, cut):
    target = _copy(originals / layout, tmp_path / "m")
    data = bytearray(open(target, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    span = 8 + n if in_header else len(data)
    for where, byte in edits:
        data[int(where * span)] = byte
    if cut is not None:
        data = data[:int(cut * len(data))]
    with open(target, "wb") as f:
        f.write(bytes(data))
    got = _load(tmp_path / "m", cast=cast)
    if got is not None:
        _check_against_file(tmp_path / "m", got)


_DTYPES = ["F32", "F64", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "", "f32", None, 3]
_dim = st.one_of(st.integers(0, 12), st.integers(-3, -1), st.integers(2**31, 2**63 - 1), st.just(1.5), st.just("6"))


@FUZZ
@given(tensors=st.dictionaries(st.sampled_from(["col.weight", "col.bias", "row.weight", "row.bias", "norm", "x"]),
                               st.fixed_dictionaries({"dtype": st.sampled_from(_DTYPES),
                                                      "shape": st.lists(_dim, max_size=3),
                                                      "data_offsets": st.lists(st.integers(-2, 2000), min_size=0,
                                                                               max_size=3)}),
                               max_size=6),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
                          st.just({"format": 1})),
       body=st.integers(0, 2000))
def test_made_up_headers(world, tmp_path, tensors, metadata, body):
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    os.makedirs(tmp_path / "h", exist_ok=True)
    with open(tmp_path / "h" / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(body))
    got = _load(tmp_path / "h", strict=False, cast=True)
    if got is not None:
        _check_against_file(tmp_path / "h", got)


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.text(max_size=4)),
                     lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)),
                     max_leaves=12)


@FUZZ
@given(field=st.sampled_from(["boxes", "shape", "whole", "save_id", "tensors"]), value=_json,
       box=st.lists(st.lists(st.integers(-2, 12), min_size=0, max_size=3), min_size=3, max_size=3))
def test_mutated_sharded_descriptions(originals, tmp_path, field, value, box):
    """The header's tplinear description of each stored piece rewritten: refused, or exactly right."""
    target = _copy(originals / "sharded", tmp_path / "s")
    data = open(target, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    desc = json.loads(header["__metadata__"]["tplinear"])
    key = sorted(desc["tensors"])[0]
    if field == "boxes":
        desc["tensors"][key]["boxes"] = [box]
    elif field == "shape":
        desc["tensors"][key]["shape"] = value
    elif field == "whole":
        desc = value
    elif field == "save_id":
        desc["save_id"] = value
    else:
        desc["tensors"] = value
    header["__metadata__"]["tplinear"] = json.dumps(desc)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    got = _load(tmp_path / "s")
    if got is not None:
        _check_against_file(tmp_path / "s", got)


@FUZZ
@given(field=st.sampled_from(["format", "version", "layout", "files", "metadata", "save_id", "all"]), value=_json)
def test_mutated_manifests(originals, tmp_path, field, value):
    _copy(originals / "consolidated", tmp_path / "c")
    path = tmp_path / "c" / "tplinear.json"
    manifest = json.loads(path.read_text())
    if field == "all":
        manifest = value
    else:
        manifest[field] = value
    path.write_text(json.dumps(manifest))
    try:
        got = _load(tmp_path / "c")
    except FileNotFoundError:  # the manifest names a file that is not there
        return
    if got is not None:
        _check_against_file(tmp_path / "c", got)


@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_mutated_npz_files(originals, tmp_path, edits, cut):
    data = bytearray((originals / "old.npz").read_bytes())
    for where, byte in edits:
        data[int(where * len(data))] = byte
    if cut is not None:
        data = data[:int(cut * len(data))]
    path = tmp_path / "m.npz"
    path.write_bytes(bytes(data))
    got = _load(path, cast=True)
    if got is not None:
        with np.load(path) as f:
            for n, layer in got[0].items():
                for k in ("weight", "bias"):
                    assert np.array_equal(getattr(layer, k).data, f[f"{n}.{k}"].astype(np.float32))
