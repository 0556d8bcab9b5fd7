"""Sequence parallelism and vocabulary parallelism at world sizes 1-4: each rank checks the
sequence-parallel layers, the vocab-parallel embedding and cross-entropy and a 2-block decoder against a
float64 single-process reference (tests/seq_checks.py), with sequence and vocabulary sizes the group does
not divide; the NumPy cross-entropy reference and tplinear's loss against torch's F.cross_entropy."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import SEED

from tplinear.testing import assert_world_ok

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
ENV = {"TPLINEAR_TEST_SEED": str(SEED), "PYTHONPATH": TESTS}


@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_sequence_parallel_layers(nproc):
    assert_world_ok(nproc, """
        import tp_checks, seq_checks as c
        tp_checks.init()
        c.check_sp_layers()
        c.check_frozen()
    """, env=ENV, timeout=240)


@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_vocab_parallel_embedding_and_cross_entropy(nproc):
    assert_world_ok(nproc, """
        import tp_checks, seq_checks as c
        tp_checks.init()
        c.check_embeddings()
        c.check_cross_entropies()
    """, env=ENV, timeout=240)


@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_decoder_with_sequence_parallelism_equals_without(nproc):
    """The 2-block decoder (embedding -> blocks -> head -> loss): sequence-parallel with the vocab-parallel
    loss, plain tensor-parallel, and with the logits gathered, all equal the float64 reference."""
    assert_world_ok(nproc, """
        import tp_checks, seq_checks as c
        tp_checks.init()
        c.check_decoder(seq_len=7)
        c.check_decoder(seq_len=2)
    """, env=ENV, timeout=240)


@pytest.mark.parametrize("nproc", [2, 3])
def test_sequence_parallel_bad_input(nproc):
    assert_world_ok(nproc, """
        import tp_checks, seq_checks as c
        tp_checks.init(timeout=20)
        c.check_sp_bad_input()
    """, env=ENV, timeout=120)


@pytest.mark.parametrize("nproc", [2, 3])
def test_reduce_scatter_v(nproc):
    """dist.reduce_scatter_v with uneven and even counts and every op, against NumPy."""
    assert_world_ok(nproc, """
        import numpy as np
        import tplinear.distributed as dist
        import tp_checks
        r, p = tp_checks.init()
        for counts in ([3 + k for k in range(p)], [4] * p, [0] * (p - 1) + [5]):
            for dtype in ("float32", "float64", "int32", "int64"):
                every = [(np.arange(sum(counts)) * (k + 1) % 7 - 3).astype(dtype) for k in range(p)]
                for op, fn in (("sum", np.sum), ("max", np.max), ("min", np.min)):
                    out = np.empty(counts[r], dtype)
                    dist.reduce_scatter_v(out, every[r], counts, op=op)
                    lo = sum(counts[:r])
                    assert np.array_equal(out, fn(np.stack(every), axis=0)[lo:lo + counts[r]]), (counts, dtype, op)
        try:
            dist.reduce_scatter_v(np.empty(2, np.float32), np.zeros(5, np.float32), [2] * p)
            raise AssertionError("a wrong input size was accepted")
        except ValueError as exc:
            assert "sum of counts" in str(exc)
    """, env=ENV, timeout=120)


def test_decoder_example_learns_and_agrees_at_1_2_3_ranks(tmp_path):
    curves = {}
    for nproc, flag in ((1, []), (2, []), (3, []), (2, ["--no-sequence-parallel"])):
        out = tmp_path / f"losses{nproc}{len(flag)}.json"
        cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(nproc),
               os.path.join(ROOT, "examples", "decoder_sp.py"), "--steps", "5", "--seq", "13", "--vocab", "101",
               "--dtype", "float64", "--losses", str(out)] + flag
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        curves[(nproc, bool(flag))] = json.loads(out.read_text())["losses"]
    base = curves[(1, False)]
    assert base[-1] < base[0] * 0.9, base
    for key, curve in curves.items():
        np.testing.assert_allclose(curve, base, rtol=1e-10, err_msg=str(key))


# ------------------------------------------------------------------------------------------- torch's semantics

CASES = [  # (shape, vocab, ignore_index, label_smoothing, reduction, scale)
    ((6,), 11, -100, 0.0, "mean", 1.0), ((4, 3), 11, -100, 0.1, "mean", 3.0), ((5,), 7, 2, 0.3, "sum", 2.0),
    ((5,), 7, -100, 1.0, "none", 2.0), ((3, 2), 13, -100, 0.05, "none", 10.0), ((8,), 5, -100, 0.0, "mean", 1e4),
]


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("case", CASES)
def test_cross_entropy_reference_and_tplinear_equal_torch(case, rng):
    """tplinear's loss (world of one, float64 and float32) and the NumPy reference the multi-rank tests use
    both equal torch.nn.functional.cross_entropy and its autograd gradient."""
    torch = _torch()
    import tplinear as tp
    import seq_checks

    shape, vocab, ignore, smoothing, reduction, scale = case
    logits = rng.standard_normal(shape + (vocab,)) * scale
    targets = rng.integers(0, vocab, shape)
    targets.flat[1] = ignore if ignore >= 0 else -100
    x = torch.tensor(logits.reshape(-1, vocab), requires_grad=True)
    want = torch.nn.functional.cross_entropy(x, torch.tensor(targets.reshape(-1)), ignore_index=ignore,
                                             label_smoothing=smoothing, reduction=reduction)
    want.sum().backward()
    want_loss = want.detach().numpy().reshape(shape) if reduction == "none" else want.item()
    want_grad = x.grad.numpy().reshape(logits.shape)
    ref_loss, ref_grad = seq_checks.cross_entropy_ref(logits, targets, ignore, smoothing, reduction)
    np.testing.assert_allclose(ref_loss, want_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ref_grad, want_grad, rtol=1e-10, atol=1e-14)
    for dtype, tol in (("float64", 1e-12), ("float32", 2e-6)):
        loss, grad = tp.vocab_parallel_cross_entropy(logits.astype(dtype), targets, ignore_index=ignore,
                                                     label_smoothing=smoothing, reduction=reduction)
        np.testing.assert_allclose(loss, want_loss, rtol=tol, atol=tol)
        np.testing.assert_allclose(grad, want_grad, rtol=tol * 10, atol=tol)


def test_cross_entropy_all_ignored_is_nan_like_torch():
    torch = _torch()
    import tplinear as tp

    logits = np.random.default_rng(0).standard_normal((3, 4))
    for smoothing in (0.0, 0.1):
        x = torch.tensor(logits, requires_grad=True)
        want = torch.nn.functional.cross_entropy(x, torch.full((3,), -100), label_smoothing=smoothing)
        want.backward()
        loss, grad = tp.vocab_parallel_cross_entropy(logits, np.full(3, -100), label_smoothing=smoothing)
        assert np.isnan(want.item()) and np.isnan(loss)
        np.testing.assert_array_equal(x.grad.numpy(), grad)  # torch's gradient of a loss over no target: zeros
