"""Tensor-parallel Mamba mixers (transformers' ``MambaMixer``, ``FalconMambaMixer`` and ``Mamba2Mixer``), split
along the intermediate (d_inner) channels as Megatron's and mamba-ssm's tensor parallelism do.

A Mamba mixer is ``out_proj(scan(conv(x), dt, B, C, A, D) * silu(z))`` with ``[x | z] = in_proj(h)``,
``[dt | B | C] = x_proj(conv(x))`` and ``dt`` widened by ``dt_proj``; the convolution is depthwise and the
scan runs channel by channel, so everything over d_inner is independent per channel except x_proj, which
sums over it. Rank r keeps channels ``units[r]`` (the partition rule's pieces of d_inner, shared by every
piece below):

    in_proj   column-parallel over its packed [x | z] output (each half split the same way): its backward
              all-reduces the gradient of the mixer's input
    conv1d    weight and bias split by channel (in place: ExpertShard pieces)
    x_proj    row-parallel: dt / B / C all-reduced (the full d_inner sum), then replicated on every rank;
              their gradient is all-reduced on the way back (each rank's channels give a partial one)
    dt_proj   column-parallel (output channels and bias split)
    A_log, D  split by channel (in place)
    out_proj  row-parallel: the mixer's output all-reduced, its bias added once

FalconMamba's and Jamba's RMS norms over dt / B / C act on the all-reduced (replicated) widths; Jamba's have
weights, whose gradients (from this rank's channels only) are summed over the group. The mixer's own forward then runs unchanged on this rank's channels (the torch path, and the cached
decode path, whose conv / recurrent states are built from the channels they see: d_inner / p per rank);
Mamba's fused ``mamba_inner_fn`` kernel path, which would read the sharded weights as whole ones, is not
taken by a sharded mixer.

Mamba-2 (``Mamba2Mixer``) is split by whole groups of B / C (``n_groups``): see ``_shard_mamba2``. Its gated
RMSNorm normalizes each group's span of d_inner, so fewer groups than ranks is refused (a sharded sum of
squares is not implemented).
"""
from torch import nn

from ..partition import get_tp_grain_size
from . import _ops
from .modules import LinearAllreduce, LinearLayer
from .moe import shard_param

# class names whose forward the split above is exact for
MAMBA = ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer")
MAMBA2 = ("Mamba2Mixer",)  # and those of the Mamba-2 split (_shard_mamba2)


def is_mixer(module):
    """Whether module is a Mamba mixer this module splits (and not one already split)."""
    return type(module).__name__ in MAMBA + MAMBA2 and not isinstance(module, _TPMixer)


def find_mixers(named, p):
    """The names of the Mamba mixers among named ({name: module}), each checked for p ranks (check_mixer)."""
    names = [n for n, m in named.items() if is_mixer(m)]
    for n in names:
        check_mixer(n, named[n], p)
    return names


def _sizes(module):
    """(d_inner, groups, heads, in_proj's output, conv channels, per-channel parameters and their size): the
    shapes the split expects of a mixer."""
    d, n = module.intermediate_size, module.ssm_state_size
    if type(module).__name__ in MAMBA:
        return d, d, d, 2 * d, d, {"A_log": d, "D": d}
    g, h = module.n_groups, module.num_heads
    return d, g, h, 2 * d + 2 * g * n + h, d + 2 * g * n, {"A_log": h, "D": h, "dt_bias": h}


def check_mixer(name, module, p):
    """Raises ValueError (naming the module) for a mixer whose parts are not the ones the split expects, or
    with fewer channels (Mamba-2: groups) than p ranks."""
    d, g, h, in_f, conv_f, params = _sizes(module)
    if g < p or d % g or h % g:
        what = "intermediate channels" if g == d else (f"groups of B / C (n_groups; {h} heads, d_inner {d}), each "
                                                        "the span of one gated RMSNorm,")
        raise ValueError(f"{name}: {g} {what} cannot be dealt whole to {p} ranks (a norm over part of a group "
                         "would need the whole group's sum of squares: not implemented)")
    parts = {"in_proj": (in_f, None), "out_proj": (None, d)}
    if type(module).__name__ in MAMBA:
        parts.update(x_proj=(None, d), dt_proj=(d, None))
    for part, (out_f, in_w) in parts.items():
        m = getattr(module, part, None)
        if not isinstance(m, nn.Linear) or out_f not in (None, m.out_features) or in_w not in (None, m.in_features):
            raise ValueError(f"{name}.{part}: expected an nn.Linear of {out_f or 'any'} outputs from {in_w or 'any'} "
                             f"inputs (intermediate_size {d}), got {m!r}")
    conv = getattr(module, "conv1d", None)
    if not isinstance(conv, nn.Conv1d) or not conv.in_channels == conv.out_channels == conv.groups == conv_f:
        raise ValueError(f"{name}.conv1d: expected a depthwise nn.Conv1d over {conv_f} channels, got {conv!r}")
    for pname, size in params.items():
        param = module._parameters.get(pname)
        if not isinstance(param, nn.Parameter) or param.shape[0] != size:
            raise ValueError(f"{name}.{pname}: expected a parameter of {size} rows")
    norm = getattr(module, "norm", None)
    if type(module).__name__ in MAMBA2 and (getattr(norm, "group_size", None) != d // g or norm.weight.shape != (d,)):
        raise ValueError(f"{name}.norm: expected a gated RMSNorm over groups of {d // g} of {d} channels")


class _TPMixer:
    """Mixed into a Mamba mixer's class: its forward on this rank's channels (see the module docstring)."""

    def forward(self, *args, **kwargs):
        training = self.training
        self.training = False  # Mamba's fused kernel branch (training, no cache) reads x_proj / out_proj whole
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.training = training


_CLASSES = {}


def _tp_class(cls):
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TP{cls.__name__}", (_TPMixer, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def _replicated_output(module, args, out):
    """x_proj's output after its all-reduce: used whole by every rank's channels, so the gradients they
    send back are partial sums, all-reduced here."""
    return _ops.CopyToGroup.apply(out, module.mp_group)


def shard_mixer(name, module, group):
    """Splits one Mamba mixer over group in place (see the module docstring); returns module. Collective."""
    check_mixer(name, module, group.size)
    if type(module).__name__ in MAMBA2:
        return _shard_mamba2(name, module, group)
    d = module.intermediate_size
    # the mode's grain where d is made of at least p of them, else channel by channel: no rank without channels
    # (a depthwise convolution over none fails)
    grain = get_tp_grain_size()
    grain = grain if d % grain == 0 and d // grain >= group.size else 1
    args = dict(mp_group=group, tp_grain_size=grain)
    in_proj = LinearLayer(module.in_proj, name=f"{name}.in_proj", block_sizes=[d, d], **args)
    units = [tuple(pieces[0]) for pieces in in_proj.shard_ranges()]  # every rank's (offset, size) of d_inner
    layers = {"in_proj": in_proj, "x_proj": LinearAllreduce(module.x_proj, name=f"{name}.x_proj", **args),
              "dt_proj": LinearLayer(module.dt_proj, name=f"{name}.dt_proj", **args),
              "out_proj": LinearAllreduce(module.out_proj, name=f"{name}.out_proj", **args)}
    expect = {part: [[u] for u in units] for part in layers}  # the same rule on the same width, agreed
    expect["in_proj"] = [[u, (d + u[0], u[1])] for u in units]  # on every rank alike
    for part, layer in layers.items():
        if [[tuple(pc) for pc in r] for r in layer.shard_ranges()] != expect[part]:
            raise ValueError(f"{name}.{part}: its split of the {d} channels {layer.shard_ranges()} is not "
                             f"in_proj's {expect[part]}")
    conv = module.conv1d
    for p in (conv.weight, conv.bias, module.A_log, module.D):
        if p is not None:
            shard_param(p, group, 0, units, 1, d)
    local = units[group.rank][1]
    conv.in_channels = conv.out_channels = conv.groups = local
    layers["x_proj"].register_forward_hook(_replicated_output)
    for part, layer in layers.items():
        setattr(module, part, layer)
    # left replicated (Jamba's norms over dt / B / C): applied to x_proj's replicated output, each rank's
    # channels give them a partial gradient
    for param in module.parameters():
        if getattr(param, "tp_layer", None) is None:
            _ops.reduce_grad(param, group)
    module.intermediate_size = local
    module.__class__ = _tp_class(type(module))
    return module


def _shard_mamba2(name, module, group):
    """A Mamba-2 mixer split by whole groups of B / C (each with its heads, their x / z channels and gated-norm
    span): in_proj [z | x | B | C | dt] column-parallel block by block, conv1d over [x | B | C] and dt_bias /
    A_log / D / norm.weight by the same groups, out_proj row-parallel. Nothing between in_proj and out_proj
    mixes groups, so no other collective is needed."""
    d, g, h, _, conv_f, _ = _sizes(module)
    gn = g * module.ssm_state_size
    args = dict(mp_group=group, block_heads=[g] * 5)
    in_proj = LinearLayer(module.in_proj, name=f"{name}.in_proj", block_sizes=[d, d, gn, gn, h], **args)
    mine = in_proj.shard_ranges()  # every rank's [z, x, B, C, dt] pieces
    out_proj = LinearAllreduce(module.out_proj, name=f"{name}.out_proj", block_sizes=[d], block_heads=[g],
                               mp_group=group)
    if [[tuple(pc) for pc in r] for r in out_proj.shard_ranges()] != [[tuple(r[0])] for r in mine]:
        raise ValueError(f"{name}.out_proj: its split of the {d} channels {out_proj.shard_ranges()} is not "
                         f"in_proj's {[r[0] for r in mine]}")
    conv = module.conv1d
    xbc = [(off - d, size) for r in mine for off, size in r[1:4]]
    heads = [(r[4][0] - 2 * d - 2 * gn, r[4][1]) for r in mine]
    for param, ranges, nblocks, full in ((conv.weight, xbc, 3, conv_f), (conv.bias, xbc, 3, conv_f),
                                         (module.dt_bias, heads, 1, h), (module.A_log, heads, 1, h),
                                         (module.D, heads, 1, h), (module.norm.weight, [r[0] for r in mine], 1, d)):
        if param is not None:
            shard_param(param, group, 0, ranges, nblocks, full)
    r = mine[group.rank]
    conv.in_channels = conv.out_channels = conv.groups = module.conv_dim = r[1][1] + r[2][1] + r[3][1]
    module.intermediate_size, module.num_heads, module.n_groups = r[0][1], r[4][1], r[2][1] // module.ssm_state_size
    module.in_proj, module.out_proj = in_proj, out_proj
    module.__class__ = _tp_class(type(module))
    return module


def parallelize_mixers(model, names, group):
    """Splits the Mamba mixers of model named in names over group; returns their names."""
    for name in names:
        shard_mixer(name, model.get_submodule(name), group)
    return list(names)
