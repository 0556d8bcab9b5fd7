"""The type stubs (python/tplinear/_C.pyi, with py.typed) name exactly what the extension has, and ship
with the package."""
import ast
import os
import subprocess
import sys

import pytest

import tplinear
from tplinear import _C

PKG = os.path.dirname(tplinear.__file__)
STUB = os.path.join(PKG, "_C.pyi")


def _stub_tree():
    with open(STUB) as f:
        return ast.parse(f.read(), STUB)


def _names(body):
    """The names a stub body defines: functions, classes, annotated or assigned names."""
    out = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return out


def _public(names):
    return {n for n in names if not n.startswith("_")}


def test_stub_names_every_public_name_of_the_extension_and_nothing_else():
    stub = _public(_names(_stub_tree().body))
    module = _public(n for n in dir(_C))
    assert module - stub == set(), f"in tplinear._C but not in _C.pyi: {sorted(module - stub)}"
    assert stub - module == set(), f"in _C.pyi but not in tplinear._C: {sorted(stub - module)}"


def test_stub_classes_match_the_types():
    classes = {node.name: node for node in _stub_tree().body if isinstance(node, ast.ClassDef)}
    for name, cls in (("DeviceArray", _C.DeviceArray), ("_BFloat16DType", type(_C.bfloat16))):
        stub = _names(classes[name].body)
        own = {n for n in vars(cls) if not (n.startswith("__") and n.endswith("__"))}
        protocols = {"__dlpack__", "__dlpack_device__", "__array__", "__cuda_array_interface__"} & set(vars(cls))
        assert own | protocols <= stub, f"{name}: not in the stub: {sorted((own | protocols) - stub)}"
        missing = {n for n in stub if not hasattr(cls, n)}
        assert not missing, f"{name}: in the stub but not on the type: {sorted(missing)}"


def test_type_information_is_installed_with_the_package():
    assert os.path.isfile(STUB) and os.path.isfile(os.path.join(PKG, "py.typed"))


def test_stubtest_finds_the_stub_consistent_with_the_module(tmp_path):
    """mypy's stubtest compares the stub with the imported module: names, kinds, positional-only
    parameters of the slots, final classes. An installed package is found through py.typed (PEP 561);
    a source tree (editable install) through MYPYPATH."""
    pytest.importorskip("mypy.stubtest")
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    root = os.path.dirname(PKG)
    if os.path.basename(root) not in ("site-packages", "dist-packages"):
        env["MYPYPATH"] = root
    proc = subprocess.run([sys.executable, "-m", "mypy.stubtest", "tplinear._C"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
