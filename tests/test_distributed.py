"""Process groups and collectives: multi-rank worlds through the launcher
(tplinear.testing), failure cases through direct spawning (tests/comm_spawn.py)."""
import glob
import inspect
import os
import textwrap

import numpy as np
import pytest

import tplinear
import tplinear.distributed as dist
from comm_spawn import assert_spawned_ok, spawn_world
from reliability.fuzz_ops import reduce_ref
from conftest import SHM_ALGOS

try:  # the launcher-based helpers; direct spawning stands in where they are missing
    from tplinear.testing import assert_world_ok as _assert_world_ok
except ImportError:  # pragma: no cover
    _assert_world_ok = None


def world_ok(nproc, code, timeout=120, env=None):
    code = textwrap.dedent(code)
    if _assert_world_ok is not None:
        if env:
            return _assert_world_ok(nproc, code, timeout=timeout, env=env)
        return _assert_world_ok(nproc, code, timeout=timeout)
    return assert_spawned_ok(nproc, code, timeout=timeout, env=env)


PRELUDE = """
import os, signal, sys, time
import numpy as np
import tplinear
import tplinear.distributed as dist
"""

# the reference reduction is the fuzz tests' one (tests/reliability/fuzz_ops.py), pasted into the script
COLLECTIVES = PRELUDE + inspect.getsource(reduce_ref) + """
dist.init_process_group(timeout=60)
r, p = dist.get_rank(), dist.get_world_size()
assert dist.get_world_size() == int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
BIG = int(os.environ["TEST_BIG"])
DTYPES = [np.float32, np.float64, np.int32, np.int64]
COUNTS = [0, 1, 7, 513, BIG]

def val(k, n, dt, salt=0):
    x = (np.arange(n, dtype=np.int64) * 7 + 13 * k + salt) % 101 - 50
    return x.astype(dt)

def ref(stack, op, dt):
    return reduce_ref(stack, op, dt, p)

def same(a, b, what):
    ok = np.array_equal(a, b) if a.dtype.kind == "i" else np.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert ok and a.dtype == b.dtype and a.shape == b.shape, (what, a[:8], b[:8])

for dt in DTYPES:
    for n in COUNTS:
        stack = np.stack([val(k, n, dt) for k in range(p)])
        for op in ["sum", "avg", "max", "min"]:
            a = val(r, n, dt)
            dist.all_reduce(a, op=op)
            same(a, ref(stack, op, dt), ("all_reduce", dt, n, op))
        # 2-D input, op as a ReduceOp
        a = val(r, 2 * n, dt).reshape(2, n)
        dist.all_reduce(a, op=dist.ReduceOp.MAX)
        same(a, np.stack([val(k, 2 * n, dt) for k in range(p)]).max(0).reshape(2, n), ("all_reduce 2d", dt, n))
        # all-gather
        out = np.full(p * n, -7, dt)
        dist.all_gather_into_tensor(out, val(r, n, dt))
        same(out, stack.reshape(-1), ("all_gather", dt, n))
        # in place: the input is this rank's slice of the output
        out = np.zeros(p * n, dt)
        out[r * n:(r + 1) * n] = val(r, n, dt)
        dist.all_gather_into_tensor(out, out[r * n:(r + 1) * n])
        same(out, stack.reshape(-1), ("all_gather in place", dt, n))
        # variable counts
        counts = [(n + 3 * k) % (BIG + 1) for k in range(p)]
        out = np.full(sum(counts), -7, dt)
        dist.all_gather_v(out, val(r, counts[r], dt), counts)
        same(out, np.concatenate([val(k, counts[k], dt) for k in range(p)]), ("all_gather_v", dt, n))
        # reduce-scatter
        full = np.stack([val(k, p * n, dt, 5) for k in range(p)])
        for op in ["sum", "avg", "max", "min"]:
            out = np.full(n, -7, dt)
            dist.reduce_scatter_tensor(out, val(r, p * n, dt, 5), op=op)
            same(out, ref(full, op, dt)[r * n:(r + 1) * n], ("reduce_scatter", dt, n, op))
        # broadcast from every root
        for root in range(p):
            a = val(r, n, dt, 11)
            dist.broadcast(a, src=root)
            same(a, val(root, n, dt, 11), ("broadcast", dt, n, root))
        dist.barrier()
print("rank", r, "of", p, "ok", dist.get_backend(), flush=True)
dist.destroy_process_group()
"""




@pytest.mark.parametrize("algos", list(SHM_ALGOS))
@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_collectives_small_chunks(nproc, algos):
    # 16 KB slots: 8 KB chunks, so 513 int64/float64 and BIG take several chunks and both all-reduce paths
    if nproc == 1 and algos != "by-size":
        pytest.skip("a world of one has no shm backend")
    env = dict(SHM_ALGOS[algos], TEST_BIG="3001", TPLINEAR_SHM_SLOT_KB="16")
    res = world_ok(nproc, COLLECTIVES, env=env)
    for r in range(nproc):
        assert f"rank {r} of {nproc} ok" in res.output


BITWISE = PRELUDE + """
# float32 sums: every rank gets the same bits, those of adding the ranks' inputs in rank order
dist.init_process_group(timeout=60)
r, p = dist.get_rank(), dist.get_world_size()
for n in [1, 1000, 4099, 70_001, 1_000_003]:
    xs = [np.random.default_rng([n, k]).standard_normal(n).astype(np.float32) for k in range(p)]
    want = xs[0].copy()
    for k in range(1, p):
        want += xs[k]
    a = xs[r].copy()
    dist.all_reduce(a)
    assert np.array_equal(a, want), ("all_reduce", n, np.abs(a - want).max())
    seen = np.empty(p * n, np.float32)
    dist.all_gather_into_tensor(seen, a)
    assert np.array_equal(seen, np.tile(want, p)), ("all_gather", n)
    full = [np.random.default_rng([n, k, 1]).standard_normal(p * n).astype(np.float32) for k in range(p)]
    wfull = full[0].copy()
    for k in range(1, p):
        wfull += full[k]
    out = np.empty(n, np.float32)
    dist.reduce_scatter_tensor(out, full[r])
    assert np.array_equal(out, wfull[r * n:(r + 1) * n]), ("reduce_scatter", n)
print("bitwise ok", r, flush=True)
"""


@pytest.mark.parametrize("algos", list(SHM_ALGOS))
@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_sums_bitwise_in_rank_order(nproc, algos):
    res = world_ok(nproc, BITWISE, env=SHM_ALGOS[algos])
    assert res.output.count("bitwise ok") == nproc, res.output


@pytest.mark.parametrize("cma", ["0", "1"])
def test_single_copy_is_logged(cma):
    """The log says whether single-copy collectives run and, when off, why."""
    res = world_ok(2, PRELUDE + "dist.init_process_group(timeout=30)\ndist.barrier()\n",
                   env={"TPLINEAR_DEBUG": "INFO", "TPLINEAR_SHM_CMA": cma})
    if cma == "0":
        assert "single copy off" in res.output, res.output
    else:  # this machine either allows process_vm_readv between the ranks or says why not
        assert "single copy (process_vm_readv) " in res.output or "single copy off: " in res.output, res.output


@pytest.mark.parametrize("nproc", [2, 3])
def test_collectives_default_chunks(nproc):
    # larger than the default 1 MB chunk for every dtype
    code = PRELUDE + """
dist.init_process_group(timeout=60)
r, p = dist.get_rank(), dist.get_world_size()
n = 300_001
for dt in [np.float32, np.float64, np.int32, np.int64]:
    a = (np.arange(n) % 1000 + r).astype(dt)
    dist.all_reduce(a)
    assert np.array_equal(a, (p * (np.arange(n) % 1000) + p * (p - 1) // 2).astype(dt)), dt
    out = np.empty(p * n, dt)
    dist.all_gather_into_tensor(out, (np.arange(n) + r).astype(dt))
    assert np.array_equal(out, np.concatenate([(np.arange(n) + k).astype(dt) for k in range(p)]))
    b = (np.arange(n) * (r == 1)).astype(dt)
    dist.broadcast(b, src=1)
    assert np.array_equal(b, np.arange(n).astype(dt))
    out = np.empty(n, dt)
    dist.reduce_scatter_tensor(out, np.ones(p * n, dt))
    assert np.array_equal(out, np.full(n, p, dt))
print("big ok", r, flush=True)
"""
    world_ok(nproc, code)


def test_subgroups_2x2():
    code = PRELUDE + """
dist.init_process_group(timeout=60)
r = dist.get_rank()
tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
g31 = dist.new_group([3, 1])
tp, dp, other = tp_groups[r // 2], dp_groups[r % 2], tp_groups[1 - r // 2]
assert (tp.rank, tp.size, tp.ranks) == (r % 2, 2, [r // 2 * 2, r // 2 * 2 + 1]), tp
assert (dp.rank, dp.size, dp.ranks) == (r // 2, 2, [r % 2, r % 2 + 2]), dp
assert other.rank == -1 and not other.is_member() and dist.get_rank(other) == -1
try:
    dist.all_reduce(np.ones(3), group=other)
    raise SystemExit("a non-member's collective did not raise")
except ValueError as e:
    assert "not a member" in str(e), e
for i in range(3):  # interleave the groups
    a = np.full(5, float(r)); dist.all_reduce(a, group=tp)
    assert np.all(a == sum(tp.ranks)), a
    b = np.full(5, float(r)); dist.all_reduce(b, group=dp)
    assert np.all(b == sum(dp.ranks)), b
    c = np.full(5, float(r)); dist.all_reduce(c)
    assert np.all(c == 6), c
if r in (1, 3):
    assert g31.rank == (0 if r == 3 else 1) and g31.ranks == [3, 1]
    x = np.array([r, r], np.int64); dist.broadcast(x, src=3, group=g31)
    assert list(x) == [3, 3], x
    out = np.empty(2, np.int64); dist.all_gather_into_tensor(out, np.array([r], np.int64), group=g31)
    assert list(out) == [3, 1], out
# the world can go first: subgroups keep what they share with it
dist.destroy_process_group()
for i in range(2):
    a = np.full(4, float(r)); dist.all_reduce(a, group=tp)
    assert np.all(a == sum(tp.ranks))
    dist.barrier(group=dp)
for g in tp_groups + dp_groups + [g31]:
    dist.destroy_process_group(g)
print("subgroups ok", r, flush=True)
"""
    world_ok(4, code)


def test_broadcast_roots_are_global_ranks_as_in_torch():
    """torch.distributed.broadcast(tensor, src=None, group=None, group_src=None): src is a global rank,
    group_src a rank within the group, exactly one of them; a src outside the group raises. On the
    strided groups [1, 3] and [0, 2] and the reordered group [3, 1]."""
    code = PRELUDE + """
dist.init_process_group(timeout=30)
r = dist.get_rank()
odd, even, g31 = dist.new_group([1, 3]), dist.new_group([0, 2]), dist.new_group([3, 1])
mine = odd if r % 2 else even
for g in (mine, g31) if r in (1, 3) else (mine,):
    for gr, src in enumerate(g.ranks):
        assert dist.get_group_rank(g, src) == gr and dist.get_global_rank(g, gr) == src
        for kw in ({"src": src}, {"group_src": gr}):
            x = np.full(3, 10.0 * r)
            dist.broadcast(x, group=g, **kw)
            assert np.all(x == 10.0 * src), (g.ranks, kw, x)
        x = np.full(2, float(r)); dist.broadcast(x, src, g)  # positional, as torch's broadcast(t, src, group)
        assert np.all(x == src)
    outsider = [q for q in range(4) if q not in g.ranks][0]
    for kw, words in (({"src": outsider}, f"src={outsider} is a global rank that is not a member"),
                      ({"group_src": 2}, "group rank 2 is out of range"),
                      ({}, "exactly one of src="), ({"src": g.ranks[0], "group_src": 0}, "exactly one")):
        try:
            dist.broadcast(np.ones(2), group=g, **kw)
            raise SystemExit(f"broadcast {kw} on {g.ranks} did not raise")
        except ValueError as e:
            assert words in str(e), (kw, str(e))
    try:
        dist.get_group_rank(g, outsider)
        raise SystemExit("get_group_rank of an outsider did not raise")
    except ValueError as e:
        assert "not a member" in str(e)
    dist.barrier(group=g)
print("broadcast roots ok", r, flush=True)
"""
    res = world_ok(4, code)
    for r in range(4):
        assert f"broadcast roots ok {r}" in res.output


MISMATCH = PRELUDE + """
dist.init_process_group(timeout=30)
r, p = dist.get_rank(), dist.get_world_size()
last = r == p - 1
f32 = lambda n: np.ones(n, np.float32)
cases = [
    ("all_reduce vs broadcast", lambda g: dist.broadcast(f32(1024), 0, group=g) if last else dist.all_reduce(f32(1024), group=g), "broadcast of 1024 float32"),
    ("sizes", lambda g: dist.all_reduce(f32(1000 if last else 1024), group=g), "all_reduce of 1000 float32"),
    ("ops", lambda g: dist.all_reduce(f32(64), op="max" if last else "sum", group=g), "(max)"),
    ("dtypes", lambda g: dist.all_reduce(np.ones(512, np.float64) if last else f32(1024), group=g), "float64"),
    ("barrier vs all_gather", lambda g: dist.barrier(group=g) if last else dist.all_gather_into_tensor(f32(4 * p), f32(4), group=g), "barrier"),
    ("large, multi-chunk", lambda g: dist.reduce_scatter_tensor(f32(1 << 20), f32(p << 20), group=g) if last else dist.all_reduce(f32(3 << 20), group=g), "reduce_scatter"),
    ("one-shot vs single-copy sizes", lambda g: dist.all_reduce(f32(1024 if last else 1 << 16), group=g), "all_reduce of 1024 float32"),
    ("broadcast roots", lambda g: dist.broadcast(f32(10), 1 if last else 0, group=g), "from root 1"),
    ("gather counts", lambda g: dist.all_gather_v(f32(2 * p), f32(3 if last else 2), ([2] * (p - 2) + [1, 3]) if last else [2] * p, group=g), "counts hash"),
]
for name, call, expect in cases:
    g = dist.new_group(list(range(p)))
    dist.barrier(group=g)
    try:
        call(g)
        raise SystemExit(f"{name}: no error on rank {r}")
    except tplinear.CommError as e:
        msg = str(e)
        assert "collective mismatch" in msg and f"rank {p - 1} called" in msg and expect in msg, (name, msg)
    try:  # the group is unusable afterwards, at once
        dist.barrier(group=g)
        raise SystemExit(f"{name}: group still usable on rank {r}")
    except tplinear.CommError as e:
        assert "unusable" in str(e), e
    dist.destroy_process_group(g)
    print("mismatch", name, "ok", flush=True)
dist.barrier()  # the world is unaffected
print("mismatch ok", r, flush=True)
"""


@pytest.mark.parametrize("nproc", [2, 3])
def test_mismatch_fails_on_every_rank(nproc):
    res = world_ok(nproc, MISMATCH, timeout=120)
    for r in range(nproc):
        assert f"mismatch ok {r}" in res.output


@pytest.mark.parametrize("victim,count", [(1, 1000), (0, 1000), (1, 1 << 20)])
def test_killed_rank(victim, count):
    code = PRELUDE + f"""
dist.init_process_group(timeout=10)
r = dist.get_rank()
a = np.ones({count})
for i in range(5):
    dist.all_reduce(a)
if r == {victim}:
    os.kill(os.getpid(), signal.SIGKILL)
t0 = time.monotonic()
try:
    while True:
        dist.all_reduce(a)
except tplinear.CommError as e:
    print("CAUGHT after %.1f s:" % (time.monotonic() - t0), e, flush=True)
"""
    res = spawn_world(3, textwrap.dedent(code), timeout=60)
    assert res.returncodes[victim] == -9, res.output
    for r in range(3):
        if r != victim:
            assert res.returncodes[r] == 0, res.output
            out = res.outputs[r]
            assert "CAUGHT" in out and f"rank {victim}" in out and "died" in out, res.output


def test_rank_that_never_joins():
    code = PRELUDE + """
if int(os.environ["RANK"]) == 2:
    sys.exit(0)
try:
    dist.init_process_group(timeout=3)
    print("NO ERROR", flush=True)
except tplinear.CommError as e:
    print("CAUGHT", e, flush=True)
"""
    res = spawn_world(3, code, timeout=60)
    for r in (0, 1):
        out = res.outputs[r]
        assert "CAUGHT" in out and "waiting for rank 2 of 3 to join" in out, res.output


def test_rank0_gone_is_an_error_not_a_hang():
    code = PRELUDE + """
dist.init_process_group(timeout=20)
if dist.get_rank() == 0:
    os._exit(3)
time.sleep(0.5)
t0 = time.monotonic()
try:
    g = dist.new_group([0, 1])   # needs rank 0's store
    print("NO ERROR", flush=True)
except tplinear.CommError as e:
    print("CAUGHT after %.1f s:" % (time.monotonic() - t0), e, flush=True)
"""
    res = spawn_world(2, code, timeout=60)
    assert "CAUGHT" in res.outputs[1] and "rank 0" in res.outputs[1], res.output


ABORT = PRELUDE + """
dist.init_process_group(timeout=30)
r = dist.get_rank()
dist.barrier()
if r == 0:
    time.sleep(0.3)
    dist.abort()
try:
    dist.barrier()
    print("NO ERROR", flush=True)
except tplinear.CommError as e:
    assert "aborted by rank 0" in str(e), e
    print("CAUGHT", e, flush=True)
"""


def test_abort_wakes_peers():
    res = world_ok(2, ABORT, timeout=60)
    assert res.output.count("CAUGHT") == 2, res.output


def test_openmpi_variables():
    code = PRELUDE + """
# as under mpirun: OpenMPI's variables instead of torchrun's (MASTER_ADDR/PORT still given)
env = os.environ
for a, b in [("RANK", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
             ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"), ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")]:
    env[b] = env.pop(a)
dist.init_process_group(timeout=30)
assert dist.get_world_size() == 2 and dist.get_rank() == int(env["OMPI_COMM_WORLD_RANK"])
a = np.ones(3, np.int32); dist.all_reduce(a)
assert list(a) == [2, 2, 2], a
print("ompi ok", flush=True)
"""
    res = world_ok(2, code)
    assert res.output.count("ompi ok") == 2, res.output


def test_debug_logging():
    code = PRELUDE + """
dist.init_process_group(timeout=30)
dist.all_reduce(np.ones(10))
"""
    res = world_ok(2, code, env={"TPLINEAR_DEBUG": "TRACE"})
    assert "[tplinear rank 1]" in res.output and "backend shm" in res.output, res.output
    assert "segment" in res.output and "all_reduce #0 of 80 bytes" in res.output, res.output


# ---------------------------------------------------------------- in this process (a world of one)


def test_world_of_one(world_of_one):
    assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (0, 1, "self")
    a = np.arange(5.0)
    dist.all_reduce(a, op="avg")
    assert list(a) == [0, 1, 2, 3, 4]
    out = np.empty(5)
    dist.all_gather_into_tensor(out, a)
    assert np.array_equal(out, a)
    g = dist.new_group([0])
    dist.all_reduce(a, group=g)
    dist.broadcast(a, 0, group=g)
    dist.barrier(group=g)
    with pytest.raises(RuntimeError):
        dist.init_process_group()


def test_argument_errors(world_of_one):
    with pytest.raises(TypeError):
        dist.all_reduce(np.ones(4, np.uint16))  # (float16 reduces on the host since issue 27)
    with pytest.raises(TypeError):
        dist.all_reduce(np.ones(4, np.int8))
    with pytest.raises(TypeError):
        dist.all_reduce([1.0, 2.0])
    with pytest.raises(ValueError, match="contiguous"):
        dist.all_reduce(np.ones((4, 4))[:, ::2])
    with pytest.raises(ValueError):
        dist.all_reduce(np.ones(3), op="prod")
    with pytest.raises(ValueError, match="elements"):
        dist.all_gather_into_tensor(np.empty(5), np.ones(3))
    with pytest.raises(TypeError, match="dtype"):
        dist.all_gather_into_tensor(np.empty(3, np.float32), np.ones(3))
    with pytest.raises(ValueError, match="elements"):
        dist.reduce_scatter_tensor(np.empty(2), np.ones(3))
    with pytest.raises(ValueError, match="src=1 is a global rank that is not a member"):
        dist.broadcast(np.ones(3), src=1)
    with pytest.raises(ValueError, match="rank"):
        dist.new_group([0, 0])
    with pytest.raises(ValueError):
        dist.new_group([5])
    with pytest.raises(TypeError):
        dist.all_reduce(np.ones(3), group="world")


def test_init_errors(monkeypatch, no_outer_world):
    if dist.is_initialized():
        dist.destroy_process_group()
    if "mpi" in dist.available_backends():  # a world of one needs no MPI launcher
        dist.init_process_group(backend="mpi")
        assert dist.get_backend() == "self"
        dist.destroy_process_group()
    else:
        with pytest.raises(NotImplementedError, match="apt-get install libopenmpi-dev"):
            dist.init_process_group(backend="mpi")
    with pytest.raises(ValueError):
        dist.init_process_group(backend="bogus")
    with pytest.raises(ValueError, match="MASTER_PORT"):
        dist.init_process_group(rank=0, world_size=2, timeout=2)
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist.init_process_group()
    assert not dist.is_initialized()


def test_zz_no_segments_left_behind():
    """Runs last in this file: no tplinear segment of an exited process is left in /dev/shm."""
    left = []
    for path in glob.glob("/dev/shm/tplinear-*"):
        try:
            pid = int(os.path.basename(path).split("-")[1])
        except (IndexError, ValueError):
            left.append(path)
            continue
        if not os.path.exists(f"/proc/{pid}"):
            left.append(path)
    assert not left, left


@pytest.mark.parametrize("nproc", [3])
def test_input_output_overlap_is_an_error_except_own_slot(nproc):
    """The one alias of an all-gather is the input as exactly this rank's slot of the output (of a
    reduce-scatter: the output as this rank's slot of the input); any other overlap raised nothing and gave
    a silently wrong result (issue 26.5). Own-slot aliases equal a float64 reference."""
    world_ok(nproc, PRELUDE + textwrap.dedent("""
    dist.init_process_group(timeout=60)
    r, p = dist.get_rank(), dist.get_world_size()
    n = 1000
    def refused(fn, what):
        try:
            fn()
        except ValueError as e:
            assert "overlaps" in str(e) and "slot" in str(e), (what, e)
            return
        raise AssertionError(f"{what}: no ValueError")
    full = np.arange(p * n, dtype=np.float64) * 0.5 - 7
    # all_gather: another rank's slot, a shifted window, the whole output as input
    out = np.zeros(p * n)
    other = (r + 1) % p
    refused(lambda: dist.all_gather_into_tensor(out, out[other * n:(other + 1) * n]), "another slot")
    refused(lambda: dist.all_gather_into_tensor(out, out[r * n + 1:(r + 1) * n + 1] if r < p - 1 else
                                                out[r * n - 1:(r + 1) * n - 1]), "shifted")
    refused(lambda: dist.all_gather_v(out, out[:n], [n] * p) if r else
            dist.all_gather_v(out, out[1:n + 1], [n] * p), "all_gather_v shifted")
    # the own slot: the documented in-place form
    out = np.zeros(p * n)
    out[r * n:(r + 1) * n] = full[r * n:(r + 1) * n]
    dist.all_gather_into_tensor(out, out[r * n:(r + 1) * n])
    assert np.array_equal(out, full), "in-place all_gather"
    counts = [n + k for k in range(p)]
    offs = np.concatenate([[0], np.cumsum(counts)])
    outv = np.zeros(offs[-1]); want = np.arange(offs[-1], dtype=np.float64)
    outv[offs[r]:offs[r + 1]] = want[offs[r]:offs[r + 1]]
    dist.all_gather_v(outv, outv[offs[r]:offs[r + 1]], counts)
    assert np.array_equal(outv, want), "in-place all_gather_v"
    # reduce_scatter: the output at another rank's block of the input, or straddling blocks
    inp = np.ones(p * n)
    refused(lambda: dist.reduce_scatter_tensor(inp[other * n:(other + 1) * n], inp), "reduce_scatter other block")
    refused(lambda: dist.reduce_scatter_v(inp[1:n + 1] if r == 0 else inp[:n], inp, [n] * p), "reduce_scatter_v")
    # own block in place: the float64 reference sum_k (k + 1) * full
    inp = full * (r + 1)
    dist.reduce_scatter_tensor(inp[r * n:(r + 1) * n], inp)
    assert np.allclose(inp[r * n:(r + 1) * n], full[r * n:(r + 1) * n] * sum(range(1, p + 1))), "in-place rs"
    dist.barrier()
    print("OK", r)
    """))


SIGNAL_WORLD = PRELUDE + """
import threading
from tplinear import CommError
dist.init_process_group(timeout=30)
r = dist.get_rank()
x = np.ones(4)
if r == 0:
    # a SIGTERM handler that returns: it runs during the wait, which goes on
    ran = []
    signal.signal(signal.SIGTERM, lambda *a: ran.append(time.monotonic()))
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()   # arrives during the barrier
    dist.barrier()                           # rank 1 comes 1 s late
    back = time.monotonic()
    assert ran and ran[0] < back - 0.5, "the SIGTERM handler did not run during the wait"
    # Ctrl-C while rank 1 never enters: KeyboardInterrupt here, promptly
    sent = []
    threading.Timer(0.3, lambda: (sent.append(time.monotonic()), os.kill(os.getpid(), signal.SIGINT))).start()
    try:
        dist.all_reduce(x)
        print("NO INTERRUPT", flush=True)
    except KeyboardInterrupt:
        print(f"INTERRUPTED after {1e3 * (time.monotonic() - sent[0]):.0f} ms", flush=True)
    try:
        dist.all_reduce(x)
        print("GROUP STILL USABLE", flush=True)
    except CommError as e:
        print(f"RANK0 AFTER {e}", flush=True)
else:
    time.sleep(1.0)
    dist.barrier()
    time.sleep(1.5)                          # never in the all-reduce while rank 0 is interrupted
    t = time.monotonic()
    try:  # under MPI rank 0's part may have left before the signal: then the next call fails
        dist.all_reduce(x)
        dist.all_reduce(x)
        print("NO ERROR", flush=True)
    except CommError as e:
        print(f"PEER ERROR after {1e3 * (time.monotonic() - t):.0f} ms: {e}", flush=True)
"""


@pytest.mark.parametrize("launcher", ["tplinear.run", "mpirun"])
def test_ctrl_c_in_a_collective_interrupts_and_fails_the_group(launcher, tmp_path):
    """Waits ran signal handlers only after the collective ended (issue 26.3): now a Python SIGTERM handler
    runs during a wait, and Ctrl-C raises KeyboardInterrupt in the waiting rank within ~0.2 s, fails its
    group, and the peer gets CommError naming the interrupted rank."""
    import re

    from tplinear.testing import launch, launcher_missing

    why = launcher_missing(launcher)
    if why:
        pytest.skip(why)
    path = tmp_path / "sig.py"
    path.write_text(SIGNAL_WORLD)
    res = launch(launcher, 2, [str(path)], timeout=90)
    out = res.output
    assert res.returncode == 0, out
    m = re.search(r"INTERRUPTED after (\d+) ms", out)
    assert m and int(m.group(1)) < 200, out
    print(f"{launcher}: Ctrl-C to KeyboardInterrupt {m.group(1)} ms")
    assert re.search(r"PEER ERROR after \d+ ms: .*rank 0 of the group \(global rank 0\) was interrupted by a signal", out), out
    assert "RANK0 AFTER" in out and "NO ERROR" not in out and "GROUP STILL USABLE" not in out, out
