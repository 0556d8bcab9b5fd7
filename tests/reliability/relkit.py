"""Shared helpers of the reliability suite (failures detected within bounded time, no leaks; fixtures and the latency table live in conftest.py): worlds of rank processes started one by one (so a test
can start a rank late, stop or kill one, and time what the others see), a persistent world that executes
commands sent by the test process (for property-based fuzzing without a process per case), checks that a
world leaves nothing behind, and the detection-latency table printed at the end of the run.

Every wait here is bounded: rank processes are killed when their test ends, whatever happened, and every
helper that waits takes a timeout. Add new fault, hygiene or fuzz cases (checkpoint files too) on top of
``spawn`` / ``CommandWorld`` / ``leftovers``.
"""
import glob
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time

# The group timeout of fault worlds: what a stopped (alive but hung) peer costs.
T = 3.0
SLACK = 2.0  # a peer's failure must be detected within the timeout T + SLACK seconds

# besides an outer world's variables (tplinear.run.clean_launcher_env), the job ids a token may be derived
# from and the MPI runtime's variables (an outer mpirun's must not make a rank think MPI started it)
WORLD_VARS = ("PMIX_NAMESPACE", "PMIX_RANK", "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_hnp_uri", "PMI_FD",
              "PMI_PORT", "SLURM_JOB_ID", "SLURM_STEP_ID")


def _pkg_root():
    import tplinear
    return os.path.dirname(os.path.dirname(os.path.abspath(tplinear.__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra=None):
    from tplinear.run import clean_launcher_env
    env = {k: v for k, v in clean_launcher_env(os.environ).items() if k not in WORLD_VARS}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    root = _pkg_root()
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([root] + paths)
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


class Ranks:
    """The rank processes of one world, each started on demand with torchrun's variables; output per rank
    in a file. Everything still running is SIGKILLed by the fixture at the end of the test."""

    def __init__(self, tmp, code, nproc, port, env, token):
        self.tmp = tmp
        self.nproc = nproc
        self.port = port
        self.env = env
        self.token = token
        self.script = os.path.join(tmp, "rank_main.py")
        with open(self.script, "w") as f:
            f.write(textwrap.dedent(code))
        self.procs = {}
        self.logs = {}

    def start(self, rank, env=None, token="world"):
        e = dict(self.env, RANK=rank, WORLD_SIZE=self.nproc, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=self.nproc,
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=self.port)
        tok = self.token if token == "world" else token
        if tok is not None:
            e["TPLINEAR_TOKEN"] = tok
        e.update(env or {})
        e = {k: str(v) for k, v in e.items()}
        path = os.path.join(self.tmp, "rank%d.log" % rank)
        log = open(path, "w")
        self.logs[rank] = path
        self.procs[rank] = subprocess.Popen([sys.executable, self.script], env=e, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.tmp)
        log.close()
        return self.procs[rank]

    def start_all(self, **kw):
        for r in range(self.nproc):
            self.start(r, **kw)
        return self

    def output(self, rank):
        try:
            with open(self.logs[rank], errors="replace") as f:
                return f.read()
        except (KeyError, OSError):
            return ""

    def all_output(self):
        return "".join("--- rank %d (exit %s) ---\n%s\n" % (r, self.procs[r].poll(), self.output(r))
                       for r in sorted(self.procs))

    def wait_line(self, rank, pattern, timeout):
        """The first line of rank's output matching the regex, waiting up to timeout s (AssertionError)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.output(rank)
            proc = self.procs.get(rank)
            if proc is not None and proc.poll() is None:  # a running rank may be mid-line: whole lines only
                text = text[:text.rfind("\n") + 1]
            for line in text.splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError("rank %d printed no line matching %r within %.1f s\n%s"
                                     % (rank, pattern, timeout, self.all_output()))
            time.sleep(0.01)

    def signal(self, rank, sig):
        try:
            self.procs[rank].send_signal(sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout, ranks=None):
        """Waits (bounded) for ranks (default all started) to exit; returns {rank: returncode or None}."""
        deadline = time.monotonic() + timeout
        out = {}
        for r in (ranks if ranks is not None else sorted(self.procs)):
            try:
                out[r] = self.procs[r].wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out[r] = None
        return out

    def kill(self):
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    @property
    def pids(self):
        return [p.pid for p in self.procs.values()]


# ------------------------------------------------------------------------------ torchrun's agent store

# A real torch TCPStore server in a process of its own (torch is not imported by the tests: a CUDA build of
# tplinear and torch may load different NCCLs); it prints its port and serves until stdin closes.
_TORCH_STORE = r"""
import sys
import torch.distributed as td
store = td.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
sys.stdin.read()
"""


class TorchStore:
    """The store torchrun's agent serves (a torch TCPStore), for ranks started with ``agent_env``. The test
    reads and writes raw keys as any process that reaches the port can: torch's wire protocol (VALIDATE, SET,
    GET, CHECK; comm/torch_store.c) over a socket of its own, without torch's client, which would put "/"
    before every key."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _TORCH_STORE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=base_env())
        import select
        if not select.select([self.proc.stdout], [], [], 60)[0]:
            self.close()
            raise AssertionError("the torch store server did not start within 60 s")
        self.port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.sock.sendall(struct.pack("=BI", 0, 0x3C85F7CE))   # VALIDATE

    def _recv(self, n):
        b = b""
        while len(b) < n:
            c = self.sock.recv(n - len(b))
            if not c:
                raise AssertionError("the torch store closed the connection")
            b += c
        return b

    @staticmethod
    def _str(b):
        return struct.pack("=Q", len(b)) + b

    def has(self, key):
        self.sock.sendall(struct.pack("=BQ", 5, 1) + self._str(key.encode()))   # CHECK
        return self._recv(1) == b"\0"

    def get(self, key):
        assert self.has(key), key
        self.sock.sendall(b"\3" + self._str(key.encode()))                     # GET
        return self._recv(struct.unpack("=Q", self._recv(8))[0])

    def set(self, key, value):
        self.sock.sendall(b"\1" + self._str(key.encode()) + self._str(value))  # SET

    def agent_env(self, run_id, restart=0):
        """What torchrun gives its workers about its store (the ranks' MASTER_PORT is self.port)."""
        return {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": run_id,
                "TORCHELASTIC_RESTART_COUNT": restart}

    def close(self):
        if getattr(self, "sock", None):
            self.sock.close()
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------------------------- hygiene

def shm_files():
    """tplinear's entries in /dev/shm (the shm backend keeps none: its segments are memfds)."""
    return set(glob.glob("/dev/shm/tplinear*"))


def alive(pids):
    from tplinear.testing import wait_gone
    return wait_gone(pids, timeout=10.0)


# ----------------------------------------------------------------------------------- latency reporting

_LATENCIES = []
_FUZZ = []


def record_latency(role, phase, fault, seconds, what=""):
    """Prints and records one detection latency (shown in the table at the end of the run)."""
    _LATENCIES.append((role, phase, fault, seconds * 1e3, what))
    print("detection latency: %-9s %-22s %-8s %8.0f ms  %s" % (role, phase, fault, seconds * 1e3, what[:160]))


def record_fuzz(cases):
    """Records how many cases a fuzz world ran (shown at the end of the run)."""
    _FUZZ.append(cases)


# ------------------------------------------------------------------------------------ a command world

WORKER = r"""
import os, pickle, struct, sys, traceback
import numpy as np
import tplinear, tplinear.distributed as dist
inp = os.fdopen(int(os.environ["CMD_FD"]), "rb", buffering=0)
out = os.fdopen(int(os.environ["RES_FD"]), "wb", buffering=0)
dist.init_process_group(timeout=float(os.environ["CMD_TIMEOUT"]))
rank = dist.get_rank()
env = {"np": np, "tp": tplinear, "dist": dist, "rank": rank, "world": dist.get_world_size()}
exec(os.environ["CMD_SETUP"], env)

def read(n):
    b = b""
    while len(b) < n:
        c = inp.read(n - len(b))
        if not c:
            sys.exit(0)
        b += c
    return b

while True:
    n, = struct.unpack("<Q", read(8))
    name, args = pickle.loads(read(n))
    try:
        res = ("ok", env[name](*args))
    except BaseException as e:
        res = ("exc", type(e).__module__ + "." + type(e).__qualname__, str(e)[:2000], traceback.format_exc()[-3000:])
    data = pickle.dumps(res)
    out.write(struct.pack("<Q", len(data)) + data)
"""


class WorldCrashed(AssertionError):
    pass


class CommandWorld:
    """A world of nproc ranks that runs setup (Python source defining functions) once, then executes
    calls sent by the test process: call(name, *args) runs env[name](*args) on every rank and returns the
    per-rank results, each ("ok", value) or ("exc", type name, message, traceback). A rank that dies or
    does not answer within `timeout` fails the call with WorldCrashed (the world is killed and restarted
    on the next call), so a crash or a hang is a test failure, never a blocked run."""

    def __init__(self, nproc, setup, timeout=20.0, group_timeout=5.0, env=None):
        self.nproc, self.setup, self.timeout, self.group_timeout = nproc, setup, timeout, group_timeout
        self.env = env or {}
        self.procs = []
        self.calls = 0

    def _start(self):
        port = free_port()
        token = os.urandom(16).hex()
        self.tmp = tempfile.mkdtemp(prefix="tplinear-cmd-")
        for r in range(self.nproc):
            cmd_r, cmd_w = os.pipe()
            res_r, res_w = os.pipe()
            e = base_env(dict(self.env, RANK=r, WORLD_SIZE=self.nproc, LOCAL_RANK=r, LOCAL_WORLD_SIZE=self.nproc,
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TPLINEAR_TOKEN=token, CMD_FD=cmd_r,
                              RES_FD=res_w, CMD_TIMEOUT=self.group_timeout, CMD_SETUP=textwrap.dedent(self.setup)))
            log = open(os.path.join(self.tmp, "rank%d.log" % r), "w")
            p = subprocess.Popen([sys.executable, "-c", WORKER], env=e, pass_fds=(cmd_r, res_w), stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            os.close(cmd_r)
            os.close(res_w)
            self.procs.append((p, os.fdopen(cmd_w, "wb", buffering=0), res_r))

    def log(self, r):
        try:
            with open(os.path.join(self.tmp, "rank%d.log" % r), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def _read(self, fd, n, deadline):
        import select
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
        return buf

    def call(self, name, *args):
        if not self.procs:
            self._start()
        self.calls += 1
        data = pickle.dumps((name, args))
        try:
            for p, w, _ in self.procs:
                w.write(struct.pack("<Q", len(data)) + data)
            deadline = time.monotonic() + self.timeout
            out = []
            for p, _, r in self.procs:
                n, = struct.unpack("<Q", self._read(r, 8, deadline))
                out.append(pickle.loads(self._read(r, n, deadline)))
            return out
        except (TimeoutError, EOFError, BrokenPipeError) as e:
            codes = [p.poll() for p, _, _ in self.procs]
            logs = "\n".join("--- rank %d (exit %s) ---\n%s" % (i, codes[i], self.log(i)) for i in range(self.nproc))
            self.close()
            raise WorldCrashed("%s in %s%r: exit codes %s\n%s" % (
                "no answer within %.0f s" % self.timeout if isinstance(e, TimeoutError) else "a rank died",
                name, args, codes, logs)) from None

    def close(self):
        for p, w, r in self.procs:
            try:
                w.close()
            except OSError:
                pass
            os.close(r)
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []
        if getattr(self, "tmp", None):
            subprocess.run(["rm", "-rf", self.tmp], check=False)
