"""Security: a world is a closed club. A rank that cannot prove the world's token is refused with
a clear error on both sides, whatever the token's source (init's token=, TPLINEAR_TOKEN, the derivation for
plain torchrun/mpirun); worlds of other generations or jobs never mix; the shared segment is reachable by no
other process once the world is set up and appears nowhere in /dev/shm; the token is never logged. (The
segment header's proof, refused when it is another world's, is checked by tests/c/test_comm.c, which can
hand a rank a foreign segment directly.)"""
import os
import re
import time

import pytest

from .relkit import shm_files

pytestmark = pytest.mark.timeout(90)

JOIN = """
import os, sys, time
import numpy as np
import tplinear, tplinear.distributed as dist
rank = int(os.environ["RANK"])
def say(*a):
    print(*a, flush=True)
t0 = time.monotonic()
try:
    dist.init_process_group(timeout=float(os.environ.get("TMO", "2.5")), token=os.environ.get("INIT_TOKEN"))
    a = np.ones(8); dist.all_reduce(a)
    say("JOINED", a[0])
except tplinear.CommError as e:
    say("REFUSED %.2f" % (time.monotonic() - t0), e)
"""


@pytest.mark.parametrize("source", ["env", "init"])
@pytest.mark.parametrize("wrong", [0, 1], ids=["rank0-wrong", "rank1-wrong"])
def test_wrong_token_is_refused_on_both_sides(spawn, wrong, source):
    w = spawn(JOIN, 2)
    for r in (0, 1):
        tok = "intruder" if r == wrong else "the-world"
        if source == "env":
            w.start(r, token=tok)
        else:
            w.start(r, token=None, env={"INIT_TOKEN": tok})
    w.wait(30)
    out0, out1 = w.wait_line(0, "REFUSED|JOINED", 1), w.wait_line(1, "REFUSED|JOINED", 1)
    # the joining rank learns at once that the token differs; rank 0 says so in its timeout and its warning
    assert out1.startswith("REFUSED") and "token differs" in out1 and float(out1.split()[1]) < 2, w.all_output()
    assert out0.startswith("REFUSED") and "refused 1 connection" in out0 and "token differs" in out0, w.all_output()
    assert "store: refused a connection from 127.0.0.1:" in w.output(0), w.all_output()


def test_token_from_init_and_environment_agree(spawn):
    w = spawn(JOIN, 2)
    w.start(0, token=None, env={"INIT_TOKEN": "same-secret"})
    w.start(1, token="same-secret")
    w.wait(30)
    for r in (0, 1):
        assert "JOINED 2.0" in w.output(r), w.all_output()


@pytest.mark.parametrize("var", ["TORCHELASTIC_RUN_ID", "PMIX_NAMESPACE", "SLURM_JOB_ID"])
def test_derived_tokens_keep_jobs_apart(spawn, var):
    """Without TPLINEAR_TOKEN (plain torchrun / mpirun / srun), the token is derived from the job id: two jobs
    that meet on one port are refused, ranks of one job join."""
    w = spawn(JOIN, 2)
    w.start(0, token=None, env={var: "job-a"})
    w.start(1, token=None, env={var: "job-b"})
    w.wait(30)
    assert "token differs" in w.output(1) and "REFUSED" in w.output(0), w.all_output()
    w2 = spawn(JOIN, 2)
    w2.start(0, token=None, env={var: "job-a"})
    w2.start(1, token=None, env={var: "job-a"})
    w2.wait(30)
    assert "JOINED 2.0" in w2.output(0) and "JOINED 2.0" in w2.output(1), w2.all_output()


def documented_derivation(addr, port, size, job_id):
    """docs/security.md's formula, as the torchrun-store and MPI bootstrap paths must compute it."""
    import hashlib
    parts = ["tplinear-token-v1", str(os.geteuid()), addr, str(port), str(size), job_id]
    return hashlib.sha256(b"".join(p.encode() + b"\0" for p in parts)).hexdigest()


def test_derivation_is_the_documented_one(spawn):
    """A rank given the documented formula's value as TPLINEAR_TOKEN joins a rank that derives its token."""
    w = spawn(JOIN, 2)
    w.start(0, token=None, env={"TORCHELASTIC_RUN_ID": "job-x"})
    w.start(1, token=documented_derivation("127.0.0.1", w.port, 2, "job-x"))
    w.wait(30)
    assert "JOINED 2.0" in w.output(0) and "JOINED 2.0" in w.output(1), w.all_output()


# Rank 1 calls init_process_group once more than rank 0: its first init is a world of its own that fails
# (its own store's rank 1, on DEAD_PORT, which nobody serves), under whatever launcher started the ranks.
ONE_WORLD_AHEAD = """
import os
import tplinear, tplinear.distributed as dist
rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
if rank == 1:   # this process's world #1
    launcher = dict(os.environ)
    os.environ.update(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["DEAD_PORT"],
                      TORCHELASTIC_USE_AGENT_STORE="False")
    try:
        dist.init_process_group(timeout=0.5)
    except tplinear.CommError as e:
        print(f"FIRST {e}", flush=True)
    os.environ.clear()
    os.environ.update(launcher)
try:
    dist.init_process_group(timeout=float(os.environ.get("TMO", "4")))
    print(f"JOINED {rank}", flush=True)
except (tplinear.CommError, ValueError) as e:
    print(f"REFUSED {rank} {e}", flush=True)
"""


def test_other_generation_is_sent_away(spawn):
    """A rank that called init_process_group once more than rank 0 (here: one failed attempt) is not let into
    rank 0's world of another generation; it says why."""
    w = spawn(ONE_WORLD_AHEAD, 2, env={"DEAD_PORT": _dead_port()})
    w.start_all()
    w.wait(30)
    assert "FIRST" in w.output(1), w.all_output()
    line = w.wait_line(1, "REFUSED|JOINED", 1)
    assert "REFUSED" in line and "generation 1" in line and "generation 2" in line, w.all_output()
    assert "REFUSED" in w.output(0) and "waiting for rank 1 of 2 to join" in w.output(0), w.all_output()


def _dead_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_segment_is_unreachable_once_the_world_is_up(spawn):
    """The shm segment never appears in /dev/shm, and once every rank has mapped it no descriptor of it is
    left open anywhere, so no other process can open it (only the ranks' own mappings reach it)."""
    before = shm_files()
    w = spawn("""
import os, time
import numpy as np
import tplinear.distributed as dist
dist.init_process_group(timeout=20)
g = dist.new_group([0, 1])
a = np.ones(8); dist.all_reduce(a, group=g)
with open("/proc/self/maps") as f:
    n = sum("memfd:tplinear" in l for l in f)
print("UP", os.getpid(), n, flush=True)
time.sleep(20)
""", 2).start_all()
    for r in (0, 1):
        line = w.wait_line(r, "UP", 30)
        assert line.split()[2] == "2", line                  # the world's segment and the subgroup's
    for pid in w.pids:
        fd_dir = "/proc/%d/fd" % pid
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            assert "memfd:tplinear" not in target and "/dev/shm" not in target, (pid, fd, target)
    assert shm_files() - before == set()


def test_token_is_never_logged(spawn):
    w = spawn(JOIN, 2, env={"TPLINEAR_DEBUG": "TRACE"}, token="s3cr3t-t0ken-value-0123456789")
    w.start_all()
    w.wait(30)
    out = w.all_output()
    assert "JOINED 2.0" in out and "token from TPLINEAR_TOKEN" in out, out
    assert "s3cr3t-t0ken" not in out


# ---------------------------------------------------------------- torchrun's agent store (no auth of its own)

def _torch_proof(token, key, value):
    """docs/security.md: the proof a value in torchrun's store carries (HMAC-SHA-256 over the label, the
    namespaced key and the value)."""
    import hashlib
    import hmac
    return hmac.new(token.encode(), b"tplinear-torch-store-v1\0" + key.encode() + b"\0" + value,
                    hashlib.sha256).digest()


def test_torchrun_store_values_carry_the_token_proof(spawn, torch_store):
    """Under torchrun the ranks meet in the agent's store, which anyone reaching its port may read and write:
    every value tplinear stores there is the value followed by the documented proof of the world's token,
    under tplinear/<run id>/<restart>/<generation>/."""
    w = spawn(JOIN, 2, port=torch_store.port, env=torch_store.agent_env("run-p"), token="the-world")
    w.start_all()
    w.wait(30)
    assert "JOINED 2.0" in w.output(0) and "JOINED 2.0" in w.output(1), w.all_output()
    # the records of the rendezvous, the host exchange, the segment's path and the barriers of the setup
    keys = ["join/0", "join/1", "g0/host/0", "g0/host/1", "g0/shm/path", "g0/shm/mapped/1", "g0/done/1"]
    for key in ("tplinear/run-p/0/1/" + k for k in keys):
        raw = torch_store.get(key)
        assert len(raw) > 32 and raw[-32:] == _torch_proof("the-world", key, raw[:-32]), key
    assert b"/proc/" in torch_store.get("tplinear/run-p/0/1/g0/shm/path")   # readable: torch's store is not secret


@pytest.mark.parametrize("wrong", [0, 1], ids=["rank0-wrong", "rank1-wrong"])
def test_torchrun_store_wrong_token_is_refused_on_both_sides(spawn, torch_store, wrong):
    w = spawn(JOIN, 2, port=torch_store.port, env=torch_store.agent_env("run-w"))
    for r in (0, 1):
        w.start(r, token="intruder" if r == wrong else "the-world")
    w.wait(30)
    for r in (0, 1):
        line = w.wait_line(r, "REFUSED|JOINED", 1)
        assert line.startswith("REFUSED") and "does not prove this world's token" in line, w.all_output()
        assert float(line.split()[1]) < 2, line   # at once, not at the timeout


@pytest.mark.parametrize("how", ["forged", "other-run", "other-restart"])
def test_torchrun_store_forged_or_replayed_join_is_refused(spawn, torch_store, how):
    """A process that is not a rank writes rank 1's join record into the store while rank 0 waits for it:
    garbage, or a record rank 1 of another run or restart proved with the same token (a replay). Rank 0
    refuses it at once instead of starting a world with a rank that is not there."""
    if how != "forged":   # a real world whose record is replayed
        env = torch_store.agent_env("run-a" if how == "other-run" else "run-b", restart=0)
        w0 = spawn(JOIN, 2, port=torch_store.port, env=env, token="the-world")
        w0.start_all()
        w0.wait(30)
        assert "JOINED 2.0" in w0.output(1), w0.all_output()
        record = torch_store.get("tplinear/%s/0/1/join/1" % env["TORCHELASTIC_RUN_ID"])
    else:
        record = b"\1\0\0\0" + bytes(32)
    env = torch_store.agent_env("run-b", restart=1 if how == "other-restart" else 0)
    w = spawn(JOIN, 2, port=torch_store.port, env=dict(env, TMO=20), token="the-world")
    w.start(0)
    target = "tplinear/run-b/%d/1/join/0" % env["TORCHELASTIC_RESTART_COUNT"]
    deadline = time.monotonic() + 20
    while not torch_store.has(target) and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    torch_store.set(target[:-1] + "1", record)
    line = w.wait_line(0, "REFUSED|JOINED", 10)
    assert line.startswith("REFUSED") and "join/1' does not prove this world's token" in line, w.all_output()
    assert time.monotonic() - t0 < 5, line


def test_torchrun_store_generations_keep_worlds_of_one_process_apart(spawn, torch_store):
    """Each init of the same processes is a world of its own in the agent's store: its keys live under the next
    generation, so a rank that re-initialises early never reads the previous world's records, and ranks that
    called init a different number of times are told so at the timeout."""
    w = spawn("""
import os, time
import numpy as np
import tplinear.distributed as dist
rank = int(os.environ["RANK"])
for i in range(3):
    if rank == 1:
        time.sleep(0.5)     # rank 0 reaches each new world first, while rank 1 is still in the last one
    dist.init_process_group(timeout=20)
    a = np.full(4, 10.0 * i + rank); dist.all_reduce(a)
    assert a[0] == 20.0 * i + 1, (i, a)
    b = np.arange(3.0) * (rank == 1); dist.broadcast(b, src=1)
    assert list(b) == [0, 1, 2], b
    dist.destroy_process_group()
print("WORLDS OK", flush=True)
""", 2, port=torch_store.port, env=torch_store.agent_env("run-g"))
    w.start_all()
    w.wait(60)
    assert "WORLDS OK" in w.output(0) and "WORLDS OK" in w.output(1), w.all_output()
    for gen in (1, 2, 3):
        assert torch_store.has("tplinear/run-g/0/%d/join/1" % gen), gen
    # a rank one world ahead
    w2 = spawn(ONE_WORLD_AHEAD, 2, port=torch_store.port,
               env=dict(torch_store.agent_env("run-h"), DEAD_PORT=_dead_port(), TMO=3))
    w2.start_all()
    w2.wait(30)
    assert "FIRST" in w2.output(1), w2.all_output()
    for r, gen in ((0, 1), (1, 2)):
        line = w2.wait_line(r, "REFUSED|JOINED", 1)
        assert "REFUSED" in line and "world generation %d of this process through torchrun's store" % gen in line, \
            w2.all_output()
        assert "every rank must call init_process_group the same number of times" in line, line


# ---------------------------------------------------------------- mpirun: the bootstrap through MPI

def _mpirun(code, nproc=2, env=None, timeout=60):
    from tplinear.testing import launch, launcher_missing
    why = launcher_missing("mpirun")
    if why:
        pytest.skip(why)
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    try:
        return launch("mpirun", nproc, [f.name], timeout=timeout, env=env)
    finally:
        os.unlink(f.name)


def test_mpirun_world_meets_on_a_kernel_port_with_a_fresh_token():
    """Under mpirun rank 0 serves on a port the kernel picks and sends it, with a fresh random token, through
    MPI: no port is raced for (a program holding MASTER_PORT does not matter), no token is derived from
    guessable inputs, and every init of the same processes is a world of its own."""
    import socket
    with socket.socket() as squatter:   # MASTER_PORT is taken: the bootstrap must not need it
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        res = _mpirun("""
import numpy as np
import tplinear.distributed as dist
for i in range(2):
    dist.init_process_group(timeout=20)
    a = np.full(4, 10.0 * i + dist.get_rank()); dist.all_reduce(a)
    assert a[0] == 20.0 * i + 1, a
    dist.destroy_process_group()
print("WORLDS OK", flush=True)
""", env={"TPLINEAR_DEBUG": "INFO", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    out = res.output
    assert res.returncode == 0 and out.count("WORLDS OK") == 2, out
    joined = re.findall(r"rank 0 of 2 joined world generation (\d) at 127\.0\.0\.1:(\d+)", out)
    assert [g for g, _ in joined] == ["1", "2"], out
    assert all(int(p) not in (0, port) for _, p in joined), joined
    assert out.count("token from rank 0, through the launcher (a fresh random token for this world)") == 4, out
    assert "a port the kernel picks" in out, out


@pytest.mark.parametrize("same", [True, False])
def test_mpirun_tokens_given_to_the_ranks_win_and_must_agree(same):
    res = _mpirun("""
import os
import numpy as np
import tplinear, tplinear.distributed as dist
rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
try:
    dist.init_process_group(timeout=2.5, token="secret" if rank == 0 or %r else "other")
    a = np.ones(4); dist.all_reduce(a)
    print(f"JOINED {rank} {a[0]}", flush=True)
except tplinear.CommError as e:
    print(f"REFUSED {rank} {e}", flush=True)
""" % same)
    out = res.output
    if same:
        assert "JOINED 0 2.0" in out and "JOINED 1 2.0" in out, out
    else:
        assert re.search(r"REFUSED 1 .*token differs", out), out              # at once
        assert re.search(r"REFUSED 0 .*refused 1 connection.*token differs", out), out   # at its timeout


def test_mpirun_ranks_at_different_generations_are_told_so():
    """Rank 1's first init was another world (its own store on a dead port): at its second it is one world
    ahead of rank 0, and says so at once instead of joining rank 0's world."""
    res = _mpirun(ONE_WORLD_AHEAD, env={"DEAD_PORT": _dead_port(), "TMO": 3})
    out = res.output
    assert "FIRST" in out, out
    assert re.search(r"REFUSED 1 .*rank 0 starts world generation 1, this rank 2 \(every rank must call "
                     r"init_process_group the same number of times\)", out), out
    assert re.search(r"REFUSED 0 .*waiting for rank 1 of 2 to join", out), out
