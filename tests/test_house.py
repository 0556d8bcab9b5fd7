"""House rules of the source tree, read from the files (nothing is imported or run):

- a name with a leading underscore is its module's own: no module of python/tplinear uses another
  module's (``from .x import _y``, ``x._y``); names the package shares between its modules go without
  the underscore, in the module that owns them (a private module such as ``_layout`` or ``_ckpt`` is
  then the package's internal API, importable from anywhere inside the package that holds it);
- the NumPy front end (tplinear's layers) and the torch front end (tplinear.torch) are siblings over the
  shared modules: neither imports the other;
- the modules of python/tplinear import each other without circles;
- no project file cites a document the project does not ship (the old design notes beside the code,
  the folder shared between checkouts): users have README.md and docs/.
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "python")
PKG = "tplinear"
EXTENSION = "_C"  # the extension module: its name is its real name, and every module may import it


def _modules():
    """{dotted name: path} of every module of the package."""
    out = {}
    for folder, _, files in os.walk(os.path.join(SRC, PKG)):
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, f[:-3]), SRC).split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name != EXTENSION


def _package_of(module):
    """The package a module lives in (a package's __init__: the package itself)."""
    path = MODULES[module]
    return module if os.path.basename(path) == "__init__.py" else module.rpartition(".")[0]


def _may_import_module(importer, target):
    """A private module (tplinear._ckpt, tplinear.torch._ops) belongs to the package that holds it: any
    module inside that package may import it, no module outside it."""
    holder = target.rpartition(".")[0]
    return not _private(target.rpartition(".")[2]) or importer == holder or importer.startswith(holder + ".")


class _Uses(ast.NodeVisitor):
    """Every use in one module of another tplinear module's private names, and every tplinear module it
    imports."""

    def __init__(self, module):
        self.module, self.package = module, _package_of(module)
        self.aliases = {}  # local name -> the tplinear module it stands for
        self.imports = set()
        self.problems = []

    def _absolute(self, node):
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def _import_of_module(self, node, target):
        if target == self.module:
            return
        self.imports.add(target)
        if not _may_import_module(self.module, target):
            self.problems.append(f"line {node.lineno}: imports {target}, a private module of another package")

    def visit_Import(self, node):
        for a in node.names:
            if a.name == PKG or a.name.startswith(PKG + "."):
                self._import_of_module(node, a.name)
                if a.asname:
                    self.aliases[a.asname] = a.name
                else:
                    self.aliases[PKG] = PKG

    def visit_ImportFrom(self, node):
        source = self._absolute(node)
        if source != PKG and not source.startswith(PKG + "."):
            return
        for a in node.names:
            full = f"{source}.{a.name}"
            if full in MODULES:  # a submodule
                self._import_of_module(node, full)
                self.aliases[a.asname or a.name] = full
                continue
            if source in MODULES:
                self._import_of_module(node, source)
            if _private(a.name) and source != self.module:
                self.problems.append(f"line {node.lineno}: from {source} import {a.name}")

    def visit_Attribute(self, node):
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in self.aliases:
            target = self.aliases[value.id]
            for attr in reversed(chain):
                if f"{target}.{attr}" in MODULES:
                    target = f"{target}.{attr}"
                    if not _may_import_module(self.module, target):
                        self.problems.append(f"line {node.lineno}: uses {target}, a private module of another "
                                             "package")
                    continue
                if _private(attr) and target != self.module:
                    self.problems.append(f"line {node.lineno}: {value.id}.{attr} ({target}'s own name)")
                break
            return  # the chain is checked whole
        self.generic_visit(node)


def _uses(module):
    with open(MODULES[module]) as f:
        tree = ast.parse(f.read(), MODULES[module])
    uses = _Uses(module)
    uses.visit(tree)
    return uses


USES = {m: _uses(m) for m in MODULES}


def test_the_rule_sees_what_it_forbids():
    """The checker itself: each kind of use it must refuse, and what it must let through."""
    MODULES.setdefault("tplinear._probe", "")  # a private module of tplinear, for the cases below
    try:
        def problems(module, text):
            uses = _Uses(module)
            uses.visit(ast.parse(text))
            return uses.problems

        assert problems("tplinear.vocab", "from .layers import _shape")
        assert problems("tplinear.vocab", "from tplinear.layers import _shape")
        assert problems("tplinear.vocab", "from . import partition\npartition._count(1, 'n')")
        assert problems("tplinear.torch.vocab", "from .. import distributed as dist\ndist._group(None)")
        assert problems("tplinear.torch.vocab", "import tplinear.partition as p\np._count(1, 'n')")
        assert problems("tplinear.torch.vocab", "import tplinear\ntplinear.partition._count(1, 'n')")
        assert problems("tplinear.vocab", "from .torch import _ops")  # tplinear.torch's private module
        assert problems("tplinear.layers", "from .torch._ops import arr")
        assert not problems("tplinear.torch.vocab", "from .. import _probe\n_probe.helper()")
        assert not problems("tplinear.torch.vocab", "from . import _ops\n_ops.arr(None)")
        assert not problems("tplinear.vocab", "from . import _C\n_C.partition([1], 1, 1)")
        assert not problems("tplinear.vocab", "from .layers import shape_of as _shape_of")  # a private alias
        assert not problems("tplinear.vocab", "from . import layers\nlayers.__name__")  # dunder names
        assert not problems("tplinear.vocab", "from . import layers\nx = layers.TPLayer\nx._kind")  # an object's
    finally:
        MODULES.pop("tplinear._probe", None)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_uses_another_modules_private_names(module):
    problems = USES[module].problems
    assert not problems, (f"{MODULES[module]} uses names that other modules keep to themselves: {problems}; give "
                          "the name a public spelling in the module that owns it (a private module's public names "
                          "are the package's internal API)")


def _front_end(module):
    if module == f"{PKG}.torch" or module.startswith(f"{PKG}.torch."):
        return "torch"
    return "numpy" if module in NUMPY_FRONT_END else None


NUMPY_FRONT_END = {f"{PKG}.layers", f"{PKG}.vocab", f"{PKG}.checkpoint", f"{PKG}.autotp"}


def test_the_numpy_and_torch_front_ends_are_siblings():
    """tplinear.torch builds on the shared modules (_layout, _ckpt, distributed, partition, ...), never on
    the NumPy layers' modules, and the NumPy layers never on tplinear.torch."""
    crossings = [(m, t) for m, uses in USES.items() for t in uses.imports
                 if _front_end(m) and _front_end(t) and _front_end(m) != _front_end(t)]
    assert not crossings, f"one front end imports the other: {crossings}"


def test_the_modules_import_each_other_without_circles():
    # a module importing its own package (for a sibling, or the package's names) is not a circle
    graph = {m: {t for t in uses.imports if t in MODULES and not m.startswith(t + ".")} for m, uses in USES.items()}
    circles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, f"import circles among tplinear's modules: {[' -> '.join(c) for c in circles]}"


# ---------------------------------------------------------------------------------------------- citations

PROJECT = ["README.md", "docs", "csrc", "python", "tests", "tools", "benchmarks", "examples"]
TEXT = (".py", ".pyi", ".c", ".h", ".cu", ".cuh", ".md", ".txt", ".toml", ".cfg", ".sh", ".json", "Makefile")
# spelt so that this file does not match itself: the design-notes file, the shared folder beside a checkout
UNSHIPPED = re.compile("DESIGN" + r"\.md|\.\./" + "shared" + r"\b")


def _project_files():
    for entry in PROJECT:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__" and not d.endswith(".egg-info")]
            for f in files:
                if f.endswith(TEXT):
                    yield os.path.join(folder, f)


def test_no_project_file_cites_a_document_the_project_does_not_ship():
    """Users get README.md and docs/; a citation of the design notes or of the shared folder points at
    nothing they have. (csrc/ is checked too.)"""
    hits = []
    for path in _project_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if UNSHIPPED.search(line):
                    hits.append(f"{os.path.relpath(path, ROOT)}:{n}")
    assert not hits, f"cite a file of docs/ (or say it) instead: {hits}"
