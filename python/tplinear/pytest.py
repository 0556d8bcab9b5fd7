"""pytest plugin for rank-local tests: pytest started once per rank by a launcher (``python -m tplinear.run``,
torchrun, mpirun, srun), each rank running every test. Registered as the ``tplinear`` plugin through the
``pytest11`` entry point (named like the module, so ``-p tplinear.pytest`` may be given as well); it does
nothing unless this process is a rank of a launched world or ``-p tplinear.pytest`` is given, and
``-p no:tplinear`` turns it off (``-p no:tplinear.pytest`` does not even load it). docs/testing.md has a whole example.

- fixtures ``tp_group`` (the world, initialised on first use and kept for the session), ``tp_rank``,
  ``tp_world_size`` and ``tp_tmp_path`` (rank 0's ``tmp_path``, the same directory on every rank);
- after each test the ranks agree on its outcome over a channel of their own (TCP, not the world): a test
  that fails on one rank fails on every rank, the others reporting "failed on rank 1: <its message>"; a
  rank whose test fails aborts the world at once (peers blocked in a collective return), and after such a
  test the world is re-created, so the next test starts on a usable group;
- ``-x`` / ``--maxfail`` stop every rank together (the outcomes agree); a rank that does not finish a test
  within twice ``--tp-timeout`` of another is reported hung on the others, naming the test, and the session
  stops (the launcher then ends the hung rank);
- output: every line prefixed with ``[rank N] `` (``--tp-output=prefix``), only rank 0 reporting
  (``rank0``), or untouched (``plain``; the default under ``python -m tplinear.run --prefix-output``).

Importable without torch, and without importing tplinear's C extension until it is active.
"""
import hmac
import os
import pickle
import secrets
import select
import socket
import struct
import sys
import time

import pytest

# variables by which a launcher tells a process that it is one rank of a world (tplinear._C.world_env
# decides; these only spare importing the C extension in every other pytest run)
_LAUNCHER_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID")
_MAX_TEXT = 20000  # characters of another rank's failure report carried over
_KEY = pytest.StashKey()


def pytest_addoption(parser):
    g = parser.getgroup("tplinear", "tplinear: rank-local tests under a launcher")
    g.addoption("--tp-timeout", dest="tp_timeout", type=float, default=None,
                help="seconds every wait of the world's collectives may last (init_process_group's timeout); a "
                     "rank that finishes a test waits twice as long for the others (ini: tp_timeout, default 300)")
    g.addoption("--tp-output", dest="tp_output", default=None, choices=("prefix", "rank0", "plain"),
                help="prefix: every line with '[rank N] '; rank0: only rank 0 reports; plain: untouched (ini: "
                     "tp_output; default prefix, plain under tplinear.run --prefix-output)")
    parser.addini("tp_timeout", "tplinear plugin: the world's timeout in seconds (--tp-timeout)", default="300")
    parser.addini("tp_output", "tplinear plugin: prefix, rank0 or plain (--tp-output)", default="")


def _launched():
    """(rank, size) when a launcher started this process as a rank of a world, else None."""
    if not any(v in os.environ for v in _LAUNCHER_VARS):
        return None
    from . import _C

    env = _C.world_env()
    if env["world_size"] is None:
        return None
    return env["rank"] or 0, env["world_size"]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.pluginmanager.is_blocked("tplinear"):  # -p no:tplinear
        return
    explicit = "tplinear.pytest" in (getattr(config.known_args_namespace, "plugins", None) or [])
    world = _launched()
    if world is None and not explicit:
        return
    rank, size = world or (0, 1)
    timeout = config.getoption("tp_timeout") or float(config.getini("tp_timeout") or 300)
    if not timeout > 0:
        raise pytest.UsageError(f"--tp-timeout must be > 0 seconds, got {timeout}")
    output = config.getoption("tp_output") or config.getini("tp_output") or (
        "plain" if os.environ.get("TPLINEAR_PREFIX_OUTPUT") else "prefix")
    if output not in ("prefix", "rank0", "plain"):
        raise pytest.UsageError(f"tp_output must be prefix, rank0 or plain, got {output!r}")
    state = _Ranks(config, rank, size, timeout, output)
    config.stash[_KEY] = state
    state.wrap_output()
    config.pluginmanager.register(state, "tplinear-ranks")


def _state(config):
    state = config.stash.get(_KEY, None)
    if state is None:
        pytest.skip("the tplinear plugin is not active: run pytest under a launcher (python -m tplinear.run, "
                    "torchrun, mpirun) or with -p tplinear.pytest")
    return state


@pytest.fixture
def tp_group(request):
    """The world (tplinear.distributed's default group), initialised on first use with --tp-timeout and
    re-created after a test that failed on any rank."""
    return _state(request.config).world()


@pytest.fixture
def tp_rank(request):
    return _state(request.config).rank


@pytest.fixture
def tp_world_size(request):
    return _state(request.config).size


@pytest.fixture
def tp_tmp_path(request, tp_group):
    """One directory that every rank sees: rank 0's tmp_path (pytest creates and removes it), its path
    broadcast to the others. Ranks on several hosts need it on a shared file system."""
    import pathlib

    import tplinear.distributed as dist

    path = [str(request.getfixturevalue("tmp_path")) if tp_group.rank == 0 else None]
    dist.broadcast_object_list(path, group=tp_group, group_src=0)
    return pathlib.Path(path[0])


# ---------------------------------------------------------------- output

class _Lines:
    """A text stream that writes whole lines only, each as one write prefixed with the rank (launchers
    without prefixes share one pipe between the ranks: one write per line keeps lines whole). A partial
    line waits for its end, or for close."""

    def __init__(self, stream, prefix, quiet=False):
        self._stream = stream
        self._prefix = prefix
        self._quiet = quiet
        self._pending = ""

    def write(self, text):
        if self._quiet:
            return len(text)
        self._pending += text
        if "\n" in self._pending:
            *lines, self._pending = self._pending.split("\n")
            self._stream.write("".join(self._prefix + line + "\n" for line in lines))
            self._stream.flush()
        return len(text)

    def flush(self):
        pass

    def close_line(self):
        if self._pending:
            self._stream.write(self._prefix + self._pending + "\n")
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, errors, ...
        return getattr(self._stream, name)


# ---------------------------------------------------------------- the ranks' own channel

class _Channel:
    """The ranks' agreement channel: TCP between rank 0 (the meeting point) and every other rank, set up
    through one broadcast over a short-lived world. Independent of the world the tests use, so a failed or
    aborted world cannot poison it; every wait is bounded."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size
        self.peers = {}      # rank 0: {rank: socket}
        self.hub = None      # the others: the socket to rank 0
        self.broken = None   # why it can no longer be used

    @staticmethod
    def _send(sock, obj):
        data = pickle.dumps(obj)
        sock.sendall(struct.pack("!Q", len(data)) + data)

    @staticmethod
    def _recv(sock, deadline):
        def exact(n):
            buf = b""
            while len(buf) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out")
                sock.settimeout(left)
                chunk = sock.recv(n - len(buf))
                if not chunk:
                    raise ConnectionError("closed")
                buf += chunk
            return buf
        (n,) = struct.unpack("!Q", exact(8))
        return pickle.loads(exact(n))

    def connect(self, timeout):
        if self.size == 1:
            return
        import tplinear.distributed as dist

        dist.init_process_group(timeout=timeout)
        try:
            hosts = [None] * self.size
            dist.all_gather_object(hosts, socket.gethostname())
            server, info = None, [None]
            if self.rank == 0:
                one_host = len(set(hosts)) == 1
                server = socket.create_server(("127.0.0.1" if one_host else "", 0), backlog=self.size)
                addr = "127.0.0.1" if one_host else os.environ.get("MASTER_ADDR") or socket.gethostbyname(hosts[0])
                info = [(addr, server.getsockname()[1], secrets.token_hex(16))]
            dist.broadcast_object_list(info, src=0)
        finally:
            dist.destroy_process_group()
        addr, port, key = info[0]
        deadline = time.monotonic() + timeout
        if self.rank == 0:
            with server:
                while len(self.peers) < self.size - 1:
                    server.settimeout(max(0.01, deadline - time.monotonic()))
                    try:
                        sock, _ = server.accept()
                        rank, token = self._recv(sock, deadline)
                    except (OSError, ValueError, pickle.PickleError) as e:
                        if time.monotonic() >= deadline:
                            raise RuntimeError(f"tplinear plugin: ranks {sorted(set(range(1, self.size)) - set(self.peers))} "
                                               f"did not connect to rank 0 within {timeout:.0f} s ({e})") from None
                        continue
                    if hmac.compare_digest(str(token), key) and isinstance(rank, int) and 0 < rank < self.size:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        self.peers[rank] = sock
                    else:
                        sock.close()
        else:
            self.hub = socket.create_connection((addr, port), timeout=timeout)
            self.hub.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._send(self.hub, (self.rank, key))

    def exchange(self, obj, timeout):
        """Every rank's obj as {rank: obj}, and the ranks that did not send theirs within timeout seconds
        (rank 0 waits timeout; the others a little longer, for rank 0's answer). Once a rank is missing the
        channel is broken: later exchanges return at once with every other rank missing."""
        if self.size == 1:
            return {0: obj}, []
        if self.broken:
            return {self.rank: obj}, [r for r in range(self.size) if r != self.rank]
        if self.rank != 0:
            try:
                self._send(self.hub, obj)
                records, missing = self._recv(self.hub, time.monotonic() + timeout + 15)
            except (OSError, ValueError, EOFError, pickle.PickleError) as e:
                self.broken = f"rank 0 did not answer ({e})"
                self.hub.close()
                return {self.rank: obj}, [0]
            if missing:
                self.broken = f"ranks {missing} did not answer"
            return records, missing
        records = {0: obj}
        deadline = time.monotonic() + timeout
        waiting = dict(self.peers)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(waiting.values()), [], [], left)
            for sock in ready:
                rank = next(r for r, s in waiting.items() if s is sock)
                del waiting[rank]
                try:
                    records[rank] = self._recv(sock, deadline)
                except (OSError, ValueError, EOFError, pickle.PickleError):
                    pass
        missing = sorted(r for r in range(self.size) if r not in records)
        for rank in missing:
            self.peers.pop(rank).close()
        for rank, sock in list(self.peers.items()):
            try:
                self._send(sock, (records, missing))
            except OSError:
                pass
        if missing:
            self.broken = f"ranks {missing} did not answer"
        return records, missing


# ---------------------------------------------------------------- the plugin proper (active only)

def _summary(reports, dirty, comm):
    failed = [r for r in reports if r.failed]
    if not failed:
        return {"failed": False, "dirty": dirty}
    rep = failed[0]
    text = str(rep.longrepr)
    try:
        message = rep.longrepr.reprcrash.message
    except AttributeError:
        message = text.strip().splitlines()[-1] if text.strip() else "failed"
    return {"failed": True, "dirty": dirty, "comm": comm, "when": rep.when, "message": message.split("\n")[0],
            "text": text[-_MAX_TEXT:]}


class _Ranks:
    def __init__(self, config, rank, size, timeout, output):
        self.config = config
        self.rank, self.size = rank, size
        self.timeout = timeout
        self.output = output
        self.channel = _Channel(rank, size)
        self.index = 0
        self.dirty = False       # this rank's current test raised (not a skip)
        self.comm = False        # ... a CommError
        self._world = None       # the world this plugin made (tp_group)
        self.hung = False
        self.exitstatus = None
        self._streams = []

    # -- output
    def wrap_output(self):
        if self.output == "plain" or self.size == 1:
            return
        prefix = f"[rank {self.rank}] "
        quiet = self.output == "rank0" and self.rank != 0
        self._streams = [("stdout", sys.stdout), ("stderr", sys.stderr)]
        sys.stdout = _Lines(sys.stdout, prefix, quiet=quiet)
        sys.stderr = _Lines(sys.stderr, prefix)

    def _narrow_terminal(self, config):
        tr = config.pluginmanager.get_plugin("terminalreporter")
        tw = getattr(tr, "_tw", None)
        if self.output == "prefix" and tw is not None and hasattr(tw, "fullwidth"):
            try:
                tw.fullwidth = max(40, tw.fullwidth - len(f"[rank {self.rank}] "))
            except (AttributeError, TypeError):
                pass

    def pytest_report_header(self, config):
        return (f"tplinear: rank {self.rank} of {self.size}, timeout {self.timeout:g} s, output {self.output} "
                "(outcomes agreed between the ranks)")

    # -- the world
    def world(self):
        import tplinear.distributed as dist

        if dist.is_initialized():
            return dist.get_world_group()
        self._world = dist.init_process_group(timeout=self.timeout)
        return self._world

    def _owned(self):
        import tplinear.distributed as dist

        return self._world is not None and dist.is_initialized() and dist.get_world_group() is self._world

    def _recreate(self):
        import tplinear.distributed as dist

        if not self._owned():
            return
        dist.destroy_process_group()
        self._world = None
        self.world()

    # -- session
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session):
        self._narrow_terminal(session.config)
        self.channel.connect(self.timeout)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        mine = ("collect", [item.nodeid for item in session.items], session.testsfailed)
        records, missing = self.channel.exchange(mine, 2 * self.timeout)
        if missing:
            raise session.Interrupted(f"tplinear: ranks {missing} did not finish collecting within "
                                      f"{2 * self.timeout:g} s of rank {self.rank}")
        for rank, (_, ids, errors) in sorted(records.items()):
            if errors and not session.testsfailed:
                raise session.Interrupted(f"tplinear: rank {rank} had {errors} error(s) during collection")
            if ids != mine[1] and not session.testsfailed:
                extra = sorted(set(ids) ^ set(mine[1]))[:5] or ["(the same tests in another order)"]
                raise session.Interrupted(f"tplinear: rank {rank} collected other tests than rank {self.rank} "
                                          f"(e.g. {', '.join(extra)}); every rank must run the same tests")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        rep = yield
        if call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception):
            from . import _C
            import tplinear.distributed as dist

            self.dirty = True
            self.comm = self.comm or bool(call.excinfo.errisinstance(_C.CommError))
            if self._owned():  # peers blocked in a collective of this test return at once
                try:
                    dist.abort()
                except Exception:  # noqa: BLE001 - the world may be gone already
                    pass
        return rep

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        from _pytest.runner import runtestprotocol

        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        self.dirty = self.comm = False
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        self.index += 1
        mine = ("test", self.index, item.nodeid, _summary(reports, self.dirty, self.comm))
        wait = 2 * self.timeout
        records, missing = self.channel.exchange(mine, wait)
        stop = None
        if missing:
            stop = (f"tplinear: ranks {missing} did not finish {item.nodeid} within {wait:g} s (2 x --tp-timeout) "
                    f"of rank {self.rank}: hung? The ranks cannot agree on later tests")
            self.hung = True
        elif any(rec[:3] != mine[:3] for rec in records.values()):
            stop = f"tplinear: the ranks ran different tests ({sorted(set(rec[2] for rec in records.values()))})"
            self.hung = True
        self._agree(item, reports, {r: rec[3] for r, rec in records.items()}, missing, wait)
        for rep in reports:
            item.ihook.pytest_runtest_logreport(report=rep)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        if stop:
            item.session.shouldfail = stop
        elif any(rec[3]["dirty"] for rec in records.values()):
            try:
                self._recreate()
            except Exception as e:  # noqa: BLE001 - reported, and the session stops
                item.session.shouldfail = f"tplinear: could not re-create the world after {item.nodeid}: {e}"
        return True

    def _agree(self, item, reports, outcomes, missing, wait):
        failures = {r: o for r, o in outcomes.items() if o["failed"]}
        if not failures and not missing:
            return
        mine = outcomes[self.rank]
        if missing:
            src, when = missing[0], "call"
            headline = (f"failed on rank {src}: it did not finish the test within {wait:g} s of rank {self.rank} "
                        "(hung?)")
            body = ""
        else:
            src = min(failures, key=lambda r: (failures[r]["comm"], r))  # a cause before its consequences
            when = failures[src]["when"]
            headline = f"failed on rank {src}: {failures[src]['message']}"
            body = f"\n\n---- rank {src}'s report ({when}) ----\n{failures[src]['text']}"
        failed_here = [rep for rep in reports if rep.failed]
        target = (failed_here[0] if failed_here else
                  next((rep for rep in reports if rep.when == when), None) or
                  next((rep for rep in reports if rep.when == "call"), reports[0]))
        own = not missing and (src == self.rank or (mine["failed"] and not mine["comm"]))
        if not own:
            local = f"\n\n---- this rank (rank {self.rank}) ----\n{target.longrepr}" if target.failed else ""
            target.longrepr = headline + body + local
            target.outcome = "failed"
            if hasattr(target, "wasxfail"):
                del target.wasxfail
        for rep in failed_here[1:]:  # one failed report per rank and test, so -x / --maxfail agree
            target.longrepr = f"{target.longrepr}\n\n---- also on rank {self.rank}, at {rep.when} ----\n{rep.longrepr}"
            rep.outcome = "passed"
            rep.longrepr = None

    def pytest_sessionfinish(self, session, exitstatus):
        self.exitstatus = int(exitstatus)

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config):
        sys.stdout.flush()
        # every rank has printed its summary before any exits (a launcher stops the others when one exits
        # with a failure)
        self.channel.exchange(("end",), 2 * self.timeout)
        for name, stream in self._streams:
            wrapper = getattr(sys, name)
            if isinstance(wrapper, _Lines):
                wrapper.close_line()
                setattr(sys, name, stream)
        if self.hung:
            # a peer is stuck for good: leave without MPI_Finalize or other exit handlers that would wait
            # for it; the launcher then stops it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exitstatus or 1)
        import tplinear.distributed as dist

        if self._owned():
            dist.destroy_process_group()
