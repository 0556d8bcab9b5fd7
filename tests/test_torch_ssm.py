"""tplinear.torch.ssm: transformers' Mamba and FalconMamba mixers split along their intermediate (d_inner)
channels by parallelize(model) (in_proj column-parallel over [x | z], conv1d / A_log / D / dt_proj by
channel, x_proj and out_proj row-parallel) against the unsharded float64 model at 3 ranks, d_inner
101 (uneven): training mode (logits, loss, every gradient gathered, AdamW steps, the full state dict, the
fused-kernel branch not taken) and inference mode with the cache (prefill and decode steps).
tests/ssm_checks.py runs inside each rank."""
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
        for kind in ("mamba", "falcon_mamba", "mamba2"):
            s.check_ssm(kind, True)
            s.check_ssm(kind, False)
        s.check_mamba2_refused()
    """, env=ENV, timeout=300)
