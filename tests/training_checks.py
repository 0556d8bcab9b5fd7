"""Checks that run inside each rank of a world spawned by tests/test_training.py: the training loop around
tplinear.torch's layers (clipping, save_pretrained, seeds, copies, autocast) against a single-process
reference model, float64."""
import copy
import os
import pickle

import numpy as np
import torch

import tplinear as tp
import tplinear.distributed as dist
import tplinear.torch as tpt
from torch_checks import TOL_AFTER_ADAM, close, full_grad, hf_model, init, rel, seed  # noqa: F401


def _batch(step=0, batch=2, seq=9):
    seed("batch", step)
    return torch.randint(0, 97, (batch, seq))


def _same_on_every_rank(value, what):
    """value (a float64 0-d tensor) has the same bits on every rank."""
    mine = np.array([value.to(torch.float64).reshape(1).view(torch.int64).item()], dtype=np.int64)
    every = np.zeros(dist.get_world_size(), dtype=np.int64)
    dist.all_gather_into_tensor(every, mine)
    assert len(set(every.tolist())) == 1, f"{what}: the ranks got different bits {every.tolist()}"


def _pair(kind="qwen2"):
    tp.set_training_mode(True)
    model = hf_model(kind, torch.float64)
    ref = copy.deepcopy(model)
    tpt.parallelize(model)
    return model, ref


# ---------------------------------------------------------------------------------------------- clipping


def check_clipping(kind="qwen2", steps=3, max_norm=0.5):
    """tplinear.torch.clip_grad_norm_ and plain torch.nn.utils.clip_grad_norm_ on the parallel model give the
    unsharded model's norm (1e-12), the same bits on every rank; AdamW steps with clipping stay on the
    reference's path (to TOL_AFTER_ADAM) and the replicas stay identical."""
    p = dist.get_world_size()
    for clip in ("tplinear", "torch"):
        model, ref = _pair(kind)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        for step in range(steps):
            ids = _batch(step)
            opt.zero_grad()
            ref_opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            ref(ids, labels=ids).loss.backward()
            fn = tpt.clip_grad_norm_ if clip == "tplinear" else torch.nn.utils.clip_grad_norm_
            got = fn(model.parameters(), max_norm)
            want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
            assert want.item() > max_norm, "the test must actually clip"
            close(got.reshape(1), want.reshape(1), torch.float64, f"{clip} clip_grad_norm_ p={p} step {step}")
            _same_on_every_rank(got, f"{clip} clip_grad_norm_ p={p}")
            opt.step()
            ref_opt.step()
        refs = dict(ref.named_parameters())
        for name, param in model.named_parameters():
            layer = getattr(param, "tp_layer", None)
            full = param if layer is None else layer.full_tensor(param)
            if getattr(layer, "_conv1d", False) and param is layer.weight:
                full = full.t()
            close(full, refs[name], torch.float64, f"{clip}-clipped AdamW p={p}: {name}", TOL_AFTER_ADAM)
        tpt.check_replicas(model)


def check_norm_variants():
    """get_total_norm, the inf norm, error_if_nonfinite (raised on every rank), dp_group given as a group of
    one, foreach on and off."""
    model, ref = _pair()
    ids = _batch()
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters()]
    ref_grads = [p.grad for p in ref.parameters()]
    for norm_type in (2.0, 1.0, 3.0, float("inf")):
        want = torch.nn.utils.get_total_norm(ref_grads, norm_type)
        for foreach in (None, False):
            got = tpt.get_total_norm(grads, norm_type, foreach=foreach)
            close(got.reshape(1), want.reshape(1), torch.float64, f"get_total_norm {norm_type} foreach={foreach}")
            _same_on_every_rank(got, f"get_total_norm {norm_type}")
            plain = torch.nn.utils.get_total_norm(grads, norm_type, foreach=foreach)
            close(plain.reshape(1), want.reshape(1), torch.float64, f"torch's get_total_norm {norm_type}")
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    got = tpt.get_total_norm(grads, dp_group=groups[dist.get_rank()])
    close(got.reshape(1), torch.nn.utils.get_total_norm(ref_grads).reshape(1), torch.float64, "dp_group of one")
    if dist.get_rank() == 0:
        next(p for p in model.parameters() if getattr(p, "tp_layer", None) is not None).grad.view(-1)[0] = float("nan")
    try:
        tpt.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    except RuntimeError as exc:
        assert "non-finite" in str(exc), exc
    else:
        raise AssertionError("error_if_nonfinite did not raise")


# ---------------------------------------------------------------------------------------------- saving


def check_save_pretrained(path):
    """model.save_pretrained(path) after parallelize: the full model once (sharded index past max_shard_size),
    which plain transformers loads in this process and computes the parallel model's logits with."""
    import transformers

    model, _ = _pair()
    ids = _batch()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(path, max_shard_size="20KB")
    files = sorted(os.listdir(path))
    assert "config.json" in files and "model.safetensors.index.json" in files, files
    assert not any(f.startswith("rank") for f in files), files
    full = tpt.full_state_dict(model)
    if dist.get_rank() == 0:
        back = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        with torch.no_grad():
            got = back(ids).logits
        close(got, logits, torch.float64, "from_pretrained of save_pretrained")
        sd = back.state_dict()
        assert sorted(full) == sorted(model.state_dict()), "full_state_dict keys"
        for k, v in full.items():
            assert tuple(v.shape) == tuple(sd[k].shape) and torch.equal(v, sd[k]), k
    else:
        assert full == {}, "full_state_dict is rank 0's"
    dist.barrier()
    try:
        model.save_pretrained(path, push_to_hub=True)
    except NotImplementedError as exc:
        assert "tplinear.torch.full_state_dict" in str(exc), exc
    else:
        raise AssertionError("save_pretrained(push_to_hub=True) did not refuse")


# ---------------------------------------------------------------------------------------------- seeds


def check_seeds():
    """A per-rank seed is refused on every rank naming the first module; src_rank=0 broadcasts rank 0's
    weights; check_replicas finds a replica that drifted."""
    r, p = dist.get_rank(), dist.get_world_size()
    tp.set_training_mode(True)
    import transformers
    cfg = hf_model("qwen2").config
    torch.manual_seed(1234 + r)  # a per-rank seed: the mistake
    model = transformers.Qwen2ForCausalLM(cfg).double()
    if p > 1:
        try:
            tpt.parallelize(model)
        except ValueError as exc:
            msg = str(exc)
            assert "model.embed_tokens.weight differs on rank(s)" in msg and "src_rank=0" in msg, msg
        else:
            raise AssertionError("parallelize accepted different weights on different ranks")
        assert not tpt.tp_modules(model), "nothing may be cut before the check"
    torch.manual_seed(1234)  # rank 0's seed: its model is what src_rank=0 hands to every rank
    ref = transformers.Qwen2ForCausalLM(cfg).double()
    tpt.parallelize(model, src_rank=0)
    ids = _batch()
    with torch.no_grad():
        close(model(ids).logits, ref(ids).logits, torch.float64, f"src_rank=0 at p={p}")
    tpt.check_replicas(model)
    if p > 1:
        if r == p - 1:
            with torch.no_grad():
                model.model.norm.weight[0] += 1e-3
        try:
            tpt.check_replicas(model)
        except ValueError as exc:
            assert "model.norm.weight" in str(exc) and f"rank(s) [{p - 1}]" in str(exc), exc
        else:
            raise AssertionError("check_replicas missed a drifted replica")


# ---------------------------------------------------------------------------------------------- copies


def check_deepcopy(kind="qwen3"):
    """copy.deepcopy of a parallelized model (and of a layer, a group): the group shared, the shards copied;
    the copy trains independently and gives the original's results; pickle of a group is a TypeError."""
    group = dist.get_world_group()
    assert copy.deepcopy(group) is group and copy.copy(group) is group
    for obj in (group, group._handle):
        try:
            pickle.dumps(obj)
        except TypeError as exc:
            assert "cannot be pickled" in str(exc), exc
        else:
            raise AssertionError("a group pickled")
    model, ref = _pair(kind)
    twin = copy.deepcopy(model)
    first = next(iter(tpt.tp_modules(model)))
    layer, orig = twin.get_submodule(first), model.get_submodule(first)
    assert layer.mp_group is orig.mp_group and layer.weight is not orig.weight
    assert layer.weight.data_ptr() != orig.weight.data_ptr() and layer.weight.tp_layer is layer
    assert torch.equal(layer.weight, orig.weight) and layer._op_key != orig._op_key
    lone = copy.deepcopy(orig)
    assert lone.weight.tp_layer is lone and lone.mp_group is orig.mp_group
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin, ref)]
    for step in range(2):
        ids = _batch(step)
        for m, opt in zip((model, twin, ref), opts):
            opt.zero_grad()
            m(ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            opt.step()
    refs = dict(ref.named_parameters())
    a, b = dict(model.named_parameters()), dict(twin.named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), f"the copy trained differently: {name}"
        assert a[name].data_ptr() != b[name].data_ptr(), name
        owner = getattr(b[name], "tp_layer", None)
        full = b[name] if owner is None else owner.full_tensor(b[name])
        if getattr(owner, "_conv1d", False) and b[name] is owner.weight:
            full = full.t()
        close(full, refs[name], torch.float64, f"copy vs reference: {name}", TOL_AFTER_ADAM)
    ids = _batch(9)
    with torch.no_grad():
        layer.weight.add_(1.0)  # the copy's shards are its own
        assert not torch.equal(model(ids).logits, twin(ids).logits)


# ---------------------------------------------------------------------------------------------- autocast


def check_autocast_cpu():
    """torch.autocast('cpu', bfloat16 / float16) on a float32 model: the layers compute as nn.Linear does under
    it (input, weight and bias cast, the output in the autocast dtype, the gradients in the parameters' own
    dtype), so the parallel model is as close to the exact one (float64, no autocast) as the unsharded model
    under the same autocast: within twice its norm-wise error + 2u (the row layers' reduction rounds partial
    sums once more, tests/torch_checks.py's close_half). A float64 model is not cast (torch's autocast leaves
    float64 alone). A sequence-parallel model is still refused (its layers do not follow autocast), naming the
    way out."""
    tp.set_training_mode(True)
    model = hf_model("qwen2", torch.float32)
    ref, exact = copy.deepcopy(model), copy.deepcopy(model).double()
    tpt.parallelize(model)
    ids = _batch()
    for dt, u in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
        with torch.autocast("cpu", dtype=dt):
            outs = [m(ids, labels=ids) for m in (model, ref)]
        want = exact(ids, labels=ids)
        assert outs[0].logits.dtype == outs[1].logits.dtype, (outs[0].logits.dtype, outs[1].logits.dtype)
        close(outs[0].logits, want.logits, dt, f"autocast {dt} logits", 2 * rel(outs[1].logits, want.logits) + 2 * u)
        for m in (model, ref, exact):
            m.zero_grad(set_to_none=True)
        for out in outs + [want]:
            out.loss.backward()
        refs, exacts = dict(ref.named_parameters()), dict(exact.named_parameters())
        for name, param in model.named_parameters():
            assert param.grad.dtype == torch.float32, (name, param.grad.dtype)
            tol = 2 * rel(refs[name].grad, exacts[name].grad) + 2 * u
            close(full_grad(param), exacts[name].grad, dt, f"autocast {dt} grad of {name}", tol)
    with torch.no_grad():
        close(model(ids).logits, exact(ids).logits, torch.float32, "outside autocast")
    model, ref = _pair()  # float64: autocast casts nothing
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids).logits
        assert got.dtype == torch.float64
        close(got, ref(ids).logits, torch.float64, "float64 under autocast")
    sp = hf_model("qwen2", torch.float32)
    tpt.parallelize(sp, sequence_parallel=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sp(ids)
    except TypeError as exc:
        msg = str(exc)
        assert "sequence-parallel" in msg and "bfloat16" in msg and "enabled=False" in msg, msg
    else:
        raise AssertionError("autocast bfloat16 on a sequence-parallel model did not refuse")


# ---------------------------------------------------------------------------------------------- paths


def _expect_value_error(fn, *needles):
    try:
        fn()
    except ValueError as exc:
        for n in needles:
            assert n in str(exc), (n, str(exc))
    else:
        raise AssertionError(f"no ValueError (expected one saying {needles})")


def check_paths(root):
    """save_checkpoint / load_checkpoint with per-rank paths or per-rank directories: the same ValueError on
    every rank before anything is written, naming the paths or the ranks that cannot see rank 0's
    directory."""
    r = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(tpt.LinearLayer(torch.nn.Linear(8, 12)), torch.nn.Linear(12, 4))
    mine = os.path.join(root, f"rank{r}", "ckpt")  # pytest's per-rank tmp_path, in effect
    _expect_value_error(lambda: tpt.save_checkpoint(mine, model), "the ranks passed different paths",
                        f"rank 0: {os.path.join(root, 'rank0', 'ckpt')!r}", f"rank 1: {os.path.join(root, 'rank1', 'ckpt')!r}")
    assert not os.path.exists(mine), "nothing may be written"
    shared = os.path.join(root, "shared")
    tpt.save_checkpoint(shared, model)
    _expect_value_error(lambda: tpt.load_checkpoint(mine, model), "the ranks passed different paths")
    _expect_value_error(lambda: tp.load_checkpoint(mine, {}), "the ranks passed different paths")
    here = os.getcwd()
    os.makedirs(os.path.join(root, f"cwd{r}"), exist_ok=True)
    os.chdir(os.path.join(root, f"cwd{r}"))  # the same relative path names another directory on each rank
    try:
        _expect_value_error(lambda: tpt.save_checkpoint("ckpt", model), "rank 1", "cannot see rank 0's directory ckpt")
        if r == 0:
            os.symlink(shared, "seen")  # rank 0 sees the checkpoint under a relative name, the others do not
        dist.barrier()
        _expect_value_error(lambda: tpt.load_checkpoint("seen", model), "rank 1", "cannot see the checkpoint at seen")
    finally:
        os.chdir(here)
    tpt.load_checkpoint(shared, model)
