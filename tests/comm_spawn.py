"""Direct multi-rank spawning for the distributed tests (no launcher): starts nproc Python processes
with torchrun's variables set, waits (bounded), and reports each rank's exit status and output.

Used where the launcher's own behaviour would get in the way (a rank killed on purpose: the launcher
stops the others at once) and as a stand-in for tplinear.testing.run_world when that is missing."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

# variables of an enclosing world (pytest itself may run under the launcher)
WORLD_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorldResult:
    def __init__(self, returncodes, outputs):
        self.returncodes = returncodes
        self.outputs = outputs
        self.returncode = next((rc for rc in returncodes if rc != 0), 0)
        self.output = "".join(f"--- rank {r} (exit {rc}) ---\n{out}\n" for r, (rc, out) in
                              enumerate(zip(returncodes, outputs)))


def spawn_world(nproc, code, timeout=120.0, env=None):
    """Runs the Python source `code` on nproc ranks; returns a WorldResult (returncode: the first
    non-zero exit status; a rank still running at the timeout is killed and reported as -9)."""
    base = {k: v for k, v in os.environ.items() if k not in WORLD_VARS}
    base.setdefault("OMP_NUM_THREADS", "1")
    base.update(env or {})
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tplinear-test-") as tmp:
        script = os.path.join(tmp, "world.py")
        with open(script, "w") as f:
            f.write(code)
        procs, files = [], []
        for r in range(nproc):
            e = dict(base, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            out = open(os.path.join(tmp, f"rank{r}.log"), "w+")
            files.append(out)
            procs.append(subprocess.Popen([sys.executable, script], env=e, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        outputs = []
        for f in files:
            f.seek(0)
            outputs.append(f.read())
            f.close()
        return WorldResult([p.returncode for p in procs], outputs)


def assert_spawned_ok(nproc, code, timeout=120.0, env=None):
    res = spawn_world(nproc, code, timeout=timeout, env=env)
    if res.returncode != 0:
        raise AssertionError(f"world of {nproc} failed:\n{res.output}")
    return res
