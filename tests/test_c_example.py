"""The C API example (examples/c/row_forward.c): built by its documented command and run as a world of
one and of two ranks through the launcher; each rank checks itself against the full layer."""
import os
import shutil
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "c")

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                                reason="needs make and a C compiler")


def test_c_example_row_forward(tmp_path):
    binary = str(tmp_path / "row_forward")
    build = subprocess.run(["make", "-C", EXAMPLE, f"PYTHON={sys.executable}", f"BIN={binary}", binary],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    one = subprocess.run([binary], capture_output=True, text=True, timeout=60, env=dict(os.environ, WORLD_SIZE="1"))
    assert one.returncode == 0 and "rank 0 of 1" in one.stdout, one.stdout + one.stderr
    two = subprocess.run([sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", "2", "--no-python",
                          binary], capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "rank 0 of 2" in two.stdout and "rank 1 of 2" in two.stdout
