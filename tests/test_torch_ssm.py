"""tplinear.torch.ssm: transformers' Mamba, FalconMamba and Mamba-2 mixers split by parallelize(model) (Mamba:
along d_inner, in_proj column-parallel over [x | z], conv1d / A_log / D / dt_proj by channel, x_proj and
out_proj row-parallel; Mamba-2: by whole groups of B / C) against the unsharded float64 model at 3 ranks,
d_inner 101 / 4 groups (uneven): training mode (logits, loss, every gradient gathered, an AdamW step, the
full state dict, the fused-kernel branch not taken), inference mode with the cache (prefill and decode
steps), and Mamba-2 with fewer groups than ranks refused. tests/ssm_checks.py runs inside each rank."""
import os

import pytest

from conftest import SEED

from tplinear.testing import assert_world_ok

pytest.importorskip("torch", reason="tplinear.torch needs the torch extra: pip install '.[torch]'")
pytest.importorskip("transformers", reason="the model-level tests need transformers (the test extra)")

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"TPLINEAR_TEST_SEED": str(SEED), "PYTHONPATH": TESTS}


def test_mamba_mixers_match_the_unsharded_model():
    """3 ranks (2 in tests/test_hf_families.py)."""
    assert_world_ok(3, """
        import ssm_checks as s
        s.init()
        for kind in ("mamba", "mamba2"):
            s.check_ssm(kind, True)
            s.check_ssm(kind, False)
        s.check_ssm("falcon_mamba", False)  # (its training mode, and Jamba's: tests/test_hf_families.py at 2 ranks)
        s.check_mamba2_refused()
    """, env=ENV, timeout=300)
