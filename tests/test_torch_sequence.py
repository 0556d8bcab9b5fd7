"""tplinear.torch's sequence and vocabulary parallelism at world sizes 1-4, against unsharded
float64 torch references (bfloat16 / float16: per-element bounds from the dtype, torch_seq_checks.check_sp_half
and check_vocab_half) (tests/torch_seq_checks.py runs inside each rank): the sequence-parallel modules
and mappings, the vocab-parallel embedding and cross-entropy with autograd, a decoder with both, and
parallelize's embedding_rowwise style on a transformers model."""
import os

import pytest

from conftest import SEED

from tplinear.testing import assert_world_ok

torch = pytest.importorskip("torch", reason="tplinear.torch needs the torch extra: pip install '.[torch]'")

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"TPLINEAR_TEST_SEED": str(SEED), "PYTHONPATH": TESTS}


@pytest.mark.parametrize("nproc", [1, 2, 3])  # 4 ranks: the loss-curve test; CI time (2 cores)
def test_torch_sequence_parallel_modules_and_mappings(nproc):
    assert_world_ok(nproc, """
        import torch
        import torch_checks, torch_seq_checks as c
        torch_checks.init()
        p = torch_checks.dist.get_world_size()
        for dtype in (torch.float32, torch.float64):
            for seq_len in (7, 2 * p + 1, max(p - 1, 1)):
                for rest in ((), (2,)):
                    for training, (i, o) in ((True, (10, 13)), (False, (70, 130))):
                        c.check_sp_modules(dtype, seq_len, rest, i, o, training, overlap=seq_len == 7)
        for dtype in (torch.bfloat16, torch.float16):  # on the CPU (issue 27 item 3)
            c.check_sp_half(dtype, 7, 10, 13, overlap=True)
            c.check_sp_half(dtype, max(p - 1, 1), 70, 130, overlap=False)
        c.check_mappings()
    """, env=ENV, timeout=300)


@pytest.mark.parametrize("nproc", [1, 2, 3])  # 4 ranks: the loss-curve test; CI time (2 cores)
def test_torch_vocab_parallel_embedding_and_cross_entropy(nproc):
    assert_world_ok(nproc, """
        import torch
        import torch_checks, torch_seq_checks as c
        torch_checks.init()
        for dtype in (torch.float32, torch.float64):
            for training, vocab in ((True, 37), (False, 130)):
                for sp in (False, True):
                    c.check_embedding(dtype, training, vocab, sp, padding_idx=None if sp else 3)
            for smoothing in (0.0, 0.1):
                for reduction in ("mean", "sum", "none"):
                    c.check_cross_entropy(dtype, 37, smoothing, reduction)
        for dtype in (torch.bfloat16, torch.float16):  # on the CPU (issue 27 item 3)
            c.check_vocab_half(dtype)
    """, env=ENV, timeout=300)


@pytest.mark.parametrize("nproc", [1, 2, 3])  # 4 ranks: the loss-curve test; CI time (2 cores)
def test_torch_decoder_and_parallelize_embedding(nproc):
    pytest.importorskip("transformers", reason="parallelize's test model comes from transformers")
    assert_world_ok(nproc, """
        import torch_checks, torch_seq_checks as c
        torch_checks.init()
        c.check_decoder(seq_len=7)
        c.check_decoder(seq_len=2)
        c.check_parallelize_embedding("llama")
    """, env=ENV, timeout=300)
