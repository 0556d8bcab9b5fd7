"""Checks that csrc/ keeps its floors (run by tests/test_layout.py):

    include/  <  core/  <  device/  <  gemm/ and comm/ side by side  <  layers/  <  python/

- every `#include "..."` of a file names a header of its own folder or of a folder on a lower floor
  (gemm/ and comm/ share a floor and include neither each other);
- every call of a file goes to a function defined in its own folder or on a lower floor: a call into a
  function (not `static`) that a file of a higher floor, or of the sibling folder on the same floor (gemm/
  vs comm/), defines is a violation. Includes alone cannot show this: every file includes tplinear.h, which
  declares the public functions of every floor;
- csrc/ holds no other folder (no build-flavour folder such as the former csrc/cuda/);
- no backend is named outside comm/registry.c and the backend's own file: the names in the tables
  (`.name = "shm"`) appear as string literals nowhere else in csrc/ (comments aside).

    python tools/check_layout.py [csrc folder]     prints each violation; exit status 1 if any
"""
import os
import re
import sys

FLOORS = {"include": 0, "core": 1, "device": 2, "gemm": 3, "comm": 3, "layers": 4, "python": 5}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
# Comments, string and character literals (blanked before looking for definitions and calls).
NOT_CODE = re.compile(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
# A function definition: at the start of a line, a declarator ending in name(parameters) and a body's brace.
DEFINITION = re.compile(r"^(?!(?:if|else|for|while|switch|do|return|case|out)\b)[A-Za-z_][^;{}()=#\n]*?\b([A-Za-z_]\w*)"
                        r"\s*\(([^;{}()]|\([^;{}()]*\))*\)\s*\{", re.M)
CALL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
BACKEND_NAME = re.compile(r'^const tp_backend tp_\w+_backend = \{\s*\.name = "([^"]+)"', re.M)


def _sources(csrc):
    for folder in sorted(os.listdir(csrc)):
        path = os.path.join(csrc, folder)
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name.endswith((".c", ".h")):
                    yield folder, os.path.join(path, name)


def _resolve(csrc, src, target):
    """The folder (under csrc) of the header an include names, or None outside csrc."""
    for base in (os.path.dirname(src), os.path.join(csrc, "include")):
        path = os.path.normpath(os.path.join(base, target))
        if os.path.isfile(path):
            rel = os.path.relpath(path, csrc).split(os.sep)
            return rel[0] if len(rel) > 1 and not rel[0].startswith("..") else None
    return None


def _code(text):
    """text with comments and literals blanked, newlines kept (so offsets give the same line numbers)."""
    return NOT_CODE.sub(lambda m: "\n" * m.group(0).count("\n") if m.group(0)[0] == "/" else '""', text)


def _calls(codes):
    """The calls between floors: for each file, each call of a function that a file of a higher floor or of
    the sibling folder defines (not static), as messages."""
    defined = {}  # function name -> folders whose files define it (not static)
    local = {}    # file -> every function name the file itself defines
    bodies = {}   # file -> (start, end) of each function body
    for (folder, src), code in codes.items():
        local[src], bodies[src] = set(), []
        for m in DEFINITION.finditer(code):
            local[src].add(m.group(1))
            if not re.search(r"\bstatic\b", m.group(0)[:m.start(1) - m.start()]):
                defined.setdefault(m.group(1), set()).add(folder)
            depth, end = 0, m.end() - 1
            while end < len(code):
                depth += {"{": 1, "}": -1}.get(code[end], 0)
                if depth == 0:
                    break
                end += 1
            bodies[src].append((m.end(), end))
    errors = []
    for (folder, src), code in codes.items():
        for start, end in bodies[src]:
            errors += _calls_in(code, start, end, folder, src, local[src], defined)
    return errors


def _calls_in(code, start, end, folder, src, local, defined):
    """The violations among the calls of one body (code[start:end]) of file src in folder."""
    errors = []
    for m in CALL.finditer(code, start, end):
        name = m.group(1)
        if name in local:
            continue
        for got in sorted(defined.get(name, ())):
            if got != folder and FLOORS[got] >= FLOORS[folder]:
                where = "beside" if FLOORS[got] == FLOORS[folder] else "above"
                line = code.count("\n", 0, m.start()) + 1
                errors.append(f"{src}:{line}: calls {name}() of {got}/, a folder {where} its own ({folder}/)")
    return errors


def check(csrc):
    errors = []
    for folder in sorted(os.listdir(csrc)):
        if os.path.isdir(os.path.join(csrc, folder)) and folder not in FLOORS:
            errors.append(f"csrc/{folder}/ is not a floor of the library ({', '.join(FLOORS)})")
    texts, codes = {}, {}
    for folder, src in _sources(csrc):
        if folder not in FLOORS:
            continue
        with open(src) as f:
            text = texts[src] = f.read()
        codes[(folder, os.path.relpath(src, csrc))] = _code(text)
        for target in INCLUDE.findall(text):
            got = _resolve(csrc, src, target)
            if got is None:
                errors.append(f"{os.path.relpath(src, csrc)}: #include \"{target}\" is not a header of csrc/")
            elif got != folder and FLOORS[got] >= FLOORS[folder]:
                where = "beside" if FLOORS[got] == FLOORS[folder] else "above"
                errors.append(f"{os.path.relpath(src, csrc)}: includes \"{target}\" from {got}/, a folder {where} "
                              f"its own ({folder}/)")
    errors += _calls(codes)
    owners = {}
    for src, text in texts.items():
        for name in BACKEND_NAME.findall(text):
            owners[name] = src
    registry = os.path.join(csrc, "comm", "registry.c")
    for name, owner in sorted(owners.items()):
        for src, text in texts.items():
            if src not in (owner, registry) and f'"{name}"' in COMMENT.sub("", text):
                errors.append(f"{os.path.relpath(src, csrc)}: names the backend \"{name}\" (only "
                              f"{os.path.relpath(owner, csrc)} and comm/registry.c may)")
    if not owners:
        errors.append("no backend table found (const tp_backend tp_<name>_backend = { .name = ... })")
    return errors


def main(argv):
    csrc = argv[0] if argv else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    errors = check(csrc)
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
