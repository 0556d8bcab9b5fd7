"""Checks that run inside each rank of a world spawned by tests/test_torch_ssm.py: transformers' Mamba,
FalconMamba and Mamba-2 mixers split by tplinear.torch.parallelize, against the unsharded float64 model."""
import copy

import torch

import tplinear as tp
import tplinear.distributed as dist
import tplinear.torch as tpt
from tplinear.torch import ssm

from torch_checks import close, close_grads, full_grad, init, seed  # noqa: F401

INTER, VOCAB = 101, 97  # d_inner 101: uneven over every p in 2..4


def ssm_model(kind, dtype=torch.float64, n_groups=4):
    import transformers
    from transformers import logging

    logging.set_verbosity_error()
    common = dict(vocab_size=VOCAB, hidden_size=48, state_size=8, num_hidden_layers=2, time_step_rank=6,
                  conv_kernel=3, intermediate_size=INTER, use_bias=True, tie_word_embeddings=False)
    if kind == "mamba":
        cfg, cls = transformers.MambaConfig(**common), transformers.MambaForCausalLM
    elif kind == "falcon_mamba":
        cfg, cls = transformers.FalconMambaConfig(**common), transformers.FalconMambaForCausalLM
    elif kind == "mamba2":  # d_inner 96: 12 heads of 8 in n_groups groups (4: uneven over 3 ranks)
        common.pop("time_step_rank")
        common.update(intermediate_size=96, num_heads=12, head_dim=8, n_groups=n_groups, expand=2)
        cfg, cls = transformers.Mamba2Config(**common), transformers.Mamba2ForCausalLM
    else:
        raise ValueError(kind)
    seed("ssm", kind)
    model = cls(cfg)
    with torch.no_grad():  # the biases start at zero, A_log / D at constants: make every value count
        for name, p in model.named_parameters():
            if name.endswith(("bias", "A_log", "D", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def check_ssm(kind, training, steps=1):
    """Training mode (model.train(), no cache): logits, loss, every gradient (gathered), AdamW step(s), the full
    state dict, and the mixers' channel shards at 1/p per rank; Mamba's fused-kernel branch is never taken.
    Inference mode: a prefill and three cached decode steps, logits each time."""
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(training)
    model = ssm_model(kind)
    ref = copy.deepcopy(model)
    tpt.parallelize(model)
    what = f"{kind} {'training' if training else 'inference'} p={p}"
    mixers = {n: m for n, m in model.named_modules() if isinstance(m, ssm._TPMixer)}
    assert len(mixers) == 2, f"{what}: expected 2 tensor-parallel mixers, got {sorted(mixers)}"
    full = ref.config.intermediate_size
    sizes = torch.tensor([float(m.intermediate_size) for m in mixers.values()], dtype=torch.float64)
    for m in mixers.values():
        d = m.intermediate_size
        if kind == "mamba2":
            assert m.out_proj.weight.shape[1] == m.norm.weight.shape[0] == d, what
        else:
            assert m.A_log.shape[0] == m.D.shape[0] == m.conv1d.weight.shape[0] == m.dt_proj.weight.shape[0] == d
            assert m.in_proj.weight.shape[0] == 2 * d and m.x_proj.weight.shape[1] == m.out_proj.weight.shape[1] == d
        # 101 is no multiple of the grain: dealt channel by channel; Mamba-2: whole groups of 24 channels
        assert abs(d - full / p) < (24 if kind == "mamba2" else 1), (what, d)
    dist.all_reduce(sizes.numpy())
    assert sizes.tolist() == [float(full)] * 2, (what, sizes)
    seed("ssm-input", kind)
    ids = torch.randint(0, VOCAB, (2, 7))
    if not training:
        model.eval()
        ref.eval()
        with torch.no_grad():
            out, expect = model(ids, use_cache=True), ref(ids, use_cache=True)
            close(out.logits, expect.logits, torch.float64, f"{what} prefill logits", 1e-6)
            cache, rcache = out.cache, expect.cache
            for step in range(3):
                nxt = expect.logits[:, -1:].argmax(-1)
                out = model(nxt, cache=cache, use_cache=True)
                expect = ref(nxt, cache=rcache, use_cache=True)
                close(out.logits, expect.logits, torch.float64, f"{what} decode step {step} logits", 1e-6)
        print(f"rank {r}: {what}: exact", flush=True)
        return
    model.train()
    ref.train()
    import importlib

    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    fused_fn = "mamba2_split_conv1d_scan_combined" if kind == "mamba2" else "mamba_inner_fn"

    def fused(*args, **kwargs):
        raise AssertionError(f"{what}: a sharded mixer took the fused {fused_fn} branch")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        ropt.zero_grad()
        saved = getattr(modeling, fused_fn, None)
        setattr(modeling, fused_fn, fused)
        try:
            out = model(ids, labels=ids)
        finally:
            setattr(modeling, fused_fn, saved)
        expect = ref(ids, labels=ids)
        # the scan runs in float32 (transformers' .float()): its rounding bounds the agreement
        close(out.logits, expect.logits, torch.float64, f"{what} step {step} logits", 1e-5)
        close(out.loss.reshape(1), expect.loss.reshape(1), torch.float64, f"{what} step {step} loss", 1e-5)
        out.loss.backward()
        expect.loss.backward()
        close_grads(model, ref, f"{what} step {step}", 1e-4)
        opt.step()
        ropt.step()
    full = tpt.full_state_dict(model, rank0_only=False)  # what save_pretrained writes: the mixers whole
    for name, t in ref.state_dict().items():
        close(full[name], t, torch.float64, f"{what} full_state_dict[{name}] after {steps} AdamW steps", 1e-4)
    print(f"rank {r}: {what}: exact", flush=True)


def check_mamba2_refused():
    """n_groups 2 over 3 ranks: refused at parallelize on every rank, naming the mixer, before any change."""
    model = ssm_model("mamba2", n_groups=2)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    try:
        tpt.parallelize(model)
    except ValueError as exc:
        assert "backbone.layers.0.mixer" in str(exc) and "n_groups" in str(exc), exc
    else:
        raise AssertionError("mamba2 with n_groups 2 over 3 ranks was not refused")
    for n, q in model.named_parameters():
        assert q.shape == before[n].shape and torch.equal(q, before[n]), n
    print(f"rank {dist.get_rank()}: mamba2 n_groups=2: refused", flush=True)
