"""The layout of csrc/: the include floors include/ < core/ < device/ < gemm/ | comm/ < layers/ <
python/, calls that follow the same floors, no folder outside them, and no backend named outside
comm/registry.c and its own file, checked by tools/check_layout.py on the tree and, to show the check can
fail, on copies with one violation each and on a tiny tree of its own."""
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
                                  "a build-flavour folder", "group.c names a backend", "group.c calls gemm"])
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
    elif case == "group.c calls gemm":
        _append(csrc / "comm" / "group.c", "void tp_probe_threads(void)\n{\n    (void)tp_get_num_threads();\n}\n")
        want = "calls tp_get_num_threads() of gemm/, a folder beside its own (comm/)"
    else:
        _append(csrc / "comm" / "group.c", 'static const char *b = "shm";\n')
        want = 'comm/group.c: names the backend "shm"'
    errors = check_layout.check(str(csrc))
    assert any(want in e for e in errors), errors


def test_a_call_between_floors_is_reported(tmp_path):
    """Every file includes tplinear.h, which declares the public functions of every floor, so only the calls
    show that comm/ uses gemm/ or core/ uses layers/: a tiny tree with one call of each kind."""
    files = {
        "include/tplinear.h": "int tp_gemm_fn(int);\nint tp_layers_fn(void);\nint tp_core_fn(void);\n",
        "core/c.c": '#include "tplinear.h"\nint tp_core_fn(void)\n{\n    return tp_layers_fn(); /* up */\n}\n',
        "gemm/g.c": '#include "tplinear.h"\nint tp_gemm_fn(int n)\n{\n    return n + tp_core_fn();\n}\n',
        "comm/m.c": ('#include "tplinear.h"\n/* tp_gemm_fn(1) in a comment is no call */\n'
                     'static int helper(int n,\n                  int m)\n{\n    return n + m;\n}\n\n'
                     'int tp_comm_fn(void)\n{\n    const char *s = "tp_gemm_fn(2)";\n'
                     '    return helper(s[0], tp_gemm_fn(3));\n}\n'),
        "comm/registry.c": 'const tp_backend tp_x_backend = {\n    .name = "x",\n};\n',
        "layers/l.c": ('#include "tplinear.h"\nstatic int tp_core_fn2(void) { return 0; }\n'
                       'int tp_layers_fn(void)\n{\n    return tp_gemm_fn(tp_comm_fn()) + tp_core_fn2();\n}\n'),
    }
    for name, text in files.items():
        path = tmp_path / "csrc" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    errors = check_layout.check(str(tmp_path / "csrc"))
    assert errors == [
        "comm/m.c:12: calls tp_gemm_fn() of gemm/, a folder beside its own (comm/)",
        "core/c.c:4: calls tp_layers_fn() of layers/, a folder above its own (core/)",
    ], errors


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
