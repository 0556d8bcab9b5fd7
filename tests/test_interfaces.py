"""Which address rank 0's rendezvous store announces under mpirun, on one host made to look like a host
with a decoy interface first: a private network namespace (unshare -n, as root) with two veth interfaces,
decoy0 (10.77.0.1, first) and good0 (10.78.0.1), and a routing rule that makes the decoy's address
unreachable ("Network is unreachable", as a docker0 or management address is from another host). Only
addresses inside that namespace are used; the host's own interfaces are never touched."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from tplinear.testing import launcher_missing, world_env

TESTS = os.path.dirname(os.path.abspath(__file__))

SETUP = """
set -e
ip link set lo up
for n in decoy:10.77.0.1 good:10.78.0.1; do
    ip link add ${n%%:*}0 type veth peer name ${n%%:*}1
    ip addr add ${n#*:}/24 dev ${n%%:*}0
    ip link set ${n%%:*}0 up
    ip link set ${n%%:*}1 up
done
# the decoy's address answers nobody, not even this host (a rule ahead of the local table)
ip rule add to 10.77.0.1 unreachable pref 10
ip rule del pref 0
ip rule add lookup local pref 100
"""

WORLD = """
import os, sys
# two hosts as far as the launcher's variables and the host identities say (one rank on each)
os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"], os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = "1", "0"
os.environ["TPLINEAR_HOST_ID"] = "node" + os.environ["OMPI_COMM_WORLD_RANK"]
import numpy as np
import tplinear.distributed as dist
try:
    dist.init_process_group(timeout=float(os.environ.get("TEST_TIMEOUT", "20")))
except Exception as e:
    print(f"RANK {os.environ['OMPI_COMM_WORLD_RANK']} {type(e).__name__}: {e}", flush=True)
    sys.exit(0)
x = np.full(3, dist.get_rank() + 1.0)
dist.all_reduce(x)
assert x.tolist() == [3.0] * 3, x
print(f"RANK {dist.get_rank()} OK", flush=True)
dist.destroy_process_group()
"""


def netns_missing():
    if launcher_missing("mpirun"):
        return launcher_missing("mpirun")
    if os.geteuid() != 0:
        return "needs root to make a network namespace (unshare -n)"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs util-linux's unshare and iproute2's ip"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link add t0 type veth peer name t1"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"the kernel or sandbox refuses a network namespace with veth: {probe.stderr.strip()}"
    return None


def run_cases(tmp_path, cases):
    """Runs the 2-rank WORLD under mpirun once per case ({name: env}), all at once, inside one fresh
    namespace; returns {name: output}."""
    script = tmp_path / "world.py"
    script.write_text(WORLD)
    lines = [SETUP]
    for name, env in cases.items():
        assigns = " ".join(f"{k}={v!r}" for k, v in env.items())
        lines.append(f"(env {assigns} timeout 120 mpirun --allow-run-as-root --oversubscribe -np 2 {sys.executable} "
                     f"{script} > {tmp_path / name}.out 2>&1 || echo exit $? >> {tmp_path / name}.out) &")
    lines.append("wait")  # the cases at once: each is mostly waiting for its launcher
    proc = subprocess.run(["unshare", "-n", "sh", "-c", "\n".join(lines)], env=world_env({"TPLINEAR_DEBUG": "INFO"}),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {name: (tmp_path / f"{name}.out").read_text() for name in cases}


def test_store_announces_every_interface_and_peers_keep_the_one_that_answers(tmp_path):
    why = netns_missing()
    if why:
        pytest.skip(why)
    out = run_cases(tmp_path, {
        "default": {},                                         # decoy first: both announced, good0 kept
        "decoy": {"TPLINEAR_SOCKET_IFNAME": "=decoy0", "TEST_TIMEOUT": "3"},  # only the unreachable one
        "master": {"MASTER_ADDR": "10.78.0.1", "TPLINEAR_SOCKET_IFNAME": "=decoy0"},  # MASTER_ADDR wins
    })
    text = out["default"]
    assert "RANK 0 OK" in text and "RANK 1 OK" in text, text
    assert re.search(r"store 10\.77\.0\.1,10\.78\.0\.1:\d+", text), text          # every address, decoy first
    assert re.search(r"connected to the store of rank 0 at 10\.78\.0\.1:\d+", text), text
    # the one unreachable address: every rank fails naming it with its errno text, and the hint knows
    # that under mpirun rank 0 is running
    text = out["decoy"]
    fails = re.findall(r"RANK \d CommError: .*", text)
    assert len(fails) == 2, text
    for line in fails:
        assert re.search(r"tried 10\.77\.0\.1:\d+ \(Network is unreachable\)", line), line
        assert "rank 0 is running" in line and "TPLINEAR_SOCKET_IFNAME" in line, line
    text = out["master"]
    assert "RANK 0 OK" in text and "RANK 1 OK" in text and re.search(r"store 10\.78\.0\.1:\d+,", text), text
