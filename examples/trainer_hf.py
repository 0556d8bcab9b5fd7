"""Trains a small Hugging Face Qwen2-style model with transformers' Trainer, tensor parallel over tplinear
(tplinear.torch.integrations.Trainer), on synthetic tokens, then saves it where plain from_pretrained
loads it.

    python -m tplinear.run --nproc-per-node 2 examples/trainer_hf.py              # TP 2
    python -m tplinear.run --nproc-per-node 4 examples/trainer_hf.py --tp 2       # DP 2 x TP 2
    python examples/trainer_hf.py                                                 # one process

The changes from a plain Trainer script are marked "tplinear": create tplinear's process group (and the
tensor-parallel groups, when the world holds several replicas), parallelize the model, and import Trainer
and TrainingArguments from tplinear.torch.integrations. --batch is the global batch: each replica's
per-device batch is batch / replicas, so every layout trains on the same batches and logs the same losses.
"""
import argparse
import os

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, logging

import tplinear.distributed as dist  # tplinear
import tplinear.torch as tpt  # tplinear
from tplinear.torch.integrations import Trainer, TrainingArguments  # tplinear


def synthetic(n, seq, vocab, seed):
    """Arithmetic progressions mod vocab: a learnable language, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 7, (n, 1), generator=g)
    ids = (start + step * torch.arange(seq)) % vocab
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel group size (default: the world)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="global batch (per device: batch / replicas)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--out", default="trainer_hf_out")
    args = ap.parse_args()
    logging.set_verbosity_error()

    dist.init_process_group()  # tplinear: the world from the launcher (a world of one without)
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = args.tp or world
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the world of {world} ranks")
    # tplinear: tensor-parallel groups of consecutive ranks ({0, 1}, {2, 3} for --tp 2 in a world of 4);
    # every rank creates every group
    groups = [dist.new_group(list(range(first, first + tp))) for first in range(0, world, tp)]
    group = groups[rank // tp]
    replicas = world // tp

    torch.manual_seed(0)  # the same full model on every rank before parallelize cuts it
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = tpt.parallelize(Qwen2ForCausalLM(cfg), mp_group=group)  # tplinear

    training_args = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch // replicas,
        per_device_eval_batch_size=args.batch // replicas, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps, learning_rate=3e-3, logging_steps=1, eval_strategy="steps",
        eval_steps=args.steps // 2, save_strategy="steps", save_steps=args.steps // 2, report_to=[], seed=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, ddp_find_unused_parameters=False)
    train = synthetic(args.batch * args.steps * args.grad_accum, 32, 256, 1)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=synthetic(32, 32, 256, 2),
                      mp_group=group)
    trainer.train()  # max_grad_norm=1.0 (the default) clips with the tensor-parallel norm
    trainer.save_model(os.path.join(args.out, "final"))  # collective: the full model, written once
    if rank == 0:
        losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
        print(f"world {world}: TP {tp} x DP {replicas}; losses {losses}")
        print(f"saved to {os.path.join(args.out, 'final')}: "
              "transformers.AutoModelForCausalLM.from_pretrained loads it in one process")


if __name__ == "__main__":
    main()
