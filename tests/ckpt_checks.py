"""Checkpoint checks that run inside each rank of a world spawned by tests/test_checkpoint.py.

The model: a fused QKV column layer (packed blocks, heads), an attention output row layer, a gate/up
column layer (packed), a down row layer, replicated arrays (float32, float64, int64 0-d) and Adam-like
optimizer state. Every tensor's full value is a fixed function of its name, so a rank of any world can
say what its shard must hold; the expected shards are cut with the partition rule itself (_C.partition /
_C.partition_packed), independently of the layers' bookkeeping.
"""
import json
import os
import zlib

import numpy as np

import tplinear as tp
import tplinear.distributed as dist

SEED = int(os.environ.get("TPLINEAR_TEST_SEED", "0"))
HID = 24
# name: (kind, in, out, blocks, heads, bias); dims divide by 1..4 (training) and split unevenly (inference)
LAYERS = {
    "attn.qkv": ("col", HID, 96, [48, 24, 24], [8, 4, 4], True),
    "attn.o": ("row", 48, HID, None, None, True),
    "mlp.gate_up": ("col", HID, 144, [72, 72], None, False),
    "mlp.down": ("row", 72, HID, None, None, True),
    "head": ("col", HID, 132, None, None, False),
}
ARRAYS = {"norm.w": ((HID,), "float32"), "embed": ((50, HID), "float32"), "scale": ((3,), "float64"),
          "counter": ((), "int64")}
LAYOUTS = {"consolidated": {}, "consolidated-index": {"max_shard_size": 8000}, "sharded": {}}


def init(timeout=60.0):
    dist.init_process_group(timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def value(name, shape, dtype="float32"):
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    if np.dtype(dtype).kind == "i":
        return rng.integers(-1000, 1000, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def full_shapes():
    """Every parameter key's full shape."""
    out = {}
    for name, (kind, i, o, _, _, bias) in LAYERS.items():
        out[f"{name}.weight"] = (o, i)
        if bias:
            out[f"{name}.bias"] = (o,)
    return out


def pieces(name, training):
    """Every rank's pieces of a layer's split dim, by the partition rule (tplinear.shard_ranges)."""
    kind, i, o, blocks, heads, _ = LAYERS[name]
    return tp.shard_ranges(o if kind == "col" else i, dist.get_world_size(), training=training, name=name,
                           block_sizes=blocks, block_heads=heads)


def shard_of(full, key, training):
    """This rank's shard of a parameter key's full value (or the whole of a replicated one)."""
    name, what = key.rsplit(".", 1)
    kind = LAYERS[name][0]
    if kind == "row" and what == "bias":
        return full
    dim = 1 if kind == "row" else 0
    mine = pieces(name, training)[dist.get_rank()]
    idx = [slice(None)] * full.ndim
    parts = []
    for off, size in mine:
        idx[dim] = slice(off, off + size)
        parts.append(full[tuple(idx)])
    return np.concatenate(parts, axis=dim)


def build(training, seed=0, dtype="float32", group=None):
    """The layers (random weights of seed), zeroed arrays and zeroed optimizer state."""
    tp.set_training_mode(training)
    layers = {}
    for name, (kind, i, o, blocks, heads, bias) in LAYERS.items():
        if kind == "col":
            layers[name] = tp.LinearLayer.from_init(i, o, group, seed=seed + len(layers), bias=bias, dtype=dtype,
                                                    name=name, block_sizes=blocks, block_heads=heads)
        else:
            layers[name] = tp.LinearAllreduce.from_init(i, o, group, seed=seed + len(layers), bias=bias, dtype=dtype,
                                                        name=name)
    arrays = {n: np.zeros(s, dtype=d) for n, (s, d) in ARRAYS.items()}
    opt = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for key in full_shapes():
        layer, what = key.rsplit(".", 1)
        local = getattr(layers[layer], what).data
        opt["exp_avg"][key] = np.zeros_like(local)
        opt["exp_avg_sq"][key] = np.zeros_like(local)
    opt["exp_avg"]["norm.w"] = np.zeros(ARRAYS["norm.w"][0], np.float32)
    opt["step"]["attn.qkv.weight"] = np.zeros((), np.int64)
    return layers, arrays, opt


def fill(layers, arrays, opt, training):
    """Sets every tensor to its reference value (layers through their full state dicts)."""
    shapes = full_shapes()
    for name, layer in layers.items():
        sd = {"weight": value(f"{name}.weight", shapes[f"{name}.weight"])}
        if layer.bias is not None:
            sd["bias"] = value(f"{name}.bias", shapes[f"{name}.bias"])
        layer.load_consolidated_state_dict(sd)
    for n, (s, d) in ARRAYS.items():
        arrays[n][...] = value(n, s, d)
    for state, per in opt.items():
        for key, arr in per.items():
            if state == "step":
                arr[...] = 7
            elif key in shapes:
                arr[...] = shard_of(value(f"{state}/{key}", shapes[key]), key, training)
            else:
                arr[...] = value(f"{state}/{key}", arr.shape)


def verify(layers, arrays, opt, training, what):
    shapes = full_shapes()
    for name, layer in layers.items():
        for part in ("weight", "bias"):
            param = getattr(layer, part)
            if param is None:
                continue
            key = f"{name}.{part}"
            want = shard_of(value(key, shapes[key]), key, training)
            assert np.array_equal(param.data, want), f"{what}: {key} shard differs"
        with tp.GatherReplacedLayerParams(layer.parameters(), layer):
            assert np.array_equal(layer.weight.data, value(f"{name}.weight", shapes[f"{name}.weight"])), \
                f"{what}: {name}.weight gathered differs"
    for n, (s, d) in ARRAYS.items():
        assert arrays[n].dtype == np.dtype(d) and np.array_equal(arrays[n], value(n, s, d)), f"{what}: array {n}"
    for state, per in opt.items():
        for key, arr in per.items():
            if state == "step":
                want = 7
            elif key in shapes:
                want = shard_of(value(f"{state}/{key}", shapes[key]), key, training)
            else:
                want = value(f"{state}/{key}", arr.shape)
            assert np.array_equal(arr, want), f"{what}: optimizer {state}/{key}"


def save_all(root):
    """Saves the model in every layout, in both modes, at this world's size."""
    p = dist.get_world_size()
    for training in (True, False):
        layers, arrays, opt = build(training, seed=100)
        fill(layers, arrays, opt, training)
        for layout, kwargs in LAYOUTS.items():
            path = os.path.join(root, f"p{p}-{layout}-{'train' if training else 'infer'}")
            tp.save_checkpoint(path, layers, layout=layout.split("-")[0], arrays=arrays, optimizer_state=opt,
                               metadata={"saved_at": p, "training": training}, **kwargs)
            if dist.get_rank() == 0:
                files = sorted(os.listdir(path))
                if layout == "consolidated-index":
                    assert "model.safetensors.index.json" in files, files
                    assert sum(f.startswith("model-0") for f in files) > 1, files
                elif layout == "sharded":
                    assert sum(f.startswith("rank") for f in files) == p, files
                else:
                    assert files == ["model.safetensors", "optimizer.safetensors", "tplinear.json"], files
    dist.barrier()


def load_all(root, save_sizes):
    """Loads every checkpoint save_all made (each save size, layout and mode) into layers of both modes at
    this world's size, and checks every shard, gathered weight, array and optimizer state exactly."""
    p = dist.get_world_size()
    done = 0
    for s in save_sizes:
        for layout in LAYOUTS:
            for saved_training in (True, False):
                path = os.path.join(root, f"p{s}-{layout}-{'train' if saved_training else 'infer'}")
                for training in (True, False):
                    layers, arrays, opt = build(training, seed=7)
                    meta = tp.load_checkpoint(path, layers, arrays=arrays, optimizer_state=opt)
                    assert meta == {"saved_at": s, "training": saved_training}, meta
                    verify(layers, arrays, opt, training, f"saved at {s} ({layout}, training={saved_training}), "
                                                          f"loaded at {p} (training={training})")
                    done += 1
    print(f"rank {dist.get_rank()}: {done} checkpoints loaded at {p} ranks and checked", flush=True)


def save_replicas(root):
    """A world of 4 as two data-parallel replicas of a 2-rank tensor-parallel group ([0, 1] and [2, 3]):
    the consolidated file is fed by the replica of world rank 0, the sharded layout holds both replicas'
    (identical) pieces; either loads at any size."""
    r = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    for training in (True, False):
        layers, arrays, _ = build(training, seed=100, group=groups[r // 2])
        fill(layers, arrays, {}, training)
        for layout in ("consolidated", "sharded"):
            path = os.path.join(root, f"dp-{layout}-{'train' if training else 'infer'}")
            tp.save_checkpoint(path, layers, layout=layout, arrays=arrays)
            if r == 0 and layout == "sharded":
                assert sum(f.startswith("rank") for f in os.listdir(path)) == 4
    save_conv(root)


class _Conv1D:
    """GPT-2's Conv1D as the NumPy layers take it: weight [in, out], bias [out]."""

    def __init__(self, name, n_in, n_out, zero=False):
        self.weight = np.zeros((n_in, n_out)) if zero else value(f"{name}.weight", (n_in, n_out), "float64")
        self.bias = np.zeros(n_out) if zero else value(f"{name}.bias", (n_out,), "float64")


def conv_layers(zero=False):
    tp.set_training_mode(False)
    return {"c_attn": tp.conv_LinearLayer(_Conv1D("c_attn", 16, 96, zero)),
            "c_proj": tp.Conv_LinearALlreduce(_Conv1D("c_proj", 96, 16, zero))}


def save_conv(root):
    """NumPy Conv1D layers hold [in, out] shards: the files keep that layout (what GPT-2 checkpoints hold)."""
    layers = conv_layers()
    for layout in ("consolidated", "sharded"):
        tp.save_checkpoint(os.path.join(root, f"conv-{layout}"), layers, layout=layout)
    if dist.get_rank() == 0:
        from safetensors.numpy import load_file

        got = load_file(os.path.join(root, "conv-consolidated", "model.safetensors"))
        for name in layers:
            src = _Conv1D(name, *((16, 96) if name == "c_attn" else (96, 16)))
            assert np.array_equal(got[f"{name}.weight"], src.weight) and np.array_equal(got[f"{name}.bias"], src.bias)


def load_conv(root):
    for layout in ("consolidated", "sharded"):
        layers = conv_layers(zero=True)
        tp.load_checkpoint(os.path.join(root, f"conv-{layout}"), layers)
        for name, layer in layers.items():
            src = _Conv1D(name, *((16, 96) if name == "c_attn" else (96, 16)))
            sd = layer.consolidated_state_dict()
            assert np.array_equal(sd["weight"], src.weight) and np.array_equal(sd["bias"], src.bias), (layout, name)


def load_replicas(root):
    for layout in ("consolidated", "sharded"):
        for saved in ("train", "infer"):
            for training in (True, False):
                layers, arrays, _ = build(training, seed=9)
                tp.load_checkpoint(os.path.join(root, f"dp-{layout}-{saved}"), layers, arrays=arrays)
                verify(layers, arrays, {}, training, f"replicas {layout} {saved} -> {dist.get_world_size()}")
    load_conv(root)
    print(f"rank {dist.get_rank()}: replicas ok", flush=True)


# ------------------------------------------------------------------------------------------- resume

DIN, DH = 12, 48  # the training model: x -> fc1 (column) -> gelu -> fc2 (row) -> * norm; dims divide 1..3


def gelu(x):
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _train_model():
    tp.set_training_mode(True)
    fc1 = tp.LinearLayer.from_init(DIN, DH, seed=31, name="fc1")
    fc2 = tp.LinearAllreduce.from_init(DH, DIN, seed=32, name="fc2")
    norm = np.ones(DIN, np.float32)
    return {"fc1": fc1, "fc2": fc2}, {"norm": norm}


def _params(layers, arrays):
    out = {f"{n}.{k}": getattr(l, k) for n, l in layers.items() for k in ("weight", "bias")}
    return out, arrays


def train(steps, start=0, resume=None, save=None, layout="sharded"):
    """Adam on the model for steps [start, start + steps); returns the losses. resume: a checkpoint to
    load first (moments, norm and step included); save: a checkpoint written after the last step."""
    layers, arrays = _train_model()
    params, arrays = _params(layers, arrays)
    m = {k: np.zeros_like(p.data) for k, p in params.items()} | {k: np.zeros_like(a) for k, a in arrays.items()}
    v = {k: np.zeros_like(x) for k, x in m.items()}
    opt = {"exp_avg": m, "exp_avg_sq": v}
    if resume is not None:
        meta = tp.load_checkpoint(resume, layers, arrays=arrays, optimizer_state=opt)
        assert meta["step"] == start, meta
    losses = []
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    fc1, fc2, norm = layers["fc1"], layers["fc2"], arrays["norm"]
    for step in range(start, start + steps):
        rng = np.random.default_rng([SEED, step])
        x = rng.standard_normal((16, DIN)).astype(np.float32)
        target = np.sin(x).astype(np.float32)
        h = fc1(x)
        a, da = gelu(h)
        z = fc2(a.astype(np.float32))
        y = z * norm
        diff = y - target
        loss = float(np.mean(diff.astype(np.float64) ** 2))
        losses.append(loss)
        dy = (2.0 / diff.size * diff).astype(np.float32)
        grads = {"norm": (dy * z).sum(0)}
        dz = dy * norm
        da_in = fc2.backward(dz)
        fc1.backward((da_in * da).astype(np.float32))
        t = step + 1
        for key, g in [(k, p.grad) for k, p in params.items()] + list(grads.items()):
            target_arr = params[key].data if key in params else arrays[key]
            m[key] = m[key] * b1 + (1 - b1) * g
            v[key] = v[key] * b2 + (1 - b2) * g * g
            upd = lr * (m[key] / (1 - b1**t)) / (np.sqrt(v[key] / (1 - b2**t)) + eps)
            target_arr -= upd.astype(target_arr.dtype)
        for layer in layers.values():
            layer.zero_grad()
    if save is not None:
        tp.save_checkpoint(save, layers, layout=layout, arrays=arrays, optimizer_state=opt,
                           metadata={"step": start + steps, "losses": losses})
    return losses


def write_losses(path, losses):
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(losses, f)


def save_both(root, losses_path):
    """The uninterrupted run's losses (8 steps), and a checkpoint after 4 steps in each layout."""
    ref = train(8)
    for layout in ("sharded", "consolidated"):
        assert train(4, save=os.path.join(root, layout), layout=layout) == ref[:4]
    write_losses(losses_path, ref)


def resume_both(root, losses_path):
    write_losses(losses_path, {layout: train(4, start=4, resume=os.path.join(root, layout))
                               for layout in ("sharded", "consolidated")})
