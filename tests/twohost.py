"""Two hosts on one machine for the two-host tests: two Linux network namespaces joined by a veth pair,
each process of a host under a UTS namespace of its own whose hostname is the host's name, and OpenMPI's
mpirun started on host node0 with an rsh agent that enters node1's namespaces to start its daemon there.

    with TwoHosts(decoy=False) as hosts:            # skips (pytest.skip) with the kernel's reason if refused
        res = hosts.mpirun(4, ["script.py"], per_host=2, timeout=120)   # ranks 0, 1 on node0; 2, 3 on node1
        hosts.link_down()                           # cut the wire between them

Only addresses inside the namespaces made here are used (10.231.1.1 on node0, 10.231.1.2 on node1; the
decoy, when asked for, is an interface on node0 with 10.231.2.1, which node1 cannot reach, created ahead
of the veth so that it is node0's first non-loopback interface: a veth pair of its own inside node0, as
the kernel may lack the dummy device). OpenMPI's own traffic is kept on the
veth (`oob_tcp_if_include`, `btl_tcp_if_include`), so the decoy misleads nobody but tplinear.

Teardown (close(), also on any failure of the setup) SIGKILLs every process inside either namespace, then
deletes both namespaces, which removes their interfaces; nothing is left in `ip netns list`. Needs root,
iproute2's `ip`, util-linux's `nsenter` and `unshare`, and OpenMPI's mpirun.
"""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from tplinear.testing import launcher_missing, world_env

HOSTS = ("node0", "node1")
NET = "10.231.1"          # the veth: node0 is .1, node1 is .2
DECOY = "10.231.2.1/24"   # node0's decoy interface: no route from node1
VETH = ("tplveth0", "tplveth1")

# Runs its arguments on the host named by the first one; OpenMPI calls it as an rsh/ssh agent:
# `agent [options] HOST COMMAND...`, the command a shell line, as ssh would pass it.
AGENT = """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1; shift
case "$host" in
{cases}
*) echo "tplinear two-host agent: no host $host" >&2; exit 255 ;;
esac
exec nsenter --net="/run/netns/$ns" -- unshare --uts -- \\
    sh -c 'echo "$0" > /proc/sys/kernel/hostname && exec sh -c "$*"' "$host" "$@"
"""


def _run(cmd, timeout=30):
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


class MpiResult:
    def __init__(self, returncode, output, cmd, seconds):
        self.returncode, self.output, self.cmd, self.seconds = returncode, output, cmd, seconds

    def describe(self):
        return "exit %s after %.1f s\ncommand: %s\n%s" % (self.returncode, self.seconds, " ".join(self.cmd),
                                                           self.output[-20000:])


class TwoHosts:
    def __init__(self, decoy=False):
        self.decoy = decoy
        tag = "tplci%d-%s" % (os.getpid(), os.urandom(3).hex())
        self.netns = (tag + "-0", tag + "-1")
        self.made = []
        self.tmp = None

    # ------------------------------------------------------------------ setup and teardown
    def __enter__(self):
        why = self._missing()
        if why:
            pytest.skip(why)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _missing():
        if os.geteuid() != 0:
            return "two hosts need root (network and UTS namespaces)"
        for tool, pkg in (("ip", "iproute2"), ("nsenter", "util-linux"), ("unshare", "util-linux")):
            if shutil.which(tool) is None:
                return "no %s on PATH (apt-get install %s)" % (tool, pkg)
        return launcher_missing("mpirun")

    def _ip(self, *args, skip=False):
        res = _run(["ip"] + list(args))
        if res.returncode != 0:
            msg = "ip %s: %s" % (" ".join(args), (res.stderr or res.stdout).strip())
            if skip:
                pytest.skip("the kernel or sandbox refused a network namespace: " + msg)
            raise RuntimeError(msg)

    def _build(self):
        self._reap_stale()
        for ns in self.netns:
            self._ip("netns", "add", ns, skip=True)
            self.made.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        probe = _run(["nsenter", "--net=/run/netns/" + self.netns[0], "--", "unshare", "--uts", "--", "true"])
        if probe.returncode != 0:
            pytest.skip("the kernel or sandbox refused a UTS namespace: " + probe.stderr.strip())
        if self.decoy:   # first, so that it is node0's first non-loopback interface
            self._ip("-n", self.netns[0], "link", "add", "tpldecoy", "type", "veth", "peer", "name", "tpldecoyp",
                     skip=True)
            self._ip("-n", self.netns[0], "addr", "add", DECOY, "dev", "tpldecoy")
            for dev in ("tpldecoyp", "tpldecoy"):
                self._ip("-n", self.netns[0], "link", "set", dev, "up")
        self._ip("link", "add", VETH[0], "netns", self.netns[0], "type", "veth", "peer", "name", VETH[1],
                 "netns", self.netns[1], skip=True)
        for k, ns in enumerate(self.netns):
            self._ip("-n", ns, "addr", "add", "%s.%d/24" % (NET, k + 1), "dev", VETH[k])
            self._ip("-n", ns, "link", "set", VETH[k], "up")
        self.tmp = tempfile.mkdtemp(prefix="tplinear-twohost-")
        self.agent = os.path.join(self.tmp, "agent.sh")
        cases = "\n".join("%s) ns=%s ;;" % (h, ns) for h, ns in zip(HOSTS, self.netns))
        with open(self.agent, "w") as f:
            f.write(AGENT.format(cases=cases))
        os.chmod(self.agent, 0o755)

    @staticmethod
    def _reap_stale():
        """Namespaces of a test process that died without its teardown (SIGKILL): their processes and them."""
        for line in _run(["ip", "netns", "list"]).stdout.splitlines():
            m = re.match(r"(tplci(\d+)-[0-9a-f]+-[01])\b", line)
            if m and not os.path.exists("/proc/" + m.group(2)):
                for pid in _run(["ip", "netns", "pids", m.group(1)]).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                _run(["ip", "netns", "del", m.group(1)])

    def pids(self):
        """Every process inside either namespace."""
        out = []
        for ns in self.made:
            res = _run(["ip", "netns", "pids", ns])
            out += [int(p) for p in res.stdout.split()]
        return out

    def kill_all(self):
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def close(self):
        self.kill_all()
        errors = []
        for ns in reversed(self.made):
            res = _run(["ip", "netns", "del", ns])
            if res.returncode != 0:
                errors.append(res.stderr.strip())
        self.made = []
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if errors:
            raise RuntimeError("two-host teardown: " + "; ".join(errors))

    # ------------------------------------------------------------------ running things
    def address(self, host):
        return "%s.%d" % (NET, host + 1)

    def on(self, host, cmd):
        """The command line that runs cmd on host (0 or 1), under that host's name."""
        return ["nsenter", "--net=/run/netns/" + self.netns[host], "--", "unshare", "--uts", "--", "sh", "-c",
                'echo "$0" > /proc/sys/kernel/hostname && exec "$@"', HOSTS[host]] + list(cmd)

    def link_down(self):
        """Cut the wire: node1's end of the veth goes down (node0 sees its carrier go)."""
        self._ip("-n", self.netns[1], "link", "set", VETH[1], "down")

    def mpirun_cmd(self, nproc, argv, per_host=None, mpi_args=()):
        import sys
        per_host = per_host or (nproc + 1) // 2
        hosts = "%s:%d,%s:%d" % (HOSTS[0], per_host, HOSTS[1], nproc - per_host)
        net = NET + ".0/24"
        cmd = ["mpirun", "-np", str(nproc), "--host", hosts, "--oversubscribe",
               "--mca", "plm_rsh_agent", self.agent, "--mca", "oob_tcp_if_include", net,
               "--mca", "btl_tcp_if_include", net, "--mca", "btl", "self,vader,tcp"]
        return self.on(0, cmd + list(mpi_args) + [sys.executable] + [str(a) for a in argv])

    def start(self, nproc, argv, per_host=None, env=None, mpi_args=(), cwd=None):
        """Starts mpirun on node0 (its own session: kill with kill_all); returns the Popen (output piped)."""
        e = world_env(env)
        e.setdefault("OMP_NUM_THREADS", "1")
        e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
        cmd = self.mpirun_cmd(nproc, argv, per_host, mpi_args)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=e, cwd=cwd or self.tmp, start_new_session=True, text=True)
        proc.cmd = cmd
        return proc

    def mpirun(self, nproc, argv, per_host=None, env=None, mpi_args=(), timeout=120, cwd=None):
        """Runs argv (a Python script and its arguments) on nproc ranks, per_host of them on node0 (by
        default half, rounded up) and the rest on node1; every process of the hosts is killed at the
        timeout. Returns an MpiResult (returncode None: timed out)."""
        t0 = time.monotonic()
        proc = self.start(nproc, argv, per_host, env, mpi_args, cwd)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            self.kill_all()
            out, rc = proc.communicate(timeout=10)[0], None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.kill_all()   # whatever outlived mpirun
        return MpiResult(rc, out, proc.cmd, time.monotonic() - t0)
