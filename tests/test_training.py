"""The training loop around tplinear.torch's layers (docs/torch.md, "The training loop"): TP-aware gradient
clipping (and plain torch's clipping made right), save_pretrained of a parallelized model, replica checks and
src_rank, checkpoint path checks, autocast, copy.deepcopy, and the thread rule; tests/training_checks.py
runs inside each rank, against the unsharded float64 model. World sizes 1-3 (3 divides none of the model's
head counts and sizes)."""
import os
import subprocess
import sys

import pytest

from conftest import SEED

from tplinear.testing import assert_world_ok, run_world

torch = pytest.importorskip("torch", reason="tplinear.torch needs the torch extra: pip install '.[torch]'")
pytest.importorskip("transformers", reason="the model-level tests need transformers (the test extra)")

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"TPLINEAR_TEST_SEED": str(SEED), "PYTHONPATH": TESTS}


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_clip_grad_norm_matches_the_unsharded_model(nproc):
    """The issue's case (Qwen2 from a config, parallelize, AdamW, clip to 0.5): on main plain torch clipping
    gave each rank its own norm. Both tplinear.torch.clip_grad_norm_ and torch.nn.utils.clip_grad_norm_
    now give the unsharded model's norm to 1e-12 with the same bits on every rank, and three clipped AdamW
    steps equal the reference's."""
    assert_world_ok(nproc, """
        import training_checks as c
        c.init()
        c.check_clipping("qwen2")
        c.check_clipping("gpt2", steps=2)
        c.check_norm_variants()
    """, env=ENV, timeout=400)


@pytest.mark.parametrize("nproc", [2, 3])
def test_save_pretrained_writes_the_full_model(nproc, tmp_path):
    assert_world_ok(nproc, f"""
        import training_checks as c
        c.init()
        c.check_save_pretrained({str(tmp_path / "saved")!r})
    """, env=ENV, timeout=400)


@pytest.mark.parametrize("nproc", [1, 3])
def test_per_rank_seeds_are_refused_and_src_rank_broadcasts(nproc):
    assert_world_ok(nproc, """
        import training_checks as c
        c.init()
        c.check_seeds()
    """, env=ENV, timeout=300)


@pytest.mark.parametrize("nproc", [1, 2])
def test_deepcopy_of_a_parallelized_model(nproc):
    assert_world_ok(nproc, """
        import training_checks as c
        c.init()
        c.check_deepcopy("qwen3")
        c.check_deepcopy("gpt2")
    """, env=ENV, timeout=300)


def test_autocast_on_the_cpu_computes_as_nn_linear():
    assert_world_ok(2, """
        import training_checks as c
        c.init()
        c.check_autocast_cpu()
    """, env=ENV, timeout=300)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_autocast_on_the_gpu_computes_as_nn_linear():
    """Under torch.autocast('cuda', float16 / bfloat16) a layer computes as nn.Linear does there: input and
    weight cast, the output in the autocast dtype, the gradients in the parameters' dtype."""
    import tplinear.torch as tpt

    for dt in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        lin = torch.nn.Linear(48, 40).cuda()
        ref = torch.nn.Linear(48, 40).cuda()
        ref.load_state_dict(lin.state_dict())
        layer = tpt.LinearLayer(lin)
        x = torch.randn(5, 48, device="cuda")
        with torch.autocast("cuda", dtype=dt):
            y, want = layer(x), ref(x)
        assert y.dtype == want.dtype == dt
        assert torch.allclose(y.float(), want.float(), rtol=2e-2, atol=2e-2)
        y.float().sum().backward()
        want.float().sum().backward()
        assert layer.weight.grad.dtype == torch.float32
        assert torch.allclose(layer.weight.grad, ref.weight.grad, rtol=2e-2, atol=2e-2)


def test_blas_threads_follow_torch():
    code = ("import torch; torch.set_num_threads(1)\n"
            "import tplinear, tplinear.torch as tpt\n"
            "assert tplinear.get_num_threads() == torch.get_num_threads() == 1, tplinear.get_num_threads()\n"
            "tpt.set_num_threads(2)\n"
            "assert tplinear.get_num_threads() == torch.get_num_threads() == 2\n"
            "print('ok')\n")
    env = dict(os.environ)
    env.pop("TPLINEAR_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("nproc", [2, 3])
def test_checkpoint_paths_agree(nproc, tmp_path):
    """On main, per-rank paths gave FileNotFoundError on one rank and 'save failed on world rank(s) [1]' on
    the other, or a save that failed only at load."""
    assert_world_ok(nproc, f"""
        import training_checks as c
        c.init()
        c.check_paths({str(tmp_path)!r})
    """, env=ENV, timeout=300)
