"""A one-node Slurm cluster in a temporary directory, for the srun tests (tests/test_slurm.py).

    with SlurmCluster() as cluster:        # pytest.skip with the reason when Slurm cannot run here
        env = cluster.env                  # SLURM_CONF: srun, sinfo, scontrol find this cluster
        subprocess.run(["srun", "--ntasks", "2", *cluster.mpi_args, "hostname"], env=env, ...)

Debian's slurm-wlm: a slurm.conf naming this host and its CPU count, the controller and node daemons on
ports the kernel picked a moment before, state, spool, logs and pid files in the directory; munge with a
freshly generated key on a private socket (`AuthInfo=socket=`), or, where munged will not start,
`auth/none` (the reason is kept in `.auth_note`). The daemons run in the foreground in a session of their
own and are killed, with every job step they started, by close(); nothing under /etc is read or changed.
`mpi_args` is `--mpi=pmix` where `srun --mpi=list` has it, else `--mpi=pmi2`, else `--mpi=none` (tplinear
then finds the world in SLURM_PROCID/SLURM_NTASKS and needs MASTER_ADDR/MASTER_PORT); it is also the
cluster's `MpiDefault`, so a plain `srun` gets it too.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

CONF = """\
ClusterName=tplci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser={user}
SlurmdUser=root
AuthType={auth}
CredType={cred}
{auth_info}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
PlugStackConfig={dir}/plugstack.conf
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault={mpi}
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=tplci Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env=None, timeout=30):
    try:
        return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, e.stdout or "", "timed out after %s s" % timeout)


def _tail(path, n=2000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


class SlurmCluster:
    def __init__(self, start_timeout=60):
        self.start_timeout = start_timeout
        self.procs = []
        self.dir = None
        self.auth_note = ""
        self.mpi_args = []
        self.env = None

    def __enter__(self):
        for daemon in ("slurmctld", "slurmd", "srun"):
            if shutil.which(daemon) is None:
                pytest.skip("Slurm is not installed (no %s on PATH: apt-get install slurm-wlm munge)" % daemon)
        if os.geteuid() != 0:
            pytest.skip("a one-node Slurm cluster needs root here (slurmd starts job steps as their user)")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _daemon(self, cmd, log):
        out = open(os.path.join(self.dir, log), "w")
        try:
            proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def _munge(self):
        """munged on a private socket with a fresh key; returns slurm.conf's auth lines, or auth/none's."""
        if shutil.which("munged") is None or shutil.which("mungekey") is None:
            self.auth_note = "no munged (apt-get install munge): auth/none"
            return "auth/none", "cred/none", ""
        mdir = os.path.join(self.dir, "munge")
        os.makedirs(mdir, mode=0o700)
        key = os.path.join(mdir, "munge.key")
        res = _run(["mungekey", "--create", "--keyfile", key])
        sock = os.path.join(mdir, "munge.socket")
        if res.returncode == 0:
            proc = self._daemon(["munged", "--foreground", "--force", "--key-file", key, "--socket", sock,
                                 "--pid-file", os.path.join(mdir, "munged.pid"),
                                 "--seed-file", os.path.join(mdir, "munged.seed"),
                                 "--log-file", os.path.join(mdir, "munged.log")], "munged.out")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None and not os.path.exists(sock):
                time.sleep(0.05)
            if os.path.exists(sock):
                return "auth/munge", "cred/munge", "AuthInfo=socket=%s" % sock
            why = _tail(os.path.join(mdir, "munged.log"), 500) or _tail(os.path.join(self.dir, "munged.out"), 500)
        else:
            why = res.stderr.strip()
        self.auth_note = "munged did not start (%s): auth/none" % why.strip().replace("\n", " ")
        return "auth/none", "cred/none", ""

    def _start(self):
        self.dir = tempfile.mkdtemp(prefix="tplinear-slurm-")
        os.chmod(self.dir, 0o755)
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.dir, sub))
        open(os.path.join(self.dir, "plugstack.conf"), "w").close()
        self.env = dict(os.environ, SLURM_CONF=os.path.join(self.dir, "slurm.conf"))
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del self.env[k]
        auth, cred, auth_info = self._munge()
        self.host = socket.gethostname().split(".")[0]
        conf = self.env["SLURM_CONF"]
        fields = dict(host=self.host, cpus=os.cpu_count() or 1, ctld_port=_free_port(), d_port=_free_port(),
                      user="root", auth=auth, cred=cred, auth_info=auth_info, dir=self.dir, mpi="none")
        for final in (False, True):   # srun --mpi=list reads the configuration; the daemons are not needed
            with open(conf, "w") as f:
                f.write(CONF.format(**fields))
            if not final:
                res = _run(["srun", "--mpi=list"], env=self.env)
                names = (res.stdout + res.stderr).replace(",", " ").split()
                fields["mpi"] = "pmix" if "pmix" in names else "pmi2" if "pmi2" in names else "none"
        self.mpi_args = ["--mpi=" + fields["mpi"]]
        self._daemon(["slurmctld", "-D", "-i", "-f", conf], "slurmctld.out")
        self._daemon(["slurmd", "-D", "-f", conf, "-N", self.host], "slurmd.out")
        deadline = time.monotonic() + self.start_timeout
        state = ""
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            res = _run(["sinfo", "--noheader", "--node", self.host, "--format", "%t"], env=self.env, timeout=10)
            state = (res.stdout.strip() or res.stderr.strip())
            if res.returncode == 0 and state.rstrip("*") in ("idle", "mix", "alloc"):
                break
            time.sleep(0.3)
        else:
            state = "not ready within %s s (sinfo: %s)" % (self.start_timeout, state)
        if any(p.poll() is not None for p in self.procs) or state.rstrip("*") not in ("idle", "mix", "alloc"):
            logs = "\n".join("--- %s\n%s" % (n, _tail(os.path.join(self.dir, n))) for n in
                             ("slurmctld.log", "slurmctld.out", "slurmd.log", "slurmd.out"))
            pytest.skip("the one-node Slurm cluster did not come up (%s):\n%s" % (state, logs))

    def close(self):
        if self.env and self.dir and shutil.which("scancel"):
            _run(["scancel", "--full", "--quiet", "--partition", "tplci"], env=self.env, timeout=10)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self.procs = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
