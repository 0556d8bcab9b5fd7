"""Runs the C unit tests of the core (tests/c/test_*.c), plain and under AddressSanitizer +
UndefinedBehaviorSanitizer, through tools/ctest.py."""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.mark.parametrize("flavour", ["plain", "asan"])
def test_c_unit_tests(flavour):
    import ctest

    results = ctest.run(flavour)
    assert results, "no C tests were found"
    failed = [f"--- {name} ({flavour})\n{output}" for name, ok, output in results if not ok]
    assert not failed, "\n".join(failed)


def test_shard_binding_matches_numpy_slicing():
    """_C.shard(full, dim, flat_ranges, nblocks, rank, out) writes exactly the rank's pieces, concatenated in
    block order, for every rank of packed uneven partitions, into C- and Fortran-ordered outputs."""
    import numpy as np

    from tplinear import _C

    rng = np.random.default_rng(0)
    for p in (1, 2, 3, 4):
        for blocks, dim, shape in (([130], 1, (5, 130)), ([24, 8, 8], 0, (40, 3)), ([7, 5], 2, (2, 3, 12))):
            full = rng.standard_normal(shape)
            flat = _C.partition(blocks, p, 64)
            nb = len(blocks)
            for r in range(p):
                mine = flat[r * nb:(r + 1) * nb]
                want = np.concatenate([np.take(full, range(o, o + s), axis=dim) for o, s in mine], axis=dim)
                for order in ("C", "F"):
                    out = np.zeros(want.shape, order=order)
                    _C.shard(full, dim, flat, nb, r, out)
                    assert np.array_equal(out, want), (p, blocks, r, order)
    full = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="rank 2"):
        _C.shard(full, 1, [(0, 3), (3, 3)], 1, 2, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="partition says 3"):
        _C.shard(full, 1, [(0, 3), (3, 3)], 1, 0, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="multiple of nblocks"):
        _C.shard(full, 1, [(0, 3), (3, 3)], 4, 0, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="float64"):
        _C.shard(full, 1, [(0, 3), (3, 3)], 1, 0, np.zeros((4, 3), np.float64))
    with pytest.raises(TypeError):
        _C.shard(full, 1, [(0, 3), (3, 3)], 1, 0, "not an array")
