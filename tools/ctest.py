"""Builds and runs the C tests (tests/c/test_*.c) against the C core, plain and under sanitizers.

    python tools/ctest.py [plain|asan] [test_name ...]

Each flavour compiles the core's sources once into tests/c/build/<flavour>/ (rebuilt when a source
or header is newer), links every test program, and runs it. Exit status 0 when every test passes
with no sanitizer report. Used by tests/test_c_core.py, so `python -m pytest` runs it too.
"""
import concurrent.futures
import glob
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import buildcfg  # noqa: E402

ROOT = buildcfg.ROOT
FLAVOURS = {
    "plain": {"cflags": ["-O2", "-g"], "ldflags": [], "env": {}},
    "asan": {
        "cflags": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                   "-fno-sanitize-recover=undefined"],
        "ldflags": ["-fsanitize=address,undefined"],
        "env": {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
                "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
    },
}
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


def _newest(paths):
    return max((os.path.getmtime(p) for p in paths), default=0.0)


def _run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def build(flavour):
    """Compiles the core for a flavour and links each test; returns the test binaries."""
    cfg = buildcfg.config(link_blas=True, with_cuda=False)
    spec = FLAVOURS[flavour]
    out = os.path.join(ROOT, "tests", "c", "build", flavour)
    os.makedirs(out, exist_ok=True)
    base = [f for f in cfg["cflags"] if not f.startswith("-O")] + spec["cflags"]
    incs = ["-I" + os.path.join(ROOT, i) if not os.path.isabs(i) else "-I" + i for i in cfg["include_dirs"]]
    incs.append("-I" + os.path.join(ROOT, "tests", "c"))
    macros = ["-D%s=%s" % m for m in cfg["define_macros"]]
    headers = glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
    headers += glob.glob(os.path.join(ROOT, "tests", "c", "*.h"))
    stamp = _newest(headers)

    def compile_one(src):
        obj = os.path.join(out, src.replace("/", "_").replace(".c", ".o"))
        path = os.path.join(ROOT, src)
        if not os.path.exists(obj) or os.path.getmtime(obj) < max(stamp, os.path.getmtime(path)):
            _run(["cc", *base, *incs, *macros, "-c", path, "-o", obj])
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, cfg["sources"]))
    libs = ["-L" + d for d in cfg["library_dirs"]] + ["-l" + l for l in cfg["libraries"]]
    libs += ["-Wl,-rpath," + d for d in cfg["runtime_library_dirs"]] + cfg["ldflags"] + ["-lm"]
    binaries = []
    for test in sorted(glob.glob(os.path.join(ROOT, "tests", "c", "test_*.c"))):
        exe = os.path.join(out, os.path.basename(test)[:-2])
        _run(["cc", *base, *incs, *macros, test, *objs, "-o", exe, *spec["ldflags"], *libs])
        binaries.append(exe)
    return binaries


def run(flavour, names=None, timeout=300):
    """Builds and runs; returns a list of (name, ok, output)."""
    results = []
    env = dict(os.environ, **FLAVOURS[flavour]["env"], OMP_NUM_THREADS="1")
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
