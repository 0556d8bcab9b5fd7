"""Checkpoints (safetensors): every layout x save size x load size (1..4) x mode, optimizer state, resume
of a training run at another group size, Hugging Face round trips, bad files, atomic writes, the old .npz."""
import json
import os
import struct
import warnings

import numpy as np
import pytest

from conftest import SEED

import tplinear as tp
from tplinear import _ckpt
from tplinear.testing import assert_world_ok

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"TPLINEAR_TEST_SEED": str(SEED), "PYTHONPATH": TESTS}
SIZES = (1, 2, 3, 4)


# ---------------------------------------------------------------------------------- the matrix


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    for p in SIZES:
        assert_world_ok(p, f"import ckpt_checks as c; c.init(); c.save_all({root!r})", env=ENV, timeout=180)
    return root


@pytest.mark.parametrize("nproc", SIZES)
def test_every_layout_save_size_and_mode_loads_at(saved, nproc):
    """Checkpoints saved at 1..4 ranks in each layout (one file, numbered files + index, sharded) and mode
    load at nproc ranks in both modes: every shard, gathered weight, array and optimizer state exact."""
    res = assert_world_ok(nproc, f"import ckpt_checks as c; c.init(); c.load_all({saved!r}, {list(SIZES)!r})",
                          env=ENV, timeout=240)
    assert f"48 checkpoints loaded at {nproc} ranks" in res.output, res.output


def test_data_parallel_replicas(tmp_path):
    """Saved by two data-parallel replicas of a 2-rank group (world of 4), loaded at 3 ranks; GPT-2
    Conv1D layers ([in, out] weights) saved at 4 ranks in that layout, loaded at 3."""
    root = str(tmp_path)
    assert_world_ok(4, f"import ckpt_checks as c; c.init(); c.save_replicas({root!r})", env=ENV, timeout=180)
    res = assert_world_ok(3, f"import ckpt_checks as c; c.init(); c.load_replicas({root!r})", env=ENV, timeout=180)
    assert res.output.count("replicas ok") == 3


# ---------------------------------------------------------------------------------- resume


def resume_matches(module, tmp_path, timeout):
    """module.save_both at 2 ranks (8 steps uninterrupted; 4 steps then a checkpoint in each layout), then
    module.resume_both at 1, 2 and 3 ranks (4 more steps from each checkpoint): the resumed losses equal
    the uninterrupted run's bit for bit at 2 ranks and to 1e-6 at 1 and 3. Returns the reference losses."""
    full = str(tmp_path / "full.json")
    assert_world_ok(2, f"import {module} as c; c.init(); c.save_both({str(tmp_path)!r}, {full!r})", env=ENV,
                    timeout=timeout)
    ref = json.loads(open(full).read())
    for nproc in (1, 2, 3):
        out = str(tmp_path / f"resumed-{nproc}.json")
        assert_world_ok(nproc, f"import {module} as c; c.init(); c.resume_both({str(tmp_path)!r}, {out!r})",
                        env=ENV, timeout=timeout)
        for layout, got in json.loads(open(out).read()).items():
            if nproc == 2:
                assert got == ref[4:], (layout, got, ref[4:])
            else:
                err = max(abs(a - b) / abs(b) for a, b in zip(got, ref[4:]))
                assert err <= 1e-6, (layout, nproc, err, got, ref[4:])
    return ref


def test_resume_continues_the_loss_curve(tmp_path):
    """Adam (NumPy, float32) with moments, a trained replicated array and the step in the checkpoint."""
    ref = resume_matches("ckpt_checks", tmp_path, timeout=120)
    assert ref[-1] < ref[0]


# ---------------------------------------------------------------------------------- in this process


def _model(dtype="float32", seed=1):
    tp.set_training_mode(False)
    col = tp.LinearLayer.from_init(16, 40, seed=seed, dtype=dtype, name="col")
    row = tp.LinearAllreduce.from_init(40, 16, seed=seed + 1, dtype=dtype, name="row")
    return {"col": col, "row": row}


def _same(a, b):
    return all(np.array_equal(getattr(a[n], k).data, getattr(b[n], k).data) for n in a for k in ("weight", "bias"))


def test_files_are_plain_safetensors(world_of_one, tmp_path):
    from safetensors.numpy import load_file

    layers = _model()
    norm = np.linspace(0, 1, 16, dtype=np.float32)
    tp.save_checkpoint(tmp_path / "c", layers, arrays={"norm": norm}, metadata={"step": 3})
    got = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert sorted(got) == ["col.bias", "col.weight", "norm", "row.bias", "row.weight"]
    assert np.array_equal(got["col.weight"], layers["col"].weight.data) and np.array_equal(got["norm"], norm)
    manifest = json.loads((tmp_path / "c" / "tplinear.json").read_text())
    assert manifest["layout"] == "consolidated" and manifest["metadata"] == {"step": 3}
    # numbered files and an index past max_shard_size; every tensor in exactly one file
    tp.save_checkpoint(tmp_path / "m", layers, max_shard_size="3KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["col.bias", "col.weight", "row.bias", "row.weight"]
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(getattr(layers[n], k).data.nbytes for n in layers
                                                  for k in ("weight", "bias"))
    # a single .safetensors file loads too
    other = _model(seed=9)
    tp.load_checkpoint(tmp_path / "c" / "model.safetensors", other, arrays={"norm": np.zeros(16, np.float32)})
    assert _same(layers, other)


@pytest.mark.parametrize("layout", ["consolidated", "sharded"])
def test_a_path_ending_in_safetensors_is_refused_not_made_a_directory(world_of_one, tmp_path, layout):
    """save_checkpoint("x.safetensors") made a directory of that name (issue 26.5): a checkpoint is a directory
    (manifest, model and optimizer files), so a file's name is a clear ValueError and nothing is created."""
    for path in (tmp_path / "x.safetensors", str(tmp_path / "y.safetensors")):
        with pytest.raises(ValueError, match="ends in .safetensors.*pass a directory path"):
            tp.save_checkpoint(path, _model(), layout=layout)
        assert not os.path.lexists(path)


def test_missing_extra_and_strict(world_of_one, tmp_path):
    layers = _model()
    tp.save_checkpoint(tmp_path / "c", layers, arrays={"norm": np.ones(4, np.float32)})
    other = _model(seed=5)
    with pytest.raises(ValueError, match="in the checkpoint but not loaded: 'norm'"):
        tp.load_checkpoint(tmp_path / "c", other)
    more = dict(other, extra=tp.LinearLayer.from_init(16, 8, name="extra"))
    with pytest.raises(ValueError, match="missing from the checkpoint: 'extra.weight', 'extra.bias'"):
        tp.load_checkpoint(tmp_path / "c", more, arrays={"norm": np.zeros(4, np.float32)})
    before = more["extra"].weight.data.copy()
    tp.load_checkpoint(tmp_path / "c", more, strict=False)  # loads what both have
    assert _same(layers, other) and np.array_equal(more["extra"].weight.data, before)


def test_shapes_and_dtypes_are_checked_from_the_header(world_of_one, tmp_path):
    tp.save_checkpoint(tmp_path / "f64", _model("float64"))
    target = _model("float32", seed=4)
    keep = target["col"].weight.data.copy()
    with pytest.raises(TypeError, match="cast=True converts.*col.weight: checkpoint F64, col.weight F32"):
        tp.load_checkpoint(tmp_path / "f64", target)
    assert np.array_equal(target["col"].weight.data, keep), "a refused load changed the layer"
    tp.load_checkpoint(tmp_path / "f64", target, cast=True)
    assert np.array_equal(target["col"].weight.data, _model("float64")["col"].weight.data.astype(np.float32))
    tp.set_training_mode(False)
    wrong = {"col": tp.LinearLayer.from_init(16, 41, name="col"), "row": target["row"]}
    with pytest.raises(ValueError, match=r"col.weight: checkpoint \(40, 16\), col.weight \(41, 16\)"):
        tp.load_checkpoint(tmp_path / "f64", wrong, cast=True)


def test_bfloat16_and_other_dtypes_round_trip(world_of_one, tmp_path):
    import ml_dtypes

    arrays = {"bf": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16), "i8": np.arange(-3, 3, dtype=np.int8),
              "f16": np.linspace(0, 1, 5).astype(np.float16), "b": np.array([True, False]), "s": np.array(2.5)}
    for layout in ("consolidated", "sharded"):
        tp.save_checkpoint(tmp_path / layout, {}, layout=layout, arrays=arrays)
        back = {k: np.zeros_like(v) for k, v in arrays.items()}
        tp.load_checkpoint(tmp_path / layout, {}, arrays=back)
        for k in arrays:
            assert back[k].dtype == arrays[k].dtype and np.array_equal(back[k], arrays[k]), k
    # bfloat16 into float32 needs cast=True and is exact
    f32 = {"bf": np.zeros(6, np.float32)}
    with pytest.raises(TypeError, match="BF16"):
        tp.load_checkpoint(tmp_path / "sharded", {}, arrays=f32, strict=False)
    tp.load_checkpoint(tmp_path / "sharded", {}, arrays=f32, strict=False, cast=True)
    assert np.array_equal(f32["bf"], np.arange(6, dtype=np.float32))


def test_optimizer_state_argument_errors(world_of_one, tmp_path):
    layers = _model()
    w = layers["col"].weight.data
    with pytest.raises(ValueError, match="no parameter is named 'nope.weight'"):
        tp.save_checkpoint(tmp_path / "c", layers, optimizer_state={"m": {"nope.weight": np.zeros(3)}})
    with pytest.raises(ValueError, match="must have the shape of this rank's shard"):
        tp.save_checkpoint(tmp_path / "c", layers, optimizer_state={"m": {"col.weight": np.zeros(3)}})
    with pytest.raises(TypeError, match="optimizer_state\\['m'\\] must be a dict"):
        tp.save_checkpoint(tmp_path / "c", layers, optimizer_state={"m": np.zeros_like(w)})
    with pytest.raises(TypeError, match="JSON"):
        tp.save_checkpoint(tmp_path / "c", layers, metadata={"x": object()})
    with pytest.raises(TypeError, match="not a tplinear layer .*arrays="):
        tp.save_checkpoint(tmp_path / "c", {"norm": np.zeros(3)})
    with pytest.raises(ValueError, match="layout must be"):
        tp.save_checkpoint(tmp_path / "c", layers, layout="zip")
    with pytest.raises(ValueError, match="two tensors are both named 'col.weight'"):
        tp.save_checkpoint(tmp_path / "c", layers, arrays={"col.weight": np.zeros(2)})
    with pytest.raises(ValueError, match="max_shard_size"):
        tp.save_checkpoint(tmp_path / "c", layers, max_shard_size="lots")
    assert not os.path.exists(tmp_path / "c" / "tplinear.json")
    m = {"col.weight": np.ones_like(w)}
    tp.save_checkpoint(tmp_path / "c", layers, optimizer_state={"m": m})
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros_like(w)
        ro.flags.writeable = False
        tp.load_checkpoint(tmp_path / "c", layers, optimizer_state={"m": {"col.weight": ro}})
    # without optimizer_state, a checkpoint's optimizer state is not "extra"
    tp.load_checkpoint(tmp_path / "c", layers)


def test_byte_range_reads_equal_numpy_slices(world_of_one, tmp_path, rng):
    """The pread path (runs contiguous in file and shard) and the get_slice path read the same boxes."""
    from safetensors.numpy import save_file

    full = rng.standard_normal((6, 5, 2048)).astype(np.float32)
    save_file({"t": full}, str(tmp_path / "model.safetensors"))
    ck = _ckpt.Checkpoint(tmp_path)
    try:
        # (start, size, read with pread: one run, or runs of >= 4 KiB; else get_slice)
        for start, size, fast in [((0, 0, 0), (6, 5, 2048), True), ((2, 0, 0), (3, 5, 2048), True),
                                  ((0, 1, 0), (6, 3, 2048), True), ((1, 2, 1024), (4, 2, 1024), True),
                                  ((0, 0, 5), (6, 5, 3), False), ((3, 4, 7), (1, 1, 1), True)]:
            want = full[_ckpt.slices(start, size)]
            dest = np.zeros((8,) + size[1:], np.float32)  # the box lands at row 1 of a larger shard
            direct = ck.read_into("model.safetensors", "t", start, dest, (1, 0, 0), size)
            assert direct == fast, (start, size)
            if not direct:
                dest[1:1 + size[0]] = ck.open("model.safetensors").get_slice("t")[_ckpt.slices(start, size)]
            assert np.array_equal(dest[1:1 + size[0]], want) and not dest[0].any(), (start, size)
    finally:
        ck.close()


def _corrupt(path, how):
    data = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    if how == "truncated":
        data = data[:len(data) - 7]
    elif how == "header":
        data[8:8 + 10] = b"not json!!"
    elif how == "length":
        data[:8] = struct.pack("<Q", n + 10**12)
    elif how == "offsets":
        header = json.loads(data[8:8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"][1] += 4
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("layout", ["consolidated", "sharded"])
@pytest.mark.parametrize("how", ["truncated", "header", "length", "offsets"])
def test_bad_files_are_clear_errors(world_of_one, tmp_path, layout, how):
    layers = _model()
    tp.save_checkpoint(tmp_path / "c", layers, layout=layout)
    name = next(f for f in os.listdir(tmp_path / "c") if f.endswith(".safetensors"))
    _corrupt(tmp_path / "c" / name, how)
    with pytest.raises(ValueError, match=f"{name}: not a valid safetensors file"):
        tp.load_checkpoint(tmp_path / "c", _model(seed=3))


def test_sharded_checkpoint_problems(world_of_one, tmp_path):
    layers = _model()
    tp.save_checkpoint(tmp_path / "a", layers, layout="sharded")
    tp.save_checkpoint(tmp_path / "b", layers, layout="sharded")
    (name_a,) = [f for f in os.listdir(tmp_path / "a") if f.startswith("rank")]
    (name_b,) = [f for f in os.listdir(tmp_path / "b") if f.startswith("rank")]
    # a file of another save under the manifest's name: refused
    os.replace(tmp_path / "b" / name_b, tmp_path / "a" / name_a)
    with pytest.raises(ValueError, match="belongs to another save"):
        tp.load_checkpoint(tmp_path / "a", _model())
    # a rank's file missing
    os.unlink(tmp_path / "a" / name_a)
    with pytest.raises(ValueError, match=f"file {name_a} is missing"):
        tp.load_checkpoint(tmp_path / "a", _model())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tp.load_checkpoint(tmp_path / "nothing", _model())
    (tmp_path / "b" / "tplinear.json").write_text('{"format": "tplinear-checkpoint", "version": 99}')
    with pytest.raises(ValueError, match="newer than this tplinear reads"):
        tp.load_checkpoint(tmp_path / "b", _model())


def test_writes_are_atomic(world_of_one, tmp_path, monkeypatch):
    """A save that fails midway leaves no temporary file and the previous checkpoint loadable; a symlink
    at a file's name is replaced, never written through."""
    layers = _model()
    tp.save_checkpoint(tmp_path / "c", layers)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, tmp_path / "c" / "optimizer.safetensors")
    calls = []

    def failing(self, key, arr):
        calls.append(key)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, key, arr)

    real = _ckpt._TensorFile.write
    monkeypatch.setattr(_ckpt._TensorFile, "write", failing)
    changed = _model(seed=8)
    with pytest.raises(OSError, match="No space left"):
        tp.save_checkpoint(tmp_path / "c", changed)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "c")) == ["model.safetensors", "optimizer.safetensors", "tplinear.json"]
    back = _model(seed=4)
    tp.load_checkpoint(tmp_path / "c", back)
    assert _same(back, layers), "a failed save changed the checkpoint"
    m = {"col.weight": np.ones_like(layers["col"].weight.data)}
    tp.save_checkpoint(tmp_path / "c", layers, optimizer_state={"m": m})
    assert victim.read_bytes() == b"keep me" and not os.path.islink(tmp_path / "c" / "optimizer.safetensors")
    # a later save of another layout removes the files the new manifest does not name
    tp.save_checkpoint(tmp_path / "c", layers, layout="sharded")
    assert sorted(f.split("-")[0] for f in os.listdir(tmp_path / "c")) == ["rank00000", "tplinear.json"]


def test_progress_bar_on_long_operations(world_of_one, tmp_path, capfd, monkeypatch):
    import tqdm.auto

    seen = []
    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **dict(kwargs, delay=0))

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    layers = _model()
    tp.save_checkpoint(tmp_path / "c", layers)
    tp.load_checkpoint(tmp_path / "c", layers)
    tp.save_checkpoint(tmp_path / "q", layers, progress=False)
    assert [k["desc"].split()[0] for k in seen] == ["save", "load"]
    assert all(k["unit"] == "B" and k["delay"] == 1.0 for k in seen)
    assert "B/s" in capfd.readouterr().err


# ---------------------------------------------------------------------------------- the old .npz


def test_npz_still_reads_and_checks_headers_first(world_of_one, tmp_path):
    layers = _model()
    path = tmp_path / "old.npz"
    with pytest.warns(DeprecationWarning, match="safetensors"):
        tp.save_checkpoint(path, layers)
    back = _model(seed=6)
    tp.load_checkpoint(path, back)
    assert _same(layers, back)
    # a float64 file into float32 layers: an error unless cast=True
    np.savez(tmp_path / "f64.npz", **{f"{n}.{k}": getattr(layers[n], k).data.astype(np.float64)
                                      for n in layers for k in ("weight", "bias")})
    with pytest.raises(TypeError, match="float64 in the checkpoint but the layer is float32"):
        tp.load_checkpoint(tmp_path / "f64.npz", back)
    tp.load_checkpoint(tmp_path / "f64.npz", back, cast=True)
    assert _same(layers, back)
    # a small compressed file that declares a huge array: refused from its header, nothing inflated
    huge = {f"{n}.{k}": getattr(layers[n], k).data for n in layers for k in ("weight", "bias")}
    huge["col.weight"] = np.zeros((8192, 8192), np.float32)
    np.savez_compressed(tmp_path / "bomb.npz", **huge)
    assert os.path.getsize(tmp_path / "bomb.npz") < 400_000
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"'col.weight' has shape \(8192, 8192\)"):
        tp.load_checkpoint(tmp_path / "bomb.npz", back)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: never inflated
    with pytest.raises(ValueError, match="not a readable .npz"):
        (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 nonsense")
        tp.load_checkpoint(tmp_path / "junk.npz", back)


def test_npz_save_is_atomic(world_of_one, tmp_path, monkeypatch):
    layers = _model()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, tmp_path / "c.npz")
    # the temporary name of earlier versions, predictable, planted as a symlink: never written through
    planted = tmp_path / f"c.npz.tmp{os.getpid()}.npz"
    os.symlink(victim, planted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tp.save_checkpoint(tmp_path / "c.npz", layers)
        assert victim.read_bytes() == b"keep me" and not os.path.islink(tmp_path / "c.npz")
        monkeypatch.setattr(np.lib.format, "write_array", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            tp.save_checkpoint(tmp_path / "d.npz", layers)
    os.unlink(planted)
    assert sorted(os.listdir(tmp_path)) == ["c.npz", "victim"]


# ---------------------------------------------------------------------------------- Hugging Face


def _hf(*args):
    """tests/hf_tiny.py in a process of its own (this one never imports torch or transformers)."""
    import importlib.util
    import subprocess
    import sys

    for mod in ("torch", "transformers"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "hf_tiny.py"), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "llama")
    _hf("make", path, str(SEED))
    return path


HF_LOAD = """
import numpy as np, os, shutil
import tplinear as tp
import ckpt_checks as c
c.init()
hf, out, prev = {hf!r}, {out!r}, {prev!r}
tp.set_training_mode(False)


def make(seed):
    layers = {{}}
    for i in range(2):
        # fused QKV and gate/up layers, read from the separate q/k/v and gate/up tensors
        layers[f"l{{i}}.qkv"] = tp.LinearLayer.from_init(32, 64, seed=seed, name=f"l{{i}}.self_attn.qkv",
                                                        block_sizes=[32, 16, 16], block_heads=[4, 2, 2])
        layers[f"l{{i}}.o"] = tp.LinearAllreduce.from_init(32, 32, seed=seed, name=f"l{{i}}.self_attn.o_proj")
        layers[f"l{{i}}.gate_up"] = tp.LinearLayer.from_init(32, 160, seed=seed, name=f"l{{i}}.mlp.gate_up",
                                                            block_sizes=[80, 80])
        layers[f"l{{i}}.down"] = tp.LinearAllreduce.from_init(80, 32, seed=seed, name=f"l{{i}}.mlp.down_proj")
    layers["lm_head"] = tp.LinearLayer.from_init(32, 96, seed=seed, bias=False, name="lm_head")
    arrays = {{"model.embed_tokens.weight": np.zeros((96, 32), np.float32), "model.norm.weight": np.zeros(32, np.float32)}}
    for i in range(2):
        for n in ("input_layernorm", "post_attention_layernorm"):
            arrays[f"model.layers.{{i}}.{{n}}.weight"] = np.zeros(32, np.float32)
    return layers, arrays


keymap = {{}}
for i in range(2):
    pre = f"model.layers.{{i}}."
    for k in ("weight", "bias"):
        keymap[f"l{{i}}.qkv.{{k}}"] = [pre + f"self_attn.{{p}}_proj.{{k}}" for p in "qkv"]
        keymap[f"l{{i}}.gate_up.{{k}}"] = [pre + f"mlp.{{p}}_proj.{{k}}" for p in ("gate", "up")]
        keymap[f"l{{i}}.o.{{k}}"] = pre + f"self_attn.o_proj.{{k}}"
        keymap[f"l{{i}}.down.{{k}}"] = pre + f"mlp.down_proj.{{k}}"
layers, arrays = make(1)
tp.load_checkpoint(hf, layers, arrays=arrays, key_map=keymap)   # strict: every tensor of the model is used
ref = np.load(os.path.join(hf, "ref.npz"))
# the MLP of layer 1 through the tensor-parallel layers equals transformers' (SiLU(gate) * up -> down)
h = layers["l1.gate_up"](ref["x"])
half = h.shape[-1] // 2
a = h[:, :half] / (1 + np.exp(-h[:, :half])) * h[:, half:]
y = layers["l1.down"](a.astype(np.float32))
err = np.linalg.norm(y - ref["mlp"]) / np.linalg.norm(ref["mlp"])
assert err < 1e-5, err
# and back: a consolidated checkpoint under the Hugging Face names (q/k/v and gate/up split again), and a
# sharded one stored under them too; this world's and the previous world's sharded ones load exactly
tp.save_checkpoint(out, layers, arrays=arrays, key_map=keymap, max_shard_size="30KB")
tp.save_checkpoint(out + "-sharded", layers, layout="sharded", arrays=arrays, key_map=keymap)
if tp.distributed.get_rank() == 0:
    shutil.copy(os.path.join(hf, "config.json"), out)
for src in [out + "-sharded"] + ([prev + "-sharded"] if prev else []):
    again, arrays2 = make(2)
    tp.load_checkpoint(src, again, arrays=arrays2, key_map=keymap)
    for n, layer in layers.items():
        for k in ("weight", "bias"):
            if getattr(layer, k) is not None:
                assert np.array_equal(getattr(again[n], k).data, getattr(layer, k).data), (src, n, k)
    assert all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)
print("hf ok", err)
"""


def test_hugging_face_round_trip(hf_dir, tmp_path):
    """A transformers model saved with save_pretrained (numbered files + index) loads into NumPy layers
    (fused QKV and gate/up from separate tensors) at 2 and 3 ranks; saved back consolidated,
    transformers loads it and every tensor and the logits are the original's; saved sharded under the
    same key map, it reloads at the same and another group size."""
    outs = []
    for nproc in (2, 3):
        out = str(tmp_path / f"back{nproc}")
        res = assert_world_ok(nproc, HF_LOAD.format(hf=hf_dir, out=out, prev=outs[-1] if outs else None), env=ENV,
                              timeout=180)
        assert "hf ok" in res.output
        assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
        outs.append(out)
    assert _hf("compare", hf_dir, *outs).count("every tensor and the logits are equal") == 2


# ---------------------------------------------------------------------------------- tplinear.torch


def _needs(*mods):
    import importlib.util

    for mod in mods:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")


def test_torch_hugging_face_into_parallel_modules(hf_dir, tmp_path):
    """A save_pretrained directory loads into a Llama and a GPT-2 tensor-parallelized by
    tplinear.torch.parallelize, at 2 and 3 ranks: the logits equal the unsharded model's; the Llama saved
    back loads in transformers unchanged. Conv1D layers (fused c_attn) read and write the [in, out] layout
    of their files; tied weights are stored once."""
    _needs("torch", "transformers")
    outs, prev_half = [], None
    for nproc in (2, 3):
        out = str(tmp_path / f"torch{nproc}")
        conv = tmp_path / f"conv{nproc}"
        conv.mkdir()
        tied = tmp_path / f"tied{nproc}"
        half = str(tmp_path / f"half{nproc}")
        res = assert_world_ok(nproc, f"import torch_ckpt_checks as c; c.init(); c.hf_logits({hf_dir!r}, {out!r}); "
                                     f"c.gpt2_logits({hf_dir + '-gpt2'!r}); c.conv({str(conv)!r}); "
                                     f"c.tied({str(tied)!r}); c.half({half!r}, {prev_half!r})", env=ENV, timeout=300)
        prev_half = half
        for what in ("hf logits ok", "gpt2 logits ok", "conv ok", "tied ok", "half ok"):
            assert res.output.count(what) == nproc, res.output
        outs.append(out)
    assert _hf("compare", hf_dir, *outs).count("every tensor and the logits are equal") == 2


def test_torch_resume_with_the_optimizer(tmp_path):
    """torch.optim.AdamW (amsgrad: three state tensors and step per parameter; float64) with the model,
    its optimizer state and param groups in the checkpoint."""
    _needs("torch")
    resume_matches("torch_ckpt_checks", tmp_path, timeout=240)
