"""The pytest plugin for rank-local tests (tplinear.pytest): pytest under python -m tplinear.run, torchrun and
mpirun, driven with pytest's own pytester. A test failing on one rank is exactly one failed test on every rank
and the next test passes; -x stops every rank together; a hang ends at the plugin's timeout naming the test."""
import re
import sys

import pytest

from tplinear.testing import launch, launcher_missing

pytest_plugins = ["pytester"]

TIMEOUT = 4  # --tp-timeout of the worlds below: a hang is reported after 2 x 4 s

RANK_LOCAL = """
    import numpy as np
    import tplinear.distributed as dist

    def test_allreduce(tp_group, tp_rank, tp_world_size):
        x = np.full(4, tp_rank, np.float32)
        dist.all_reduce(x)
        assert (x == sum(range(tp_world_size))).all()

    def test_fails_on_rank_1(tp_group, tp_rank):
        assert tp_rank != 1, "rank one is wrong"
        x = np.ones(4, np.float32)
        dist.all_reduce(x)          # rank 0 waits here until rank 1's failure aborts the world

    def test_next_one_passes(tp_group, tp_tmp_path, tp_rank, tp_world_size):
        (tp_tmp_path / f"rank{tp_rank}").write_text("x")
        dist.barrier()
        assert sorted(p.name for p in tp_tmp_path.iterdir()) == [f"rank{r}" for r in range(tp_world_size)]
        seed = [1234 if tp_rank == 0 else None]
        dist.broadcast_object_list(seed, src=0)
        assert seed == [1234]
"""


def need(launcher):
    why = launcher_missing(launcher)
    if why:
        pytest.skip(why)


def run(pytester, launcher, *args, nproc=2, timeout=150, ini=True):
    """pytest on nproc ranks under launcher, in pytester's directory; returns the launcher's result."""
    if ini:
        pytester.makeini(f"[pytest]\ntp_timeout = {TIMEOUT}\n")
    argv = ["-m", "pytest", "-p", "no:cacheprovider", *args]
    return launch(launcher, nproc, argv, timeout=timeout, cwd=str(pytester.path))


def rank_result(res, rank):
    """Rank `rank`'s pytest output (the plugin's '[rank N] ' prefix removed) as a pytest.RunResult."""
    lines = res.rank_lines(rank)
    assert lines, f"no output from rank {rank}:\n{res.output[-20000:]}"
    return pytest.RunResult(res.returncode, lines, [], 0.0)


@pytest.mark.parametrize("launcher", ["tplinear.run", "torchrun", "mpirun"])
def test_failure_on_one_rank_fails_once_on_every_rank(pytester, launcher):
    need(launcher)
    pytester.makepyfile(test_rank_local=RANK_LOCAL)
    res = run(pytester, launcher, "-rf", "--tb=short")
    assert res.returncode != 0, res.output
    for r in range(2):
        out = rank_result(res, r)
        out.assert_outcomes(failed=1, passed=2)
        out.stdout.fnmatch_lines(["*FAILED test_rank_local.py::test_fails_on_rank_1*"])
    # rank 1 reports its own assertion, rank 0 that the test failed on rank 1 (with rank 1's report)
    rank_result(res, 1).stdout.fnmatch_lines(["*AssertionError: rank one is wrong*"])
    rank_result(res, 0).stdout.fnmatch_lines(["failed on rank 1: AssertionError: rank one is wrong*",
                                               "*---- rank 1's report (call) ----*"])
    assert "collective mismatch" not in res.output and "unusable after" not in res.output, res.output


def test_maxfail_stops_every_rank_together_and_rank0_only_reports(pytester):
    need("tplinear.run")
    pytester.makepyfile(test_rank_local=RANK_LOCAL)
    res = run(pytester, "tplinear.run", "-x", "--tp-output=rank0")
    lines = res.rank_lines(0)
    assert not res.rank_lines(1), res.output  # rank 1 prints nothing
    out = pytest.RunResult(res.returncode, lines, [], 0.0)
    out.assert_outcomes(failed=1, passed=1)
    out.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    assert res.returncode == 1, res.output


HANGS = """
    import time
    import numpy as np
    import tplinear.distributed as dist

    def test_collective_on_rank_0_only(tp_group, tp_rank):
        if tp_rank == 0:
            dist.all_reduce(np.ones(2, np.float32))     # nobody joins: CommError at the timeout

    def test_passes_after_the_timeout(tp_group):
        x = np.ones(2, np.float32)
        dist.all_reduce(x)
        assert (x == 2).all()

    def test_python_hang_on_rank_1(tp_rank):
        if tp_rank == 1:
            time.sleep(1000)

    def test_never_runs():
        pass
"""


def test_hangs_end_at_the_timeout_naming_the_test(pytester):
    need("tplinear.run")
    pytester.makepyfile(test_hangs=HANGS)
    res = run(pytester, "tplinear.run", "-rf", timeout=120)
    out = rank_result(res, 0)
    # the collective's hang is an ordinary failure (on both ranks), and the next test passes
    out.stdout.fnmatch_lines(["*_ test_collective_on_rank_0_only _*", f"*CommError: all_reduce: timed out after {TIMEOUT} s*",
                              "*FAILED test_hangs.py::test_collective_on_rank_0_only*"])
    # (rank 1 prints its report at the session's end, which it never reaches: the launcher stops it)
    assert out.parseoutcomes().get("passed") == 1, res.output
    # the hang in Python: rank 0 reports it, naming the test and the rank, and the session stops there
    out.stdout.fnmatch_lines(["*_ test_python_hang_on_rank_1 _*",
                              f"failed on rank 1: it did not finish the test within {2 * TIMEOUT} s of rank 0 (hung?)",
                              "*FAILED test_hangs.py::test_python_hang_on_rank_1*",
                              "*did not finish test_hangs.py::test_python_hang_on_rank_1*"])
    assert "test_never_runs" not in res.output, res.output
    assert out.parseoutcomes().get("failed") == 2, res.output
    assert res.returncode != 0


def test_inactive_without_a_launcher_and_opt_in_with_p(pytester):
    pytester.makepyfile(test_one="""
        def test_world(tp_rank, tp_world_size):
            assert (tp_rank, tp_world_size) == (0, 1)
    """)
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    plain.assert_outcomes(skipped=1)
    plain.stdout.fnmatch_lines(["*the tplinear plugin is not active*"])
    opted = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "tplinear.pytest")
    opted.assert_outcomes(passed=1)
    opted.stdout.fnmatch_lines(["*tplinear: rank 0 of 1*"])


def test_no_tplinear_turns_it_off_under_a_launcher(pytester):
    need("tplinear.run")
    pytester.makepyfile(test_one="""
        def test_plain():
            pass
    """)
    res = run(pytester, "tplinear.run", "-p", "no:tplinear", ini=False)
    assert res.returncode == 0 and res.output.count("1 passed") == 2, res.output
    assert "[rank" not in res.output, res.output
