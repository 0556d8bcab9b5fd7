"""Hugging Face integrations: :class:`Trainer`, a ``transformers.Trainer`` that trains a model cut by
``tplinear.torch.parallelize``, and the :class:`TrainingArguments` it wants under a launcher.

Imported on demand (``from tplinear.torch.integrations import Trainer, TrainingArguments``), so that
``tplinear.torch`` itself does not need transformers. See docs/torch.md, "Hugging Face Trainer".

The layout: the world is cut into tensor-parallel groups (``mp_group``: the model's group; by default the
whole world), each holding one replica of the model. Ranks that hold the same shard in different replicas
form a data-parallel group. ``transformers.Trainer`` (through accelerate) is shown the data-parallel group
as its world: torch.distributed is initialised over that group only (its own TCP store, never the
launcher's MASTER_PORT, which tplinear's rank 0 serves), so accelerate shards the batches by replica,
wraps the model in DistributedDataParallel over the replicas (gradients of every parameter averaged
between the ranks that hold the same shard) and averages the logged loss over them; the ranks of one
replica see the same batches. With one replica (world size = group size) there is no data parallelism:
no torch.distributed, no DDP, every rank sees every batch.

What the Trainer does beside that: gradient clipping with the tensor-parallel norm
(``tplinear.torch.clip_grad_norm_``); ``save_model`` (and so checkpoints and the final save) writes the
full model once with ``save_pretrained`` (a directory plain ``from_pretrained`` loads), collectively; a
checkpoint also holds the optimizer in a tplinear checkpoint (``tplinear_state/``), so
``resume_from_checkpoint`` works at the same or another group size; files every rank would write (the
trainer state, the scheduler, the arguments) are written by world rank 0, the RNG state by one rank per
replica.
"""
import contextlib
import os
import socket
import warnings
from datetime import timedelta
from functools import cached_property

try:
    import transformers
    from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tplinear.torch.integrations needs transformers >= 5 and accelerate (pip install 'transformers>=5' "
        f"accelerate): {exc}") from exc

import torch

from .. import distributed as dist
from .checkpoint import load_checkpoint, save_checkpoint
from .training import model_group, clip_grad_norm_, get_total_norm

__all__ = ["Trainer", "TrainingArguments", "data_parallel_layout"]

# the subdirectory of a checkpoint that holds tplinear's checkpoint of the model and the optimizer
STATE_DIR = "tplinear_state"

# the variables a launcher sets that make accelerate start torch.distributed over the whole world
_WORLD_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "PMI_SIZE", "PMI_RANK",
               "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
               "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
               "ACCELERATE_TORCH_DEVICE")


@contextlib.contextmanager
def _environ(**values):
    """os.environ with values set (None: removed); restored exactly afterwards (accelerate writes RANK,
    WORLD_SIZE, ... back into it)."""
    saved = {k: os.environ.get(k) for k in set(values) | set(_WORLD_VARS) | {"MASTER_PORT", "MASTER_ADDR"}}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TrainingArguments(transformers.TrainingArguments):
    """transformers.TrainingArguments that can be built under a launcher (tplinear.run, torchrun, mpirun).

    The plain class sets up accelerate when it is built: under a launcher that starts torch.distributed
    over the whole world at MASTER_ADDR:MASTER_PORT, where tplinear's rank 0 already serves its own store
    (an error or a hang), and it would make every rank a data-parallel replica. This class sets up a
    single process instead; :class:`Trainer` then sets up the data-parallel group of its model's layout.
    Same fields and defaults as the plain class."""

    @cached_property
    def _setup_devices(self):
        with _environ(**{k: None for k in _WORLD_VARS}):
            return transformers.TrainingArguments._setup_devices.func(self)


# ------------------------------------------------------------------------------------------ layout


def data_parallel_layout(mp_group=None):
    """(replicas, dp_ranks, dp_rank): the world's tensor-parallel groups (each a tuple of world ranks, in
    the order of their first rank), the world ranks of this rank's data-parallel group (the rank of the
    same index in every replica) and this rank's index in it (its replica's index). ValueError on every
    rank when the groups do not cut the world into replicas of one size. Collective over the world."""
    group = dist.resolve_group(mp_group)
    world = dist.get_world_group()
    mine = (tuple(int(r) for r in group.ranks), int(group.rank))
    every = [None] * world.size
    dist.all_gather_object(every, mine, group=world)
    replicas = sorted({g for g, _ in every}, key=min)
    covered = sorted(r for g in replicas for r in g)
    if covered != list(range(world.size)) or len({len(g) for g in replicas}) != 1:
        raise ValueError(
            f"the ranks' tensor-parallel groups {replicas} do not cut the world of {world.size} ranks into "
            "replicas of one size: every rank must belong to exactly one group, all of the same size "
            "(e.g. tplinear.distributed.new_group([0, 1]) and new_group([2, 3]) in a world of 4)")
    dp_ranks = tuple(g[mine[1]] for g in replicas)
    return replicas, dp_ranks, replicas.index(mine[0])


_DP = {"ranks": None}  # the world ranks of the torch.distributed world this module started, if any


def _host_for_peers(world):
    """The address the other ranks reach this host at: MASTER_ADDR on world rank 0's host (the launcher's
    address for it), else this host's name."""
    names = [None] * world.size
    dist.all_gather_object(names, socket.gethostname(), group=world)
    if names[dist.get_rank(world)] == names[0] and os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    return socket.gethostname()


def _init_data_parallel(dp_ranks, dp_rank, device, timeout):
    """torch.distributed over this rank's data-parallel group (a world of its own per group, with its own
    TCP store on a free port that the group's first rank opens and announces through tplinear), or none
    with one replica. Collective over tplinear's world."""
    import torch.distributed as tdist

    world = dist.get_world_group()
    key = tuple(dp_ranks)
    if tdist.is_available() and tdist.is_initialized():
        if _DP["ranks"] is None:
            raise RuntimeError(
                "torch.distributed is already initialised (over a world of "
                f"{tdist.get_world_size()} ranks), but tplinear's Trainer must start it over the data-parallel "
                f"group only (world ranks {list(key)}): do not initialise torch.distributed yourself, and build "
                "the arguments with tplinear.torch.integrations.TrainingArguments (the plain class starts it "
                "over the whole world)")
        if _DP["ranks"] == key:
            return
        tdist.destroy_process_group()  # ours, for another layout (a Trainer of another group size)
        _DP["ranks"] = None
    host = _host_for_peers(world)
    if len(key) == 1:
        return
    store = None
    if dp_rank == 0:
        store = tdist.TCPStore(host, 0, len(key), is_master=True, timeout=timeout, wait_for_workers=False)
        where = (host, int(store.port))
    else:
        where = None
    every = [None] * world.size
    dist.all_gather_object(every, where, group=world)
    if store is None:
        addr, port = every[key[0]]
        store = tdist.TCPStore(addr, port, len(key), is_master=False, timeout=timeout)
    backend = "nccl" if device.type == "cuda" and tdist.is_nccl_available() else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    tdist.init_process_group(backend, store=store, rank=dp_rank, world_size=len(key), timeout=timeout, **kwargs)
    _DP["ranks"] = key


def _model_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _setup_args(args, device, dp_size, dp_rank):
    """Sets up args' accelerate state for this layout: one process (dp_size 1) or the data-parallel group
    that torch.distributed now spans, on the model's device."""
    cuda_now = torch.cuda.current_device() if device.type == "cuda" else None
    args.__dict__.pop("_setup_devices", None)
    if dp_size == 1:
        env = {k: None for k in _WORLD_VARS}
    else:
        env = {k: None for k in _WORLD_VARS if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        env.update(RANK=dp_rank, WORLD_SIZE=dp_size, LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
                   LOCAL_WORLD_SIZE=os.environ.get("LOCAL_WORLD_SIZE", str(dp_size)))
    env["ACCELERATE_TORCH_DEVICE"] = str(device)
    with _environ(**env):
        transformers.TrainingArguments._setup_devices.func(args)
    args.__dict__["_setup_devices"] = device  # not cuda:0 (accelerate's choice for one process)
    args._n_gpu = 1 if device.type == "cuda" else 0
    if cuda_now is not None:
        torch.cuda.set_device(cuda_now)
    state = args.distributed_state
    if state.num_processes != dp_size or state.process_index != dp_rank:
        raise RuntimeError(f"accelerate set up {state.num_processes} process(es) (index {state.process_index}) "
                           f"for a data-parallel group of {dp_size} (index {dp_rank})")


# ------------------------------------------------------------------------------------------ Trainer


def _unwrap_optimizer(optimizer):
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class Trainer(transformers.Trainer):
    """transformers.Trainer for a model cut by tplinear.torch.parallelize: the same constructor, plus
    mp_group (default: the group of the model's tplinear layers). Tensor parallel within mp_group, data
    parallel across the replicas (world size / group size), see the module's docstring. Every rank of the
    world runs the same script: train, evaluate, save_model and the checkpoints are collective.

    Under a launcher, build the arguments with tplinear.torch.integrations.TrainingArguments (the plain
    class starts torch.distributed over the whole world when it is built). per_device_train_batch_size is
    per replica: the global batch is it times the number of replicas (and gradient_accumulation_steps).

    Not supported: model_init (parallelize the model first and pass it), push_to_hub, DeepSpeed, FSDP."""

    def __init__(self, model=None, args=None, *rest, mp_group=None, **kwargs):
        if model is None:
            raise NotImplementedError("tplinear's Trainer needs the parallelized model itself (model_init is not "
                                      "supported: call parallelize(model) and pass the model)")
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        if getattr(args, "push_to_hub", False):
            raise NotImplementedError("push_to_hub is not supported by tplinear's Trainer: save_model(dir) writes "
                                      "the full model on world rank 0; push that directory")
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise NotImplementedError("tplinear's Trainer does not combine with DeepSpeed or FSDP")
        self.mp_group = model_group(model, mp_group)
        self.world_group = dist.get_world_group()
        self.replicas, self.dp_ranks, self.dp_rank = data_parallel_layout(self.mp_group)
        device = _model_device(model)
        _init_data_parallel(self.dp_ranks, self.dp_rank, device, timedelta(seconds=args.ddp_timeout))
        _setup_args(args, device, len(self.dp_ranks), self.dp_rank)
        super().__init__(model, args, *rest, **kwargs)

    # ---- who writes

    def is_world_process_zero(self):
        return dist.get_rank(self.world_group) == 0

    def is_local_process_zero(self):
        # the first rank on each host prints the logs, not one rank per replica (or every rank)
        local = os.environ.get("LOCAL_RANK") or os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
        return int(local) == 0 if local else self.is_world_process_zero()

    def _barrier(self):
        dist.barrier(self.world_group)

    # ---- clipping

    def _clip_grad_norm(self, model):
        self.accelerator.unscale_gradients()
        return clip_grad_norm_(model.parameters(), self.args.max_grad_norm, mp_group=self.mp_group)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = get_total_norm(grads, mp_group=self.mp_group) if grads else torch.tensor(0.0)
        return grad_norm

    # ---- saving

    def save_model(self, output_dir=None, _internal_call=False):
        """The full model with save_pretrained (a directory plain from_pretrained loads), the processing
        class and the arguments; world rank 0 writes. Collective: every rank calls it."""
        self._save(output_dir)

    def _save(self, output_dir=None, state_dict=None):
        if state_dict is not None:
            raise NotImplementedError("tplinear's Trainer saves the model's own full state (state_dict=None)")
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir)  # collective: gathers the shards, world rank 0 writes
        failure = None
        if self.is_world_process_zero():
            try:
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
                elif getattr(self.data_collator, "tokenizer", None) is not None:
                    self.data_collator.tokenizer.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
            except Exception as exc:  # noqa: BLE001 - told to every rank
                failure = exc
        dist.agree_on_failure(self.world_group, failure)

    def _save_checkpoint(self, model, trial):
        """transformers' checkpoint, written once: the model (save_model), the optimizer and the model's
        shards in a tplinear checkpoint, the scheduler, RNG states and the trainer state."""
        checkpoint_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, checkpoint_folder)
        self.save_model(output_dir, _internal_call=True)
        if (self.args.save_strategy in [SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST]
                and self.state.best_global_step):
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.exists(best):
                self.state.best_model_checkpoint = best
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(output_dir)
            self._save_scaler(output_dir)
            self._save_rng_state(output_dir)
        failure = None
        if self.is_world_process_zero():
            try:
                for cb in [cb for cb in self.callback_handler.callbacks + [self.control]
                           if isinstance(cb, ExportableState)]:
                    name, cb_state = cb.__class__.__name__, cb.state()
                    if isinstance(self.state.stateful_callbacks[name], list):
                        self.state.stateful_callbacks[name].append(cb_state)
                    else:
                        self.state.stateful_callbacks[name] = cb_state
                self.state.save_to_json(os.path.join(output_dir, TRAINER_STATE_NAME))
                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            except Exception as exc:  # noqa: BLE001 - told to every rank
                failure = exc
        dist.agree_on_failure(self.world_group, failure)

    def _save_optimizer_and_scheduler(self, output_dir):
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_checkpoint(os.path.join(output_dir, STATE_DIR), model, _unwrap_optimizer(self.optimizer),
                        layout="sharded", progress=False)
        failure = None
        if self.is_world_process_zero() and self.lr_scheduler is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            except Exception as exc:  # noqa: BLE001 - told to every rank
                failure = exc
        dist.agree_on_failure(self.world_group, failure)

    def _save_scaler(self, output_dir):
        if self.is_world_process_zero():
            super()._save_scaler(output_dir)

    def _save_rng_state(self, output_dir):
        # one file per replica (rng_state.pth with one replica, else rng_state_{replica}.pth, the names
        # transformers' _load_rng_state reads), written by the replica's first rank: the ranks of a replica
        # draw the same numbers
        if self.mp_group.rank == 0:
            super()._save_rng_state(output_dir)

    # ---- loading

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        load_checkpoint(resume_from_checkpoint, model, progress=False)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        state = os.path.join(checkpoint, STATE_DIR)
        if not os.path.isdir(state):
            warnings.warn(f"{checkpoint} has no {STATE_DIR}/ (not written by tplinear's Trainer): the optimizer "
                          "and the scheduler start afresh", stacklevel=2)
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        load_checkpoint(state, model, _unwrap_optimizer(self.optimizer), progress=False)
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(scheduler):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))

    def _load_best_model(self):
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        load_checkpoint(self.state.best_model_checkpoint, model, progress=False)
