"""Soak, opt-in: TPLINEAR_SOAK=<seconds> runs random collectives (every kind, dtype and op, sizes
from empty to several chunks, on the world and on subgroups made and destroyed along the way) at 2 ranks
for that long, each checked bit-exact against NumPy, and asserts that resident memory and open file
descriptors stay flat (sampled after a warm-up tenth of the run, and at the end). The ranks run with a fixed
glibc mmap threshold (MALLOC_MMAP_THRESHOLD_), so that the large NumPy buffers the test itself makes and
frees go back to the system and the check measures tplinear rather than glibc's heap growth (with the
default, adaptive threshold the private RSS of this test climbs by ~30 MB in 30 s, and stays flat with it).

    TPLINEAR_SOAK=120 python -m pytest -q -s tests/reliability/test_soak.py
"""
import os

import pytest

from tplinear.testing import assert_world_ok

SOAK = float(os.environ.get("TPLINEAR_SOAK", "0") or 0)

pytestmark = [pytest.mark.skipif(SOAK <= 0, reason="opt-in: set TPLINEAR_SOAK=<seconds>"),
              pytest.mark.timeout(int(SOAK) + 180)]

SCRIPT = """
import os, sys, time
import numpy as np
import tplinear.distributed as dist
from fuzz_ops import data, reduce_ref      # the fuzz cases' exact data and NumPy references

SOAK = float(os.environ["TPLINEAR_SOAK"])
dist.init_process_group(timeout=60)
r, p = dist.get_rank(), dist.get_world_size()
rng = np.random.default_rng(1234)          # the same stream on every rank: the same calls
DT = [np.float32, np.float64, np.int32, np.int64]
OPS = ["sum", "avg", "max", "min"]

def usage():
    # (private resident bytes, resident shared-memory bytes, open descriptors)
    kb = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                kb[line.split(":")[0]] = int(line.split()[1]) * 1024
    return kb["RssAnon"], kb["RssShmem"], len(os.listdir("/proc/self/fd"))

t0 = time.monotonic()
start = None
it = 0
sub = None
kinds = {}
while True:
    if it % 50 == 0:       # the ranks agree on when to stop (and on the warm-up sample)
        flag = np.array([time.monotonic() - t0 >= SOAK, start is None and time.monotonic() - t0 >= SOAK / 10],
                        np.int32)
        dist.all_reduce(flag, op="max")
        if flag[0]:
            break
        if flag[1]:
            start = usage()
    if it % 97 == 0:       # subgroups come and go
        if sub is not None:
            dist.destroy_process_group(sub)
        sub = dist.new_group([1, 0] if rng.integers(2) else [0, 1])
    grp = sub if rng.integers(3) == 0 else None
    gr = [1, 0] if grp is not None and grp.ranks == [1, 0] else [0, 1]
    me = gr.index(r)
    kind = rng.choice(["all_reduce", "all_gather", "all_gather_v", "reduce_scatter", "broadcast", "barrier"])
    dt = DT[rng.integers(4)]
    n = int(rng.choice([0, 1, 7, 1000, 70000, 600000]))
    seed = int(rng.integers(2 ** 31))
    op = OPS[rng.integers(4)]
    kinds[kind] = kinds.get(kind, 0) + 1
    if kind == "all_reduce":
        x = data(seed, r, n, dt); dist.all_reduce(x, op=op, group=grp)
        want = reduce_ref(np.stack([data(seed, k, n, dt) for k in gr]), op, dt, p)
    elif kind == "all_gather":
        x = np.empty(p * n, dt); dist.all_gather_into_tensor(x, data(seed, r, n, dt), group=grp)
        want = np.concatenate([data(seed, k, n, dt) for k in gr])
    elif kind == "all_gather_v":
        counts = [int(c) for c in rng.integers(0, n + 1, p)]
        x = np.empty(sum(counts), dt); dist.all_gather_v(x, data(seed, r, counts[me], dt), counts, group=grp)
        want = np.concatenate([data(seed, k, counts[i], dt) for i, k in enumerate(gr)])
    elif kind == "reduce_scatter":
        x = np.empty(n, dt); dist.reduce_scatter_tensor(x, data(seed, r, p * n, dt), op=op, group=grp)
        want = reduce_ref(np.stack([data(seed, k, p * n, dt) for k in gr]), op, dt, p)[me * n:(me + 1) * n]
    elif kind == "broadcast":
        root = int(rng.integers(p))
        x = data(seed, r, n, dt); dist.broadcast(x, group=grp, group_src=root)
        want = data(seed, gr[root], n, dt)
    else:
        dist.barrier(group=grp); x = want = np.zeros(0)
    if not (x.dtype == want.dtype and np.array_equal(x, want)):
        sys.exit("iteration %d: %s of %d %s (%s) differs from NumPy" % (it, kind, n, np.dtype(dt).name, op))
    it += 1
end = usage()
print("SOAK rank %d: %d collectives in %.0f s %s; private RSS %.1f -> %.1f MB, shared-memory RSS %.1f -> %.1f MB, "
      "fds %d -> %d" % (r, it, time.monotonic() - t0, {str(k): v for k, v in sorted(kinds.items())},
                        start[0] / 2**20, end[0] / 2**20, start[1] / 2**20, end[1] / 2**20, start[2], end[2]),
      flush=True)
assert end[2] == start[2], ("fds", start, end)
assert end[0] - start[0] < 16 * 2**20, ("private rss", start, end)
# the mapped segments (the world's and at most one subgroup's, 2 ranks x 8 MB slots each) bound the rest
assert end[1] <= 2 * (2 * 8 + 1) * 2**20, ("shared rss", start, end)
"""


def test_soak():
    env = {"TPLINEAR_SOAK": SOAK, "MALLOC_MMAP_THRESHOLD_": 65536,
           "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    res = assert_world_ok(2, SCRIPT, timeout=SOAK + 150, env=env)
    for r in (0, 1):
        line = [l for l in res.rank_lines(r) if l.startswith("SOAK")]
        assert line, res.output
        print(line[0])
