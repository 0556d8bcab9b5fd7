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
