"""srun for real: a one-node Slurm cluster started by the test (tests/slurm.py: slurmctld + slurmd, munge on
a private socket) runs the demo, the layers and tests/test_distributed.py as job steps of 2 tasks, with
`--mpi=pmix` where Debian's build has it (else pmi2, else none + tplinear's own reading of SLURM_*). These
are docs/launching.md's srun lines. Skips with the reason where Slurm is not installed or will not start."""
import json
import os
import re
import subprocess

import pytest

from slurm import SlurmCluster
from test_launch_anywhere import DEMO, ENV, TESTS, ROOT, layer_checks, same_curve, script, single_process_curve
from tplinear.run import free_port
from tplinear.testing import launch, launcher_missing


@pytest.fixture(scope="module")
def cluster():
    with SlurmCluster() as c, pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", c.env["SLURM_CONF"])   # srun, scontrol and tplinear.testing find this cluster
        yield c
        queue = subprocess.run(["squeue", "--noheader"], env=c.env, capture_output=True, text=True, timeout=30)
        assert queue.returncode == 0 and not queue.stdout.strip(), "steps left running:\n" + queue.stdout


def srun_env(cluster, env=None):
    """Without an MPI plugin the ranks meet at MASTER_ADDR:MASTER_PORT (docs/launching.md)."""
    out = dict(env or {})
    if cluster.mpi_args == ["--mpi=none"]:
        out.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return out


def ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\ncommand: {' '.join(res.cmd)}\n{res.output[-20000:]}"
    return res


def test_launcher_is_found_only_while_a_controller_answers(cluster, monkeypatch, tmp_path):
    """Installed is not running: with the controller down, the srun cases of the other files skip."""
    assert launcher_missing("srun") is None
    conf = open(cluster.env["SLURM_CONF"]).read()
    down = tmp_path / "down.conf"
    down.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=%d" % free_port(), conf))
    monkeypatch.setenv("SLURM_CONF", str(down))
    why = launcher_missing("srun")
    assert why and "no controller answers (scontrol ping: Slurmctld(primary) at" in why and "is DOWN" in why, why


def test_demo_under_srun(cluster, tmp_path):
    """srun --ntasks 2 --ntasks-per-node 2 --mpi=pmix python examples/train_mlp.py: the mpi backend, the
    single-process loss curve."""
    out = tmp_path / "losses.json"
    res = ok(launch("srun", 2, [DEMO, "--steps", "6", "--losses", out], timeout=180, cwd=str(tmp_path),
                    launcher_args=["--ntasks-per-node", "2"] + cluster.mpi_args, env=srun_env(cluster)))
    assert "step   6/6" in res.output and "2 ranks" in res.output, res.output
    backend = "shm" if cluster.mpi_args == ["--mpi=none"] else "mpi"
    assert f", {backend})" in res.output, res.output
    same_curve(single_process_curve(tmp_path, 6), json.loads(out.read_text())["losses"])


def test_layers_under_srun(cluster, tmp_path):
    res = ok(launch("srun", 2, [script(tmp_path, layer_checks(2))], timeout=300, launcher_args=cluster.mpi_args,
                    env=srun_env(cluster, ENV)))
    assert res.output.count("layer checks passed") == 2, res.output


def test_distributed_tests_under_srun(cluster):
    """pytest as a job step: the tests' own worlds ignore the step they run in."""
    res = ok(launch("srun", 2, ["-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(TESTS, "test_distributed.py"),
                                "-k", "subgroups_2x2 or world_of_one or argument_errors"], timeout=300, cwd=ROOT,
                    launcher_args=cluster.mpi_args))
    assert res.output.count("3 passed") == 2, res.output
