import os
import zlib

import numpy as np
import pytest

import tplinear.distributed as dist

# Fresh random inputs every run; TPLINEAR_TEST_SEED=<n> reproduces a run (the seed is in the header).
SEED = int(os.environ.get("TPLINEAR_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))


def pytest_report_header(config):
    return f"tplinear test seed: TPLINEAR_TEST_SEED={SEED}"


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, zlib.crc32(request.node.nodeid.encode())])


def rel_err(got, ref):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    return np.linalg.norm(got - ref) / (den if den > 0 else 1.0)


TOL = {"float32": 1e-5, "float64": 1e-12}

# The shm backend's algorithms, as environments for a world: chosen by size (the default); the copying
# ones only (main's before single copy, and the fallback where the kernel refuses process_vm_readv);
# single copy for every size (the one-shot all-reduce off as well).
SHM_ALGOS = {
    "by-size": {},
    "copying": {"TPLINEAR_SHM_CMA": "0"},
    "single-copy": {"TPLINEAR_SHM_CMA_KB": "0", "TPLINEAR_SHM_ONESHOT_KB": "0"},
}


@pytest.fixture
def no_outer_world(monkeypatch):
    """This process may be a rank of a launcher's world (pytest under torchrun or mpirun): forget it."""
    from tplinear.run import clean_launcher_env
    for k in set(os.environ) - set(clean_launcher_env(os.environ)):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def world_of_one(no_outer_world):
    """The default group as a world of one in this process (no launcher variables), destroyed afterwards."""
    if dist.is_initialized():
        dist.destroy_process_group()
    g = dist.init_process_group(timeout=10)
    yield g
    dist.destroy_process_group()
