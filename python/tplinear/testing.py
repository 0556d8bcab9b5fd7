"""Helpers for tests that run an N-rank world through the launcher (``python -m tplinear.run``).

::

    from tplinear.testing import assert_world_ok, run_world

    def test_allreduce():
        res = assert_world_ok(4, '''
            import numpy as np, tplinear.distributed as dist
            dist.init_process_group()
            x = np.full(8, dist.get_rank(), np.float32)
            dist.all_reduce(x)
            assert (x == 6).all(), x
            print("ok")
        ''')
        assert all("ok" in res.rank_output(r) for r in range(4))

    def test_killed_rank():
        res = run_world(2, '''
            import os, signal, time
            if os.environ["RANK"] == "1":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)                        # rank 0 is stopped by the launcher
        ''')
        assert res.returncode == 128 + 9 and res.failed_rank == 1
        assert res.failures == {1: "signal SIGKILL (9)"}

Results: ``res.returncode``, ``res.output`` (launcher and ranks, stdout and stderr merged),
``res.rank_output(r)`` / ``res.rank_lines(r)`` (what rank r printed, prefixes removed),
``res.summary`` (the launcher's own lines), ``res.failed_rank``, ``res.failures``, ``res.describe()``.

The world runs in its own session (process group), with every outer launcher variable (RANK, WORLD_SIZE,
MASTER_PORT, OMPI_COMM_WORLD_*, ...) removed from its environment, so these helpers also work when pytest
itself runs under the launcher. On a timeout, an exception or a KeyboardInterrupt in the test, the whole
process group is SIGKILLed: no worker outlives the helper.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from .run import clean_launcher_env

__all__ = ["WorldResult", "WorldTimeout", "run_world", "assert_world_ok", "world_env", "wait_gone", "launch",
           "launcher_missing", "LAUNCHERS"]

_PREFIX_RE = re.compile(r"^\[rank (\d+)\] ?(.*)$")
_FAIL_RE = re.compile(r"^tplinear\.run: rank (\d+) \(local \d+\) (?:also )?failed with (.*?)(?:;|$)")
_KILL_WAIT = 10.0
_MAX_SHOWN = 20000          # characters of output quoted in an assertion message


def _package_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def world_env(env=None):
    """The launcher's environment: ours minus any outer world, plus ``env`` (a None value deletes).

    When tplinear is imported from a source tree (not site-packages), that tree is appended to
    PYTHONPATH (after any PYTHONPATH given in ``env``), so the world imports the same tplinear.
    """
    out = clean_launcher_env(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = str(value)
    root = _package_root()
    if os.path.basename(root) not in ("site-packages", "dist-packages"):
        paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            out["PYTHONPATH"] = os.pathsep.join(paths + [root])
    return out


class WorldTimeout(AssertionError):
    """The world did not finish within the timeout; ``.output`` holds what it printed until then."""

    def __init__(self, message, output=""):
        super().__init__(message)
        self.output = output


class WorldResult:
    """Outcome of one world: ``returncode``, ``output`` (stdout and stderr of launcher and ranks, as text)."""

    def __init__(self, nproc, returncode, output, cmd):
        self.nproc = nproc
        self.returncode = returncode
        self.output = output
        self.cmd = cmd

    @property
    def ok(self):
        return self.returncode == 0

    def rank_lines(self, rank):
        """The lines rank ``rank`` printed (stdout and stderr), prefix removed (needs prefix=True)."""
        lines = []
        for line in self.output.splitlines():
            m = _PREFIX_RE.match(line)
            if m and int(m.group(1)) == rank:
                lines.append(m.group(2))
        return lines

    def rank_output(self, rank):
        """The text rank ``rank`` printed, one line per line, prefix removed (needs prefix=True)."""
        return "\n".join(self.rank_lines(rank))

    @property
    def summary(self):
        """The launcher's own lines (``tplinear.run: ...``), e.g. the failure summary."""
        return "\n".join(l for l in self.output.splitlines() if l.startswith("tplinear.run:"))

    @property
    def failures(self):
        """{rank: "exit code 3" | "signal SIGKILL (9)"} for every rank the launcher reported as failed."""
        out = {}
        for line in self.output.splitlines():
            m = _FAIL_RE.match(line)
            if m:
                out.setdefault(int(m.group(1)), m.group(2))
        return out

    @property
    def failed_rank(self):
        """The first failed rank named by the launcher's summary, or None."""
        for line in self.output.splitlines():
            m = _FAIL_RE.match(line)
            if m and " also failed " not in line:
                return int(m.group(1))
        return None

    def describe(self):
        """A readable report: command, return code, launcher summary, then each failed rank's output."""
        parts = ["world of %d ranks exited with %s" % (self.nproc, self.returncode),
                 "command: %s" % " ".join(self.cmd)]
        if self.summary:
            parts.append("launcher:\n" + textwrap.indent(self.summary, "  "))
        failures = self.failures
        for rank in sorted(failures):
            text = self.rank_output(rank) or "(no output)"
            parts.append("rank %d (%s) output:\n%s" % (rank, failures[rank],
                                                       textwrap.indent(_tail(text), "  | ")))
        if not failures:
            parts.append("full output:\n" + textwrap.indent(_tail(self.output) or "(no output)", "  | "))
        return "\n".join(parts)

    def __repr__(self):
        return "WorldResult(nproc=%d, returncode=%r)" % (self.nproc, self.returncode)


def _tail(text, limit=_MAX_SHOWN):
    if len(text) <= limit:
        return text
    return "... (%d characters cut)\n%s" % (len(text) - limit, text[-limit:])


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_world(nproc, code, timeout=120.0, env=None, args=(), prefix=True, launcher_args=(), cwd=None):
    """Run the Python source ``code`` (dedented) on ``nproc`` ranks through the launcher.

    The command is ``python -m tplinear.run --standalone --nproc-per-node nproc [--prefix-output]
    [launcher_args] <file> [args]``. Returns a :class:`WorldResult` whatever the exit status; raises
    :class:`WorldTimeout` (an AssertionError, with the output so far) when the world takes longer than
    ``timeout`` seconds, after SIGKILLing its whole process group. The ranks run in ``cwd``, by default
    a scratch directory (holding the script) that is removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="tplinear-world-") as tmp:
        script = os.path.join(tmp, "world_main.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(code))
        cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(int(nproc))]
        if prefix:
            cmd.append("--prefix-output")
        cmd += [str(a) for a in launcher_args]
        cmd += [script] + [str(a) for a in args]
        return _run(cmd, int(nproc), world_env(env), tmp if cwd is None else cwd, timeout)


def _run(cmd, nproc, env, cwd, timeout):
    """Runs cmd in its own session; SIGKILLs the whole session on a timeout or an exception."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, _ = proc.communicate(timeout=_KILL_WAIT)
            except subprocess.TimeoutExpired:   # something outside the group holds the pipe
                out = b""
            text = out.decode("utf-8", "replace")
            raise WorldTimeout("world of %d ranks did not finish within %.1f s; killed it.\n"
                               "command: %s\noutput so far:\n%s"
                               % (nproc, timeout, " ".join(cmd), textwrap.indent(_tail(text), "  | ")),
                               text) from None
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            try:
                proc.wait(timeout=_KILL_WAIT)
            except subprocess.TimeoutExpired:
                pass
        else:
            # The launcher is gone; a worker it could not reap would die by PR_SET_PDEATHSIG,
            # but make sure nothing of its group lingers.
            _kill_group(proc)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    return WorldResult(nproc, proc.returncode, out.decode("utf-8", "replace"), cmd)


LAUNCHERS = ("tplinear.run", "torchrun", "mpirun", "srun")


def launcher_missing(launcher):
    """Why ``launcher`` cannot start a world here (a reason to skip a test), or None when it can."""
    import shutil

    if launcher == "tplinear.run":
        return None
    if launcher == "torchrun":  # found, not imported: torch and a CUDA build of tplinear may load different NCCLs
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return "torch is not installed (pip install torch) so there is no torchrun"
        return None
    if launcher == "mpirun":
        from . import _C

        if shutil.which("mpirun") is None:
            return "no mpirun on PATH (apt-get install openmpi-bin libopenmpi-dev)"
        if "mpi" not in _C.backends():
            return "tplinear was built without MPI (apt-get install libopenmpi-dev, then reinstall tplinear)"
        return None
    if launcher == "srun":
        if shutil.which("srun") is None:
            return "Slurm is not installed on this machine (no srun)"
        try:   # installed is not running: without a controller srun fails (or retries) instead of starting
            ping = subprocess.run(["scontrol", "ping"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            return "Slurm is installed but `scontrol ping` failed: %s" % e
        if ping.returncode != 0 or " is UP" not in ping.stdout:
            said = ping.stdout.strip().splitlines()[:1] or ping.stderr.strip().splitlines()[-1:]
            return "Slurm is installed but no controller answers (scontrol ping: %s)" % (said[0] if said else
                                                                                          "exit %d" % ping.returncode)
        return None
    raise ValueError("launcher must be one of %s, got %r" % (", ".join(LAUNCHERS), launcher))


def _is_openmpi():
    try:
        return "Open MPI" in subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                                            timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False


def launch(launcher, nproc, argv, timeout=120.0, env=None, launcher_args=(), cwd=None):
    """Starts ``argv`` (a Python script and its arguments, or ``["-m", module, ...]``) on ``nproc`` ranks
    with a real launcher: ``"tplinear.run"`` (--standalone), ``"torchrun"`` (--standalone), ``"mpirun"``
    (OpenMPI: --oversubscribe, and allowed to run as root) or ``"srun"``; ``launcher_args`` go to the
    launcher (e.g. ``["--mca", "btl", "tcp,self"]``). The environment is ours minus any outer world,
    plus ``env``. Returns a :class:`WorldResult` (no rank prefixes: read ``.output``); raises
    :class:`WorldTimeout` after killing everything when it takes longer than ``timeout``. Check
    :func:`launcher_missing` first."""
    py = [sys.executable] + [str(a) for a in argv]
    extra = [str(a) for a in launcher_args]
    env = world_env(env)
    if launcher == "tplinear.run":
        cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(nproc)] + extra + py[1:]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        cmd += extra + py[1:]
    elif launcher == "mpirun":
        cmd = ["mpirun", "-np", str(nproc)]
        if _is_openmpi():
            cmd.append("--oversubscribe")
            if os.geteuid() == 0:  # OpenMPI refuses root unless told twice
                env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
                env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        cmd += extra + py
    elif launcher == "srun":
        cmd = ["srun", "--ntasks", str(nproc)] + extra + py
    else:
        raise ValueError("launcher must be one of %s, got %r" % (", ".join(LAUNCHERS), launcher))
    return _run(cmd, int(nproc), env, cwd, timeout)


def assert_world_ok(nproc, code, timeout=120.0, env=None, **kwargs):
    """:func:`run_world`, then AssertionError (launcher summary + each failed rank's output) unless it exited 0."""
    res = run_world(nproc, code, timeout=timeout, env=env, **kwargs)
    if res.returncode != 0:
        raise AssertionError(res.describe())
    return res


def wait_gone(pids, timeout=10.0):
    """Wait until none of ``pids`` exists (zombies count as gone); returns the pids still alive."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while True:
        alive = [p for p in alive if _pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
