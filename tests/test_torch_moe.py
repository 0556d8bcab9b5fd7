"""tplinear.torch.moe: transformers 5's fused MoE experts split along each expert's intermediate dim by
parallelize(model) (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE, gpt-oss: transposed,
interleaved gate/up, biases, clamped SwiGLU) against the unsharded float64 model at 2 and 3 ranks: logits,
loss, every gradient (gathered), AdamW steps, expert storage 1/p per rank (tests/moe_checks.py runs inside
each rank)."""
import os

import pytest

from conftest import SEED

from tplinear.testing import assert_world_ok

pytest.importorskip("torch", reason="tplinear.torch needs the torch extra: pip install '.[torch]'")
pytest.importorskip("transformers", reason="the model-level tests need transformers (the test extra)")

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"TPLINEAR_TEST_SEED": str(SEED), "PYTHONPATH": TESTS}
KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "llama4")


@pytest.mark.parametrize("nproc", [2, 3])
def test_moe_experts_match_the_unsharded_model(nproc, tmp_path):
    """Intermediate size 41: uneven at 2 and 3 ranks. Training mode with 3 AdamW steps (p=2) or 1 (p=3);
    inference mode for Mixtral and gpt-oss, whose models are also saved and loaded (both layouts)."""
    steps = 3 if nproc == 2 else 1
    assert_world_ok(nproc, f"""
        import moe_checks as m
        m.init()
        for kind in {KINDS!r}:
            m.check_moe(kind, True, steps={steps})
        for kind in ("mixtral", "gpt_oss"):
            m.check_moe(kind, False, steps=1, ckpt_dir={str(tmp_path)!r})
        m.check_grouped_mm_and_twice()
        m.check_plan_styles()
        m.check_post_expert_norm()
    """, env=ENV, timeout=600)


def test_layout_of_non_gated_experts_from_the_hidden_size():
    """up [E, a, b] with down [E, b, a] fits both layouts by shape (no gate): the experts' input width (the
    module's hidden_dim / hidden_size, else the config's, passed as hidden) tells them apart; a separate 3-d
    gate_proj is split as up_proj; a square expert (I = H) is refused, naming the module."""
    import torch
    from tplinear.torch import moe

    experts = torch.nn.Module()
    experts.gate_proj = torch.nn.Parameter(torch.zeros(2, 4, 8))
    experts.up_proj = torch.nn.Parameter(torch.zeros(2, 4, 8))
    experts.down_proj = torch.nn.Parameter(torch.zeros(2, 8, 4))
    with pytest.raises(ValueError, match="x.shared_experts: cannot tell the experts' layout"):
        moe.split_dims("x.shared_experts", experts)
    assert moe.split_dims("x.shared_experts", experts, hidden=8) == {"up_proj": 1, "gate_proj": 1, "down_proj": 2}
    assert moe.split_dims("x.shared_experts", experts, hidden=4) == {"up_proj": 2, "gate_proj": 2, "down_proj": 1}
    experts.hidden_dim = 4  # the module's own size wins over the config's
    assert moe.split_dims("x.shared_experts", experts, hidden=8)["down_proj"] == 1
    square = torch.nn.Module()
    square.up_proj = torch.nn.Parameter(torch.zeros(2, 8, 8))
    square.down_proj = torch.nn.Parameter(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="x.experts: cannot tell"):
        moe.split_dims("x.experts", square, hidden=8)
