"""tplinear.run -- start an N-rank world on this host, torchrun style.

Usage::

    python -m tplinear.run [options] script.py [script args...]
    python -m tplinear.run [options] -m module [module args...]
    tplinear-run [options] script.py [script args...]

Examples::

    python -m tplinear.run --standalone --nproc-per-node 4 train.py --lr 0.1
    python -m tplinear.run --nproc-per-node 2 -m pytest tests/test_distributed.py
    # two hosts, two ranks each (run once per host; node 0 serves the rendezvous store):
    python -m tplinear.run --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr host0 train.py
    python -m tplinear.run --nnodes 2 --node-rank 1 --nproc-per-node 2 --master-addr host0 train.py

Everything after the script path (or after the module name with ``-m``) is passed to the script
untouched, including arguments that look like launcher options.

Each worker gets torchrun's environment variables (any outer values, e.g. from an enclosing launcher,
are replaced, never inherited; so are MPICH's ``PMI_RANK``/``PMI_SIZE`` and Slurm's ``SLURM_STEP_ID``): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK`` (node rank), ``GROUP_WORLD_SIZE`` (nnodes), ``ROLE_NAME`` ("default"), ``ROLE_RANK``,
``ROLE_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_RUN_ID``,
``TORCHELASTIC_RESTART_COUNT`` (0) and ``TORCHELASTIC_MAX_RESTARTS`` (0). OpenMPI's
``OMPI_COMM_WORLD_*`` variables are removed so that the rendezvous cannot pick up an outer world.

The world is a closed club (docs/security.md): on one node the launcher gives its workers a fresh random
``TPLINEAR_TOKEN`` (an inherited one is replaced, as an outer world's variables are), which every rank
proves to join the rendezvous and to map the world's shared memory; with ``--nnodes`` > 1 every node's
launcher passes on the ``TPLINEAR_TOKEN`` of its own environment (set the same secret on every node), or,
when there is none, the ranks derive one from ``--rdzv-id``, the master address and port. On one node
without ``--master-port`` the launcher picks a free port itself (as ``--standalone`` does).
``OMP_NUM_THREADS`` is set to ``max(1, cores // nproc_per_node)`` when unset (torchrun sets 1; tplinear
gives each rank its share of the cores, docs/architecture.md section 3). With ``--prefix-output``,
``PYTHONUNBUFFERED=1`` is also set when unset, so that prefixed lines appear as they are printed.

Exit behaviour:

* all workers exit 0: the launcher exits 0;
* a worker exits non-zero or is killed by a signal: the other workers get SIGTERM, then SIGKILL after
  ``--grace-period`` seconds (default 5); the launcher prints a summary naming the first failed rank to
  stderr, e.g. ``tplinear.run: rank 1 (local 1) failed with exit code 3; stopped the other 3 ranks``,
  and exits with that worker's exit code (128 + signal number when it was killed by a signal);
* SIGINT (Ctrl-C), SIGTERM or SIGHUP to the launcher is forwarded to every worker, which get SIGKILL
  after the grace period (at once on a second signal); the launcher exits with 128 + signal number.

Workers stay in the launcher's process group, so a Ctrl-C at the terminal reaches all of them and a
``kill -- -PGID`` stops the whole world. Each worker also asks the kernel (``PR_SET_PDEATHSIG``) for
SIGKILL when the launcher dies, so even a SIGKILLed launcher leaves no orphan behind.
"""

import argparse
import ctypes
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
import uuid

__all__ = ["main", "LAUNCHER_ENV_VARS", "LAUNCHER_ENV_PREFIXES", "clean_launcher_env", "free_port"]

PROG = "tplinear.run"

# Variables that describe a world. A launcher removes all of them from the inherited environment
# before it sets its own, so nested worlds never see the outer one's values.
LAUNCHER_ENV_VARS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_NAME", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TPLINEAR_TOKEN",
    # MPICH / Intel MPI (Hydra) and Slurm's job step: the other worlds tplinear reads
    "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "SLURM_STEP_ID",
    "TPLINEAR_PREFIX_OUTPUT",  # set by --prefix-output for the pytest plugin
)
LAUNCHER_ENV_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_KILL_WAIT = 10.0      # seconds to wait for SIGKILLed workers to be reaped
_DRAIN_WAIT = 2.0      # seconds to read leftover output after the workers are gone
_POLL = 0.1            # upper bound of one wait in the event loop


def clean_launcher_env(environ):
    """A copy of ``environ`` without any launcher/world variable (see LAUNCHER_ENV_VARS)."""
    return {k: v for k, v in environ.items()
            if k not in LAUNCHER_ENV_VARS and not k.startswith(LAUNCHER_ENV_PREFIXES)}


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago (bind to port 0, read the port, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _num_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _signame(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


# ---------------------------------------------------------------------------------------------- args

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a positive integer, got %r" % text) from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected a positive integer, got %r" % text)
    return value


def _nproc(text):
    if text in ("auto", "cpu"):
        return _num_cores()
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "expected a positive integer, 'auto' or 'cpu', got %r" % text) from None


def _nnodes(text):
    """'N' or torchrun's elastic 'MIN:MAX' (the static world takes MAX)."""
    parts = text.split(":")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError("expected N or MIN:MAX, got %r" % text)
    try:
        values = [_positive_int(p) for p in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "expected N or MIN:MAX with positive integers, got %r" % text) from None
    if len(values) == 2 and values[0] > values[1]:
        raise argparse.ArgumentTypeError("MIN > MAX in %r" % text)
    return values[-1]


def _port(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError("expected a port number 1..65535, got %r" % text)
    return value


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError("expected a number of seconds >= 0, got %r" % text)
    return value


def _nonneg_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("expected an integer >= 0, got %r" % text)
    return value


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        usage="python -m tplinear.run [options] (script.py | -m module) [args...]",
        description="Start an N-rank tplinear world on this host with torchrun's flags and environment "
                    "variables. When a worker fails the others are stopped and the launcher exits "
                    "non-zero naming the failed rank; Ctrl-C stops the whole world.",
        epilog="Arguments after the script (or module) go to it untouched. Exit status: 0 when every "
               "worker succeeds; the first failed worker's exit code (128+N when killed by signal N); "
               "128+N when the launcher itself got signal N.",
        allow_abbrev=False,
    )
    p.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=_nproc, default=1,
                   metavar="N", help="workers (ranks) on this node; 'auto'/'cpu' = number of cores (default: 1)")
    p.add_argument("--nnodes", type=_nnodes, default=1, metavar="N|MIN:MAX",
                   help="number of nodes; for MIN:MAX the static world uses MAX (default: 1)")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=_nonneg_int, default=0,
                   metavar="R", help="rank of this node, 0 <= R < nnodes (default: 0)")
    p.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None, metavar="ADDR",
                   help="address of node 0, which serves the rendezvous store (default: 127.0.0.1)")
    p.add_argument("--master-port", "--master_port", dest="master_port", type=_port, default=None,
                   metavar="PORT", help="port of the rendezvous store (default: a free port on one node, "
                                        "29500 with --nnodes > 1)")
    p.add_argument("--standalone", action="store_true",
                   help="single node on 127.0.0.1 with a free port (cannot be combined with "
                        "--nnodes > 1, --master-addr or --master-port)")
    p.add_argument("--run-id", "--rdzv-id", "--rdzv_id", dest="run_id", default=None, metavar="ID",
                   help="value of TORCHELASTIC_RUN_ID (default: 'none', a fresh uuid with --standalone)")
    p.add_argument("-m", "--module", action="store_true",
                   help="run the target as a Python module (python -m module args)")
    p.add_argument("--no-python", "--no_python", dest="no_python", action="store_true",
                   help="run the target as an executable, without the Python interpreter")
    p.add_argument("--prefix-output", "--prefix_output", dest="prefix_output", action="store_true",
                   help="prefix every line a worker writes with '[rank N] ' (stdout and stderr kept apart)")
    p.add_argument("--grace-period", "--grace_period", dest="grace_period", type=_nonneg_float, default=5.0,
                   metavar="SECONDS", help="time between SIGTERM (or a forwarded signal) and SIGKILL (default: 5)")
    p.add_argument("training_script", metavar="script",
                   help="path of the script (or module name with -m, or executable with --no-python)")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER, metavar="args",
                   help="arguments for the script, passed through untouched")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.module and args.no_python:
        parser.error("-m/--module and --no-python cannot be combined")
    if args.standalone:
        if args.nnodes != 1:
            parser.error("--standalone runs a single node; got --nnodes %d" % args.nnodes)
        if args.master_addr is not None or args.master_port is not None:
            parser.error("--standalone picks its own address and port; drop --master-addr/--master-port")
        args.master_addr = "127.0.0.1"
        args.master_port = free_port(args.master_addr)
        if args.run_id is None:
            args.run_id = uuid.uuid4().hex
    if args.node_rank >= args.nnodes:
        parser.error("--node-rank %d out of range for --nnodes %d (expected 0..%d)"
                     % (args.node_rank, args.nnodes, args.nnodes - 1))
    if args.master_addr is None:
        args.master_addr = "127.0.0.1"
    if args.master_port is None:
        # one node: nothing else has to meet us, so take a free port rather than a fixed one that
        # another job on this host may hold; several nodes must agree on torchrun's default
        args.master_port = free_port() if args.nnodes == 1 else 29500
    if args.run_id is None:
        args.run_id = "none"
    # the world's secret: fresh on one node; several nodes share the one set in their environments
    args.token = secrets.token_hex(32) if args.nnodes == 1 else (os.environ.get("TPLINEAR_TOKEN") or None)
    return args


# ------------------------------------------------------------------------------------------- workers

def worker_env(args, local_rank, base=None):
    """The environment of one worker: the inherited one minus any outer world, plus torchrun's variables."""
    env = clean_launcher_env(os.environ if base is None else base)
    nproc = args.nproc_per_node
    world = nproc * args.nnodes
    rank = args.node_rank * nproc + local_rank
    env.update({
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(args.node_rank),
        "GROUP_WORLD_SIZE": str(args.nnodes),
        "ROLE_NAME": "default",
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": str(args.master_addr),
        "MASTER_PORT": str(args.master_port),
        "TORCHELASTIC_RUN_ID": str(args.run_id),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    })
    if getattr(args, "token", None):
        env["TPLINEAR_TOKEN"] = args.token
    if "OMP_NUM_THREADS" not in env:
        # torchrun sets OMP_NUM_THREADS=1 for nproc > 1; tplinear gives every rank its share of the
        # cores instead (cores / local ranks BLAS threads: docs/architecture.md, section 3).
        env["OMP_NUM_THREADS"] = str(max(1, _num_cores() // nproc))
    if args.prefix_output and "PYTHONUNBUFFERED" not in env:
        env["PYTHONUNBUFFERED"] = "1"
    if args.prefix_output:  # the pytest plugin leaves lines unprefixed then (tplinear.pytest)
        env["TPLINEAR_PREFIX_OUTPUT"] = "1"
    return env


def worker_cmd(args):
    if args.no_python:
        return [args.training_script] + list(args.training_script_args)
    if args.module:
        return [sys.executable, "-m", args.training_script] + list(args.training_script_args)
    return [sys.executable, args.training_script] + list(args.training_script_args)


def _make_preexec():
    """preexec_fn: SIGKILL this worker when the launcher dies (Linux PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec():
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The launcher may have died between fork and prctl: then nobody would ever kill us.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class _Worker:
    __slots__ = ("rank", "local_rank", "proc", "returncode", "prefix", "buffers")

    def __init__(self, rank, local_rank, proc, prefix):
        self.rank = rank
        self.local_rank = local_rank
        self.proc = proc
        self.returncode = None
        self.prefix = prefix
        self.buffers = {}

    def describe_exit(self):
        code = self.returncode
        if code is not None and code < 0:
            return "signal %s (%d)" % (_signame(-code), -code)
        return "exit code %s" % code


class Launcher:
    """Spawns the workers of one node, pumps their output, and stops the world on failure or signal."""

    def __init__(self, args, stdout=None, stderr=None):
        self.args = args
        self.out = stdout if stdout is not None else sys.stdout.buffer
        self.err = stderr if stderr is not None else sys.stderr.buffer
        self.workers = []
        self.sel = selectors.DefaultSelector()
        self.pending_signals = []
        self.first_failure = None
        self.other_failures = []
        self.out_ok = {id(self.out): True, id(self.err): True}
        self._wake_r = self._wake_w = None
        self._old_handlers = {}
        self._old_wakeup = None

    # -- output
    def _write(self, stream, data):
        if not self.out_ok.get(id(stream), False):
            return
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            self.out_ok[id(stream)] = False   # closed/broken pipe: keep running, stop writing there

    def log(self, message):
        self._write(self.err, ("%s: %s\n" % (PROG, message)).encode("utf-8", "replace"))

    def _on_readable(self, fileobj, worker, stream):
        try:
            data = os.read(fileobj.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf = worker.buffers.get(stream, b"") + data
        if not data:                                  # EOF
            self.sel.unregister(fileobj)
            fileobj.close()
            if buf:
                self._write(stream, worker.prefix + buf + b"\n")
            worker.buffers.pop(stream, None)
            return
        lines = buf.split(b"\n")
        worker.buffers[stream] = lines.pop()
        if lines:
            self._write(stream, b"".join(worker.prefix + line + b"\n" for line in lines))

    # -- signals
    def _on_signal(self, signum, frame):
        self.pending_signals.append(signum)

    def _install_signals(self):
        try:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        except ValueError:                            # not the main thread: fall back to polling
            for fd in (self._wake_r, self._wake_w):
                if fd is not None:
                    os.close(fd)
            self._wake_r = self._wake_w = None
            return
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        for signum in _STOP_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        # A handler (even a no-op) makes SIGCHLD write to the wakeup fd, so a worker exit wakes us at once.
        self._old_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda s, f: None)

    def _restore_signals(self):
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._old_handlers = {}
        if self._wake_w is not None:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            try:
                self.sel.unregister(self._wake_r)
            except KeyError:
                pass
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None

    # -- process management
    def spawn(self):
        args = self.args
        cmd = worker_cmd(args)
        preexec = _make_preexec()
        pipe = subprocess.PIPE if args.prefix_output else None
        # Workers deliberately stay in the launcher's process group (no start_new_session/setpgid):
        # a terminal Ctrl-C reaches every rank at once, and killing the group (as tplinear.testing does
        # on a timeout) takes the whole world down. PR_SET_PDEATHSIG covers a launcher killed alone.
        for local_rank in range(args.nproc_per_node):
            rank = args.node_rank * args.nproc_per_node + local_rank
            proc = subprocess.Popen(cmd, env=worker_env(args, local_rank), stdout=pipe, stderr=pipe,
                                    preexec_fn=preexec, close_fds=True)
            w = _Worker(rank, local_rank, proc, ("[rank %d] " % rank).encode())
            self.workers.append(w)
            if args.prefix_output:
                for fileobj, stream in ((proc.stdout, self.out), (proc.stderr, self.err)):
                    os.set_blocking(fileobj.fileno(), False)
                    self.sel.register(fileobj, selectors.EVENT_READ, (w, stream))

    def alive(self):
        return [w for w in self.workers if w.returncode is None]

    def _reap(self):
        exited = []
        for w in self.alive():
            code = w.proc.poll()
            if code is not None:
                w.returncode = code
                exited.append(w)
        return exited

    def _pump(self, timeout):
        """Wait up to ``timeout`` s for output, a signal or a child exit; handle what came. Returns exits."""
        if self.sel.get_map():
            for key, _ in self.sel.select(timeout=max(0.0, timeout)):
                if key.data is None:
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    self._on_readable(key.fileobj, *key.data)
        else:
            time.sleep(max(0.0, timeout))
        return self._reap()

    def _send(self, workers, signum):
        for w in workers:
            if w.returncode is None:
                try:
                    w.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _stop(self, signum):
        """Send ``signum`` to every live worker; SIGKILL whoever is left after the grace period."""
        targets = self.alive()
        self._send(targets, signum)
        deadline = time.monotonic() + self.args.grace_period
        while self.alive():
            now = time.monotonic()
            if now >= deadline:
                break
            if self.pending_signals:                  # a second Ctrl-C: no more grace
                self.pending_signals.clear()
                break
            self._pump(min(_POLL, deadline - now))
        late = self.alive()
        if late:
            self.log("rank%s %s still running %.1f s after %s; sending SIGKILL"
                     % ("s" if len(late) > 1 else "", ", ".join(str(w.rank) for w in late),
                        self.args.grace_period, _signame(signum)))
            self._send(late, signal.SIGKILL)
            deadline = time.monotonic() + _KILL_WAIT
            while self.alive() and time.monotonic() < deadline:
                self._pump(_POLL)
            for w in self.alive():
                self.log("rank %d (pid %d) did not exit after SIGKILL" % (w.rank, w.proc.pid))
        return len(targets)

    def _drain(self):
        """Read what is left in the pipes (bounded: a grandchild may keep a pipe open)."""
        deadline = time.monotonic() + _DRAIN_WAIT
        while any(k.data is not None for k in self.sel.get_map().values()):
            now = time.monotonic()
            if now >= deadline:
                break
            self._pump(min(_POLL, deadline - now))
        for key in list(self.sel.get_map().values()):
            if key.data is not None:
                w, stream = key.data
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
                if w.buffers.get(stream):
                    self._write(stream, w.prefix + w.buffers.pop(stream) + b"\n")

    def run(self):
        self._install_signals()
        try:
            try:
                self.spawn()
            except OSError as exc:
                self.log("cannot start worker %d: %s" % (len(self.workers), exc))
                self._stop(signal.SIGTERM)
                return 1
            return self._supervise()
        finally:
            # Whatever happened (even an exception in here), leave no worker behind.
            for w in self.alive():
                try:
                    w.proc.kill()
                    w.proc.wait(timeout=_KILL_WAIT)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._drain()
            self._restore_signals()
            self.sel.close()

    def _supervise(self):
        while self.alive():
            exited = self._pump(_POLL)
            # A stop signal first: after a Ctrl-C at the terminal the workers get SIGINT too, and their
            # deaths are its consequence, not failures.
            if self.pending_signals:
                signum = self.pending_signals.pop(0)
                self.pending_signals.clear()
                n = len(self.alive())
                self.log("received %s; stopping %d rank%s" % (_signame(signum), n, "" if n == 1 else "s"))
                self._stop(signum)
                self._drain()
                return 128 + signum
            failed = [w for w in exited if w.returncode != 0]
            if failed:
                failed.sort(key=lambda w: w.rank)
                self.first_failure, self.other_failures = failed[0], failed[1:]
                targets = self.alive()
                stopped = self._stop(signal.SIGTERM)
                self._drain()
                f = self.first_failure
                if stopped:
                    what = "stopped the other rank" if stopped == 1 else "stopped the other %d ranks" % stopped
                else:
                    what = "no other rank was running"
                self.log("rank %d (local %d) failed with %s; %s"
                         % (f.rank, f.local_rank, f.describe_exit(), what))
                for o in self.other_failures:
                    self.log("rank %d (local %d) also failed with %s" % (o.rank, o.local_rank, o.describe_exit()))
                # A positive exit code while stopping is (almost always) the rank's own failure, e.g. a peer
                # error seen in a collective; deaths by our SIGTERM/SIGKILL are negative and not reported.
                for o in targets:
                    if o.returncode is not None and o.returncode > 0:
                        self.log("rank %d (local %d) also failed with %s; it exited while the others were "
                                 "being stopped" % (o.rank, o.local_rank, o.describe_exit()))
                code = f.returncode
                return 128 - code if code < 0 else code
        self._drain()
        return 0


def main(argv=None):
    args = parse_args(argv)
    return Launcher(args).run()


if __name__ == "__main__":
    sys.exit(main())
