"""Checks that csrc/ keeps its floors (run by tests/test_layout.py):

    include/  <  core/  <  device/  <  gemm/ and comm/ side by side  <  layers/  <  python/

- every `#include "..."` of a file names a header of its own folder or of a folder on a lower floor
  (gemm/ and comm/ share a floor and include neither each other);
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


def check(csrc):
    errors = []
    for folder in sorted(os.listdir(csrc)):
        if os.path.isdir(os.path.join(csrc, folder)) and folder not in FLOORS:
            errors.append(f"csrc/{folder}/ is not a floor of the library ({', '.join(FLOORS)})")
    texts = {}
    for folder, src in _sources(csrc):
        if folder not in FLOORS:
            continue
        with open(src) as f:
            text = texts[src] = f.read()
        for target in INCLUDE.findall(text):
            got = _resolve(csrc, src, target)
            if got is None:
                errors.append(f"{os.path.relpath(src, csrc)}: #include \"{target}\" is not a header of csrc/")
            elif got != folder and FLOORS[got] >= FLOORS[folder]:
                where = "beside" if FLOORS[got] == FLOORS[folder] else "above"
                errors.append(f"{os.path.relpath(src, csrc)}: includes \"{target}\" from {got}/, a folder {where} "
                              f"its own ({folder}/)")
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
