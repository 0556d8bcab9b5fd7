"""tplinear.torch.integrations.Trainer against plain transformers.Trainer in one process, on the same tiny
Qwen2, data and seed (tests/trainer_checks.py): the logged losses and gradient norms (clipped at every
step), the evaluation loss, gradient accumulation, save_model read back by plain from_pretrained, and
resume_from_checkpoint at the same and at another group size. Worlds of 2 ranks (TP 2; resumed as
DP 2 x TP 1) and 4 ranks (DP 2 x TP 2: tensor-parallel groups {0, 1}, {2, 3}, data-parallel groups {0, 2},
{1, 3}; resumed at TP 2 and as TP 4)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import SEED

from tplinear.testing import assert_world_ok

pytest.importorskip("torch", reason="tplinear.torch needs the torch extra: pip install '.[torch]'")
pytest.importorskip("transformers", reason="the Trainer tests need transformers (the test extra)")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the test extra)")

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"TPLINEAR_TEST_SEED": str(SEED), "PYTHONPATH": TESTS}
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _one_process(*argv, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(ENV, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(TESTS, "trainer_checks.py"), *argv], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return out.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Plain transformers.Trainer in one process."""
    path = tmp_path_factory.mktemp("reference") / "logs.json"
    _one_process("reference", str(path))
    with open(path) as f:
        ref = json.load(f)
    import trainer_checks as c
    # every step clips (max_grad_norm is below every norm), so the clipping is exercised
    assert min(ref["a"]["grad_norm"]) > c.MAX_GRAD_NORM and min(ref["b"]["grad_norm"]) > c.MAX_GRAD_NORM
    return ref


def _check(tmp, ref, name, resumed=None):
    import trainer_checks as c
    with open(tmp / f"{name}.json") as f:
        got = json.load(f)
    want = ref[name if resumed is None else "a"]
    assert got["step"] == want["step"]
    c.close(got["loss"], want["loss"], f"{name} loss")
    c.close(got["grad_norm"], want["grad_norm"], f"{name} grad_norm")
    if want["eval_loss"] is not None and name == "a":
        c.close([got["eval_loss"]], [want["eval_loss"]], f"{name} eval_loss")
    return got


def _world(nproc, tp, resume_tps, tmp):
    resumes = "\n".join(f"    c.run_world({str(tmp / f'resumed{r}.json')!r}, {r}, 'a', "
                        f"resume={str(tmp / 'ck' / 'checkpoint-6')!r})" for r in resume_tps)
    code = (
        "import tplinear.distributed as dist\n"
        "dist.init_process_group(timeout=120)\n"
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "import trainer_checks as c\n"
        "if True:\n"
        f"    c.run_world({str(tmp / 'a.json')!r}, {tp}, 'a', checkpoints={str(tmp / 'ck')!r}, "
        f"save={str(tmp / 'saved')!r})\n"
        f"    c.run_world({str(tmp / 'b.json')!r}, {tp}, 'b')\n"
        f"{resumes}\n")
    assert_world_ok(nproc, code, env=ENV, timeout=400)


@pytest.mark.parametrize("nproc,tp,resume_tps", [(2, 2, (1,)), (4, 2, (2, 4))],
                         ids=["tp2", "dp2xtp2"])
def test_trainer_matches_plain_trainer(nproc, tp, resume_tps, tmp_path, reference):
    """The losses and clipped gradient norms of every step, the evaluation loss and gradient accumulation
    equal plain Trainer's to 1e-4 relative; the checkpoint's model loads with plain from_pretrained (equal
    logits); resuming at step 6 at the same or another group size ends as the uninterrupted run does."""
    _world(nproc, tp, resume_tps, tmp_path)
    _check(tmp_path, reference, "a")
    _check(tmp_path, reference, "b")
    for r in resume_tps:
        _check(tmp_path, reference, f"resumed{r}", resumed=True)
    saved = tmp_path / "saved"
    out = _one_process("logits", str(saved), str(saved / "ids.npy"), str(saved / "logits.npy"))
    assert "logits equal" in out
    ck = tmp_path / "ck" / "checkpoint-12"
    for name in ("config.json", "model.safetensors", "trainer_state.json", "scheduler.pt", "tplinear_state"):
        assert (ck / name).exists(), f"{name} missing from {sorted(os.listdir(ck))}"
