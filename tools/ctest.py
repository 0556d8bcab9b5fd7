"""Builds and runs the C tests (tests/c/test_*.c) against the C core, plain and under sanitizers.

    python tools/ctest.py [plain|asan] [test_name ...]

Each flavour builds the library build/c/<flavour>/libtplinear.a (tools/buildcfg.py: objects rebuilt when
a source or header is newer), links every test program against it, and runs it. Exit status 0 when every test passes
with no sanitizer report. Used by tests/test_c_core.py, so `python -m pytest` runs it too.
"""
import glob
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import buildcfg  # noqa: E402

ROOT = buildcfg.ROOT
ENV = {
    "plain": {},
    "asan": {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
             "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
}
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


def build(flavour):
    """Builds the flavour's libtplinear.a (tools/buildcfg.py) and links each test against it; returns the
    test binaries (in build/c/<flavour>/)."""
    lib, cfg = buildcfg.build_library(flavour)
    spec = buildcfg.FLAVOURS[flavour]
    out = os.path.dirname(lib)
    base = [f for f in cfg["cflags"] if not f.startswith("-O")] + spec["cflags"]
    incs = ["-I" + (i if os.path.isabs(i) else os.path.join(ROOT, i)) for i in cfg["include_dirs"]]
    incs.append("-I" + os.path.join(ROOT, "tests", "c"))
    macros = ["-D%s=%s" % m for m in cfg["define_macros"]]
    binaries = []
    for test in sorted(glob.glob(os.path.join(ROOT, "tests", "c", "test_*.c"))):
        exe = os.path.join(out, os.path.basename(test)[:-2])
        buildcfg.run_command(["cc", *base, *incs, *macros, test, lib, "-o", exe, *spec["ldflags"], *buildcfg.link_words(cfg)])
        binaries.append(exe)
    return binaries


def run(flavour, names=None, timeout=300):
    """Builds and runs; returns a list of (name, ok, output)."""
    results = []
    env = dict(os.environ, **ENV[flavour], OMP_NUM_THREADS="1")
    for exe in build(flavour):
        name = os.path.basename(exe)
        if names and name not in names:
            continue
        try:
            proc = subprocess.run([exe], capture_output=True, text=True, timeout=timeout, env=env)
            output = proc.stdout + proc.stderr
            ok = proc.returncode == 0 and not any(mark in output for mark in SANITIZER_MARKS)
        except subprocess.TimeoutExpired as exc:
            output, ok = f"timed out after {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}", False
        results.append((name, ok, output))
    return results


def main(argv):
    flavour = argv[0] if argv else "plain"
    failed = 0
    for name, ok, output in run(flavour, argv[1:] or None):
        print(f"{'ok  ' if ok else 'FAIL'} {flavour} {name}")
        if not ok:
            failed += 1
            print(output)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
