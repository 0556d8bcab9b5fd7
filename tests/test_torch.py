"""tplinear.torch: the nn.Modules and their autograd against float64 torch references at world sizes 1-4
(tests/torch_checks.py runs inside each rank), zero-copy, parameters and optimizers, parallelize() on real
transformers models (Llama with GQA, Qwen2, Qwen3, GPT-2's Conv1D), the example's loss curve at 1, 2 and 4
ranks, data parallel over torch.distributed beside tensor parallel over tplinear, torchrun, torch.compile."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import SEED

from tplinear.testing import assert_world_ok, run_world, world_env

torch = pytest.importorskip("torch", reason="tplinear.torch needs the torch extra: pip install '.[torch]'")
pytest.importorskip("transformers", reason="the model-level tests need transformers (the test extra)")

import tplinear.torch as tpt  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
ENV = {"TPLINEAR_TEST_SEED": str(SEED), "PYTHONPATH": TESTS}


def test_import_tplinear_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tplinear, tplinear.distributed\n"
            "try:\n    import tplinear.torch\nexcept ImportError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: tplinear.torch needs PyTorch: pip install 'tplinear[torch]'" in out.stdout, out.stdout


def test_import_order_tplinear_then_torch():
    """tplinear before torch: torch must get its own CUDA libraries (NCCL), not the toolkit's."""
    code = "import tplinear, torch, tplinear.torch; print('ok', torch.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


# (in_features, out_features): sizes no world size divides, so the uneven rule is exercised everywhere
@pytest.mark.parametrize("nproc", [1, 2, 3])  # 4 ranks: the loss-curve test; CI time (2 cores)
def test_layers_autograd_zero_copy_parameters(nproc):
    assert_world_ok(nproc, """
        import torch_checks as c
        c.init()
        c.run_layer_checks(48, 70)
        c.run_half_layer_checks(48, 70)
        c.check_zero_copy()
        c.check_grad_assign()
        c.check_params_and_optimizer()
        c.check_bad_input()
        c.check_sharded_norm()  # an RMSNorm / LayerNorm over a width split across the ranks (tplinear.torch.norms)
    """, env=ENV, timeout=400)


@pytest.mark.parametrize("nproc", [1, 2, 3])  # 4 ranks: the loss-curve test; CI time (2 cores)
def test_hf_models_match_the_unsharded_model(nproc):
    """Logits, loss and every parameter's gradient (gathered) against the unsharded model in float64, in
    float32 (1e-5) and float64; training and inference mode; a bfloat16 / float16 Llama (check_hf_half). At 3
    ranks none of the head counts divides (12 query / 4 KV heads; 6 / 2: K / V replicated by the default
    kv_heads="auto" in float32, a rank with no heads under kv_heads="whole" in float64; 6 / 3; GPT-2's 6)."""
    assert_world_ok(nproc, """
        import torch
        import torch_checks as c
        c.init()
        for kind in ("llama", "qwen2", "qwen3", "gpt2"):
            for training in (True, False):
                for dtype in (torch.float32, torch.float64):
                    c.check_hf(kind, dtype, training)
            c.check_no_full_weights(kind)
        for dtype in (torch.bfloat16, torch.float16):  # on the CPU (issue 27 item 3)
            c.check_hf_half("llama", dtype)
    """, env=ENV, timeout=500)


def test_loss_curve_is_the_same_at_1_2_4_ranks(tmp_path):
    """examples/train_hf.py: parallelize + AdamW, 20 steps; in bfloat16 on the CPU (issue 27 item 4) at 1 and
    2 ranks: the 2-rank curve at most twice as far (relative, worst step) from float32's as the 1-rank
    bfloat16 curve is, + 2u (u = 2^-8): the shards round a row layer's partial sums once more, errors of
    bfloat16's size (measured: 1 rank 1.4 %, 2 ranks 1.0 %, 4 ranks 0.8 %); a lost reduction or a wrong shard
    moves the loss by O(1)."""
    curves = {}
    for nproc in (1, 2, 4, "1-bfloat16", "2-bfloat16"):
        out = tmp_path / f"losses{nproc}.json"
        dtype = ["--dtype", "bfloat16"] if "bfloat16" in str(nproc) else []
        cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(nproc)[0],
               os.path.join(ROOT, "examples", "train_hf.py"), "--steps", "20", "--losses", str(out)] + dtype
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=world_env())
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "step  20/20" in proc.stdout + proc.stderr and "tokens/s" in proc.stdout + proc.stderr
        curves[nproc] = json.loads(out.read_text())["losses"]
    print("loss curves:", json.dumps(curves))
    assert len(curves[1]) == 20 and curves[1][-1] < curves[1][0] - 0.5, curves[1]
    for nproc in (2, 4):
        for step, (a, b) in enumerate(zip(curves[1], curves[nproc]), 1):
            assert abs(a - b) <= 1e-5 * abs(a), (nproc, step, curves[1], curves[nproc])

    def off(curve):
        return max(abs(a - b) / abs(a) for a, b in zip(curves[1], curve))
    assert len(curves["2-bfloat16"]) == 20
    assert off(curves["2-bfloat16"]) <= 2 * off(curves["1-bfloat16"]) + 2.0 ** -8, curves


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_over_torch_beside_tensor_parallel_over_tplinear():
    """2 x 2 on 4 ranks: DistributedDataParallel over torch.distributed (gloo) across the data-parallel
    pairs {0, 2} and {1, 3}, tensor parallel over tplinear in {0, 1} and {2, 3}. Three AdamW steps on a
    batch split between the DP replicas equal single-process training on the whole batch (float64: AdamW
    amplifies float32 rounding in near-zero gradients beyond 1e-5 within a few steps)."""
    port = _free_port()
    assert_world_ok(4, f"""
        import copy, datetime, torch, torch.distributed as tdist
        import torch_checks as c
        import tplinear as tp, tplinear.distributed as dist, tplinear.torch as tpt
        rank, world = c.init()
        tdist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=120))
        tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        dp_groups = [tdist.new_group([0, 2]), tdist.new_group([1, 3])]
        tp_group, dp_group = tp_groups[rank // 2], dp_groups[rank % 2]
        tp.set_training_mode(True)
        model = c.hf_model("llama", torch.float64)
        ref = copy.deepcopy(model)
        tpt.parallelize(model, mp_group=tp_group)
        assert model.model.layers[0].mlp.up_proj.tp_world_size == 2
        ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=dp_group)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        c.seed("dp-tp")
        for step in range(3):
            ids = torch.randint(0, 97, (4, 9))
            mine = ids[2 * (rank // 2):2 * (rank // 2) + 2]          # this DP replica's half of the batch
            opt.zero_grad(); ropt.zero_grad()
            loss = ddp(mine, labels=mine).loss
            loss.backward()
            # transformers computes the loss in float32 whatever the model's dtype: average in float64, as the
            # float64 all-reduce of the two replicas' losses below does
            ref_loss = (ref(ids[:2], labels=ids[:2]).loss.double() + ref(ids[2:], labels=ids[2:]).loss.double()) / 2
            ref_loss.backward()
            opt.step(); ropt.step()
            both = torch.tensor([loss.item()], dtype=torch.float64); tdist.all_reduce(both, group=dp_group)
            c.close(both / 2, ref_loss.detach().reshape(1), torch.float64, f"DP x TP loss at step {{step}}", 1e-10)
        refs = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            layer = getattr(p, "tp_layer", None)
            full = p.detach() if layer is None else layer.full_tensor(p)
            c.close(full, refs[name], torch.float64, f"DP x TP parameter {{name}} after 3 steps", 1e-9)
        tdist.destroy_process_group()
        print("rank", rank, "dp x tp ok", flush=True)
    """, env=ENV, timeout=300)


def _torchrun_supported():
    """Whether tplinear can bootstrap under torchrun here (its ranks meet through torchrun's agent store)."""
    code = "import tplinear.distributed as d; d.init_process_group(timeout=30); d.barrier(); print('up')"
    probe = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "--no-python", sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=world_env())
    if probe.returncode == 0 and probe.stdout.count("up") == 2:
        return True, ""
    return False, ("tplinear cannot bootstrap under this torchrun (it needs torchrun's agent store): "
                   f"{[ln for ln in (probe.stdout + probe.stderr).splitlines() if 'Error' in ln][-1:]}")


def test_example_under_torchrun(tmp_path):
    ok, why = _torchrun_supported()
    if not ok:
        pytest.skip(why)
    out = tmp_path / "losses.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "train_hf.py"), "--steps", "5", "--losses", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=world_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(json.loads(out.read_text())["losses"]) == 5


# ---------------------------------------------------------------------------------------------- parallelize


def test_parallelize_plans_and_refusals():
    assert_world_ok(3, """
        import torch
        from torch import nn
        import torch_checks as c
        import tplinear as tp, tplinear.torch as tpt
        c.init()
        tp.set_training_mode(True)

        # the HF plan leaves the embedding and lm_head replicated; the plan argument can shard lm_head
        model = c.hf_model("llama")
        tpt.parallelize(model)
        assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
        model = c.hf_model("llama")
        ref = c.copy.deepcopy(model)
        tpt.parallelize(model, plan={"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise",
                                     "o_proj": "rowwise", "lm_head": "colwise_gather_output"})
        assert isinstance(model.lm_head, tpt.LinearLayer) and model.lm_head.gather_output
        assert type(model.model.layers[0].mlp.up_proj) is nn.Linear   # not named: replicated
        ids = torch.randint(0, 97, (2, 5))
        c.close(model(ids).logits, ref(ids).logits, torch.float32, "partial plan logits")

        # name rules (no plan, no HF config): heads from the arguments
        class Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 24), nn.Linear(16, 8), nn.Linear(16, 8)
                self.o_proj = nn.Linear(24, 16)
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.self_attn, self.mlp = Attn(), nn.Sequential()
                self.mlp.fc1, self.mlp.fc2 = nn.Linear(16, 40), nn.Linear(40, 16)
        blk = tpt.parallelize(Block(), num_heads=6, num_kv_heads=2, head_dim=4, kv_heads="whole")  # (2 < 3 ranks)
        kinds = {n: type(m).__name__ for n, m in blk.named_modules() if n}
        assert kinds["self_attn.q_proj"] == "LinearLayer" and kinds["self_attn.o_proj"] == "LinearAllreduce"
        assert kinds["mlp.fc1"] == "LinearLayer" and kinds["mlp.fc2"] == "LinearAllreduce"
        assert blk.self_attn.q_proj.num_kv_heads == 2

        # a bare transformers block keeps a config but is no model: name rules, not the model's plan
        from transformers.models.llama.modeling_llama import LlamaMLP
        mlp = tpt.parallelize(LlamaMLP(c.hf_model("llama").config))
        assert sorted(tpt.tp_modules(mlp)) == ["down_proj", "gate_proj", "up_proj"], tpt.tp_modules(mlp)
        c._raises(ValueError, lambda: tpt.parallelize(Block(), plan={"nothing_here": "colwise"}),
                  "matches no module", "nothing_here")

        # a column output split and the row input split after it that disagree: refused, naming both
        class Odd(nn.Module):
            def __init__(self):
                super().__init__()
                self.q_proj, self.proj = nn.Linear(16, 48), nn.Linear(48, 16)
        c._raises(ValueError, lambda: tpt.parallelize(Odd(), plan={"q_proj": "colwise", "proj": "rowwise"},
                                                     num_heads=12, num_kv_heads=4, head_dim=4),
                  "q_proj", "proj", "differently")
        # styles tplinear does not have yet, unknown styles, tied weights
        c._raises(NotImplementedError, lambda: tpt.parallelize(c.hf_model("llama"),
                  plan={"input_layernorm": "sequence_parallel"}), "sequence_parallel", "input_layernorm")
        c._raises(NotImplementedError, lambda: tpt.parallelize(c.hf_model("llama"),
                  plan={"embed_tokens": "embedding_colwise"}), "hidden-dim-parallel")
        c._raises(ValueError, lambda: tpt.parallelize(c.hf_model("llama"), plan={"lm_head": "embedding_rowwise"}),
                  "lm_head", "nn.Embedding")  # embedding_rowwise (tests/test_torch_sequence.py) is for embeddings
        c._raises(ValueError, lambda: tpt.parallelize(c.hf_model("llama"), plan={"q_proj": "diagonal"}),
                  "unknown tensor-parallel style 'diagonal'", "colwise")
        # a bare parameter a plan splits column-wise (attention sinks): split by its attention's query heads,
        # kept whole as a parameter; one whose first dim is not the heads: refused, saying what tplinear does
        def sinky(n):
            blk = Block()
            blk.self_attn.sinks = nn.Parameter(torch.arange(float(n)))
            return blk
        attn_plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
                     "self_attn": "local_params", "self_attn.sinks": "colwise"}
        blk = tpt.parallelize(sinky(6), plan=attn_plan, num_heads=6, num_kv_heads=2, head_dim=4)
        first, width = blk.self_attn.q_proj.shard_ranges()[c.dist.get_rank()][0]
        assert dict(blk.named_parameters())["self_attn.sinks"].shape == (6,)
        assert blk.self_attn.sinks.tolist() == list(range(first // 4, (first + width) // 4)), blk.self_attn.sinks
        c._raises(ValueError, lambda: tpt.parallelize(sinky(5), plan=attn_plan, num_heads=6, num_kv_heads=2,
                                                     head_dim=4),
                  "self_attn.sinks", "shape [5]", "only by the heads", "self_attn.q_proj has 6 heads")
        tied = c.hf_model("llama")
        tied.lm_head.weight = tied.model.embed_tokens.weight
        c._raises(ValueError, lambda: tpt.parallelize(tied, plan={"lm_head": "colwise_gather_output"}),
                  "tied", "embed_tokens")
        # kv_heads: "auto" (default), "whole" or "replicate"; 4 KV heads over 3 ranks: replicated, 12 query heads 4/4/4
        c._raises(ValueError, lambda: tpt.parallelize(c.hf_model("llama"), kv_heads="split"), "kv_heads", "'split'")
        model = c.hf_model("llama")
        keys = sorted(model.state_dict())
        tpt.parallelize(model, kv_heads="replicate")
        attn = model.model.layers[0].self_attn
        assert all(m is not attn.k_proj for m in tpt.tp_modules(model).values())  # replicated, whole weight
        assert attn.k_proj.weight.shape == (32, 48)
        assert attn.q_proj.weight.shape == (32, 48) and attn.o_proj.weight.shape == (48, 32)  # 4 heads of 8
        assert tpt.parallelize(model, kv_heads="replicate") is model and sorted(model.state_dict()) == keys
        whole = tpt.parallelize(c.hf_model("llama")).model.layers[0].self_attn  # KV heads 2/1/1, query 6/3/3
        assert whole.q_proj.weight.shape[0] == [48, 24, 24][c.dist.get_rank()]
        # the default kv_heads="auto": fewer KV heads (2) than ranks: K / V replicated, query heads 2/2/2 of 8;
        # "whole": KV heads 1/1/0, query heads 3/3/0
        auto = tpt.parallelize(c.hf_model("qwen2")).model.layers[0].self_attn
        assert type(auto.k_proj).__name__ == "_ReplicatedRows" and auto.q_proj.weight.shape[0] == 16
        whole = tpt.parallelize(c.hf_model("qwen2"), kv_heads="whole").model.layers[0].self_attn
        assert whole.q_proj.weight.shape[0] == [24, 24, 0][c.dist.get_rank()]

        # what lies between a column and a row layer (no plan): a column of twice the row's input is [gate | up]
        # (Moshi's fc1, read as view(.., 2, -1)): packed; a LayerNorm over the sharded width between them
        # (BitNet's sub-norms): split with them (tplinear.torch.norms); another module with a parameter over
        # that width (a scale), a column no row reads, two row layers in one region (one feeding the other): kept
        # whole
        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(16, 40), nn.Linear(20, 16)
            def forward(self, x):
                h = self.fc1(x)
                h = h.view(*h.shape[:-1], 2, -1)
                return self.fc2(nn.functional.silu(h[..., 0, :]) * h[..., 1, :])
        class SubNorm(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.sub_norm, self.fc2 = nn.Linear(16, 20), nn.LayerNorm(20), nn.Linear(20, 16)
            def forward(self, x):
                return self.fc2(self.sub_norm(self.fc1(x)))
        class Scale(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight, self.eps = nn.Parameter(torch.rand(20) + 0.5), 1e-6
            def forward(self, x):
                return x * self.weight
        class SubScale(SubNorm):
            def __init__(self):
                super().__init__()
                self.sub_norm = Scale()
        class Chain(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2, self.out_proj = nn.Linear(16, 20), nn.Linear(20, 20), nn.Linear(20, 16)
            def forward(self, x):
                return self.out_proj(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp, self.sub, self.chain, self.side = Gated(), SubNorm(), Chain(), nn.Module()
                self.side.up_proj = nn.Linear(16, 16)
            def forward(self, x):
                x = x + self.mlp(x) + self.side.up_proj(x)
                return x + self.sub(x) + self.chain(x)
        c.seed("regions")
        net = Net().double()
        ref = c.copy.deepcopy(net)
        tpt.parallelize(net)
        assert sorted(tpt.tp_modules(net)) == ["mlp.fc1", "mlp.fc2", "sub.fc1", "sub.fc2"], tpt.tp_modules(net)
        assert type(net.sub.sub_norm).__name__ == "ShardedNorm" and net.sub.sub_norm.bias.shape[0] < 20
        assert net.mlp.fc1._split["block_sizes"] == [20, 20]
        x = torch.randn(3, 5, 16, dtype=torch.float64)
        w = torch.randn(3, 5, 16, dtype=torch.float64)
        out, want = net(x), ref(x)
        c.close(out, want, torch.float64, "regions: output")
        (out * w).sum().backward()
        (want * w).sum().backward()
        for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
            c.close(c.full_grad(p), q.grad, torch.float64, f"regions: grad {n}")
        c._raises(ValueError, lambda: tpt.parallelize(SubScale()), "replaced no module", "sub_norm",
                  "shape [20]", "whole width")
        print("plans ok", flush=True)
    """, env=ENV, timeout=300)


def test_an_input_error_on_one_rank_fails_every_rank_and_keeps_the_group():
    """A row layer fed a wrong width on one rank only (a half-split pair, a zero-width shard): that rank
    raises its ValueError, its peer a RuntimeError naming it, at once (not after the group's timeout, and
    without entering the all-reduce), and the group still works: the next forward is the reference."""
    assert_world_ok(2, """
        import time
        import torch
        from torch import nn
        import torch_checks as c
        import tplinear as tp, tplinear.torch as tpt
        rank, p = c.init(timeout=30.0)
        tp.set_training_mode(True)
        torch.manual_seed(0)
        lin = nn.Linear(8, 4)
        row = tpt.LinearAllreduce(c.copy.deepcopy(lin))
        x = torch.randn(3, 8)
        mine = x[:, row.shard_ranges()[rank][0][0]:][:, :row.local_shape[1]]
        t0 = time.monotonic()
        try:
            row(torch.randn(3, 8) if rank == 1 else mine)  # rank 1: the full width, not its shard
            raise AssertionError("no error")
        except ValueError as exc:
            assert rank == 1 and "last dimension must be 4" in str(exc), exc
        except RuntimeError as exc:
            assert rank == 0 and "failed on rank(s) [1]" in str(exc), exc
        assert time.monotonic() - t0 < 20, time.monotonic() - t0  # the group timeout is 30 s
        c.close(row(mine), lin(x), torch.float32, "the next forward")
        print("one-rank failure ok", flush=True)
    """, env=ENV, timeout=120)


# ---------------------------------------------------------------------------------------------- torch.compile


def test_torch_compile():
    """torch.compile puts tplinear's layers into the graph (torch custom operators), fullgraph=True
    included, and gives the eager results, forward and backward."""
    import warnings

    import tplinear as tp

    tp.set_training_mode(True)
    torch.manual_seed(0)
    col = tpt.LinearLayer(torch.nn.Linear(16, 32))
    row = tpt.LinearAllreduce(torch.nn.Linear(32, 16))

    def block(x):
        return row(torch.nn.functional.gelu(col(x)))

    x = torch.randn(4, 16, requires_grad=True)
    eager = block(x)
    eager.sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in (col.weight, col.bias, row.weight, row.bias)]
    for p in (x, col.weight, col.bias, row.weight, row.bias):
        p.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(block, fullgraph=True)(x)
        compiled.sum().backward()
    # inductor's fused GELU may differ from eager's in the last bit
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    for got, want in zip([x.grad] + [p.grad for p in (col.weight, col.bias, row.weight, row.bias)], grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- GPU


def test_gpu_layers_match_cpu():
    import tplinear as tp

    if not (tp.cuda_available() and torch.cuda.is_available()):
        pytest.skip("needs a CUDA build of tplinear and a GPU visible to torch")
    res = run_world(1, """
        import torch, tplinear as tp, tplinear.torch as tpt
        tp.set_training_mode(True)
        torch.manual_seed(0)
        fc1, fc2 = torch.nn.Linear(64, 96).cuda(), torch.nn.Linear(96, 64).cuda()
        r1, r2 = [torch.nn.Linear(1, 1) for _ in range(2)]
        r1 = torch.nn.Linear(64, 96).cuda(); r1.load_state_dict(fc1.state_dict())
        r2 = torch.nn.Linear(96, 64).cuda(); r2.load_state_dict(fc2.state_dict())
        col, row = tpt.LinearLayer(fc1), tpt.LinearAllreduce(fc2)
        x = torch.randn(8, 64, device="cuda", requires_grad=True)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):    # work runs on torch's current stream
            y = row(torch.relu(col(x)))
            y.sum().backward()
        torch.cuda.synchronize()
        yr = r2(torch.relu(r1(x.detach())))
        err = ((y - yr).norm() / yr.norm()).item()
        assert err < 1e-5, err
        assert col.weight.grad is not None and col.weight.grad.is_cuda
        print("gpu ok")
    """, env=ENV, timeout=300)
    assert res.ok, res.describe()
