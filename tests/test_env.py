"""The environment contract: one table of knobs in the C library (csrc/core/env.c), the README's
table listing exactly those knobs, the launcher's world read by C (tp_world_from_env) with Python passing
None, backend names validated once in C, and log lines prefixed with the world rank under OpenMPI's
variables too."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tplinear import _C
import tplinear.distributed as dist
from tplinear.testing import assert_world_ok, run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# README rows that are not knobs of the library's table: OpenBLAS reads OMP_NUM_THREADS itself (the launcher
# sets it), and TPLINEAR_CUDA / TPLINEAR_MPI / MPI_HOME are read by setup.py at build time.
NOT_KNOBS = {"OMP_NUM_THREADS", "TPLINEAR_CUDA", "TPLINEAR_MPI", "MPI_HOME"}
WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")


def readme_env_names():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---") and not line.startswith("| variable"):
            first = re.split(r"(?<!\\)\|", line)[1]  # cells split at unescaped bars
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)", first))
    return names


def test_readme_lists_exactly_the_knobs():
    knobs = {k["name"] for k in _C.env_knobs()}
    readme = readme_env_names()
    assert readme - NOT_KNOBS == knobs, (
        f"README's environment table and csrc/core/env.c differ: only in README {sorted(readme - NOT_KNOBS - knobs)}, "
        f"only in the table {sorted(knobs - readme)}")


def test_knob_table_is_complete():
    knobs = _C.env_knobs()
    assert len({k["name"] for k in knobs}) == len(knobs) >= 10
    for k in knobs:
        assert k["name"].startswith("TPLINEAR_") and k["doc"] and k["default"], k
        assert k["type"] in ("int", "bool", "choice", "string"), k
        assert (k["choices"] is not None) == (k["type"] == "choice"), k


def test_world_env_is_parsed_in_c(monkeypatch):
    for v in WORLD_VARS:
        monkeypatch.delenv(v, raising=False)
    assert _C.world_env() == dict(rank=None, world_size=None, local_rank=None, local_world_size=None,
                                  master_port=None, master_addr=None)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "5")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    w = _C.world_env()
    assert (w["rank"], w["world_size"], w["local_world_size"], w["master_addr"]) == (2, 5, 5, "10.0.0.7")
    monkeypatch.setenv("RANK", "4")  # torchrun's name wins
    assert _C.world_env()["rank"] == 4
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        _C.world_env()


def test_world_env_of_mpich_and_slurm(monkeypatch):
    for v in WORLD_VARS + ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "SLURM_PROCID", "SLURM_NTASKS",
                           "SLURM_LOCALID", "SLURM_STEP_ID"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")   # a batch script's own shell: not a rank of anything
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert _C.world_env()["world_size"] is None
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # inside srun's job step
    monkeypatch.setenv("SLURM_LOCALID", "1")
    w = _C.world_env()
    assert (w["rank"], w["world_size"], w["local_rank"], w["local_world_size"]) == (3, 8, 1, None)
    monkeypatch.setenv("PMI_RANK", "2")       # MPICH's Hydra comes before Slurm
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    w = _C.world_env()
    assert (w["rank"], w["world_size"], w["local_world_size"]) == (2, 4, 2)
    monkeypatch.setenv("PMI_SIZE", "four")
    with pytest.raises(ValueError, match="PMI_SIZE"):
        _C.world_env()


def test_python_reads_no_environment():
    src = open(os.path.join(ROOT, "python", "tplinear", "distributed.py")).read()
    assert "os.environ" not in src and "getenv" not in src and "import os" not in src


def test_backends_are_the_registry():
    names = dist.available_backends()
    mpi = "mpi" in names
    assert names[0] == ("mpi" if mpi else "shm") and "shm" in names  # auto: mpi (its launcher's worlds) first
    assert ("nccl" in names) == bool(_C.cuda_compiled())


def _run_one(env, code):
    base = {k: v for k, v in os.environ.items() if k not in WORLD_VARS}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(base, **env), capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_backend_knob_is_validated_in_c():
    code = """
        import tplinear.distributed as dist
        try:
            dist.init_process_group()
        except (ValueError, NotImplementedError) as e:
            print(type(e).__name__, e)
        else:
            print("backend", dist.get_backend())
    """
    res = _run_one({"TPLINEAR_BACKEND": "bogus"}, code)
    assert "ValueError" in res.stdout and "TPLINEAR_BACKEND" in res.stdout and "'bogus'" in res.stdout, res
    res = _run_one({"TPLINEAR_BACKEND": "mpi"}, code)
    if "mpi" in dist.available_backends():
        assert "backend self" in res.stdout, res  # a world of one
    else:
        assert "NotImplementedError" in res.stdout and "not built" in res.stdout and "libopenmpi-dev" in res.stdout, res
    res = _run_one({"TPLINEAR_BACKEND": "shm"}, code)
    assert "backend self" in res.stdout, res  # a world of one


def test_invalid_knob_fails_with_its_name():
    res = run_world(2, """
        import tplinear.distributed as dist
        dist.init_process_group(timeout=20)
    """, env={"TPLINEAR_SHM_ALGO": "fastest"}, timeout=60)
    assert res.returncode != 0
    assert "TPLINEAR_SHM_ALGO must be one of oneshot|rsag, got 'fastest'" in res.output, res.output


def test_log_prefix_is_the_world_rank_under_openmpi_variables():
    """With only OpenMPI's variables (as under mpirun) every rank used to log as rank 0; the knobs that are
    set are logged at INFO."""
    res = assert_world_ok(2, """
        import os
        import numpy as np
        import tplinear.distributed as dist
        env = os.environ
        for a, b in [("RANK", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
                     ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"), ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")]:
            env[b] = env.pop(a)
        dist.init_process_group(timeout=30)
        dist.all_reduce(np.ones(4))
        print("done", dist.get_rank(), flush=True)
    """, env={"TPLINEAR_DEBUG": "INFO", "TPLINEAR_SHM_SLOT_KB": "64"}, timeout=60)
    for r in range(2):
        logs = [line for line in res.rank_lines(r) if line.startswith("[tplinear rank")]
        assert logs and all(line.startswith(f"[tplinear rank {r}]") for line in logs), res.output
        assert any("env: TPLINEAR_SHM_SLOT_KB=64 (default 8192)" in line for line in logs), res.output
        assert any("backend shm" in line for line in logs), res.output
