"""Sharded gradients whose norm is the full gradient's norm, so that the common
``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` is right after ``parallelize``.

A sharded parameter (a tplinear layer's weight, a column layer's bias, a vocabulary-parallel embedding)
holds one rank's piece; torch's clipping computes each gradient's norm on each rank alone, so every rank
would clip with its own coefficient and the replicated parameters would drift apart. DTensor fixes this
with a tensor subclass whose norm is a collective; tplinear does the same, for gradients only:

- after autograd has accumulated a sharded parameter's gradient (a post-accumulate-grad hook, registered
  when the layer marks the parameter, at group sizes > 1), ``param.grad`` is replaced by a
  :class:`ShardGrad` alias of the same memory (no copy);
- :class:`ShardGrad` intercepts exactly the two calls torch's ``clip_grad_norm_`` / ``get_total_norm``
  make, ``torch._foreach_norm`` and ``torch.linalg.vector_norm`` over the whole tensor: the norm of a
  sharded gradient is then the norm of the full gradient (one float64 all-reduce over the layer's group
  per call, batched over a foreach list), the same bits on every rank. Every other operation runs as on a
  plain tensor and returns plain tensors;
- the type is registered in torch's lists of types the foreach kernels take, as DTensor registers itself,
  so optimizers keep their foreach / fused paths.

Nothing of torch is patched: the behaviour is confined to the gradients of tplinear's sharded parameters.
Those norms are collective, so every rank of the group must compute them together (as with DTensor).
"""
import math

import torch

from . import _ops


class ShardGrad(torch.Tensor):
    """The gradient of a sharded parameter: this rank's piece of the full gradient (``_tp_group``: the
    group the full gradient is split over). ``torch.linalg.vector_norm`` of the whole tensor and
    ``torch._foreach_norm`` give the full gradient's norm (collective); everything else is plain."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._foreach_norm:
            return _foreach_norm(*args, **kwargs)
        if func is torch.linalg.vector_norm and _whole(args, kwargs):
            return _vector_norm(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _whole(args, kwargs):
    dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
    return dim is None and not keepdim


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, ShardGrad) else t


def _full_norms(tensors, local, ord):
    """local[i] (the norm of tensors[i] on this rank) replaced by the full tensor's norm where tensors[i]
    is a ShardGrad of a group of more than one rank: a float64 all-reduce of the p-th powers (max for
    inf, min for -inf), one per group."""
    ord = float(ord)
    by_group = {}
    for i, t in enumerate(tensors):
        group = getattr(t, "_tp_group", None) if isinstance(t, ShardGrad) else None
        if group is not None and group.size > 1:
            by_group.setdefault(id(group._handle), (group, []))[1].append(i)
    out = list(local)
    for group, idx in by_group.values():
        vals = torch.stack([local[i].detach().to(torch.float64) for i in idx])
        if math.isinf(ord):
            op = "max" if ord > 0 else "min"
        elif ord == 0:
            op = "sum"
        else:
            op = "sum"
            vals = vals.pow(ord)
        vals = vals.contiguous()
        _ops.on_stream(vals)
        from .. import _C
        _C.all_reduce(group._handle, vals.detach(), op)
        if not math.isinf(ord) and ord != 0:
            vals = vals.pow(1.0 / ord)
        for j, i in enumerate(idx):
            out[i] = vals[j].to(local[i].dtype)
    return out


def _foreach_norm(tensors, ord=2, dtype=None):
    tensors = list(tensors)
    full = [i for i, t in enumerate(tensors) if t.numel()]
    local = [None] * len(tensors)
    with torch._C.DisableTorchFunctionSubclass():
        for i, n in zip(full, torch._foreach_norm([_plain(tensors[i]) for i in full], ord, dtype=dtype)):
            local[i] = n
    for i, t in enumerate(tensors):  # a zero-width shard (a rank with no heads): its part of the full norm is 0
        if local[i] is None:
            local[i] = torch.zeros((), dtype=dtype or t.dtype, device=t.device)
    return _full_norms(tensors, local, ord)


def _vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None, out=None):
    if out is not None:
        raise TypeError("torch.linalg.vector_norm(out=) of a sharded gradient is not supported")
    with torch._C.DisableTorchFunctionSubclass():
        if x.numel() == 0:
            local = torch.zeros((), dtype=dtype or x.dtype, device=x.device)
        else:
            local = torch.linalg.vector_norm(_plain(x), ord, dtype=dtype)
    return _full_norms([x], [local], ord)[0]


def _register_foreach():
    """Lets optimizers and torch's clipping keep their foreach kernels for ShardGrad (as DTensor does)."""
    try:
        from torch.optim import optimizer as _optimizer
        from torch.utils import _foreach_utils
    except ImportError:  # pragma: no cover - a torch without these lists
        return
    for types in (getattr(_optimizer, "_foreach_supported_types", None),
                  getattr(_foreach_utils, "_foreach_supported_types", None)):
        if isinstance(types, list) and ShardGrad not in types:
            types.append(ShardGrad)


_register_foreach()


def _after_accumulate(param):
    g = param.grad
    layer = getattr(param, "tp_layer", None)
    if g is None or isinstance(g, ShardGrad) or layer is None or getattr(param, "_tp_gathered", False):
        return
    alias = g.as_subclass(ShardGrad)
    alias._tp_group = layer.mp_group
    param.grad = alias


def track(param, layer, sharded):
    """Makes param's gradient a ShardGrad after each accumulation (sharded params of groups > 1)."""
    if not sharded or layer.mp_group.size <= 1 or getattr(param, "_tp_grad_hook", None) is not None:
        return
    if not hasattr(param, "register_post_accumulate_grad_hook"):  # pragma: no cover - torch < 2.1
        return
    param._tp_grad_hook = param.register_post_accumulate_grad_hook(_after_accumulate)
