"""Tensor-parallel layers at world sizes 1-4 (each rank checks against a float64 reference of the full
layer; see tests/tp_checks.py), checkpoints resharded across group sizes, bad input, the demo."""
import json
import os
import subprocess
import sys

import pytest

from conftest import SEED, SHM_ALGOS

from tplinear.testing import assert_world_ok

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
ENV = {"TPLINEAR_TEST_SEED": str(SEED), "PYTHONPATH": TESTS}

# (training dims (in, out), inference dims): sizes the group does not divide split unevenly in both modes
DIMS = {1: ((48, 24), (100, 70)), 2: ((47, 25), (100, 70)), 3: ((49, 26), (100, 70)), 4: ((65, 34), (50, 130))}


@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_layers_match_reference(nproc):
    training, inference = DIMS[nproc]
    assert_world_ok(nproc, f"""
        import tp_checks as c
        c.init()
        c.run_layer_checks({training!r}, {inference!r})
    """, env=ENV, timeout=240)


@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_deepspeed_layer_classes(nproc):
    """LmHeadLinearAllreduce, SubParamLinearLayer / SubParamLinearAllreduce, fused_LinearLayer,
    conv_LinearLayer / Conv_LinearALlreduce against DeepSpeed 0.19's partition code re-implemented in NumPy
    and a float64 reference; their universal-checkpoint metadata describes their shards."""
    assert_world_ok(nproc, """
        import tp_checks as c
        c.init()
        c.check_autotp_layers()
    """, env=ENV, timeout=240)


@pytest.mark.parametrize("nproc", [2, 3])
def test_bad_input(nproc):
    assert_world_ok(nproc, """
        import tp_checks as c
        c.init(timeout=20)
        c.check_bad_input()
    """, env=ENV, timeout=120)


@pytest.mark.parametrize("training", [False, True])
def test_checkpoint_reshards(tmp_path, training):
    """Saved at 4 ranks with uneven shards (190 rows), reloaded at 2, 3 and 1, in inference (grain 64) and
    training (grain 1) mode (a safetensors checkpoint directory)."""
    path, ref = str(tmp_path / "mlp"), str(tmp_path / "ref.npy")
    assert_world_ok(4, f"import tp_checks as c; c.init(); c.checkpoint_save({path!r}, {ref!r}, {training})", env=ENV,
                    timeout=120)
    for nproc in (2, 3, 1):
        assert_world_ok(nproc, f"import tp_checks as c; c.init(); c.checkpoint_load({path!r}, {ref!r}, {training})",
                        env=ENV, timeout=120)


def test_demo_loss_curve_is_the_same_at_1_2_4_ranks(tmp_path):
    curves = {}
    for nproc in (1, 2, 4):
        out = tmp_path / f"losses{nproc}.json"
        cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(nproc),
               os.path.join(ROOT, "examples", "train_mlp.py"), "--steps", "8", "--losses", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "step   8/8" in proc.stdout
        curves[nproc] = json.loads(out.read_text())["losses"]
    assert curves[1][-1] < curves[1][0], "the demo's loss does not decrease"
    for nproc in (2, 4):
        for a, b in zip(curves[1], curves[nproc]):
            assert abs(a - b) <= 1e-5 * abs(a), (nproc, curves[1], curves[nproc])




@pytest.mark.parametrize("algos", list(SHM_ALGOS))
@pytest.mark.parametrize("nproc", [2, 3])
def test_row_forward_staged_and_plain_paths(nproc, algos):
    """With a 16 KB staging area, small outputs take the staged path (GEMM straight into the shared
    segment) and larger ones the plain one, the bias added inside the reduction both ways; the column
    backward's dX likewise; strided and Fortran-ordered inputs; the row output has the same bits on
    every rank."""
    assert_world_ok(nproc, """
        import numpy as np
        import tp_checks as c
        import tplinear as tp
        import tplinear.distributed as dist
        c.init()
        for dtype in ("float32", "float64"):
            for lead in ((3,), (2, 5), (1,), (37,), (3, 29)):  # 3 x 130 x 8 bytes fits 16 KB, 37 rows do not
                for bias in (True, False):
                    c.check_row(dtype, lead, bias, False, 100, 130)
                c.check_col(dtype, lead, True, False, 130, 100)
        lin = tp.Linear(60, 130, dtype="float64", seed=4)
        row = tp.LinearAllreduce(lin, input_is_parallel=False)
        for n in (4, 45):
            x = np.asfortranarray(np.random.default_rng(n).standard_normal((n, 60)))
            y = row(x)
            c.close(y, x @ lin.weight.data.T + lin.bias.data, "float64", "fortran input")
            every = np.empty((dist.get_world_size(),) + y.shape)
            dist.all_gather_into_tensor(every, y)
            assert all(np.array_equal(every[0], e) for e in every), "row outputs differ between ranks"
    """, env=dict(ENV, TPLINEAR_SHM_SLOT_KB="32", **SHM_ALGOS[algos]), timeout=120)
