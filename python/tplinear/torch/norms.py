"""Norms over a sharded width: an RMSNorm or LayerNorm applied between a column layer and the row layer after
it (BitNet's ``attn_sub_norm`` before ``o_proj``, ``ffn_sub_norm`` before ``down_proj``) sees only this rank's
features, so its statistics are summed over the group.

``ShardedNorm`` keeps this rank's pieces of the weight (and bias), split as the column output it normalizes,
and computes, in float32 or better (the input's dtype where wider),

    RMSNorm    y = w_r * (x_r * rsqrt(sum_group(sum x_r^2) / N + eps))
    LayerNorm  y = w_r * ((x_r - m) * rsqrt(v + eps)) + b_r,   m, v from sum_group([sum x_r, sum x_r^2]) / N

with N the full width (LayerNorm's sums in float64: the variance is their difference) and one all-reduce of
the local sums per call (backward: the sums' gradient all-reduced, so every rank's input gradient is the
full one for its features). ``norm_kind`` says whether a module is such
a norm: a torch ``nn.RMSNorm`` / ``nn.LayerNorm`` with an elementwise affine weight, or a module (Hugging Face
``*RMSNorm``) that computes the same as the formula above on a probe (its own eps; Gemma's ``1 + w`` and an
eps outside the root do not match, and stay whole).
"""
import copy

import torch
from torch import nn

from . import _ops
from .moe import shard_param

_EPS = ("variance_epsilon", "eps", "epsilon")


def _eps(module):
    return next((float(getattr(module, a)) for a in _EPS if isinstance(getattr(module, a, None), (int, float))
                 and not isinstance(getattr(module, a), bool)), None)


def _reference(kind, x, weight, bias, eps):
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    return y if bias is None else y + bias


def norm_kind(module, width):
    """"rms" or "layer" where module is a norm over its input's last dim of size width, with a weight (and
    for "layer" perhaps a bias) of that size applied elementwise, computing _reference with its own eps;
    else None."""
    weight, bias, eps = getattr(module, "weight", None), getattr(module, "bias", None), _eps(module)
    if (not isinstance(weight, torch.Tensor) or weight.shape != (width,) or eps is None or bias is not None and (
            not isinstance(bias, torch.Tensor) or bias.shape != (width,))
            or any(p.shape != (width,) for p in module.parameters()) or any(True for _ in module.children())):
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, width, generator=gen, dtype=torch.float64)
    x[1] *= eps ** 0.5  # a row whose mean square is about eps: where eps goes shows
    x[2] += 3.0  # a mean far from 0: RMSNorm and LayerNorm differ
    with torch.no_grad():
        try:
            probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
        except Exception:  # noqa: BLE001 - a module that cannot be copied is not switched
            return None
        probe.weight.copy_(torch.rand(width, generator=gen, dtype=torch.float64) + 0.5)
        if bias is not None:
            probe.bias.copy_(torch.randn(width, generator=gen, dtype=torch.float64))
        try:
            got = probe(x)
        except Exception:  # noqa: BLE001 - a module that is not a norm of one input
            return None
        for kind in ("rms", "layer"):
            want = _reference(kind, x, probe.weight, probe.bias if bias is not None else None, eps)
            if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=1e-4,
                                                                                              atol=1e-5):
                return kind
    return None


class ShardedNorm(nn.Module):
    """An RMSNorm ("rms") or LayerNorm ("layer") over a last dim of full_width split across mp_group: weight
    and bias (None: none) are this rank's pieces of it, the input's last dim the same pieces (see the module
    docstring; a gated norm, Mamba2's, would multiply its input by act(gate) before calling this forward).
    from_module builds one from the norm it replaces."""

    def __init__(self, weight, bias=None, *, eps, full_width, mp_group, kind="rms"):
        super().__init__()
        if kind not in ("rms", "layer"):
            raise ValueError(f"kind must be 'rms' or 'layer', got {kind!r}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.eps, self.full_width, self.mp_group, self.kind = float(eps), int(full_width), mp_group, kind

    @classmethod
    def from_module(cls, module, mp_group, pieces, kind="rms"):
        """The norm module (weight [full width], bias or None, its eps) split by pieces: for each rank, its
        [(offset, size), ...] (a layer's shard_ranges(), tplinear.partition.shard_ranges). Its parameters
        become this rank's shards (the same Parameter objects, marked and gatherable as tplinear's layers'
        are)."""
        full = module.weight.shape[0]
        bias = getattr(module, "bias", None)
        params = [p for p in (module.weight, bias) if p is not None]
        for p in params:
            _shard(p, mp_group, pieces, full)
        return cls(module.weight, bias, eps=_eps(module), full_width=full, mp_group=mp_group, kind=kind)

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))
        if self.kind == "rms":
            sums = h.pow(2).sum(-1, keepdim=True)
        else:  # in float64: the variance is a difference of the two (cancellation)
            h64 = h.to(torch.float64)
            sums = torch.cat([h64.sum(-1, keepdim=True), h64.pow(2).sum(-1, keepdim=True)], -1)
        # the full sums, which every rank then uses on its own shard: all-reduced forward, and backward too
        # (every rank's output depends on every rank's input)
        sums = _ops.ReduceFromGroup.apply(sums.contiguous(), self.mp_group)
        sums = _ops.CopyToGroup.apply(sums, self.mp_group) / self.full_width
        if self.kind == "rms":
            h = h * torch.rsqrt(sums + self.eps)
        else:
            mean, square = sums.split(1, -1)
            h = (h - mean.to(h.dtype)) * torch.rsqrt((square - mean * mean).clamp_min(0) + self.eps).to(h.dtype)
        y = self.weight * h.to(dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return (f"{self.kind}, {tuple(self.weight.shape)} of {self.full_width}, eps={self.eps}, "
                f"rank {self.mp_group.rank} of {self.mp_group.size}")


def _shard(param, group, pieces, full):
    """param (1-d, full) becomes this rank's pieces, marked as a sharded parameter (param.tp_layer gathers it)."""
    shard_param(param, group, 0, [pc for own in pieces for pc in own], len(pieces[0]), full)
