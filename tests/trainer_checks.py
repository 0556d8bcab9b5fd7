"""tplinear.torch.integrations.Trainer against plain transformers.Trainer (tests/test_torch_trainer.py).

``python tests/trainer_checks.py reference OUT.json`` trains the tiny Qwen2 with plain transformers.Trainer
in one process (no launcher variables) and writes its logs; inside a launched world, :func:`run_world`
trains the same model on the same data and seed with tplinear's Trainer at a given tensor-parallel group
size (the rest of the world: data-parallel replicas) and writes the same logs from world rank 0.
``python tests/trainer_checks.py logits DIR IDS.npy LOGITS.npy`` loads a saved model with plain
from_pretrained and checks its logits against the parallel model's.
"""
import json
import math
import os
import sys
import warnings

import numpy as np
import torch
import transformers

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

SEED = int(os.environ.get("TPLINEAR_TEST_SEED", "0")) % 10000
VOCAB, SEQ, SAMPLES = 96, 16, 96
# the runs compared: global batch (per replica in the worlds: per device = batch / replicas), gradient
# accumulation, optimizer steps; "a" also saves checkpoints and evaluates
CONFIGS = {"a": dict(batch=8, gas=1, steps=12), "b": dict(batch=4, gas=2, steps=6)}
MAX_GRAD_NORM = 0.5  # below the tiny model's gradient norms (0.8-1.0 here): every step clips


def tiny_model():
    """A tiny Qwen2 whose head counts and sizes split over groups of 1, 2 and 4 ranks."""
    torch.manual_seed(1234 + SEED)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(cfg).float()


def dataset(n=SAMPLES, seed=0):
    """Arithmetic progressions mod VOCAB (learnable, so the loss falls): input_ids = labels."""
    g = torch.Generator().manual_seed(SEED * 7919 + seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 7, (n, 1), generator=g)
    ids = (start + step * torch.arange(SEQ)) % VOCAB
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def make_args(cls, out, batch, gas, steps, replicas=1, **kw):
    per_device = batch // replicas
    assert per_device * replicas == batch, (batch, replicas)
    base = dict(output_dir=out, per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
                gradient_accumulation_steps=gas, max_steps=steps, learning_rate=3e-3, weight_decay=0.01,
                logging_steps=1, report_to=[], seed=42 + SEED, save_strategy="no", use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=MAX_GRAD_NORM)
    base.update(kw)
    return cls(**base)


def logs(trainer):
    """{"loss": [...], "grad_norm": [...], "step": [...], "eval_loss": x or None} from the log history."""
    out = {"loss": [], "grad_norm": [], "step": [], "eval_loss": None}
    for entry in trainer.state.log_history:
        if "loss" in entry:
            out["loss"].append(float(entry["loss"]))
            out["grad_norm"].append(float(entry["grad_norm"]))
            out["step"].append(int(entry["step"]))
        if "eval_loss" in entry:
            out["eval_loss"] = float(entry["eval_loss"])
    return out


def reference(path):
    """Plain transformers.Trainer in one process: the logs of every config, and of "a" resumed at step 6."""
    import tempfile
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in CONFIGS.items():
            extra = dict(save_strategy="steps", save_steps=6) if name == "a" else {}
            args = make_args(transformers.TrainingArguments, os.path.join(tmp, name), **cfg, **extra)
            trainer = transformers.Trainer(model=tiny_model(), args=args, train_dataset=dataset(),
                                           eval_dataset=dataset(32, seed=1))
            trainer.train()
            if name == "a":
                trainer.evaluate()
            result[name] = logs(trainer)
    with open(path, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------------ in a world


def tp_group(tp):
    """This rank's tensor-parallel group: consecutive world ranks, tp of them (every rank creates every
    group, as new_group requires)."""
    import tplinear.distributed as dist
    world = dist.get_world_size()
    mine = None
    for first in range(0, world, tp):
        g = dist.new_group(list(range(first, first + tp)))
        if first <= dist.get_rank() < first + tp:
            mine = g
    return mine


def parallel_model(tp):
    import tplinear.torch as tpt
    group = tp_group(tp)
    return tpt.parallelize(tiny_model(), mp_group=group), group


def run_world(out, tp, name="a", checkpoints=None, resume=None, save=None):
    """Trains config name with tplinear's Trainer at group size tp (replicas: the rest of the world);
    writes its logs to out (world rank 0). checkpoints: an output_dir that gets a checkpoint every 6 steps;
    resume: a checkpoint to resume from; save: save_model's directory, with the logits of the trained
    parallel model on fixed ids beside it (ids.npy, logits.npy)."""
    import tplinear.distributed as dist
    from tplinear.torch.integrations import Trainer, TrainingArguments

    world = dist.get_world_size()
    replicas = world // tp
    model, group = parallel_model(tp)
    extra = dict(save_strategy="steps", save_steps=6) if checkpoints else {}
    args = make_args(TrainingArguments, checkpoints or os.path.join(os.path.dirname(out), f"run-{name}-{tp}"),
                     **CONFIGS[name], replicas=replicas, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(32, seed=1),
                      mp_group=group)
    assert trainer.args.world_size == replicas and trainer.args.process_index == trainer.dp_rank
    trainer.train(resume_from_checkpoint=resume)
    if name == "a":
        trainer.evaluate()
    import tplinear.torch as tpt
    tpt.check_replicas(model, group)  # the replicated parameters stayed equal within the group
    if replicas > 1:
        check_replicas_agree(model)
    if save:
        trainer.save_model(save)
        ids = torch.from_numpy(np.stack([d["input_ids"].numpy() for d in dataset(4, seed=2)]))
        with torch.no_grad():
            logits = model(ids).logits
        if dist.get_rank() == 0:
            np.save(os.path.join(save, "ids.npy"), ids.numpy())
            np.save(os.path.join(save, "logits.npy"), logits.numpy())
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(logs(trainer), f)
    dist.barrier()
    return trainer


def check_replicas_agree(model):
    """The data-parallel replicas hold the same parameters: each rank's shards equal those of the same
    rank in the other replicas (DDP averaged every gradient over them)."""
    import torch.distributed as tdist
    for name, p in model.named_parameters():
        mine = p.detach().clone()
        every = [torch.empty_like(mine) for _ in range(tdist.get_world_size())]
        tdist.all_gather(every, mine)
        for other in every:
            assert torch.equal(other, mine), f"{name} differs between the data-parallel replicas"


def compare_logits(path, ids_file, logits_file):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.from_numpy(np.load(ids_file))
    with torch.no_grad():
        got = model(ids).logits.numpy()
    want = np.load(logits_file)
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    assert err < 1e-5, f"from_pretrained's logits differ from the parallel model's by {err:.2e} (relative)"
    print(f"from_pretrained loads it: logits equal the parallel model's to {err:.1e}")


def close(got, want, what, tol=1e-4):
    assert len(got) == len(want), f"{what}: {len(got)} values, want {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert math.isfinite(a) and abs(a - b) <= tol * abs(b), f"{what}[{i}]: {a!r} vs {b!r} (rel {abs(a - b) / abs(b):.2e})"


if __name__ == "__main__":
    if sys.argv[1] == "reference":
        reference(sys.argv[2])
    elif sys.argv[1] == "logits":
        compare_logits(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
