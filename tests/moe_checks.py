"""Checks that run inside each rank of a world spawned by tests/test_torch_moe.py: transformers 5's fused
MoE experts (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert, OLMoE, gpt-oss with biases and the
clamped, interleaved gate/up) split by tplinear.torch.parallelize against the unsharded float64 model."""
import copy
import glob
import os

import torch

import tplinear as tp
import tplinear.distributed as dist
import tplinear.torch as tpt
from tplinear.torch import moe

from torch_checks import close, close_grads, full_grad, init, seed  # noqa: F401

# no p in 2..4 divides 40 + 1
INTER = {"mixtral": 40, "qwen3_moe": 40, "qwen2_moe": 40, "olmoe": 40, "gpt_oss": 40, "llama4": 40}
VOCAB = 97


def moe_model(kind, dtype=torch.float64, experts_implementation="eager", inter=None):
    import transformers
    from transformers import logging

    logging.set_verbosity_error()
    common = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False)
    inter = INTER[kind] + 1 if inter is None else inter  # 41: uneven over every p
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=inter, num_local_experts=4, num_experts_per_tok=2, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=inter, num_experts=4,
                                          num_experts_per_tok=2, head_dim=8, norm_topk_prob=True, **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "qwen2_moe":  # a shared expert (an ordinary MLP: the plan's colwise / rowwise) beside the experts
        cfg = transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=inter, num_experts=4,
                                          num_experts_per_tok=2, shared_expert_intermediate_size=56, **common)
        cls = transformers.Qwen2MoeForCausalLM
    elif kind == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=inter, num_experts=4, num_experts_per_tok=2, **common)
        cls = transformers.OlmoeForCausalLM
    elif kind == "gpt_oss":  # transposed, interleaved gate/up, biases, clamped SwiGLU
        cfg = transformers.GptOssConfig(intermediate_size=inter, num_local_experts=4, num_experts_per_tok=2,
                                        head_dim=8, swiglu_limit=0.05, sliding_window=4, **common)
        cls = transformers.GptOssForCausalLM
    elif kind == "llama4":  # transposed [E, H, 2I] experts named by the model's plan (packed_rowwise, colwise,
        # moe_tp_experts), a shared expert (colwise / rowwise) beside them
        cfg = transformers.Llama4TextConfig(intermediate_size=inter, intermediate_size_mlp=64, num_local_experts=4,
                                            num_experts_per_tok=1, head_dim=8, attention_chunk_size=None, **common)
        cls = transformers.Llama4ForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = experts_implementation  # transformers' grouped_mm takes no float64
    seed("moe", kind)
    model = cls(cfg)
    with torch.no_grad():  # transformers' init leaves some expert tensors (biases) at zero: make them all count
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name or name.endswith("gate.weight"):
                p.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def experts_of(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, moe._TPExperts)}


def check_moe(kind, training, steps=3, ckpt_dir=None):
    """Logits, loss, every gradient (gathered) and AdamW steps against the unsharded float64 model; the
    expert shards' storage is 1/p of the experts' (within one unit per expert)."""
    p, r = dist.get_world_size(), dist.get_rank()
    tp.set_training_mode(training)
    model = moe_model(kind)
    ref = copy.deepcopy(model)
    full_expert_bytes = {n: q.untyped_storage().nbytes() for n, q in model.named_parameters() if q.dim() == 3}
    tpt.parallelize(model)
    experts = experts_of(model)
    assert len(experts) == 2, f"{kind}: expected 2 tensor-parallel expert modules, got {sorted(experts)}"
    params = dict(model.named_parameters())
    inter = INTER[kind] + 1
    for n, full_bytes in full_expert_bytes.items():
        q = params[n]
        assert q.tensor_model_parallel and q.untyped_storage().nbytes() == q.numel() * q.element_size(), n
        mine = q.untyped_storage().nbytes()
        unit = full_bytes // inter
        assert abs(mine - full_bytes / p) <= unit, f"{kind} {n}: {mine} bytes on rank {r}, full {full_bytes}, p={p}"
    total = torch.tensor([float(sum(params[n].untyped_storage().nbytes() for n in full_expert_bytes))],
                         dtype=torch.float64)
    dist.all_reduce(total.numpy())
    assert int(total.item()) == sum(full_expert_bytes.values()), (int(total.item()), sum(full_expert_bytes.values()))
    what = f"{kind} {'training' if training else 'inference'} p={p}"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    seed("moe-input", kind)
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (2, 7))
        opt.zero_grad()
        ropt.zero_grad()
        out = model(ids, labels=ids)
        expect = ref(ids, labels=ids)
        # the routers' softmax runs in float32 (transformers' upcast): its rounding reaches the gradients
        # (1e-8), and AdamW, which normalises each gradient element, amplifies it in the steps after
        # -- by up to lr x (rounding) / eps for a gradient element that is ~0: the logits after a step moved by
        # 1.2e-4 relative under one seed (a wrong split or a lost reduction errs by O(1))
        # Llama-4's float32 sigmoid scores scale the experts' input: one float32 rounding (6e-8) reaches the logits
        tol = (1e-6 if kind == "llama4" else 1e-8) if step == 0 else 1e-3
        close(out.logits, expect.logits, torch.float64, f"{what} step {step} logits", tol)
        close(out.loss.reshape(1), expect.loss.reshape(1), torch.float64, f"{what} step {step} loss", max(tol, 1e-7))
        out.loss.backward()
        expect.loss.backward()
        if step == 0:  # the expert shards count as sharded in the training loop's norms (both clipping calls)
            want = torch.nn.utils.get_total_norm([q.grad for q in ref.parameters() if q.grad is not None])
            for how, fn in (("torch", torch.nn.utils.get_total_norm), ("tplinear", tpt.get_total_norm)):
                got = fn([q.grad for q in model.parameters() if q.grad is not None])
                # the gradients' own bound at step 0 (the routers' float32 softmax, above)
                close(got.reshape(1), want.reshape(1), torch.float64, f"{what} total grad norm ({how})", 1e-6)
        close_grads(model, ref, f"{what} step {step}", 1e-6 if step == 0 else 1e-3)
        opt.step()
        ropt.step()
    gathered = {}
    for name, q in model.named_parameters():  # within the steps' logits' bound (above)
        layer = getattr(q, "tp_layer", None)
        gathered[name] = q.detach() if layer is None else layer.full_tensor(q)
        close(gathered[name], dict(ref.named_parameters())[name], torch.float64,
              f"{what} {name} after {steps} AdamW steps", 1e-5 if steps == 1 else 1e-3)
    full = tpt.full_state_dict(model, rank0_only=False)  # what save_pretrained writes: the experts whole
    assert set(full) == set(ref.state_dict()), sorted(set(full) ^ set(ref.state_dict()))
    for name, t in gathered.items():
        assert torch.equal(full[name], t), f"{what} full_state_dict[{name}] is not the gathered parameter"
    if ckpt_dir is not None:
        check_checkpoint(model, ref, full, what, ckpt_dir)
    print(f"rank {r}: {what}: exact, expert shards "
          f"{sum(params[n].untyped_storage().nbytes() for n in full_expert_bytes)} of "
          f"{sum(full_expert_bytes.values())} bytes", flush=True)


def check_checkpoint(model, ref, full, what, path):
    """save_checkpoint stores the expert shards whole (consolidated: the file holds the unsharded tensors, full)
    or with their partition (sharded), and load_checkpoint fills a parallelized copy (of ref) whose parameters
    were zeroed: the same bits as full."""
    from safetensors.torch import load_file
    for layout in ("consolidated", "sharded"):
        where = os.path.join(path, f"{what}-{layout}".replace(" ", "-"))
        tpt.save_checkpoint(where, model, layout=layout, progress=False)
        if layout == "consolidated":
            stored = {}
            for f in glob.glob(os.path.join(where, "*.safetensors")):
                stored.update(load_file(f))
            for name, t in full.items():
                assert torch.equal(stored[name], t), f"{what} {layout} checkpoint's {name} is not the model's"
        fresh = tpt.parallelize(copy.deepcopy(ref))
        with torch.no_grad():
            for q in fresh.parameters():
                q.zero_()
        tpt.load_checkpoint(where, fresh, progress=False)
        for name, q in fresh.named_parameters():
            layer = getattr(q, "tp_layer", None)
            got = q.detach() if layer is None else layer.full_tensor(q)
            assert torch.equal(got, full[name]), f"{what} {name} loaded from the {layout} checkpoint differs"


def check_plan_styles():
    """A plan naming only the experts' 3-d parameters (transformers' styles: packed_rowwise cuts gate_up_proj's
    last dim, colwise down_proj's second-to-last) splits their module; a style that would cut another dim, or
    packed_rowwise on a linear layer, is refused naming the parameter / module."""
    tp.set_training_mode(True)
    plan = {"feed_forward.experts.gate_up_proj": "packed_rowwise", "feed_forward.experts.down_proj": "colwise"}
    model = moe_model("llama4")
    ref = copy.deepcopy(model)
    tpt.parallelize(model, plan=plan)
    assert len(experts_of(model)) == 2 and not tpt.tp_modules(model), sorted(experts_of(model))
    ids = torch.randint(0, VOCAB, (2, 7))
    close(model(ids).logits, ref(ids).logits, torch.float64, "llama4 experts by parameter entries", 1e-8)
    for bad, words in (({"feed_forward.experts.down_proj": "rowwise"}, ("experts.down_proj", "intermediate dim")),
                       ({"self_attn.q_proj": "packed_rowwise"}, ("self_attn.q_proj", "3-d parameters"))):
        try:
            tpt.parallelize(moe_model("llama4"), plan=bad)
        except ValueError as e:
            assert all(w in str(e) for w in words), (words, e)
        else:
            raise AssertionError(f"{bad} was not refused")
    print(f"rank {dist.get_rank()}: plan styles on experts' parameters ok", flush=True)


class PostNormExperts(torch.nn.Module):
    """Ergo's / MuseSpark's form: a norm after each expert's down_proj, the routing weights applied after it
    (non-gated, transposed: up [E, H, I], down [E, I, H]; its layout from hidden_dim)."""

    def __init__(self, experts=3, hidden=8, inter=7):
        super().__init__()
        self.num_experts, self.hidden_dim = experts, hidden
        self.up_proj = torch.nn.Parameter(torch.randn(experts, hidden, inter, dtype=torch.float64))
        self.down_proj = torch.nn.Parameter(torch.randn(experts, inter, hidden, dtype=torch.float64))
        self.post_expert_norm = torch.nn.LayerNorm(hidden, dtype=torch.float64)
        with torch.no_grad():
            self.post_expert_norm.weight.normal_()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            tok, pos = torch.where(top_k_index == e)
            h = torch.relu(hidden_states[tok] @ self.up_proj[e]) @ self.down_proj[e]
            out = out.index_add(0, tok, self.post_expert_norm(h) * top_k_weights[tok, pos, None])
        return out


def check_post_expert_norm():
    """The norm's input all-reduced (each expert's whole output), the routing weights after it: output and
    every gradient (hidden states, routing weights, experts, norm) as the unsharded module's."""
    seed("moe", "post_norm")
    experts = PostNormExperts()
    ref = copy.deepcopy(experts)
    moe.shard_experts("x.experts", experts, dist.resolve_group(None))
    assert experts.up_proj.shape[2] < 7 and experts.down_proj.shape[1] < 7, experts.up_proj.shape
    x = torch.randn(5, 8, dtype=torch.float64)
    idx = torch.arange(10).reshape(5, 2) % 3  # every expert hit
    w = torch.rand(5, 2, dtype=torch.float64)
    grad = torch.randn(5, 8, dtype=torch.float64)
    got, want = [], []
    for module, keep in ((experts, got), (ref, want)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = module(xi, idx, wi)
        (out * grad).sum().backward()
        keep += [out, xi.grad, wi.grad] + [full_grad(q) for q in module.parameters()]
    for i, (a, b) in enumerate(zip(got, want)):
        close(a, b, torch.float64, f"post_expert_norm experts: output / gradient {i}", 1e-10)
    print(f"rank {dist.get_rank()}: post_expert_norm experts ok", flush=True)


def check_grouped_mm_and_twice():
    """transformers' default experts implementation (grouped_mm, float32) on the shards; parallelize twice
    leaves the experts as they are; refusals for layouts that cannot be split."""
    tp.set_training_mode(True)
    # 48 = 12 grains of 16 bytes: grouped_mm's strides stay multiples of 16 bytes on every rank
    model = moe_model("mixtral", torch.float32, experts_implementation="grouped_mm", inter=48)
    ref = copy.deepcopy(model)
    tpt.parallelize(model)
    before = {n: q.shape for n, q in model.named_parameters()}
    tpt.parallelize(model)
    assert {n: q.shape for n, q in model.named_parameters()} == before, "parallelize twice changed the shards"
    ids = torch.randint(0, VOCAB, (2, 7))
    out, expect = model(ids, labels=ids), ref(ids, labels=ids)
    close(out.logits, expect.logits, torch.float32, "mixtral grouped_mm logits", 1e-5)
    out.loss.backward()
    expect.loss.backward()
    refs = dict(ref.named_parameters())
    for name, q in model.named_parameters():
        close(full_grad(q), refs[name].grad, torch.float32, f"mixtral grouped_mm grad of {name}", 1e-4)
    # a norm after each expert that is not a post_expert_norm module (whose input would be all-reduced), or
    # another module with parameters inside the experts: refused, naming the module
    holder = torch.nn.Module()
    holder.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 8, 4))
    holder.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 4))
    holder.has_post_expert_norm = True
    try:
        moe.shard_experts("x.experts", holder, dist.resolve_group(None))
    except NotImplementedError as e:
        assert "x.experts" in str(e) and "has_post_expert_norm" in str(e), e
    else:
        raise AssertionError("has_post_expert_norm was not refused")
    del holder.has_post_expert_norm
    holder.expert_norm = torch.nn.LayerNorm(4)
    try:
        moe.shard_experts("x.experts", holder, dist.resolve_group(None))
    except NotImplementedError as e:
        assert "x.experts.expert_norm" in str(e), e
    else:
        raise AssertionError("a module inside the experts was not refused")
    print(f"rank {dist.get_rank()}: grouped_mm, parallelize twice and refusals ok", flush=True)
