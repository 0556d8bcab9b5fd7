"""The layout of csrc/ (issue 9): the include floors include/ < core/ < device/ < gemm/ | comm/ < layers/ <
python/, no folder outside them, and no backend named outside comm/registry.c and its own file, checked by
tools/check_layout.py on the tree and, to show the check can fail, on copies with one violation each."""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import check_layout  # noqa: E402


def test_csrc_keeps_its_floors():
    assert check_layout.check(os.path.join(ROOT, "csrc")) == []


def _copy(tmp_path):
    dst = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), dst, ignore=shutil.ignore_patterns("*.o", "*.so"))
    return dst


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


@pytest.mark.parametrize("case", ["comm includes gemm", "device includes comm", "core includes device",
                                  "a build-flavour folder", "group.c names a backend"])
def test_a_violation_is_reported(tmp_path, case):
    csrc = _copy(tmp_path)
    if case == "comm includes gemm":
        _append(csrc / "comm" / "group.c", '#include "../gemm/gemm.h"\n')
        want = "comm/group.c: includes \"../gemm/gemm.h\" from gemm/, a folder beside its own"
    elif case == "device includes comm":
        _append(csrc / "device" / "device.h", '#include "../comm/backend.h"\n')
        want = "device/device.h: includes \"../comm/backend.h\" from comm/, a folder above its own"
    elif case == "core includes device":
        _append(csrc / "core" / "tensor.c", '#include "../device/device.h"\n')
        want = "from device/, a folder above its own (core/)"
    elif case == "a build-flavour folder":
        os.makedirs(csrc / "cuda")
        want = "csrc/cuda/ is not a floor"
    else:
        _append(csrc / "comm" / "group.c", 'static const char *b = "shm";\n')
        want = 'comm/group.c: names the backend "shm"'
    errors = check_layout.check(str(csrc))
    assert any(want in e for e in errors), errors
