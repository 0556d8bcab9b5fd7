"""Tensor-parallel MoE experts: transformers 5's fused expert modules (3-d parameters ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, or transposed ``[E, H, 2I]`` / ``[E, I, H]``; Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-style routed experts ...) split along each expert's
intermediate dimension, as transformers' ``moe_tp_experts`` plans and Megatron's tensor-parallel experts do.

Every expert is an MLP ``down(act(gate(x)) * up(x))`` whose intermediate units are independent, so rank r
keeps units ``shard_ranges(I, p, training=True)[r]`` of every expert: the matching rows of gate and of up
(concatenated ``[gate | up]`` blocks are split block by block; gpt-oss's interleaved ``[g0, u0, g1, u1, ...]``
by unit pairs), their biases, and the matching columns of down. The router stays replicated. The module's
own forward (any ``experts_implementation``) then runs on the shards and yields this rank's partial sum of
the combined expert output (routing weights applied); one all-reduce over the group completes it, not one
per expert. down's bias is added once (by rank 0; the other ranks add zeros) and its gradient is summed
over the group, so every rank holds the same value. Backward: the gradients of the experts' inputs (the
hidden states and the routing weights, whose partial products each rank computes) are all-reduced, so the
replicated router and everything before it get the full gradient. A norm after each expert
(``post_expert_norm``: Ergo, MuseSpark) gets the all-reduce at its input instead, and only the hidden states'
gradient is summed (what follows the norm runs the same on every rank).
"""
import torch
from torch import nn

from .. import _C
from ..partition import shard_ranges
from . import _grads, _ops


def _param3(module, name):
    p = module._parameters.get(name)
    return p if isinstance(p, nn.Parameter) and p.dim() == 3 else None


def is_fused_experts(module):
    """Whether module keeps its experts as 3-d parameters (down_proj and gate_up_proj or up_proj)."""
    if isinstance(module, _TPExperts):
        return False
    return _param3(module, "down_proj") is not None and (
        _param3(module, "gate_up_proj") is not None or _param3(module, "up_proj") is not None)


_HIDDEN = ("hidden_dim", "hidden_size")  # the experts module's own record of its input's width


def config_hidden_size(model):
    """The model config's hidden size (the text config's), else None: the experts' input width where the
    experts module does not keep it (_HIDDEN)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    v = getattr(config, "hidden_size", None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def is_sharded_experts(module):
    """Whether module is a fused experts module shard_experts has split."""
    return isinstance(module, _TPExperts)


_NORM = "post_expert_norm"  # a norm after each expert's down_proj (Ergo, MuseSpark): its input all-reduced


def _layout(name, module, hidden=None):
    """(up name, gate name or None, has gate, transposed, interleaved, I). hidden: the experts' input width,
    where the module does not keep it; it tells the layout where both fit the shapes (no gate: up [E, a, b]
    beside down [E, b, a])."""
    up_name = "gate_up_proj" if _param3(module, "gate_up_proj") is not None else "up_proj"
    up, down = module._parameters[up_name], module._parameters["down_proj"]
    gate_name = "gate_proj" if up_name == "up_proj" and _param3(module, "gate_proj") is not None else None
    if gate_name is not None and module._parameters[gate_name].shape != up.shape:
        raise ValueError(f"{name}: gate_proj {tuple(module._parameters[gate_name].shape)} and up_proj "
                         f"{tuple(up.shape)} differ")
    has_gate = bool(getattr(module, "has_gate", up_name == "gate_up_proj")) and up_name == "gate_up_proj"
    k = 2 if has_gate else 1
    inner = next((f"{name}.{n}" for n, m in module.named_children()
                  if n != _NORM and any(True for _ in m.parameters())), None)
    if inner is not None or getattr(module, "has_post_expert_norm", False) and not isinstance(
            getattr(module, _NORM, None), nn.Module):
        raise NotImplementedError(f"{name}: experts with a module of their own after each expert "
                                  f"({inner or 'has_post_expert_norm, but no ' + _NORM}) cannot be split along "
                                  "their intermediate dimension (it would see a partial sum); keep them replicated")
    _, a, b = up.shape
    _, c, d = down.shape
    plain = b == c and a == k * d  # up [E, kI, H], down [E, H, I]
    flipped = a == d and b == k * c  # up [E, H, kI], down [E, I, H]
    transposed = getattr(module, "is_transposed", None)
    if transposed is None and plain and flipped:  # both fit (no gate): the input width tells
        own = next((getattr(module, h) for h in _HIDDEN if isinstance(getattr(module, h, None), int)), None)
        hidden = own if own is not None else hidden
        plain, flipped = plain and b == hidden, flipped and a == hidden
    if transposed is None:
        if plain == flipped:
            raise ValueError(f"{name}: cannot tell the experts' layout from {up_name} {tuple(up.shape)} and down_proj "
                             f"{tuple(down.shape)} (hidden size {hidden}, from the module's {' / '.join(_HIDDEN)} "
                             "or the model config)")
        transposed = flipped
    if not (flipped if transposed else plain):
        raise ValueError(f"{name}: {up_name} {tuple(up.shape)} and down_proj {tuple(down.shape)} do not make experts "
                         f"({'transposed' if transposed else 'not transposed'}, {'with' if has_gate else 'no'} gate)")
    interleaved = has_gate and not getattr(module, "is_concatenated", True)
    return up_name, gate_name, has_gate, bool(transposed), interleaved, int(c if transposed else d)


def split_dims(name, module, hidden=None):
    """{parameter name: the dim shard_experts splits it along} of a fused experts module (its intermediate
    dim); raises (naming the module and the reason) where they cannot be split. hidden: as in shard_experts."""
    up_name, gate_name, _, transposed, _, _ = _layout(name, module, hidden)
    dims = {n: 2 if transposed else 1 for n in (up_name, gate_name) if n is not None}
    dims["down_proj"] = 1 if transposed else 2
    return dims


class ExpertShard:
    """The partition of one parameter split in place (``param.tp_layer``; shard_param makes it: MoE experts, and
    tplinear.torch.norms' and .ssm's per-channel parameters): full_tensor gathers it, layout() describes it."""

    _conv1d = False

    def __init__(self, group, dim, ranges, nblocks, full_size):
        self.mp_group, self.dim, self._ranges, self._nblocks, self._full = group, dim, ranges, nblocks, full_size
        self.tp_world_size, self.tp_index = group.size, group.rank

    def full_tensor(self, param, value=None):
        """The full tensor of param (value: a tensor laid out like param's shard, e.g. param.grad), all-gathered.
        Collective over the group."""
        value = param.detach() if value is None else value.detach()
        shape = list(value.shape)
        shape[self.dim] = self._full
        out = torch.empty(shape, dtype=value.dtype, device=value.device)
        with _ops.on_stream(value):
            _C.gather(self.mp_group._handle, value.contiguous(), self.dim, self._ranges, self._nblocks, out)
        return out

    def _is_sharded(self, param):  # the training loop's question to a layer (tplinear.torch.training)
        return True

    def layout(self):
        """(dim, every rank's pieces along dim as [[(offset, size), ...] for each rank], the full size along
        dim): how a checkpoint stores and reshards the parameter."""
        n = self._nblocks
        return self.dim, [self._ranges[r * n:(r + 1) * n] for r in range(self.tp_world_size)], self._full

    def __repr__(self):
        return f"ExpertShard(dim={self.dim}, pieces={self._ranges[self.tp_index * self._nblocks:][:self._nblocks]})"


def shard_param(param, group, dim, ranges, nblocks, full):
    """Replaces param's data by this rank's pieces along dim (the full tensor is released)."""
    r = group.rank
    pieces = ranges[r * nblocks:(r + 1) * nblocks]
    data = torch.cat([param.detach().narrow(dim, off, size) for off, size in pieces], dim=dim)
    with torch.no_grad():
        param.data = data.clone(memory_format=torch.contiguous_format)
    param.grad = None
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.tp_layer = ExpertShard(group, dim, ranges, nblocks, full)
    _grads.track(param, param.tp_layer, True)  # torch's clip_grad_norm_ sees the full gradient's norm
    return param


class _TPExperts:
    """Mixed into a fused experts module's class: its forward on this rank's shards, then one all-reduce
    (with a post_expert_norm: the norm's input is all-reduced instead, see shard_experts)."""

    def forward(self, *args, **kwargs):
        group = self._tplinear_group
        norm = isinstance(getattr(self, _NORM, None), nn.Module)

        def enter(a):  # forward: as is; backward: the ranks' partial gradients summed
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                return _ops.CopyToGroup.apply(a, group)
            return a

        if norm:  # only the hidden states reach the split projections; the rest (routing weights) is applied
            args = [enter(a) for a in args[:1]] + list(args[1:])  # after the norm, the same on every rank
            kwargs = {k: enter(v) if k == "hidden_states" else v for k, v in kwargs.items()}
        else:
            args = [enter(a) for a in args]
            kwargs = {k: enter(v) for k, v in kwargs.items()}
        bias = self._parameters.get("down_proj_bias")
        if bias is not None and group.rank != 0:  # the bias once: rank 0 adds it, the others add zeros
            self._parameters["down_proj_bias"] = bias * 0
        try:
            out = super().forward(*args, **kwargs)
        finally:
            if bias is not None:
                self._parameters["down_proj_bias"] = bias
        if norm:
            return out
        if isinstance(out, tuple):
            return (_ops.ReduceFromGroup.apply(out[0], group),) + tuple(out[1:])
        return _ops.ReduceFromGroup.apply(out, group)


_CLASSES = {}


def _tp_class(cls):
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TP{cls.__name__}", (_TPExperts, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def shard_experts(name, module, group, hidden=None):
    """Splits one fused experts module over group in place (see the module docstring); returns module.
    hidden: the experts' input width where the module does not keep it (config_hidden_size(model))."""
    up_name, gate_name, has_gate, transposed, interleaved, inter = _layout(name, module, hidden)
    p = group.size
    # DeepSpeed's training split (every rank holds about I / p), in grains of 16 bytes where I is made of them:
    # transformers' grouped_mm experts need 16-byte strides, which the unsharded experts then have too
    grain = max(1, 16 // module._parameters[up_name].element_size())
    units = shard_ranges(inter, p, training=True, grain=grain if inter % grain == 0 else 1)
    if has_gate and not interleaved:  # [gate | up]: each block split on its own
        up_ranges, up_blocks = [pc for r in units for pc in (r[0], (inter + r[0][0], r[0][1]))], 2
    elif has_gate:  # [g0, u0, g1, u1, ...]: unit j is elements 2j and 2j + 1
        up_ranges, up_blocks = [(2 * r[0][0], 2 * r[0][1]) for r in units], 1
    else:
        up_ranges, up_blocks = [r[0] for r in units], 1
    k = 2 if has_gate else 1
    down_ranges = [r[0] for r in units]
    for n in (up_name, gate_name) if gate_name else (up_name,):  # a separate 3-d gate_proj as up_proj
        shard_param(module._parameters[n], group, 2 if transposed else 1, up_ranges, up_blocks, k * inter)
        up_bias = module._parameters.get(f"{n}_bias")
        if isinstance(up_bias, nn.Parameter) and up_bias.dim() == 2:
            shard_param(up_bias, group, 1, up_ranges, up_blocks, k * inter)
    shard_param(module._parameters["down_proj"], group, 1 if transposed else 2, down_ranges, 1, inter)
    bias = module._parameters.get("down_proj_bias")
    if isinstance(bias, nn.Parameter):
        _ops.reduce_grad(bias, group)
    local = units[group.rank][0][1]
    for attr in ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size"):
        if getattr(module, attr, None) == inter and not isinstance(getattr(module, attr), bool):
            setattr(module, attr, local)
    norm = getattr(module, _NORM, None)
    if isinstance(norm, nn.Module):  # the norm needs each expert's whole output: the ranks' partial down_proj
        norm.register_forward_pre_hook(lambda m, args: (  # outputs are summed at its input (one all-reduce
            _ops.ReduceFromGroup.apply(args[0], group), *args[1:]))  # of topk x tokens rows, not tokens rows)
    module._tplinear_group = group
    module.__class__ = _tp_class(type(module))
    return module


def parallelize_experts(model, group):
    """Splits every fused experts module of model over group; returns their names."""
    done, hidden = [], config_hidden_size(model)
    for name, module in list(model.named_modules()):
        if is_fused_experts(module):
            shard_experts(name, module, group, hidden)
            done.append(name)
    return done
