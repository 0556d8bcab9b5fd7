"""Checks of tplinear.torch checkpoints that run inside each rank of a world (tests/test_checkpoint.py):
a Hugging Face Llama with its linear layers replaced by tplinear.torch modules, loaded from its
save_pretrained directory and saved back; an AdamW resume at another group size; GPT-2 style Conv1D
layers, whose files keep the [in, out] layout; bfloat16 / float16 layers stored in their dtype."""
import copy
import json
import os
import shutil

import numpy as np
import torch

import tplinear.distributed as dist
import tplinear.torch as tpt

SEED = int(os.environ.get("TPLINEAR_TEST_SEED", "0"))


def init(timeout=60.0):
    dist.init_process_group(timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def llama(hf_dir, seed):
    """The checkpoint's Llama with other random weights (so a tensor the load misses shows), parallelized
    by tplinear.torch.parallelize (q/k/v/gate/up column, o/down row, heads from the config)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig.from_pretrained(hf_dir)
    cfg._attn_implementation = "eager"
    return tpt.parallelize(transformers.LlamaForCausalLM(cfg).eval())


def gpt2_logits(hf_dir):
    """A GPT-2 (Conv1D layers, [in, out] weights, a fused c_attn) from its save_pretrained directory into
    the parallelized model: the logits equal the unsharded model's."""
    import transformers

    torch.manual_seed(SEED + 9)
    cfg = transformers.GPT2Config.from_pretrained(hf_dir)
    cfg._attn_implementation = "eager"
    model = tpt.parallelize(transformers.GPT2LMHeadModel(cfg).eval())
    assert any(isinstance(m, tpt.conv_LinearLayer) for m in model.modules())
    tpt.load_checkpoint(hf_dir, model)
    ref = np.load(os.path.join(hf_dir, "ref.npz"))
    with torch.no_grad():
        logits = model(torch.from_numpy(ref["ids"])).logits.numpy()
    err = np.linalg.norm(logits - ref["logits"]) / np.linalg.norm(ref["logits"])
    assert err < 1e-5, err
    print(f"rank {dist.get_rank()}: gpt2 logits ok {err:.2e}", flush=True)


def hf_logits(hf_dir, out):
    """The Hugging Face checkpoint loads into the tensor-parallel model (each rank reading its shards): the
    logits equal the unsharded model's; saved back consolidated (for transformers) and sharded, and the
    sharded one reloaded, bit for bit."""
    ref = np.load(os.path.join(hf_dir, "ref.npz"))
    ids = torch.from_numpy(ref["ids"])
    model = llama(hf_dir, seed=SEED + 7)
    meta = tpt.load_checkpoint(hf_dir, model)
    assert meta == {}, meta
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    err = np.linalg.norm(logits - ref["logits"]) / np.linalg.norm(ref["logits"])
    assert err < 1e-5, err
    tpt.save_checkpoint(out, model, max_shard_size="30KB", metadata={"from": "hf"})
    tpt.save_checkpoint(out + "-sharded", model, layout="sharded")
    if dist.get_rank() == 0:
        shutil.copy(os.path.join(hf_dir, "config.json"), out)
    dist.barrier()
    again = llama(hf_dir, seed=SEED + 8)
    assert tpt.load_checkpoint(out + "-sharded", again) == {}
    assert tpt.load_checkpoint(out, again) == {"from": "hf"}
    with torch.no_grad():
        assert torch.equal(again(ids).logits, torch.from_numpy(logits))
    print(f"rank {dist.get_rank()}: hf logits ok {err:.2e}", flush=True)


# ------------------------------------------------------------------------------------------- resume


class Block(torch.nn.Module):
    def __init__(self, d=12, hidden=48):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d, dtype=torch.float64)
        self.fc1 = torch.nn.Linear(d, hidden, dtype=torch.float64)
        self.fc2 = torch.nn.Linear(hidden, d, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def _block():
    torch.manual_seed(11)
    tpt.set_training_mode(True)
    b = Block()
    b.fc1 = tpt.LinearLayer(b.fc1, name="fc1")
    b.fc2 = tpt.LinearAllreduce(b.fc2, name="fc2")
    return b


def train(steps, start=0, resume=None, save=None, layout="sharded", losses_path=None, switch=4):
    """AdamW (weight decay, amsgrad: three state tensors and step per parameter) on the block; the
    learning rate doubles from step `switch` on, so a resume must restore the param groups too."""
    model = _block()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, amsgrad=True)
    if resume is not None:
        meta = tpt.load_checkpoint(resume, model, opt)
        assert meta["step"] == start, meta
        assert opt.param_groups[0]["lr"] == 2e-2, "the param groups' hyperparameters were not restored"
        assert sorted(opt.state[model.fc1.weight]) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
    losses = []
    for step in range(start, start + steps):
        if step == switch:
            opt.param_groups[0]["lr"] = 2e-2
        g = torch.Generator().manual_seed(SEED * 1000 + step)
        x = torch.randn(16, 12, dtype=torch.float64, generator=g)
        loss = ((model(x) - torch.sin(x)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if save is not None:
        if start + steps == switch:
            opt.param_groups[0]["lr"] = 2e-2
        tpt.save_checkpoint(save, model, opt, layout=layout, metadata={"step": start + steps})
    if losses_path is not None and dist.get_rank() == 0:
        with open(losses_path, "w") as f:
            json.dump(losses, f)
    return losses


def save_both(root, losses_path):
    """The uninterrupted run's losses, and a checkpoint after 4 steps in each layout."""
    ref = train(8)
    for layout in ("sharded", "consolidated"):
        train(4, save=os.path.join(root, layout), layout=layout)
    if dist.get_rank() == 0:
        with open(losses_path, "w") as f:
            json.dump(ref, f)


def resume_both(root, losses_path):
    got = {layout: train(4, start=4, resume=os.path.join(root, layout)) for layout in ("sharded", "consolidated")}
    if dist.get_rank() == 0:
        with open(losses_path, "w") as f:
            json.dump(got, f)


# ------------------------------------------------------------------------------------------- Conv1D


def conv(path):
    """GPT-2 style Conv1D layers ([in, out] weights, a fused c_attn): a Hugging Face format file of the
    unsharded modules loads into the tensor-parallel ones, and what they save is that file again."""
    from safetensors.torch import load_file, save_file
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    attn, proj = Conv1D(3 * 16, 16), Conv1D(16, 16)
    full = {"attn.weight": attn.weight.detach().clone(), "attn.bias": attn.bias.detach().clone(),
            "proj.weight": proj.weight.detach().clone(), "proj.bias": proj.bias.detach().clone()}
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = proj(attn(x)[:, :16])
    if dist.get_rank() == 0:
        save_file(full, os.path.join(path, "model.safetensors"))
    dist.barrier()
    torch.manual_seed(99)
    holder = torch.nn.Module()
    holder.attn = tpt.conv_LinearLayer(Conv1D(3 * 16, 16), name="attn", block_sizes=[16, 16, 16], gather_output=True)
    holder.proj = tpt.Conv_LinearALlreduce(Conv1D(16, 16), name="proj", input_is_parallel=False)
    tpt.load_checkpoint(path, holder)
    with torch.no_grad():
        got = holder.proj(holder.attn(x)[:, :16])
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (got - ref).abs().max()
    out = os.path.join(path, "back")
    tpt.save_checkpoint(out, holder)
    if dist.get_rank() == 0:
        back = load_file(os.path.join(out, "model.safetensors"))
        assert sorted(back) == sorted(full) and all(torch.equal(back[k], full[k]) for k in full)
    print(f"rank {dist.get_rank()}: conv ok", flush=True)


def tied(path):
    """Tied weights (an embedding shared with the output layer) are stored once, under the first key, as
    save_pretrained stores them; a file that has both keys loads too."""
    from safetensors.torch import load_file, save_file

    def model(seed):
        torch.manual_seed(seed)
        m = torch.nn.Module()
        m.embed = torch.nn.Embedding(10, 16)
        m.out = torch.nn.Linear(16, 10, bias=False)
        m.out.weight = m.embed.weight
        m.mid = tpt.LinearLayer(torch.nn.Linear(16, 16), name="mid")
        return m

    a, b = model(1), model(2)
    tpt.save_checkpoint(path, a)
    if dist.get_rank() == 0:
        assert sorted(load_file(os.path.join(path, "model.safetensors"))) == ["embed.weight", "mid.bias", "mid.weight"]
    tpt.load_checkpoint(path, b)
    assert torch.equal(b.out.weight, a.embed.weight) and b.out.weight is b.embed.weight
    both = os.path.join(path, "both.safetensors")
    if dist.get_rank() == 0:
        sd = load_file(os.path.join(path, "model.safetensors"))
        save_file(dict(sd, **{"out.weight": sd["embed.weight"].clone()}), both)
    dist.barrier()
    tpt.load_checkpoint(both, model(3))
    print(f"rank {dist.get_rank()}: tied ok", flush=True)


# ------------------------------------------------------------------------------------ bfloat16 / float16


def _half_mlp(dtype, seed, as_dtype=None):
    """A bfloat16 / float16 up -> GELU -> down pair (width 10: uneven at 3 ranks) as tplinear.torch layers,
    optionally converted to as_dtype before it is split; and the unsplit source."""
    torch.manual_seed(seed)
    src = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.GELU(), torch.nn.Linear(10, 12)).to(dtype)
    m = type(src)(*(copy.deepcopy(x).to(as_dtype or dtype) for x in src))
    m[0], m[2] = tpt.LinearLayer(m[0], name="up"), tpt.LinearAllreduce(m[2], name="down")
    return src, m


def half(path, prev=None):
    """bfloat16 and float16 layers: stored in their own dtype (the consolidated file holds the source module's
    tensors, BF16 / F16, bit for bit); loaded back at this group size and, from the previous world's sharded
    save (prev, another group size), resharded: the same bits as splitting the source here; into a float32
    model only with cast=True (a TypeError naming cast=True otherwise), exactly (every half value is a
    float32)."""
    from safetensors.torch import load_file

    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        src, m = _half_mlp(dtype, 1)
        for layout in ("sharded", "consolidated"):
            tpt.save_checkpoint(os.path.join(path, f"{name}-{layout}"), m, layout=layout)
        if dist.get_rank() == 0:
            saved = load_file(os.path.join(path, f"{name}-consolidated", "model.safetensors"))
            want = {k: v.detach() for k, v in src.state_dict().items()}
            assert sorted(saved) == sorted(want) and all(saved[k].dtype == dtype and torch.equal(saved[k], want[k])
                                                         for k in want), f"{name}: not stored as the source"
        dist.barrier()
        for where in [os.path.join(path, f"{name}-{lo}") for lo in ("sharded", "consolidated")] + (
                [os.path.join(prev, f"{name}-sharded")] if prev else []):
            _, back = _half_mlp(dtype, 2)
            tpt.load_checkpoint(where, back)
            assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(back.parameters(), m.parameters())), where
        _, wide = _half_mlp(dtype, 2, torch.float32)
        try:
            tpt.load_checkpoint(os.path.join(path, f"{name}-sharded"), wide)
            raise AssertionError(f"{name} loaded into float32 without cast=True")
        except TypeError as exc:
            assert "cast=True" in str(exc), exc
        tpt.load_checkpoint(os.path.join(prev or path, f"{name}-sharded"), wide, cast=True)
        assert all(a.dtype == torch.float32 and torch.equal(a, b.float()) for a, b in zip(wide.parameters(),
                                                                                          m.parameters()))
    print(f"rank {dist.get_rank()}: half ok", flush=True)
