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


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_extension_exports_exactly_the_public_api():
    """The library is compiled with -fvisibility=hidden: the extension exports its init function and the
    functions tplinear.h marks TP_API, nothing of the library's internals."""
    import re
    import subprocess

    from tplinear import _C

    header = open(os.path.join(ROOT, "csrc", "include", "tplinear.h")).read()
    public = set(re.findall(r"^TP_API [^(]*?\b(tp_\w+)\(", header, re.M))
    declared = set(re.findall(r"^(?:TP_API )?(?:const )?\w+ \**(tp_\w+)\(", header, re.M))
    assert declared == public, f"public functions without TP_API: {sorted(declared - public)}"
    out = subprocess.run(["nm", "-D", "--defined-only", _C.__file__], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[-2:-1] in (["T"], ["D"], ["B"], ["R"])}
    assert "PyInit__C" in exported
    assert exported - {"PyInit__C"} == public, (sorted(exported - public), sorted(public - exported))
