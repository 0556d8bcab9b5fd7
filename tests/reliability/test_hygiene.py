"""Hygiene: worlds back to back and side by side leave no process, no shared-memory segment and
no file descriptor behind."""
import os
import textwrap

import pytest

from .relkit import alive, shm_files
from tplinear.testing import assert_world_ok

pytestmark = pytest.mark.timeout(180)

# What a process holds of tplinear: descriptors (sockets, memfds, pipes), threads, mapped segments.
HOLDINGS = """
import os
def holdings():
    fds = len(os.listdir("/proc/self/fd"))
    threads = len(os.listdir("/proc/self/task"))
    with open("/proc/self/maps") as f:
        segs = sum("memfd:tplinear" in line for line in f)
    return fds, threads, segs
"""


def test_fifty_worlds_back_to_back_in_one_process_pair():
    """50 init/destroy cycles on the same port and in the same processes (each a fresh world, with a
    subgroup and collectives): descriptors, threads and mappings come back to where they were."""
    res = assert_world_ok(2, HOLDINGS + textwrap.dedent("""
        import numpy as np
        import tplinear.distributed as dist
        before = None
        for i in range(50):
            dist.init_process_group(timeout=30)
            r = dist.get_rank()
            a = np.full(1000, float(r + i)); dist.all_reduce(a)
            assert a[0] == 1 + 2 * i, a[0]
            g = dist.new_group([1, 0])
            b = np.arange(4.0) * r; dist.broadcast(b, group=g, group_src=0)   # group rank 0 is world rank 1
            assert b[3] == 3.0
            assert holdings()[2] == 2     # the world's segment and the subgroup's are mapped (and only they)
            dist.destroy_process_group(g)
            dist.destroy_process_group()
            if i == 0:
                before = holdings()
        after = holdings()
        print("HOLDINGS", before, after, flush=True)
        assert after == before and after[2] == 0, (before, after)
    """), timeout=150)
    for r in (0, 1):
        assert "HOLDINGS" in res.rank_output(r), res.output


def _pids(res, nproc):
    return [int(res.rank_output(r).split("PID ")[1].split()[0]) for r in range(nproc)]


WORLD = """
    import os
    import numpy as np
    import tplinear as tp, tplinear.distributed as dist
    print("PID", os.getpid(), flush=True)
    dist.init_process_group(timeout=30)
    r, p = dist.get_rank(), dist.get_world_size()
    x = np.ones((4, 64), np.float32)
    col = tp.LinearLayer(tp.Linear(64, 32, seed=1), None)
    row = tp.LinearAllreduce(tp.Linear(32, 64, seed=2), None)
    y = row(col(x))
    ref = (x @ tp.Linear(64, 32, seed=1).weight.data.T + tp.Linear(64, 32, seed=1).bias.data) @ \\
        tp.Linear(32, 64, seed=2).weight.data.T + tp.Linear(32, 64, seed=2).bias.data
    assert np.allclose(y, ref, rtol=1e-4, atol=1e-4)
    for i in range(20):
        a = np.full(10000, float(r)); dist.all_reduce(a)
        assert a[0] == p * (p - 1) / 2
    dist.destroy_process_group()
"""


def test_worlds_back_to_back_leave_no_process_or_segment():
    before = shm_files()
    pids = []
    for i in range(4):
        res = assert_world_ok(2 + i % 2, WORLD, timeout=60)
        pids += _pids(res, 2 + i % 2)
    assert alive(pids) == []
    assert shm_files() - before == set()


def test_two_concurrent_worlds():
    """Two worlds at the same time on this host (each with its own port and token) run side by side and
    leave nothing behind."""
    import threading
    before = shm_files()
    results, errors = {}, []

    def one(k):
        try:
            results[k] = assert_world_ok(2, WORLD, timeout=90)
        except BaseException as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    pids = _pids(results[0], 2) + _pids(results[1], 2)
    assert alive(pids) == []
    assert shm_files() - before == set()
