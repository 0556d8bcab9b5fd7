"""The two-host fault table: time from a fault to the survivor's CommError, per backend, on the two hosts of
tests/twohost.py (network namespaces joined by a veth pair; needs root, iproute2, util-linux, OpenMPI).

    python benchmarks/two_host_faults.py [--timeout 10] [--faults sigkill,sigstop,link,sigint] [--backends mpi,shm]
                                         [--json results.json]

  mpi: 2 ranks, one per host (mpirun --enable-recovery, so the survivor lives on and what it sees is
       tplinear's own detection); the victim is rank 1 on node1.
  shm: 2 ranks on node0, backend="shm" (the within-a-host half of a 2 x 2 layout); the victim is rank 1.
  mpirun: plain mpirun (no --enable-recovery), SIGKILL of rank 1 on node1: time until mpirun has ended
       the job (the survivor is killed by the launcher, not told).

Both ranks run all_reduce in a loop; the test process applies the fault (SIGKILL or SIGSTOP of the victim,
or `ip link set <veth> down` on node1) once the victim says it is running, and reads rank 0's
"CAUGHT <wall time>" line. The group timeout (--timeout) is what detection by timeout costs."""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from twohost import TwoHosts  # noqa: E402

RANK = """
import os, signal, sys, time
import numpy as np
import tplinear, tplinear.distributed as dist
dist.init_process_group(backend=os.environ.get("TEST_BACKEND") or None, timeout=float(os.environ["TEST_TIMEOUT"]))
r = dist.get_rank()
dist.barrier()
if r == 0:
    def interrupted(*_):   # when Python's handler runs: the Ctrl-C latency
        print("CAUGHT", r, "%.6f" % time.time(), "the SIGINT handler ran (KeyboardInterrupt)", flush=True)
        os._exit(4)
    signal.signal(signal.SIGINT, interrupted)
    print("PID0", os.getpid(), flush=True)
a = np.ones(1000)
n = 0
try:
    while True:
        dist.all_reduce(a)
        n += 1
        if r == 1 and n == 50:
            print("READY", os.getpid(), flush=True)
except tplinear.CommError as e:
    print("CAUGHT", r, "%.6f" % time.time(), e, flush=True)
    sys.exit(3)

"""


def one(backend, fault, timeout, limit):
    with TwoHosts() as hosts, tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank.py")
        with open(path, "w") as f:
            f.write(RANK)
        env = {"TEST_TIMEOUT": timeout, "TEST_BACKEND": "shm" if backend == "shm" else ""}
        recovery = [] if backend == "mpirun" else ["--enable-recovery"]
        per_host = 2 if backend == "shm" else 1
        proc = hosts.start(2, [path], per_host=per_host, env=env, mpi_args=recovery)
        t_fault, caught, lines, pid0, pid = None, None, [], None, None
        deadline = time.monotonic() + limit
        watchdog = threading.Timer(limit, hosts.kill_all)   # a silent hang ends too (the read loop sees EOF)
        watchdog.start()
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("PID0 "):
                    pid0 = int(line.split()[1])
                m = re.match(r"READY (\d+)", line)
                if m:
                    pid = int(m.group(1))
                if t_fault is None and pid and (pid0 or fault != "sigint"):
                    t_fault = time.time()
                    if fault == "sigkill":
                        os.kill(pid, signal.SIGKILL)
                    elif fault == "sigstop":
                        os.kill(pid, signal.SIGSTOP)
                    elif fault == "sigint":   # Ctrl-C in rank 0 while it waits for a stopped peer
                        os.kill(pid, signal.SIGSTOP)
                        time.sleep(0.2)
                        t_fault = time.time()
                        os.kill(pid0, signal.SIGINT)
                    else:
                        hosts.link_down()
                m = re.match(r"CAUGHT 0 (\S+) (.*)", line)
                if m:
                    caught = (float(m.group(1)) - t_fault, m.group(2).strip())
                    break
                if time.monotonic() > deadline:
                    break
            if backend == "mpirun" and t_fault is not None:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
                caught = (time.time() - t_fault, "mpirun exited %s" % proc.returncode)
        except subprocess.TimeoutExpired:
            pass
        finally:
            watchdog.cancel()
            hosts.kill_all()
            proc.wait()
        if caught is None:
            return None, "no CommError within %.0f s; output:\n%s" % (limit, "".join(lines)[-3000:])
        return caught


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=10.0, help="the group timeout, seconds")
    ap.add_argument("--faults", default="sigkill,sigstop,link,sigint")
    ap.add_argument("--backends", default="mpi,shm,mpirun")
    ap.add_argument("--limit", type=float, default=60.0, help="give up on one case after this many seconds")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    print("| backend | fault | seconds to CommError | what rank 0 saw |")
    print("|---|---|---|---|")
    for backend in args.backends.split(","):
        for fault in args.faults.split(","):
            if (backend == "shm" and fault == "link") or (backend == "mpirun" and fault != "sigkill"):
                continue   # no wire within a host; plain mpirun: only a death is the launcher's business
            seconds, what = one(backend, fault, args.timeout, args.limit)
            shown = "-" if seconds is None else "%.2f" % seconds
            print("| %s | %s | %s | %s |" % (backend, fault, shown, what.replace("|", "/")[:300]), flush=True)
            rows.append({"backend": backend, "fault": fault, "seconds": seconds, "what": what})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timeout_s": args.timeout, "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
