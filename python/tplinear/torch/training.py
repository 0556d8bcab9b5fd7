"""The training loop around tplinear.torch's layers: gradient clipping and norms over tensor-parallel
shards, the full state dict and ``save_pretrained`` of a parallelized model, replica consistency
(``parallelize`` checks or broadcasts the initial weights; ``check_replicas``), copies, and the BLAS /
torch thread rule. See docs/torch.md, "The training loop".
"""
import copy
import inspect
import math
import os
import types
import zlib

import numpy as np
import torch
from torch import nn

from .. import _C
from .. import distributed as dist
from . import _ops
from ._grads import ShardGrad

__all__ = ["check_replicas", "clip_grad_norm_", "full_state_dict", "get_total_norm", "set_num_threads"]


# ------------------------------------------------------------------------------------------ helpers


def _sharded_group(p):
    """The group p is split over, or None for a replicated tensor (or a group of one)."""
    if isinstance(p, ShardGrad):
        g = getattr(p, "_tp_group", None)
        return g if g is not None and g.size > 1 else None
    layer = getattr(p, "tp_layer", None)
    if layer is None or getattr(p, "_tp_gathered", False) or not layer._is_sharded(p):
        return None
    return layer.mp_group if layer.mp_group.size > 1 else None


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, ShardGrad) else t


def _same_group(a, b):
    return a is b or a._handle is b._handle or (a.size == b.size and a.ranks == b.ranks)


def model_group(model, mp_group=None):
    if mp_group is not None:
        return dist.resolve_group(mp_group)
    from .modules import TPModule
    for m in model.modules():
        if isinstance(m, TPModule):
            return m.mp_group
    return dist.resolve_group(None)


# ------------------------------------------------------------------------------------------ norms


def _local_norms(tensors, ord, foreach):
    """Each tensor's norm in float64, on its device (foreach kernels per device where available)."""
    out = [None] * len(tensors)
    by_device = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    empty_norm = math.inf if float(ord) == -math.inf else 0.0
    for i, t in enumerate(tensors):  # a zero-width shard (a rank with no heads) adds nothing
        if t.numel() == 0:
            out[i] = torch.tensor(empty_norm, dtype=torch.float64, device=t.device)
    by_device = {d: [i for i in idx if out[i] is None] for d, idx in by_device.items()}
    for device, idx in by_device.items():
        if not idx:
            continue
        ts = [_plain(tensors[i]).detach() for i in idx]
        use_foreach = foreach if foreach is not None else device.type in ("cpu", "cuda")
        if use_foreach:
            norms = torch._foreach_norm(ts, ord, dtype=torch.float64)
        else:
            norms = [torch.linalg.vector_norm(t, ord, dtype=torch.float64) for t in ts]
        for i, n in zip(idx, norms):
            out[i] = n
    return out


def _reduce(t, op, group):
    """In place over a tplinear group or a torch.distributed group."""
    if group is None:
        return t
    if isinstance(group, dist.ProcessGroup):
        if group.size > 1:
            t = t.contiguous()
            with _ops.on_stream(t):
                _C.all_reduce(group._handle, t.detach(), op)
        return t
    import torch.distributed as tdist
    tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}[op],
                     group=group)
    return t


def _total_norm(items, norm_type, error_if_nonfinite, foreach, mp_group, dp_group):
    """items: [(tensor, group or None)]. The norm of all tensors as one vector, where a tensor with a
    group is this rank's piece of a tensor split over that group (reduced over it) and a tensor without
    one is the same on every rank (counted once: added by the group's rank 0). float64 throughout; the
    same bits on every rank."""
    ord = float(norm_type)
    if not items:
        return torch.tensor(0.0)
    first = items[0][0]
    if mp_group is not None:
        mp_group = dist.resolve_group(mp_group)
        for t, g in items:
            if g is not None and not _same_group(g, mp_group):
                raise ValueError(f"a sharded gradient is split over a group of ranks {g.ranks}, not over mp_group "
                                 f"(ranks {mp_group.ranks}): pass that group, or mp_group=None for each "
                                 "parameter's own group")
    inf = math.isinf(ord)
    op = ("max" if ord > 0 else "min") if inf else "sum"
    local = _local_norms([t for t, _ in items], ord, foreach)
    device = first.device

    def power(n):
        n = n.to(device)
        return n if inf or ord == 0 else n.pow(ord)

    def combine(vals):
        if not vals:
            return None
        s = torch.stack(vals)
        return (s.max() if ord > 0 else s.min()) if inf else s.sum()

    groups = {}  # group handle -> (group, [indices])
    for i, (t, g) in enumerate(items):
        if g is not None:
            g = mp_group or g
            groups.setdefault(id(g._handle), (g, []))[1].append(i)
    replicated = combine([power(local[i]) for i, (t, g) in enumerate(items) if g is None])
    totals = []
    for k, (g, idx) in enumerate(groups.values()):
        part = combine([power(local[i]) for i in idx])
        if k == 0 and replicated is not None:  # counted once: on the group's rank 0
            if g.rank == 0:
                part = combine([part, replicated])
            replicated = None
        totals.append(_reduce(part.reshape(1).clone(), op, g)[0])
    if replicated is not None:
        totals.append(replicated)
    total = combine(totals)
    if dp_group is not None:
        total = _reduce(total.reshape(1).clone(), op, dp_group)[0]
    if not inf and ord != 0:
        total = total.pow(1.0 / ord)
    total = total.to(first.dtype)
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            f"The total norm of order {ord} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    return total


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None, mp_group=None, dp_group=None):
    """torch.nn.utils.get_total_norm over tensor-parallel shards: the norm of tensors (e.g. gradients) viewed
    as one vector, where the gradient of a sharded parameter (and a sharded parameter itself) is this
    rank's piece of the full tensor: its part is reduced over its group (mp_group: that group, checked;
    None: each tensor's own), and every other tensor is counted once. Computed in float64 and returned in
    the first tensor's dtype, the same bits on every rank. dp_group (a tplinear or torch.distributed group):
    also sum over data-parallel ranks whose tensors differ (ZeRO-style); after DistributedDataParallel's
    all-reduce the gradients are the same on every replica and none is needed, as in torch. Collective
    over the groups involved."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    items = [(t, _sharded_group(t)) for t in tensors]
    return _total_norm(items, norm_type, error_if_nonfinite, foreach, mp_group, dp_group)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm, norm_type=2.0, mp_group=None, error_if_nonfinite=False, foreach=None,
                    dp_group=None):
    """torch.nn.utils.clip_grad_norm_ for a tensor-parallel model: the total norm of the parameters'
    gradients counts each sharded parameter's full gradient once (its shard on each rank, reduced over its
    group) and each replicated parameter's gradient once; every rank gets the same norm to the bit and
    scales its gradients by the same coefficient, min(max_norm / (norm + 1e-6), 1), as torch does.
    Returns the total norm (a 0-d tensor in the gradients' dtype). norm_type may be inf. mp_group /
    dp_group: as in get_total_norm. Collective."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    items = [(p.grad, _sharded_group(p) or _sharded_group(p.grad)) for p in params]
    total = _total_norm(items, norm_type, error_if_nonfinite, foreach, mp_group, dp_group)
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total


# ------------------------------------------------------------------------------------------ fingerprints


_CHUNK = 1 << 22


def _fingerprint(t):
    """Three int64 words that differ, but for a 2**-64 chance, between tensors with different bytes:
    the element count, and two wrap-around sums of the tensor's 32-bit words (plain and position-weighted).
    Integer sums do not depend on the order of summation, so every rank computes the same words for the
    same bytes, on its device, in one pass of chunks."""
    t = t.detach()
    n = t.numel()
    if n == 0:
        return [0, 0, 0]
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    b = flat.view(torch.uint8)
    words = b.view(torch.int32) if b.numel() % 4 == 0 else b
    s1 = torch.zeros((), dtype=torch.int64, device=t.device)
    s2 = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _CHUNK):
        w = words[start:start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + w.numel(), dtype=torch.int64, device=t.device).remainder_(65521).add_(1)
        s1 += w.sum()
        s2 += (w * pos).sum()
    code = zlib.crc32(f"{tuple(t.shape)} {t.dtype}".encode())
    return [int(n) * 4294967311 + code, int(s1), int(s2)]


def _all_gather_rows(group, rows):
    """rows: [n, k] int64 on this rank -> [size, n, k] (n checked equal first)."""
    mine = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1) if len(rows) else np.zeros((0, 3), np.int64)
    counts = np.zeros(group.size, dtype=np.int64)
    dist.all_gather_into_tensor(counts, np.array([mine.shape[0]], dtype=np.int64), group=group)
    if len(set(counts.tolist())) > 1:
        raise ValueError(f"the ranks hold different models: {counts.tolist()} tensors on ranks 0..{group.size - 1}")
    out = np.zeros((group.size,) + mine.shape, dtype=np.int64)
    if mine.size:
        dist.all_gather_into_tensor(out, np.ascontiguousarray(mine), group=group)
    return out


def _first_difference(group, named):
    """named: [(name, tensor)] in the same order on every rank. The first name whose bytes differ between
    ranks and the ranks that differ from rank 0, or None. Collective (two small all-gathers)."""
    rows = [_fingerprint(t) for _, t in named]
    every = _all_gather_rows(group, rows)
    for i, (name, _) in enumerate(named):
        differ = [r for r in range(group.size) if not np.array_equal(every[r, i], every[0, i])]
        if differ:
            return name, differ
    return None


def _replicated_tensors(model, buffers=False):
    """(name, tensor) of the model's tensors that every rank holds whole: parameters (and buffers) outside
    tplinear's layers and not cut elsewhere (MoE expert shards), and the layers' replicated ones (a row
    layer's bias); each tensor once."""
    from .modules import TPModule
    out, seen = [], set()
    for mname, module in model.named_modules():
        tp = isinstance(module, TPModule)
        tensors = list(module.named_parameters(recurse=False))
        if buffers:
            tensors += list(module.named_buffers(recurse=False))
        for pname, p in tensors:
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if tp and (module._is_sharded(p) if hasattr(module, "_is_sharded") else True):
                continue
            if _sharded_group(p) is not None:  # a shard outside the layers (MoE experts: tplinear.torch.moe)
                continue
            out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def check_replicas(model, mp_group=None):
    """Checks that the model's replicated parameters (embeddings, norms, a row layer's bias: every
    parameter that is not a tensor-parallel shard) hold the same bytes on every rank of the group
    (default: the group of the model's tplinear layers), by a fingerprint of each (one pass over them, two
    small all-gathers). Raises ValueError on every rank naming the first parameter that differs. For a
    test or a debugging step: replicas drift apart when a rank changes them alone (clipping with per-rank
    norms, a per-rank seed). Collective."""
    group = model_group(model, mp_group)
    if group.size == 1:
        return
    hit = _first_difference(group, _replicated_tensors(model))
    if hit is not None:
        name, ranks = hit
        raise ValueError(
            f"{name} is a replicated parameter but differs on rank(s) {ranks} from rank 0 of the group: the "
            "replicas have drifted apart. Something changed it on some ranks only, e.g. gradient clipping with "
            "a per-rank norm (use tplinear.torch.clip_grad_norm_), an update that depends on the rank, or "
            "initial weights from a per-rank seed (parallelize(model, src_rank=0) broadcasts them)")


# ------------------------------------------------------------------------------------------ parallelize


def before_cutting(model, group, src_rank=None):
    """Called by parallelize before it cuts any weight: with src_rank, broadcasts the model's parameters
    and buffers from that rank of the group; without, checks that every rank holds the same ones.
    ValueError on every rank otherwise."""
    if group.size == 1:
        if src_rank not in (None, 0):
            raise ValueError(f"src_rank={src_rank!r} is not a rank of a group of 1")
        return
    if src_rank is not None and (isinstance(src_rank, bool) or not isinstance(src_rank, int)
                                 or not 0 <= src_rank < group.size):
        bad = ValueError(f"src_rank must be a rank of mp_group (0..{group.size - 1}) or None, got {src_rank!r}")
    else:
        bad = None
    words = np.zeros(group.size, dtype=np.int64)
    dist.all_gather_into_tensor(words, np.array([-2 if bad else (-1 if src_rank is None else src_rank)],
                                                dtype=np.int64), group=group)
    if bad is not None:
        raise bad
    if len(set(words.tolist())) > 1:
        raise ValueError(f"parallelize: the ranks pass different src_rank values ({words.tolist()} on ranks 0.."
                         f"{group.size - 1}, -1: None): every rank must pass the same")
    named = _replicated_tensors(model, buffers=src_rank is not None)
    if src_rank is not None:
        for _, t in named:
            _broadcast(t, src_rank, group)
        return
    hit = _first_difference(group, named)
    if hit is not None:
        name, ranks = hit
        raise ValueError(
            f"parallelize: {name} differs on rank(s) {ranks} from rank 0 of the group: every rank must hold the "
            "same full weights before they are cut, or each rank cuts its shard from a different model. Seed "
            "every rank the same (torch.manual_seed(seed) before building the model), load the same weights on "
            "every rank, or pass parallelize(model, src_rank=0) to broadcast rank 0's weights first")


@torch.no_grad()
def _broadcast(t, root, group):
    """t's bytes from group rank root to the others, in place (32-bit words; a padded copy when t is not
    contiguous or its bytes are not a multiple of 4)."""
    if t.numel() == 0:
        return
    data = t.detach()
    direct = data.is_contiguous() and (data.numel() * data.element_size()) % 4 == 0 and data.dtype != torch.bool
    if direct:
        words = data.reshape(-1).view(torch.uint8).view(torch.int32)
    else:
        raw = data.contiguous().reshape(-1)
        raw = raw.view(torch.uint8) if raw.dtype != torch.bool else raw.to(torch.uint8)
        words = torch.zeros(-(-raw.numel() // 4) * 4, dtype=torch.uint8, device=data.device)
        words[:raw.numel()] = raw
        words = words.view(torch.int32)
    with _ops.on_stream(words):
        _C.broadcast(group._handle, words, root)
    if not direct:
        raw = words.view(torch.uint8)[:data.numel() * (1 if data.dtype == torch.bool else data.element_size())]
        value = raw.to(torch.bool) if data.dtype == torch.bool else raw.view(data.dtype)
        data.copy_(value.reshape(data.shape))


def after_parallelize(model):
    """Called by parallelize once the layers are in place: a Hugging Face model's save_pretrained writes the
    full model (collective), and copy.deepcopy of the model keeps its gradient all-reduce hooks."""
    if callable(getattr(type(model), "save_pretrained", None)) and hasattr(model, "config"):
        model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)
    model.__dict__["__deepcopy__"] = types.MethodType(_deepcopy_model, model)


def _deepcopy_model(self, memo):
    """copy.deepcopy of a parallelized model: the usual copy (the group shared, the shards copied, the
    layers re-marked by their __setstate__), plus the tensor hooks torch's Parameter copies drop (the
    gradient all-reduce of replicated_with_grad_allreduce parameters)."""
    own = self.__dict__.pop("__deepcopy__")
    try:
        new = copy.deepcopy(self, memo)
    finally:
        self.__dict__["__deepcopy__"] = own
    new.__dict__["__deepcopy__"] = types.MethodType(_deepcopy_model, new)
    for p in self.parameters():
        group = getattr(p, "_tplinear_grad_allreduce_group", None)
        q = memo.get(id(p))
        if group is not None and q is not None:
            _ops.reduce_grad(q, group)
    return new


# ------------------------------------------------------------------------------------------ full state


@torch.no_grad()
def full_state_dict(model, rank0_only=True):
    """The parallelized model's state dict with full tensors, under the same keys as model.state_dict():
    each sharded parameter gathered from its group, one tensor at a time (a GPT-2 Conv1D weight back in
    Conv1D's [in, out] layout), replicated tensors as they are. With rank0_only (default) the dict is
    filled on rank 0 of the model's tensor-parallel group and empty elsewhere (every rank must call it:
    the gathers are collective); rank0_only=False gives it to every rank.

    model.state_dict() itself stays cheap during training: it returns this rank's shards under the full
    names (what an optimizer or save_checkpoint(layout="sharded") wants), not the full tensors."""
    group = model_group(model)
    keep = not rank0_only or group.rank == 0
    out, done = {}, {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t is None:
            continue
        if id(t) in done:
            if keep:
                out[key] = done[id(t)]
            continue
        layer = getattr(t, "tp_layer", None)
        if layer is not None and _sharded_group(t) is not None:
            full = layer.full_tensor(t)
            if getattr(layer, "_conv1d", False) and t is layer.weight:
                full = full.t().contiguous()
        else:
            full = t.detach()
            if getattr(layer, "_conv1d", False) and t is layer.weight:
                full = full.t().contiguous()
        done[id(t)] = full if keep else None
        if keep:
            out[key] = full
    return out


# ------------------------------------------------------------------------------------------ save_pretrained

_SAVE_OK = {"is_main_process": None, "state_dict": None, "push_to_hub": False, "safe_serialization": True,
            "variant": None, "save_original_format": None, "token": None}


def _save_pretrained(self, save_directory, max_shard_size=None, **kwargs):
    """save_pretrained of a parallelized Hugging Face model: the full model once, in consolidated safetensors
    files (model.safetensors, or numbered files and model.safetensors.index.json past max_shard_size) and
    config.json, which plain from_pretrained loads in one process. Collective over the world: every rank
    calls it; world rank 0 writes, gathering one tensor at a time; every rank returns together and raises
    together."""
    from .checkpoint import save_checkpoint

    unsupported = {k: v for k, v in kwargs.items() if not (k in _SAVE_OK and (v == _SAVE_OK[k] or k == "is_main_process"
                                                                                or (k == "save_original_format"
                                                                                    and v in (None, True))))}
    if unsupported:
        raise NotImplementedError(
            f"save_pretrained of a tplinear-parallelized model takes save_directory and max_shard_size, not "
            f"{', '.join(sorted(unsupported))}: for other options gather the full tensors with "
            "tplinear.torch.full_state_dict(model) on every rank and call type(model).save_pretrained(model, "
            "save_directory, state_dict=full, ...) on rank 0 only")
    if max_shard_size is None:
        try:
            max_shard_size = inspect.signature(type(self).save_pretrained).parameters["max_shard_size"].default
        except (KeyError, TypeError, ValueError):
            max_shard_size = None
        if max_shard_size is inspect.Parameter.empty:
            max_shard_size = None
    save_directory = os.fspath(save_directory)
    save_checkpoint(save_directory, self, layout="consolidated", max_shard_size=max_shard_size, progress=False)
    world = dist.get_world_group()
    failure = None
    if world.rank == 0:
        try:
            self.config.save_pretrained(save_directory)
            gen = getattr(self, "generation_config", None)
            can = getattr(self, "can_generate", None)
            if gen is not None and callable(can) and can():
                gen.save_pretrained(save_directory)
        except Exception as exc:  # noqa: BLE001 - told to every rank
            failure = exc
    dist.agree_on_failure(world, failure)


# ------------------------------------------------------------------------------------------ threads


def share_threads():
    """The thread rule, applied at ``import tplinear.torch``: tplinear's BLAS pool gets as many threads as
    torch's intra-op pool (torch.get_num_threads(), which OMP_NUM_THREADS and torch.set_num_threads set),
    so the two pools, which run one after the other within a step, are the same size on the same cores
    instead of each taking every core. TPLINEAR_NUM_THREADS, when set, wins."""
    want = os.environ.get("TPLINEAR_NUM_THREADS")
    try:
        n = int(want) if want else torch.get_num_threads()
    except ValueError:
        n = torch.get_num_threads()
    if n > 0:
        _C.set_num_threads(n)
    return n


def set_num_threads(n):
    """Sets torch's intra-op threads and tplinear's BLAS threads together (the thread rule after
    import)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    torch.set_num_threads(n)
    _C.set_num_threads(n)
