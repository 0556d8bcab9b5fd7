"""Fixtures of the reliability suite and the detection-latency table printed at the end of the run; the
helpers themselves are in relkit.py (shared by every file here: faults, hygiene, security, fuzz, soak, and
the checkpoint-file cases to come)."""
import os
import subprocess
import tempfile

import pytest

from .relkit import _FUZZ, _LATENCIES, SLACK, T, Ranks, TorchStore, base_env, free_port


@pytest.fixture
def spawn():
    """spawn(code, nproc, env=None, port=None, token="<random>") -> Ranks (start them with .start/.start_all)."""
    made = []
    dirs = []

    def make(code, nproc, env=None, port=None, token=None):
        tmp = tempfile.mkdtemp(prefix="tplinear-rel-")
        dirs.append(tmp)
        r = Ranks(tmp, code, nproc, port or free_port(), base_env(env), token or os.urandom(16).hex())
        made.append(r)
        return r

    yield make
    for r in made:
        r.kill()
    for d in dirs:
        subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture
def torch_store():
    """A torch TCPStore server as torchrun's agent serves it (skipped without torch)."""
    from tplinear.testing import launcher_missing
    why = launcher_missing("torchrun")
    if why:
        pytest.skip(why)
    store = TorchStore()
    yield store
    store.close()


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if _FUZZ:
        tr.section("tplinear fuzz")
        tr.write_line("%d Hypothesis cases run in 2-rank worlds (each a call on both ranks)" % sum(_FUZZ))
    if not _LATENCIES:
        return
    tr.section("tplinear detection latency (fault -> CommError/OSError on the surviving ranks; bound: "
               "timeout %.0f s + %.0f s)" % (T, SLACK))
    tr.write_line("%-10s %-24s %-9s %10s  %s" % ("victim", "phase", "fault", "ms", "what the survivor said"))
    for role, phase, fault, ms, what in _LATENCIES:
        tr.write_line("%-10s %-24s %-9s %10.0f  %s" % (role, phase, fault, ms, what[:110]))
