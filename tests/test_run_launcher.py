"""The launcher (python -m tplinear.run) and the tplinear.testing helpers. No communication involved."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tplinear.run import free_port
from tplinear.testing import WorldTimeout, assert_world_ok, run_world, wait_gone, world_env

LAUNCH = [sys.executable, "-m", "tplinear.run"]

# Every worker prints "PID <rank> <pid>" then sleeps far longer than any test may take.
SLEEPER = """
    import os, sys, time
    os.write(1, b"PID %s %d\\n" % (os.environ["RANK"].encode(), os.getpid()))   # one write: no interleaving
    time.sleep(600)
"""


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _envs(res, nproc):
    out = {}
    for r in range(nproc):
        lines = [l for l in res.rank_lines(r) if l.startswith("ENV ")]
        assert len(lines) == 1, res.output
        out[r] = json.loads(lines[0][4:])
    return out


ENV_DUMP = """
    import json, os, sys
    print("ENV " + json.dumps({"env": dict(os.environ), "argv": sys.argv[1:]}))
"""


class LiveWorld:
    """A launcher started in its own session whose output is read line by line as it comes."""

    def __init__(self, tmp_path, launcher_args, code, env=None):
        script = tmp_path / "live_main.py"
        script.write_text(textwrap.dedent(code))
        self.cmd = LAUNCH + list(launcher_args) + [str(script)]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=world_env(env), start_new_session=True)
        self.lines = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    @property
    def output(self):
        with self.cond:
            return "\n".join(self.lines)

    def worker_pids(self, n, timeout=30.0):
        """Wait until n workers printed 'PID rank pid'; returns {rank: pid}."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                pids = {}
                for l in self.lines:
                    parts = l.split()
                    if "PID" in parts:
                        i = parts.index("PID")
                        pids[int(parts[i + 1])] = int(parts[i + 2])
                if len(pids) >= n:
                    return pids
                left = deadline - time.monotonic()
                assert left > 0 and self.reader.is_alive(), \
                    "workers did not start (within %.0f s):\n%s" % (timeout, "\n".join(self.lines))
                self.cond.wait(min(left, 0.5))

    def wait(self, timeout=30.0):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("launcher still running after %.0f s:\n%s" % (timeout, self.output)) from None
        self.reader.join(5)
        return rc

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def live(tmp_path):
    worlds = []

    def start(launcher_args, code, env=None):
        w = LiveWorld(tmp_path, launcher_args, code, env)
        worlds.append(w)
        return w

    yield start
    for w in worlds:           # whatever the test did, leave nothing running
        w.kill()


# ----------------------------------------------------------------------------------- environment

def test_env_per_rank():
    res = assert_world_ok(3, ENV_DUMP, env={"OMP_NUM_THREADS": None})
    envs = _envs(res, 3)
    ports = set()
    run_ids = set()
    for r, d in envs.items():
        e = d["env"]
        assert e["RANK"] == str(r) and e["LOCAL_RANK"] == str(r) and e["ROLE_RANK"] == str(r)
        assert e["WORLD_SIZE"] == e["LOCAL_WORLD_SIZE"] == e["ROLE_WORLD_SIZE"] == "3"
        assert e["GROUP_RANK"] == "0" and e["GROUP_WORLD_SIZE"] == "1" and e["ROLE_NAME"] == "default"
        assert e["MASTER_ADDR"] == "127.0.0.1"
        assert e["OMP_NUM_THREADS"] == str(max(1, _cores() // 3))
        assert e["TORCHELASTIC_RESTART_COUNT"] == "0" and e["TORCHELASTIC_MAX_RESTARTS"] == "0"
        ports.add(e["MASTER_PORT"])
        run_ids.add(e["TORCHELASTIC_RUN_ID"])
    assert len(ports) == 1 and len(run_ids) == 1 and run_ids != {""}


def test_omp_num_threads_kept_when_set():
    res = assert_world_ok(2, ENV_DUMP, env={"OMP_NUM_THREADS": "7"})
    assert all(d["env"]["OMP_NUM_THREADS"] == "7" for d in _envs(res, 2).values())


def test_multi_node_ranks_and_defaults(tmp_path):
    script = tmp_path / "dump.py"
    script.write_text(textwrap.dedent(ENV_DUMP))
    env = world_env({"OMP_NUM_THREADS": None})
    p = subprocess.run(LAUNCH + ["--nnodes", "1:2", "--node-rank", "1", "--nproc_per_node", "2",
                                 "--prefix-output", str(script)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    seen = {}
    for line in p.stdout.splitlines():
        rank = int(line.split("]")[0].split()[1])
        seen[rank] = json.loads(line.split("ENV ", 1)[1])["env"]
    assert sorted(seen) == [2, 3]
    for rank, e in seen.items():
        assert e["RANK"] == str(rank) and e["LOCAL_RANK"] == str(rank - 2)
        assert e["WORLD_SIZE"] == "4" and e["LOCAL_WORLD_SIZE"] == "2"
        assert e["GROUP_RANK"] == "1" and e["GROUP_WORLD_SIZE"] == "2"
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] == "29500"
        assert e["TORCHELASTIC_RUN_ID"] == "none"
        assert e["OMP_NUM_THREADS"] == str(max(1, _cores() // 2))


def test_nested_launcher_env_is_overwritten(tmp_path):
    """A launcher started inside an outer world gives its workers the new world, nothing of the outer one."""
    script = tmp_path / "dump.py"
    script.write_text(textwrap.dedent(ENV_DUMP))
    outer = {"RANK": "7", "LOCAL_RANK": "5", "WORLD_SIZE": "9", "LOCAL_WORLD_SIZE": "9", "GROUP_RANK": "3",
             "ROLE_RANK": "7", "ROLE_WORLD_SIZE": "9", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "1",
             "TORCHELASTIC_RUN_ID": "outer", "TORCHELASTIC_ERROR_FILE": "/nonexistent",
             "OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "9", "OMPI_COMM_WORLD_LOCAL_RANK": "4"}
    env = dict(world_env(), **outer)
    p = subprocess.run(LAUNCH + ["--standalone", "--nproc-per-node", "2", "--prefix-output", str(script)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    seen = {}
    for line in p.stdout.splitlines():
        seen[int(line.split("]")[0].split()[1])] = json.loads(line.split("ENV ", 1)[1])["env"]
    assert sorted(seen) == [0, 1]
    for rank, e in seen.items():
        assert e["RANK"] == e["LOCAL_RANK"] == e["ROLE_RANK"] == str(rank)
        assert e["WORLD_SIZE"] == e["LOCAL_WORLD_SIZE"] == "2" and e["GROUP_RANK"] == "0"
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] != "1"
        assert e["TORCHELASTIC_RUN_ID"] != "outer"
        assert not [k for k in e if k.startswith("OMPI_COMM_WORLD_")]
        assert "TORCHELASTIC_ERROR_FILE" not in e


def test_nested_world_inside_world():
    """A rank of an outer world runs its own inner world through tplinear.testing (pytest under the launcher)."""
    res = assert_world_ok(2, """
        import os
        from tplinear.testing import assert_world_ok
        inner = assert_world_ok(2, '''
            import os
            print("INNER", os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"])
        ''')
        for r in range(2):
            print("outer", os.environ["RANK"], "port", os.environ["MASTER_PORT"], "saw", inner.rank_output(r))
    """, timeout=60)
    for r in range(2):
        lines = res.rank_lines(r)
        assert len(lines) == 2, res.output
        for i, line in enumerate(lines):
            parts = line.split()        # outer R port P saw INNER i 2 INNER_PORT
            assert parts[:2] == ["outer", str(r)] and parts[5:8] == ["INNER", str(i), "2"], res.output
            assert parts[8] != parts[3]     # the inner world has its own port


def test_standalone_picks_free_port():
    code = """
        import os, socket
        port = int(os.environ["MASTER_PORT"])
        if os.environ["RANK"] == "0":
            s = socket.socket(); s.bind(("127.0.0.1", port)); s.close()   # the port is free
        print("PORT", port)
    """
    ports = []
    for _ in range(2):
        res = assert_world_ok(2, code)
        (line,) = res.rank_lines(0)
        ports.append(int(line.split()[1]))
        assert res.rank_lines(1) == [line]
    assert 29500 not in ports and all(0 < p < 65536 for p in ports)
    assert free_port() > 0


# ------------------------------------------------------------------------------ running programs

def test_script_args_pass_through():
    args = ["--nproc-per-node", "9", "-m", "x", "--standalone", "--", "a b", "--prefix-output"]
    res = assert_world_ok(2, ENV_DUMP, args=args)
    for d in _envs(res, 2).values():
        assert d["argv"] == args


def test_module_mode(tmp_path):
    (tmp_path / "mymod_tplinear_test.py").write_text(
        "import os, sys\nprint('MOD', os.environ['RANK'], sys.argv[1:])\n")
    env = world_env({"PYTHONPATH": str(tmp_path)})
    p = subprocess.run(LAUNCH + ["--nproc-per-node", "2", "--prefix-output", "-m", "mymod_tplinear_test",
                                 "--x", "-m", "y"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == ["[rank 0] MOD 0 ['--x', '-m', 'y']",
                                             "[rank 1] MOD 1 ['--x', '-m', 'y']"]


def test_no_python(tmp_path):
    exe = tmp_path / "prog.sh"
    exe.write_text("#!/bin/sh\necho \"SH $RANK $1\"\n")
    exe.chmod(0o755)
    p = subprocess.run(LAUNCH + ["--nproc-per-node", "2", "--no-python", str(exe), "arg"],
                       capture_output=True, text=True, env=world_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == ["SH 0 arg", "SH 1 arg"]


def test_output_without_prefix():
    # one write(2) per line: unprefixed ranks share the pipe, so lines written piecewise could interleave
    res = run_world(2, "import os; os.write(1, b'plain %s\\n' % os.environ['RANK'].encode())", prefix=False)
    assert res.returncode == 0
    assert sorted(res.output.splitlines()) == ["plain 0", "plain 1"]


def test_prefix_keeps_partial_lines_and_stderr():
    res = assert_world_ok(2, """
        import os, sys
        sys.stderr.write("err %s\\n" % os.environ["RANK"])
        sys.stdout.write("no newline " + os.environ["RANK"])
    """)
    for r in range(2):
        assert sorted(res.rank_lines(r)) == ["err %d" % r, "no newline %d" % r]


@pytest.mark.parametrize("argv, message", [
    (["--nproc-per-node", "0", "x.py"], "expected a positive integer"),
    (["--nnodes", "3:2", "x.py"], "MIN > MAX"),
    (["--nnodes", "2", "--node-rank", "2", "x.py"], "--node-rank 2 out of range"),
    (["--standalone", "--master-port", "1234", "x.py"], "--standalone"),
    (["--standalone", "--nnodes", "2", "x.py"], "--standalone"),
    (["--master-port", "70000", "x.py"], "port number"),
    (["--nproc-per-node", "2"], "required"),
])
def test_argument_errors(argv, message):
    p = subprocess.run(LAUNCH + argv, capture_output=True, text=True, env=world_env(), timeout=60)
    assert p.returncode == 2 and message in p.stderr, p.stderr


def test_help_documents_usage():
    p = subprocess.run(LAUNCH + ["--help"], capture_output=True, text=True, env=world_env(), timeout=60)
    assert p.returncode == 0
    for flag in ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                 "--standalone", "--module", "--prefix-output", "--grace-period"):
        assert flag in p.stdout


# -------------------------------------------------------------------------------------- failures

def test_failing_rank_stops_the_world():
    t0 = time.monotonic()
    res = run_world(4, """
        import os, sys, time
        print("PID", os.environ["RANK"], os.getpid(), flush=True)
        if os.environ["RANK"] == "1":
            time.sleep(0.5)
            print("rank one gives up", flush=True)
            sys.exit(3)
        time.sleep(600)
    """, timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode == 3, res.output
    assert "tplinear.run: rank 1 (local 1) failed with exit code 3; stopped the other 3 ranks" in res.output
    assert res.failed_rank == 1 and res.failures == {1: "exit code 3"}
    assert elapsed < 30
    pids = [int(l.split()[2]) for r in range(4) for l in res.rank_lines(r) if l.startswith("PID")]
    assert len(pids) == 4 and wait_gone(pids) == []
    with pytest.raises(AssertionError) as ei:
        assert_world_ok(2, "import os, sys; print('bye', os.environ['RANK']); sys.exit(int(os.environ['RANK']) * 5)")
    msg = str(ei.value)
    assert "rank 1 (local 1) failed with exit code 5" in msg and "| bye 1" in msg


def test_rank_killed_by_signal():
    t0 = time.monotonic()
    res = run_world(3, """
        import os, signal, time
        print("PID", os.environ["RANK"], os.getpid(), flush=True)
        if os.environ["RANK"] == "2":
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    """, timeout=60)
    assert res.returncode == 128 + signal.SIGKILL, res.output
    assert "rank 2 (local 2) failed with signal SIGKILL (9); stopped the other 2 ranks" in res.output
    assert time.monotonic() - t0 < 30
    pids = [int(l.split()[2]) for r in range(3) for l in res.rank_lines(r) if l.startswith("PID")]
    assert len(pids) == 3 and wait_gone(pids) == []


def test_sigterm_ignored_gets_sigkill_after_grace():
    t0 = time.monotonic()
    res = run_world(2, """
        import os, signal, sys, time
        if os.environ["RANK"] == "0":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ready", flush=True)
            time.sleep(600)
        time.sleep(0.5)
        sys.exit(1)
    """, launcher_args=["--grace-period", "0.5"], timeout=60)
    assert res.returncode == 1, res.output
    assert "rank 0 still running 0.5 s after SIGTERM; sending SIGKILL" in res.output
    assert "rank 1 (local 1) failed with exit code 1; stopped the other rank" in res.output
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("to_group", [False, True], ids=["kill-launcher", "ctrl-c-group"])
def test_sigint_stops_the_world(live, to_group):
    w = live(["--nproc-per-node", "3", "--prefix-output"], SLEEPER)
    pids = w.worker_pids(3)
    t0 = time.monotonic()
    if to_group:      # what a terminal's Ctrl-C does: SIGINT to the whole foreground process group
        os.killpg(w.proc.pid, signal.SIGINT)
    else:
        os.kill(w.proc.pid, signal.SIGINT)
    rc = w.wait(30)
    assert rc == 128 + signal.SIGINT, w.output
    assert time.monotonic() - t0 < 20
    assert "tplinear.run: received SIGINT; stopping" in w.output
    assert wait_gone(pids.values()) == []


def test_sigterm_to_launcher(live):
    w = live(["--nproc-per-node", "2"], SLEEPER)
    pids = w.worker_pids(2)
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.wait(30) == 128 + signal.SIGTERM
    assert wait_gone(pids.values()) == []


def test_sigkill_of_launcher_kills_workers(live):
    w = live(["--nproc-per-node", "2"], SLEEPER)
    pids = w.worker_pids(2)
    os.kill(w.proc.pid, signal.SIGKILL)          # the launcher only, not its group
    assert w.wait(30) == -signal.SIGKILL
    assert wait_gone(pids.values()) == [], "orphaned workers survived their launcher"


def test_run_world_timeout_kills_everything():
    t0 = time.monotonic()
    with pytest.raises(WorldTimeout) as ei:
        run_world(2, SLEEPER, timeout=3)
    assert time.monotonic() - t0 < 20
    out = ei.value.output
    pids = [int(l.split()[4]) for l in out.splitlines() if " PID " in l]
    assert len(pids) == 2, out
    assert wait_gone(pids) == []
    assert "did not finish within 3.0 s" in str(ei.value)


def test_run_world_interrupted_kills_everything(tmp_path):
    """A KeyboardInterrupt in the test process still kills the world it started."""
    piddir = tmp_path / "pids"
    piddir.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import os, signal, sys, threading, time
        from tplinear.testing import run_world

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        def when_started():         # once both ranks run (bounded wait), interrupt the main thread
            deadline = time.monotonic() + 30
            while len([n for n in os.listdir(%r) if n.isdigit()]) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGUSR1)

        signal.signal(signal.SIGUSR1, interrupt)
        threading.Thread(target=when_started, daemon=True).start()
        try:
            run_world(2, '''
                import os, time
                path = os.path.join(%r, os.environ["RANK"])
                with open(path + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.rename(path + ".tmp", path)      # complete once it is visible
                time.sleep(600)
            ''', timeout=60)
        except KeyboardInterrupt:
            print("interrupted")
            sys.exit(0)
        sys.exit("run_world returned")
    """ % (str(piddir), str(piddir))))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, env=world_env(),
                       timeout=60)
    assert p.returncode == 0 and "interrupted" in p.stdout, p.stdout + p.stderr
    assert time.monotonic() - t0 < 30
    pids = [int((piddir / str(r)).read_text()) for r in range(2)]
    assert wait_gone(pids) == []


def test_all_failed_ranks_are_reported():
    res = run_world(3, """
        import os, signal, sys, time
        r = int(os.environ["RANK"])
        if r == 0:
            time.sleep(600)
        if r == 2:   # fails "on its own" while the world is being stopped
            signal.signal(signal.SIGTERM, lambda *a: (print("rank 2 error", flush=True), sys.exit(4)))
            open("r2ready", "w").close()
            time.sleep(600)
        deadline = time.monotonic() + 30
        while not os.path.exists("r2ready") and time.monotonic() < deadline:
            time.sleep(0.02)
        print("rank 1 error", flush=True)
        sys.exit(1)
    """, timeout=60)
    assert res.returncode == 1, res.output
    assert res.failed_rank == 1
    assert res.failures == {1: "exit code 1", 2: "exit code 4"}, res.output
    msg = res.describe()
    assert "| rank 1 error" in msg and "| rank 2 error" in msg
