"""parallelize(model): tensor-parallelises a model in place by a plan, as DeepSpeed AutoTP and
torch.distributed.tensor.parallel.parallelize_module do, with tplinear's layers and process groups.

The plan comes from, in order: the ``plan`` argument; the Hugging Face model's own plan
(``model._tp_plan``, else ``config.base_model_tp_plan``), without its embedding / lm_head entries, which
stay replicated unless the ``plan`` argument names them; DeepSpeed-AutoTP-style name rules. Attention
heads come from the model config (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``), the
attention module's own counts winning where it keeps them, each projection's width per head its own
(``_head_kwargs``: MLA, gated queries), and are split by tplinear's one GQA rule (``tplinear.attention_heads``: KV heads dealt whole, query heads follow
their KV group), so Q, K, V and the o_proj input always agree, at any group size.

Styles are transformers' vocabulary (``transformers.distributed.tensor_parallel``): ``_STYLES`` maps each
to a small style object that checks the module an entry names and then applies itself to it (as torch's
``ParallelStyle._apply``); styles that need what tplinear.torch does not have yet are ``_Later`` entries
and raise NotImplementedError naming the module. parallelize chooses the entries, checks them all, then
applies them.
"""
import collections
import copy
import inspect
import re
import textwrap
import warnings

import torch
from torch import nn

from .. import distributed as dist
from . import _ops
from . import moe as _moe
from . import norms as _norms
from . import sequence as _sequence
from . import ssm as _ssm
from . import training as _training
from .modules import (
    Conv_LinearALlreduce,
    LinearAllreduce,
    LinearLayer,
    TPModule,
    conv_LinearLayer,
)
from .vocab import VocabParallelEmbedding

# ------------------------------------------------------------------------------------------ styles


class _Style:
    """What one style of a plan does to the module an entry names: check (before anything is changed, so a
    bad plan leaves the model as it was) and apply (returns the module that replaces it, or None: the module
    stays, perhaps with hooks). Styles are transformers' vocabulary (transformers.distributed.tensor_parallel)."""

    supported = True  # in STYLES (False: a style tplinear does not have yet)
    shards = False  # splits the module's own parameters (which must then not be tied to another module's)

    def check(self, name, module, choice, ctx):
        pass

    def apply(self, name, module, ctx):
        return None


class _Replicate(_Style):
    """The module stays as it is."""


class _Linear(_Style):
    """nn.Linear / transformers' Conv1D -> LinearLayer (column) or LinearAllreduce (row), attention
    projections split by whole heads; packed: that many equal blocks of the output, each split on its own."""

    shards = True

    def __init__(self, kind, packed=None, **options):
        self.kind, self.packed, self.options = kind, packed, options
        self.param_dim = -2 if kind == "col" else -1  # on a 3-d expert parameter (as transformers shards it)

    def check(self, name, module, choice, ctx):
        if not _is_linear(module):
            raise ValueError(f"{name}: style {choice.style!r} ({choice.source}) is for linear layers, but {name} "
                             f"is a {type(module).__name__}")
        if self.kind == "col" and not self.options.get("gather_output") and _kv_replica(name, module, ctx):
            return
        if self._fused(name, module, ctx):
            _fused_pieces(name, module, ctx)
        else:
            self._layer_args(name, module, ctx)

    def _fused(self, name, module, ctx):
        """A fused QKV projection of a layout in _FUSED_LAYOUTS, split by heads (not when gathered)."""
        return (self.kind == "col" and not self.options.get("gather_output") and isinstance(module, nn.Linear)
                and _fused_layout(name, ctx) is not None)

    def _layer_args(self, name, module, ctx):
        conv = _is_conv1d(module)
        out_f, in_f = (module.weight.shape[1], module.weight.shape[0]) if conv else tuple(module.weight.shape)
        heads = ctx.heads
        if self.kind == "row" and _last(name) in _O and "." in name:  # the output projection of a fused layout
            for sib, m in ctx.model.get_submodule(name.rpartition(".")[0]).named_children():
                layout = _fused_layout(f"{name.rpartition('.')[0]}.{sib}", ctx) if _is_linear(m) else None
                if layout is not None:
                    heads = layout[1:4]
        parent = ctx.model.get_submodule(name.rpartition(".")[0]) if "." in name else ctx.model
        # a gathered output / a whole input (colwise_rep, rowwise_rep: OLMoE's plan) is whole in the attention:
        # its heads are its own, K / V are not replicated (kv_heads) for it
        whole = self.options.get("gather_output") or self.options.get("input_is_parallel") is False
        kwargs = _head_kwargs(name, module, self.kind, heads, out_f if self.kind == "col" else in_f, parent,
                              None if whole else ctx)
        if self.packed and "block_sizes" not in kwargs:
            if out_f % self.packed:
                raise ValueError(f"{name}: packed_colwise splits {out_f} output features into {self.packed} equal "
                                 "blocks, but they do not divide")
            kwargs["block_sizes"] = [out_f // self.packed] * self.packed
        return {**self.options, **kwargs}

    def apply(self, name, module, ctx):
        conv = _is_conv1d(module)
        replica = (self.kind == "col" and not self.options.get("gather_output") and _kv_replica(name, module, ctx))
        if replica:
            return _replicated_kv_layer(module, replica, ctx)
        if self._fused(name, module, ctx):
            pieces, layout, split = _fused_pieces(name, module, ctx)
            layer = _FusedQKVLayer(module, pieces=pieces, mp_group=ctx.group, name=name)
            layer._fused_layout = (*layout, *split[ctx.group.rank])
            return layer
        if self.kind == "col":
            cls = conv_LinearLayer if conv else LinearLayer
        else:
            cls = Conv_LinearALlreduce if conv else LinearAllreduce
        return cls(module, mp_group=ctx.group, name=name, **self._layer_args(name, module, ctx))


class _Embedding(_Style):
    """nn.Embedding split by vocabulary: tplinear.torch.VocabParallelEmbedding."""

    shards = True

    def check(self, name, module, choice, ctx):
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"{name}: style {choice.style!r} ({choice.source}) is for nn.Embedding, but {name} "
                             f"is a {type(module).__name__}")

    def apply(self, name, module, ctx):
        return VocabParallelEmbedding.from_embedding(module, mp_group=ctx.group, name=name)


class _GradAllReduce(_Style):
    """Left replicated; each parameter's incoming gradient covers only this rank's heads, so it is summed over
    the group before it accumulates (a tensor hook: gradient accumulation over micro-batches stays right)."""

    def apply(self, name, module, ctx):
        for pname, p in module.named_parameters(recurse=False):
            _ops.reduce_grad(p, ctx.group)


class _AllReduceOutput(_Style):
    """The module's output is all-reduced (forward), identity backward."""

    def apply(self, name, module, ctx):
        module.register_forward_hook(lambda m, args, out: None if out is None else _ops.ReduceFromGroup.apply(
            out, ctx.group))


class _MlaKvAProj(_Style):
    """DeepSeek MLA's kv_a_proj: the rope part of its output bypasses the column layer after it, so its
    gradient is all-reduced in the backward."""

    @staticmethod
    def _rope(model):
        config = getattr(model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(config, "qk_rope_head_dim", None)

    def check(self, name, module, choice, ctx):
        if not isinstance(self._rope(ctx.model), int):
            raise ValueError(f"{name}: style 'mla_kv_a_proj' needs the config's qk_rope_head_dim")

    def apply(self, name, module, ctx):
        def hook(m, args, out, rope=self._rope(ctx.model)):
            passed, rot = out.split([out.shape[-1] - rope, rope], dim=-1)
            return torch.cat([passed, _ops.CopyToGroup.apply(rot, ctx.group)], dim=-1)
        module.register_forward_hook(hook)


class _Experts(_Style):
    """transformers 5's fused MoE experts (3-d gate_up_proj / down_proj): split along each expert's
    intermediate dim, one all-reduce after they combine (tplinear.torch.moe). A plan's entries on their 3-d
    parameters (colwise, packed_colwise, rowwise, packed_rowwise) are this split when they cut each parameter
    along that dim (_expert_param)."""

    shards = True

    def check(self, name, module, choice, ctx):
        if not _moe.is_fused_experts(module):
            raise ValueError(f"{name}: style {choice.style!r} ({choice.source}) is for MoE experts kept as 3-d "
                             f"parameters (down_proj and gate_up_proj / up_proj), but {name} is a "
                             f"{type(module).__name__}")
        _moe.split_dims(name, module, _moe.config_hidden_size(ctx.model))

    def apply(self, name, module, ctx):
        _moe.shard_experts(name, module, ctx.group, _moe.config_hidden_size(ctx.model))


class _ExpertParam(_Style):
    """A style transformers applies only to 3-d expert parameters (packed_rowwise: the last dim, [gate | up]
    block by block), which _expert_param turns into their module's _Experts split."""

    param_dim = -1

    def check(self, name, module, choice, ctx):
        raise ValueError(f"{name}: style {choice.style!r} ({choice.source}) is for MoE experts' 3-d parameters, "
                         f"but {name} is a {type(module).__name__}")


class _Later(_Style):
    """A style transformers defines that needs what tplinear does not have yet: NotImplementedError naming the
    module (the seam for later work: give it a class above and an entry in _STYLES)."""

    supported = False

    def __init__(self, needs):
        self.needs = needs

    def check(self, name, module, choice, ctx):
        _refuse(name, choice.style, choice.pattern, choice.source)


_STYLES = {
    "colwise": _Linear("col"),
    "unit_colwise": _Linear("col"),  # by whole heads, as the heads rule splits q / k / v (kv_heads)
    "colwise_gather_output": _Linear("col", gather_output=True),
    "colwise_rep": _Linear("col", gather_output=True),
    "colwise_gather": _Linear("col", gather_output=True),
    "packed_colwise": _Linear("col", packed=2),
    "rowwise": _Linear("row"),
    "unit_rowwise": _Linear("row"),
    "rowwise_split_input": _Linear("row", input_is_parallel=False),
    "rowwise_rep": _Linear("row", input_is_parallel=False),
    "replicated_with_grad_allreduce": _GradAllReduce(),
    "all_reduce": _AllReduceOutput(),
    "mla_kv_a_proj": _MlaKvAProj(),
    "replicate": _Replicate(),
    "embedding_rowwise": _Embedding(),
    "sequence_parallel": _Later("sequence parallelism as a plan entry (parallelize(model, sequence_parallel=True) "
                                "applies it to the whole decoder; see docs/torch.md)"),
    "embedding_colwise": _Later("a hidden-dim-parallel embedding"),
    "packed_rowwise": _ExpertParam(),
    "moe_tp_experts": _Experts(),
    "moe_identity_expert": _Later("tensor-parallel MoE experts"),
    "local_params": _Replicate(),  # the owner of bare parameters that their own entries split (_head_params)
}
STYLES = sorted(name for name, style in _STYLES.items() if style.supported)


# DeepSpeed AutoTP's name rules (deepspeed/module_inject/auto_tp.py): the last name component
_NAME_ROW = {"o_proj", "out_proj", "down_proj", "fc2", "c_proj", "wo", "w2", "dense_4h_to_h"}
_NAME_COL = {"query_key_value", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1", "c_fc", "c_attn", "qkv_proj", "Wqkv",
             "W_pack", "dense_h_to_4h", "w1", "w3", "query", "key", "value", "wq", "wk", "wv", "gate_up_proj"}
# names beyond DeepSpeed's lists, of families its structural parser handles by position (docs/torch.md):
# CTRL's Wq / Wk / Wv, XLM's q_lin / k_lin / v_lin / out_lin and lin1 / lin2, CPM-Ant's project_q / k / v /
# attention_out and gated w_0 / w_1 -> w_out, ModernBERT's Wo (attention and MLP) and packed Wi (input | gate)
_MORE_Q, _MORE_KV, _MORE_O = {"Wq", "q_lin", "project_q"}, {"Wk", "Wv", "k_lin", "v_lin", "project_k", "project_v"}, \
    {"Wo", "out_lin", "attention_out"}
_NAME_ROW |= _MORE_O | {"lin2", "w_out"}
_NAME_COL |= _MORE_Q | _MORE_KV | {"lin1", "w_0", "w_1", "Wi"}
_NAME_VOCAB = {"lm_head", "embed_out", "embed_tokens", "wte", "word_embeddings"}  # replicated by default

# attention projections (the heads rule applies to them)
_Q = {"q_proj", "query", "wq", "q", "q_b_proj", "q_gate_proj"} | _MORE_Q  # q_b_proj, kv_b_proj: MLA's up-projections
_KV = {"k_proj", "v_proj", "key", "value", "wk", "wv", "k", "v", "kv_b_proj"} | _MORE_KV
_QKV = {"c_attn", "qkv_proj", "Wqkv", "W_pack", "qkv"}  # [q | k | v] blocks one after another
_O = {"o_proj", "out_proj", "wo", "o", "c_proj", "dense"} | _MORE_O  # only under an attention module
_GATE_UP = {"gate_up_proj", "Wi"}
_ATTN_GATE = {"gate_proj", "g_proj", "gate"}  # under an attention: an output gate of heads x width, split as q


def _last(name):
    return name.rsplit(".", 1)[-1]


def _is_attention(name):
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    # self_attn, attn, encoder_attn / cross_attn (cross-attention), attention
    return bool(re.search(r"attn|attention", parent, re.IGNORECASE))


def _is_conv1d(module):
    """transformers' Conv1D (GPT-2): a linear layer with its weight stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_linear(module):
    return isinstance(module, nn.Linear) or _is_conv1d(module)


# ------------------------------------------------------------------------------------------ the plan


class _Plan:
    """(pattern, style) entries; a module name matches a pattern equal to it or to a dotted suffix of it,
    where * stands for one name component; the longest matching pattern wins."""

    def __init__(self, entries, source):
        self.source = source
        self.entries = []
        for pattern, style in entries.items():
            if not isinstance(pattern, str) or not isinstance(style, str):
                raise TypeError(f"a plan maps module-name patterns (str) to styles (str), got {pattern!r}: {style!r}")
            regex = re.compile(r"(?:^|.*\.)" + r"[^.]+".join(re.escape(part) for part in pattern.split("*")) + r"$")
            self.entries.append((pattern, style, regex))

    def style(self, name):
        hits = [(len(p), p, s) for p, s, rx in self.entries if rx.match(name)]
        return (max(hits)[1:]) if hits else (None, None)


def _hf_plan(model):
    """The Hugging Face model's own plan, fully qualified where it can be: model._tp_plan (set by
    transformers on PreTrainedModel instances), else config.base_model_tp_plan (under base_model_prefix)."""
    plan = getattr(model, "_tp_plan", None)
    if plan:
        return dict(plan), "the model's _tp_plan"
    if not hasattr(model, "base_model_prefix"):  # a bare module (LlamaMLP) keeps a config, not a model's plan
        return None, None
    config = getattr(model, "config", None)
    base = getattr(config, "base_model_tp_plan", None) if config is not None else None
    if base:
        prefix = getattr(model, "base_model_prefix", "")
        has_prefix = prefix and any(n == prefix for n, _ in model.named_children())
        return {(f"{prefix}.{k}" if has_prefix else k): v for k, v in base.items()}, "config.base_model_tp_plan"
    return None, None


def _vocab_modules(model):
    """Names of the input embeddings and the output projection (lm_head), which stay replicated unless
    the plan argument names them."""
    out = set()
    named = {id(m): n for n, m in model.named_modules()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            m = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            m = None
        if m is not None and id(m) in named:
            out.add(named[id(m)])
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) or _last(name) in _NAME_VOCAB:
            out.add(name)
    return out


# names that are rules only inside one module class: (class, child name) -> style
_CLASS_NAMES = {("ProphetNetFeedForward", "intermediate"): "colwise", ("ProphetNetFeedForward", "output"): "rowwise",
                ("XLNetFeedForward", "layer_1"): "colwise", ("XLNetFeedForward", "layer_2"): "rowwise"}


def _name_rule(name, module, parent_class=None):
    if not _is_linear(module) or _last(name) in _NAME_VOCAB:
        return None
    last = _last(name)
    if (parent_class, last) in _CLASS_NAMES:
        return _CLASS_NAMES[(parent_class, last)]
    if last in _NAME_ROW or (last == "dense" and (re.search(r"(attention|output)$", name.rsplit(".", 1)[0])
                                                  or _is_attention(name))):
        return "rowwise"
    if last in _NAME_COL or last == "dense":
        return "packed_colwise" if last in _GATE_UP else "colwise"
    return None


# ------------------------------------------------------------------------------------------ heads


def _config_heads(model, num_heads, num_kv_heads, head_dim):
    """(num_heads, num_kv_heads, head_dim) from the arguments, else the model config, else None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*keys):
        for k in keys:
            v = getattr(config, k, None) if config is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    h = num_heads if num_heads is not None else first("num_attention_heads", "n_head", "num_heads")
    if h is None:
        return None
    kv = num_kv_heads if num_kv_heads is not None else first("num_key_value_heads", "n_head_kv", "num_kv_heads")
    d = head_dim if head_dim is not None else first("head_dim")
    if d is None:
        hidden = first("hidden_size", "n_embd", "d_model")
        if hidden is None or hidden % h:
            raise ValueError(f"cannot tell the head dim: the config has {h} heads but no head_dim, and its hidden "
                             f"size {hidden} is not a multiple of them; pass head_dim=")
        d = hidden // h
    return int(h), int(kv if kv is not None else h), int(d)


def _head_kwargs(name, module, kind, heads, size, parent=None, ctx=None):
    """The layer arguments that make an attention projection split by whole heads (or {} for others).
    size: the split dim (out_features of a column layer, in_features of a row layer). The head counts are the
    attention module's own (_own_heads); the width per head the config's head_dim where it makes size, else
    size / the projection's head count."""
    last = _last(name)
    attention = (_is_attention(name) or last in _Q | _KV | _QKV
                 or "Attention" in type(parent).__name__)  # attention under another name (NemotronH's mixer)
    gate = last in _ATTN_GATE and _is_attention(name)
    if heads is None or not attention or last not in _Q | _KV | _QKV | _O and not gate:
        return {}
    if kind == "row" and last not in _O:
        return {}
    role = ("o" if kind == "row" else "q" if last in _Q or gate else "kv" if last in _KV else "qkv" if last in _QKV
            else None)
    if role is None:
        return {}
    h, kv = _own_heads(parent, heads)
    if role != "qkv" and ctx is not None and _replicates(h, kv, ctx):
        kv = h  # kv_heads="replicate": the query heads dealt alone, evenly (_dealt_heads); K and V stay whole
    count = {"q": h, "o": h, "kv": kv, "qkv": h + 2 * kv}[role]
    d = heads[2] if size == count * heads[2] else size // count
    if h % kv or size != count * d:
        raise ValueError(f"{name}: an attention projection of {size} features, but its attention's heads "
                         f"(num_heads={h}, num_key_value_heads={kv}; the config's head_dim={heads[2]}) do not "
                         "divide it; pass num_heads= / num_kv_heads= / head_dim= or a plan without it")
    args = {"num_heads": h, "num_kv_heads": kv, "head_dim": d}
    if role == "qkv":
        args["block_sizes"] = [h * d, kv * d, kv * d]
    return args


_OWN_H = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_OWN_KV = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _own_heads(parent, heads):
    """(num_heads, num_kv_heads) of an attention module: its own attributes where it keeps them (per-layer
    counts: Laguna's heads, MiMo's doubled KV heads on sliding layers), else the config's (heads). Each
    projection's width per head is then its size / its head count (_head_kwargs): MLA's qk_head_dim and
    v_head_dim, a gated q_proj's query and gate of each head (Qwen3-Next)."""
    def own(attrs):
        for a in attrs:
            v = getattr(parent, a, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None
    h = own(_OWN_H) or heads[0]
    kv = own(_OWN_KV)
    groups = own(("num_key_value_groups",))
    if kv is None and groups is not None and h % groups == 0:
        kv = h // groups
    return h, kv or (heads[1] if h == heads[0] else h)


# ------------------------------------------------------------------------------------------ fused QKV layouts


class _FusedQKVLayer(LinearLayer):
    """A column layer over a fused QKV projection whose rows are not [q | k | v] blocks: each rank's rows are
    given as pieces (offset, size) of the full output, in the order the attention module reads them at its
    per-rank head counts (runs of the fused layout; padded with empty pieces so every rank has as many)."""

    def __init__(self, module, *, pieces, **kwargs):
        self._fixed_pieces = [list(p) for p in pieces]
        super().__init__(module, **kwargs)

    def _rule(self, n):
        return [list(p) for p in self._fixed_pieces]


def _runs(rows):
    """Consecutive row indices as (offset, size) pieces."""
    out = []
    for r in rows:
        if out and out[-1][0] + out[-1][1] == r:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((r, 1))
    return out


def _rows_per_head(qh, kvh, h, kv, d, attrs):  # [q k v] per head (MHA): head j at rows j*3d
    return [j * 3 * d + i for j in qh for i in range(3 * d)]


def _rows_grouped(qh, kvh, h, kv, d, attrs):  # [q ... q k v] per KV head: group g at rows g*(h/kv+2)*d
    unit = (h // kv + 2) * d
    return [g * unit + i for g in kvh for i in range(unit)]


def _rows_codegen(qh, kvh, h, kv, d, attrs):
    """CodeGen: mp_num chunks, each [q | v | k] of its heads; read at mp_num=1 per rank: [q | v | k] of the
    rank's heads."""
    mp = attrs["mp_num"]
    per = h // mp  # heads per chunk
    local = per * d

    def rows(j, part):  # part 0 q, 1 v, 2 k
        c, i = divmod(j, per)
        return range(c * 3 * local + part * local + i * d, c * 3 * local + part * local + (i + 1) * d)
    return [r for part in range(3) for j in qh for r in rows(j, part)]


def _falcon(parent):
    if getattr(parent, "new_decoder_architecture", False):
        return "grouped"
    return "mqa" if getattr(parent, "multi_query", False) else "per_head"


# attention module class -> (fused projection's name, its layout: a name or a function of the module,
# the attributes holding (num_heads, num_kv_heads or None, head_dim))
_FUSED_LAYOUTS = {
    "GPTNeoXAttention": ("query_key_value", "per_head", ("num_attention_heads", None, "head_size")),
    "GPTNeoXJapaneseAttention": ("query_key_value", "per_head", ("num_attention_heads", None, "head_size")),
    "PersimmonAttention": ("query_key_value", "per_head", ("num_heads", None, "head_dim")),
    "BloomAttention": ("query_key_value", "per_head", ("num_heads", None, "head_dim")),
    "FalconAttention": ("query_key_value", _falcon, ("num_heads", "num_kv_heads", "head_dim")),
    "GPTBigCodeAttention": ("c_attn", lambda m: "mqa" if m.multi_query else "per_head",
                            ("num_heads", None, "head_dim")),
    "CodeGenAttention": ("qkv_proj", "codegen", ("num_attention_heads", None, "head_dim")),
}
_LAYOUT_ROWS = {"per_head": _rows_per_head, "grouped": _rows_grouped, "codegen": _rows_codegen}
_FUSED_NAMES = {entry[0] for entry in _FUSED_LAYOUTS.values()}


def _fused_layout(name, ctx):
    """(layout, h, kv, d, attrs) for a fused QKV projection whose attention module is in _FUSED_LAYOUTS,
    else None."""
    parent = ctx.model.get_submodule(name.rpartition(".")[0]) if "." in name else ctx.model
    entry = _FUSED_LAYOUTS.get(type(parent).__name__)
    if entry is None or entry[0] != _last(name):
        return None
    _, layout, (ha, kva, da) = entry
    layout = layout(parent) if callable(layout) else layout
    config = getattr(parent, "config", None)

    def get(attr, i):
        v = getattr(parent, attr, None)
        v = getattr(config, attr, None) if v is None else v
        return v if v is not None else (ctx.heads[i] if ctx.heads else None)
    h, d = get(ha, 0), get(da, 2)
    kv = get(kva, 1) if kva else h
    if layout == "mqa":
        kv = 1
    return layout, int(h), int(kv), int(d), {"mp_num": getattr(parent, "mp_num", 1)}


def _fused_pieces(name, module, ctx):
    """Every rank's pieces of a fused QKV projection with a known layout (whole KV heads per rank, query heads
    with their KV group: tplinear.attention_heads), or ValueError naming the module and the sizes."""
    layout, h, kv, d, attrs = _fused_layout(name, ctx)
    p = ctx.group.size
    out_f = module.weight.shape[0]
    if layout not in _LAYOUT_ROWS:
        raise ValueError(f"{name}: a multi-query fused QKV projection ([q | k v], {h} query heads and 1 key/value "
                         f"head of {d}) cannot be split by whole KV heads over {p} ranks; pass "
                         "parallelize(..., kv_heads=\"replicate\") or the default kv_heads=\"auto\" (query heads split, "
                         "K and V on every rank) or keep it replicated (a plan without it and its output projection)")
    if h % kv or out_f != (h + 2 * kv) * d:
        raise ValueError(f"{name}: a fused QKV projection ({layout}) of {out_f} features, but its attention has "
                         f"{h} query heads, {kv} KV heads of {d} (expected {(h + 2 * kv) * d})")
    if layout == "codegen" and (h % attrs["mp_num"]):
        raise ValueError(f"{name}: CodeGen's fused QKV interleaves mp_num={attrs['mp_num']} chunks, but its "
                         f"{h} heads do not divide into them")
    split = _C_attention_heads(h, kv, p)
    if any(len(kvh) == 0 for _, kvh in split):
        raise ValueError(f"{name}: a fused QKV projection with {kv} KV heads ({h} query heads of {d}, {out_f} "
                         f"features) cannot be split by whole KV heads over {p} ranks (a rank would get none); "
                         "pass parallelize(..., kv_heads=\"replicate\") (query heads split, K and V on every rank), "
                         "use fewer ranks or keep it replicated")
    pieces = [_runs(_LAYOUT_ROWS[layout](list(qh), list(kvh), h, kv, d, attrs)) for qh, kvh in split]
    most = max(len(x) for x in pieces)
    return [x + [(0, 0)] * (most - len(x)) for x in pieces], (layout, h, kv, d), split


def _C_attention_heads(h, kv, p):
    from ..partition import attention_heads
    return attention_heads(h, kv, p)


# attention modules that take a per-head position bias built for every head (ALiBi, relative buckets):
# (the argument, its position when passed positionally, how it holds the heads: "batch*heads" or "heads" in its
# first dim, "batch,heads" in its second)
_HEAD_BIAS = {"BloomAttention": ("alibi", None, "batch*heads"), "MptAttention": ("position_bias", None, "heads"),
              "CpmAntAttention": ("position_bias", 3, "batch,heads")}


def _slice_head_bias(parent, h, qh, group):
    """A forward pre-hook that gives the attention module the rows of its position bias for this rank's query
    heads (qh: a range of head indices out of h). A bias with a gradient (CPM-Ant's learned relative buckets)
    gets it summed over the group: each rank's covers its heads only."""
    entry = _HEAD_BIAS.get(type(parent).__name__)
    if entry is None or getattr(parent, "_tplinear_head_bias", False):
        return
    arg, pos, how = entry

    def hook(module, args, kwargs):
        positional = arg not in kwargs and pos is not None and len(args) > pos
        bias = args[pos] if positional else kwargs.get(arg)
        if bias is None:
            return None
        if bias.requires_grad:
            bias = _ops.CopyToGroup.apply(bias, group)
        if how == "heads":
            bias = bias[qh.start:qh.stop]
        elif how == "batch,heads":
            bias = bias[:, qh.start:qh.stop]
        else:
            bias = bias.reshape(-1, h, *bias.shape[1:])[:, qh.start:qh.stop].reshape(-1, *bias.shape[1:])
        if positional:
            return args[:pos] + (bias,) + args[pos + 1:], kwargs
        return args, {**kwargs, arg: bias}
    parent.register_forward_pre_hook(hook, with_kwargs=True)
    parent._tplinear_head_bias = True


def _fused_attributes(parent, layout, h, kv, d, qh, kvh, group):
    """The attention module's per-rank sizes after its fused projection is split: _local_sizes, CodeGen's
    mp_num."""
    if layout == "codegen":
        parent.mp_num = 1
    _local_sizes(parent, h, kv, d, qh, kvh, group)


def _local_sizes(parent, h, kv, d, qh, kvh, group):
    """The attention module's per-rank sizes (as DeepSpeed's update_mp_params): head counts, the widths
    that are heads * head_dim (embed_dim, all_head_size, ...), num_key_value_groups, and the rows of a
    position bias built for every head. qh / kvh: this rank's query / KV heads (ranges)."""
    ql, kvl = len(qh), len(kvh)
    for attr in _OWN_H:
        if getattr(parent, attr, None) == h and not isinstance(getattr(parent, attr), bool):
            setattr(parent, attr, ql)
    for attr in _OWN_KV + ("kv_heads",):
        if getattr(parent, attr, None) == kv and not isinstance(getattr(parent, attr), bool):
            setattr(parent, attr, kvl)
    dims = {d} | {v for v in (getattr(parent, "head_dim", None), getattr(parent, "v_head_dim", None))
                  if isinstance(v, int) and not isinstance(v, bool)}
    for attr in ("embed_dim", "split_size", "hidden_size", "all_head_size", "kv_dim", "inner_dim", "attention_dim"):
        v = getattr(parent, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v % h == 0 and v // h in dims:
            setattr(parent, attr, ql * (v // h))
    _slice_head_bias(parent, h, qh, group)
    _local_config(parent, h, kv, ql, kvl)
    if getattr(parent, "num_key_value_groups", None) == h // kv and kvl:  # (replicated K/V: _replicated_kv_attributes)
        parent.num_key_value_groups = ql // kvl


def _local_config(parent, h, kv, ql, kvl):
    """An attention module that reads its head counts from its config in forward (Ergo splits its fused
    qkv by config.num_attention_heads / num_key_value_heads) gets a copy of the config with this rank's
    counts (the model's own config stays whole)."""
    config = getattr(parent, "config", None)
    if config is None or getattr(config, "num_attention_heads", None) != h:
        return
    local, names = copy.copy(config), getattr(config, "attribute_map", {})
    object.__setattr__(local, names.get("num_attention_heads", "num_attention_heads"), ql)
    if getattr(local, "num_key_value_heads", None) == kv:
        object.__setattr__(local, names.get("num_key_value_heads", "num_key_value_heads"), kvl)
    parent.config = local


# ------------------------------------------------------------------------------------------ kv_heads="replicate"

_KV_HEADS = ("auto", "whole", "replicate")


def _replicates(h, kv, ctx):
    """K and V of an attention of h query and kv KV heads stay replicated (its query heads split evenly):
    kv_heads="replicate": fewer KV than query heads, not dealt evenly over the ranks (where p divides kv, whole
    KV heads already balance the query heads); "auto" (the default): fewer KV heads than ranks, where dealing
    them whole would leave a rank without one (a fused multi-query projection could not be split at all);
    "whole": never."""
    p = ctx.group.size
    if kv >= h or ctx.kv_heads == "whole":
        return False
    return kv % p != 0 if ctx.kv_heads == "replicate" else kv < p


def _dealt_heads(heads, ctx):
    """The (h, kv, d) the GQA rule deals for the query and output projections: with K and V replicated, the
    query heads alone, evenly (as multi-head attention: (h, h, d))."""
    if heads is not None and _replicates(heads[0], heads[1], ctx):
        return heads[0], heads[0], heads[2]
    return heads


def _kv_read(h, kv, qh):
    """The KV heads a rank's query heads qh (a range) read, in the order its attention pairs them (query head
    j reads KV head j // (h / kv)): each distinct one once where every one is read by as many of qh, else one
    per query head (a KV head repeated), so the rank's attention has equal groups."""
    reads = [j // (h // kv) for j in qh]
    distinct = sorted(set(reads))
    if distinct and all(reads.count(k) == len(reads) // len(distinct) for k in distinct) \
            and len(reads) % len(distinct) == 0:
        return distinct
    return reads


def _rows_replicated(layout, h, kv, d, qh, kvl):
    """A rank's rows of a fused projection with replicated KV heads kvl, in the order its attention reads
    them at its per-rank head counts: multi-query / [q | k | v] blocks: its query heads, then its K heads,
    then its V heads; per KV head [q .. q k v] (Falcon's new architecture): each of its groups."""
    def head(base, j):
        return range(base + j * d, base + (j + 1) * d)
    if layout == "mqa":
        return ([r for j in qh for r in head(0, j)] + [r for k in kvl for r in head(h * d, k)]
                + [r for k in kvl for r in head((h + kv) * d, k)])
    unit, g, per = (h // kv + 2) * d, h // kv, len(qh) // len(kvl)  # grouped
    rows = []
    for i, k in enumerate(kvl):
        rows += [r for j in qh[i * per:(i + 1) * per] for r in head(k * unit, j - k * g)]
        rows += [r for r in head(k * unit, g)] + [r for r in head(k * unit, g + 1)]
    return rows


def _kv_replica(name, module, ctx):
    """With kv_heads="replicate", what makes a column layer replicated with this rank's rows: (rows, fused
    layout or None, h, kv, d, qh, kvl) for a K or V projection, or a fused multi-query / grouped QKV
    projection, of an attention it applies to; None for others."""
    if ctx.kv_heads == "whole" or not isinstance(module, nn.Linear):
        return None
    r, p = ctx.group.rank, ctx.group.size
    layout = _fused_layout(name, ctx)
    if layout is not None and layout[0] in ("mqa", "grouped"):
        layout, h, kv, d, _ = layout
        expect = (h + 2 * kv) * d
    elif layout is None and _last(name) in _KV and ctx.heads is not None:
        h, kv, d = ctx.heads
        expect = kv * d
    else:
        return None
    if not _replicates(h, kv, ctx):
        return None
    if module.weight.shape[0] != expect or h % kv:
        raise ValueError(f"{name}: {module.weight.shape[0]} output features, but its attention has {h} query "
                         f"heads and {kv} KV heads of {d} (expected {expect})")
    qh = _C_attention_heads(h, h, p)[r][0]
    kvl = _kv_read(h, kv, qh)
    if layout is None:
        rows = [k * d + i for k in kvl for i in range(d)]
    else:
        rows = _rows_replicated(layout, h, kv, d, qh, kvl)
    return rows, layout, h, kv, d, qh, kvl


class _ReplicatedRows(nn.Module):
    """A linear layer left replicated (its whole weight on every rank, not tensor-parallel) of which this rank
    computes only some output rows: the K and V heads its query heads read (kv_heads="replicate"), and for a
    fused projection its query heads' rows too. Its input's gradient from those rows is summed over the group
    (as a column layer's), and so are its parameters' gradients: each rank's covers its query heads only."""

    def __init__(self, module, rows, group):
        super().__init__()
        self.in_features, self.out_features = module.in_features, module.out_features
        self.weight, self.bias = module.weight, module.bias
        self.mp_group = group
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long, device=module.weight.device),
                             persistent=False)

    def forward(self, x):
        x = _ops.CopyToGroup.apply(x, self.mp_group)
        bias = None if self.bias is None else self.bias.index_select(0, self.rows)
        return nn.functional.linear(x, self.weight.index_select(0, self.rows), bias)


def _replicated_kv_layer(module, replica, ctx):
    rows, layout, h, kv, d, qh, kvl = replica
    layer = _ReplicatedRows(module, rows, ctx.group)
    _GradAllReduce().apply("", layer, ctx)
    if layout is not None:
        layer._fused_layout = (layout, h, kv, d, qh, kvl)  # _update_attention_attributes sets the sizes
    else:
        layer._kv_replica = (h, kv, qh, kvl)
    return layer


def _replicated_kv_attributes(model, built):
    """The per-rank KV sizes of an attention whose separate K / V projections are replicated (its query heads'
    sizes come with q_proj): num_key_value_heads / num_kv_heads, num_key_value_groups."""
    for name, layer in built.items():
        if getattr(layer, "_kv_replica", None) is None:
            continue
        h, kv, qh, kvl = layer._kv_replica
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        for attr in ("num_key_value_heads", "num_kv_heads"):
            if getattr(parent, attr, None) == kv:
                setattr(parent, attr, len(kvl))
        if getattr(parent, "num_key_value_groups", None) == h // kv and kvl:
            parent.num_key_value_groups = len(qh) // len(kvl)


# ------------------------------------------------------------------------------------------ sequence_parallel=True

def _decoder_stack(model):
    """(name of the decoder stack's module, its layers' ModuleList name, its final norm's name) of a Hugging
    Face decoder model (a base model with .layers and .norm: Llama, Qwen2, Qwen3, Mistral, Gemma, ...), or
    NotImplementedError."""
    names = {id(m): n for n, m in model.named_modules()}
    try:
        base = model.get_decoder() if hasattr(model, "get_decoder") else None
    except (AttributeError, NotImplementedError):
        base = None
    for cand in (base, getattr(model, "model", None), model):
        layers, norm = getattr(cand, "layers", None), getattr(cand, "norm", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and isinstance(norm, nn.Module) and id(cand) in names:
            pre = names[id(cand)] + "." if names[id(cand)] else ""
            return pre + "layers", pre + "norm"
    raise NotImplementedError(f"sequence_parallel=True: {type(model).__name__} has no decoder stack tplinear knows "
                              "(a model whose decoder has .layers and a final .norm, as Llama, Qwen2, Qwen3, Mistral, "
                              "Gemma); run it without sequence_parallel")


def _sequence_regions(model, chosen):
    """Checks (before anything changes) that sequence_parallel=True can apply: in every decoder layer, each split
    row layer is a child of a direct child of the layer (self_attn, mlp: a region, run on the whole sequence),
    and every column layer is inside such a region. Returns (layers name, norm name, {layer index: [region
    child names]})."""
    layers_name, norm_name = _decoder_stack(model)
    regions = collections.defaultdict(set)
    cols = collections.defaultdict(set)
    for name, choice in chosen.items():
        style = _STYLES.get(choice.style)
        kind = getattr(style, "kind", None)
        if not name.startswith(layers_name + ".") or kind is None:
            if kind is not None and not name.startswith(layers_name + "."):
                raise NotImplementedError(f"sequence_parallel=True: {name} is split outside the decoder layers "
                                          f"({layers_name}); only the layers' attention and MLP can be")
            continue
        idx, _, rest = name[len(layers_name) + 1:].partition(".")
        child, _, leaf = rest.partition(".")
        if kind == "row" and (style.options.get("input_is_parallel", True) is False or "." in leaf or not leaf):
            raise NotImplementedError(f"sequence_parallel=True: row layer {name} ({choice.style}) is not a rowwise "
                                      "layer directly under a child of its decoder layer")
        (regions if kind == "row" else cols)[int(idx)].add(child)
    layers = model.get_submodule(layers_name)
    n = len(layers)
    for i in range(n):
        moe = [c for c, m in layers[i].named_children() if c not in regions[i] and any(
            p.dim() > 2 for p in m.parameters())]
        if moe:
            raise NotImplementedError(f"sequence_parallel=True: {layers_name}.{i}.{moe[0]} holds MoE experts, whose "
                                      "split needs the whole sequence; run it without sequence_parallel")
        if not regions[i] or not cols[i] <= regions[i]:
            what = ("no split row layer" if not regions[i] else
                    f"column layers outside its row layers' modules ({sorted(cols[i] - regions[i])})")
            raise NotImplementedError(f"sequence_parallel=True: {layers_name}.{i} has {what}; every decoder "
                                      "layer's attention and MLP must be split (column then row)")
    return layers_name, norm_name, {i: sorted(regions[i]) for i in range(n)}


def _seq_dim1(fn, x, *args):
    """fn (a tplinear.torch.sequence mapping over dim 0) applied along dim 1 of [batch, seq, ...]."""
    return fn(x.transpose(0, 1).contiguous(), *args).transpose(0, 1)


def _sequence_parallel(model, layers_name, norm_name, regions, group):
    """Hugging Face [batch, seq, hidden] activations split along the sequence between the blocks (torch TP's
    SequenceParallel): the first decoder layer's input scattered (its backward all-gathers), each region
    (attention, MLP) all-gathers its input (the column layers in it all-reduce their input's gradient, so the
    backward keeps this rank's rows) and its row layer reduce-scatters its output (backward: all-gather);
    every other parameter of a decoder layer (the norms) and the final norm, which now see this rank's rows
    only, get their gradients summed over the group; the final norm's output is all-gathered for lm_head."""
    gather = _sequence.gather_from_sequence_parallel_region
    layers = model.get_submodule(layers_name)

    def scatter_first(module, args, kwargs):
        if args:
            return (_seq_dim1(_sequence.scatter_to_sequence_parallel_region, args[0], group),) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": _seq_dim1(_sequence.scatter_to_sequence_parallel_region,
                                                           kwargs["hidden_states"], group)}

    def gather_in(module, args, kwargs):
        if args:
            return (_seq_dim1(gather, args[0], group, None, False),) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": _seq_dim1(gather, kwargs["hidden_states"], group, None, False)}

    def to_seq_first(module, args):
        return (args[0].transpose(0, 1).contiguous(),) + args[1:]

    def to_batch_first(module, args, out):
        return out.transpose(0, 1)

    model._tplinear_sequence_parallel = True  # parallelize again is a no-op
    layers[0].register_forward_pre_hook(scatter_first, with_kwargs=True)
    for i, layer in enumerate(layers):
        for cname, child in layer.named_children():
            if cname not in regions[i]:
                _sequence.allreduce_gradients(child, group)
                continue
            child.register_forward_pre_hook(gather_in, with_kwargs=True)
            for row in child.children():
                if isinstance(row, LinearAllreduce) and row.input_is_parallel:
                    row.sequence_parallel = True
                    row.register_forward_pre_hook(to_seq_first)
                    row.register_forward_hook(to_batch_first)
        for p in layer.parameters(recurse=False):
            _ops.reduce_grad(p, group)
    norm = model.get_submodule(norm_name)
    _sequence.allreduce_gradients(norm, group)
    norm.register_forward_hook(lambda m, args, out: _seq_dim1(gather, out, group, None, False))


# ------------------------------------------------------------------------------------------ parallelize

_NAME_RULES = "DeepSpeed AutoTP's name rules"
_Choice = collections.namedtuple("_Choice", "style pattern source")  # a plan entry chosen for one module
_Context = collections.namedtuple("_Context", "model group heads kv_heads",  # what the styles apply with
                                  defaults=("auto",))


def parallelize(model, mp_group=None, plan=None, *, num_heads=None, num_kv_heads=None, head_dim=None,
                src_rank=None, strict=True, kv_heads="auto", sequence_parallel=False):
    """Replaces the model's linear layers (nn.Linear, transformers' Conv1D) in place by tplinear's
    tensor-parallel modules over mp_group (default: the default group), following a plan; returns model.

    plan: {module-name pattern: style}, styles in transformers' vocabulary (listed below). None: the Hugging
    Face model's own plan (embedding / lm_head entries dropped: they stay replicated), else DeepSpeed-AutoTP-style
    name rules (q/k/v/gate/up/fc1 -> column, o/down/dense/fc2 -> row). Modules the plan does not name stay
    replicated. num_heads / num_kv_heads / head_dim override the config's.

    kv_heads: "whole" (DeepSpeed's rule): KV heads dealt whole, query heads with their KV group; a fused
    projection that cannot give every rank a KV head is refused. "replicate" (Megatron's form for fewer KV
    heads than ranks): where num_kv_heads < num_heads and p does not divide num_kv_heads, the query heads are
    split evenly and K and V stay replicated (every rank computes the KV heads its query heads read; their
    gradients are summed over the group). "auto" (default): "whole" where every rank gets a KV head, else
    (fewer KV heads than ranks: multi-query attention) "replicate".

    sequence_parallel=True (Hugging Face decoder models: Llama, Qwen2, Qwen3, Mistral, Gemma, ...): the
    [batch, seq, hidden] activations between the blocks are split along the sequence (torch TP's
    SequenceParallel style); NotImplementedError for a model or plan it cannot apply to.

    Collective over mp_group: every rank calls it on the same model (same initial values: checked by a
    fingerprint per tensor, ValueError on every rank naming the first that differs; src_rank=r broadcasts
    rank r's weights first instead, as torch TP's src_data_rank). Every entry is checked before the model
    is changed. Raises ValueError for a plan whose column output split and following row input split
    disagree (naming both modules), NotImplementedError for a style tplinear does not have yet. A
    parallelize that leaves the model without any tensor-parallel module raises ValueError
    (strict=False: warns and returns the model unchanged).

"""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cuda = any(p.is_cuda for p in model.parameters())
    group = dist.resolve_group(mp_group, gpu=cuda)
    if group.rank < 0:
        raise ValueError("this rank is not a member of mp_group")
    if kv_heads not in _KV_HEADS:
        raise ValueError(f"kv_heads must be one of {', '.join(map(repr, _KV_HEADS))}, got {kv_heads!r}")
    ctx = _Context(model, group, _config_heads(model, num_heads, num_kv_heads, head_dim), kv_heads)
    named = dict(model.named_modules())
    chosen, params = _choose(model, plan, named)
    why_whole, norms = [], {}
    # Mamba mixers: split whole, along their channels (tplinear.torch.ssm); the plan argument leaves them alone
    mixers = _ssm.find_mixers(named, group.size) if plan is None else []
    chosen = {n: c for n, c in chosen.items() if not any(_within(n, m) for m in mixers)}
    if plan is None:
        chosen = _partners(chosen, ctx)
        chosen, why_whole, norms = _regions(chosen, named, ctx)
    _check(model, named, chosen, ctx)
    sp = (_sequence_regions(model, chosen) if sequence_parallel and not getattr(model, "_tplinear_sequence_parallel",
                                                                               False) else None)
    _check_head_params(model, named, chosen, params, ctx)
    _training.before_cutting(model, group, src_rank)  # the same full weights on every rank, or src_rank's
    _apply(model, named, chosen, ctx, norms)
    _split_head_params(model, params, ctx)
    # fused MoE experts (3-d gate_up_proj / down_proj) split along their intermediate dim, one all-reduce
    # after they combine (tplinear.torch.moe); the explicit plan argument leaves them alone
    if plan is None:
        _moe.parallelize_experts(model, ctx.group)
    _ssm.parallelize_mixers(model, mixers, ctx.group)
    if not tp_modules(model) and not any(getattr(p, "tensor_model_parallel", False) for p in model.parameters()):
        source = "the plan argument" if plan is not None else (_hf_plan(model)[1] or _NAME_RULES)
        msg = (f"parallelize replaced no module of this {type(model).__name__} (by {source}; linear layers whose "
               "names the rules do not know, or whose column / row partner stays whole, are left replicated"
               f"{_kept_whole_note(model) if plan is None else ''}); pass a plan, or strict=False to keep it "
               "unchanged" + "".join(f"; {w}" for w in why_whole))
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    if sp is not None:
        _sequence_parallel(model, *sp, group)
    _training.after_parallelize(model)  # save_pretrained writes the full model; deepcopy keeps hooks
    return model


def _style_list():
    """The docstring's list of styles, from the table."""
    def para(head, names):
        return textwrap.fill(head + ", ".join(names) + ".", width=110, initial_indent="    ",
                             subsequent_indent="      ")
    later = [n for n, s in _STYLES.items() if not s.supported]
    return (para("Styles: ", STYLES) + "\n" + para("Not yet (NotImplementedError naming the module): ", later)
            + "\n    ")


if parallelize.__doc__:  # None under python -OO
    parallelize.__doc__ += _style_list()


def _choose(model, plan, named):
    """{module name: _Choice} from the plan argument, else the model's own plan, else the name rules.
    Raises when a plan names nothing of this model, or names a bare parameter with a style that would
    have to split it."""
    if plan is not None:
        if not isinstance(plan, dict):
            raise TypeError(f"plan must be a dict of module-name pattern -> style, got {type(plan).__name__}")
        rules, vocab = _Plan(plan, "the plan argument"), set()
    else:
        hf, source = _hf_plan(model)
        rules, vocab = (_Plan(hf, source), _vocab_modules(model)) if hf else (None, _vocab_modules(model))
    chosen = _choose_by(rules, vocab, named)
    if plan is None and rules is not None and not any(_is_linear(named[n]) for n in chosen):
        # an HF plan that names no linear layer (only experts, norms, ...) does not switch the name rules off
        chosen = {**_choose_by(None, vocab, named), **chosen}
    params = {}
    if rules is not None:  # a plan may name parameters (bare nn.Parameters): replicate is a no-op there, a
        for name in dict(model.named_parameters()):  # column style splits one by its attention's heads
            pattern, style = rules.style(name)
            if style is None or isinstance(_STYLES.get(style), _Replicate) or name in named:
                continue
            owner = name.rpartition(".")[0]
            if _moe.is_sharded_experts(named[owner]):  # parallelize twice
                continue
            if _moe.is_fused_experts(named[owner]):
                chosen.setdefault(owner, _expert_param(model, name, named[owner], _Choice(style, pattern,
                                                                                           rules.source)))
            elif getattr(_STYLES.get(style), "kind", None) == "col" and not _STYLES[style].options:
                params[name] = _Choice(style, pattern, rules.source)
            else:
                _refuse(name, style, pattern, rules.source)
    if rules is not None and not chosen and not any(rules.style(n)[1] for n in named if n in vocab):
        raise ValueError(f"the plan from {rules.source} matches no module of this {type(model).__name__} "
                         f"(patterns: {', '.join(p for p, _, _ in rules.entries)})")
    return chosen, params


def _expert_param(model, name, module, choice):
    """The _Choice of the experts module owning 3-d parameter name, which a plan names with choice: its
    moe_tp_experts split, where choice's style cuts the parameter along the dim that split does (transformers:
    colwise / packed_colwise the second-to-last dim, rowwise / packed_rowwise the last); else raises."""
    owner, _, pname = name.rpartition(".")
    dims = _moe.split_dims(owner, module, _moe.config_hidden_size(model))
    dim = getattr(_STYLES.get(choice.style), "param_dim", None)
    if dim is None:
        _refuse(name, choice.style, choice.pattern, choice.source)
    if pname not in dims or dims[pname] != module._parameters[pname].dim() + dim:
        raise ValueError(f"{name}: style {choice.style!r} (from {choice.source}, {choice.pattern!r}) splits "
                         f"{tuple(module._parameters[pname].shape)} along dim {dim}, but {owner}'s experts are "
                         "split along their intermediate dim "
                         f"({', '.join(f'{n} dim {d}' for n, d in dims.items())}); leave it out of the plan")
    return _Choice("moe_tp_experts", choice.pattern, choice.source)


def _choose_by(rules, vocab, named):
    chosen = {}
    for name, module in named.items():
        if not name or isinstance(module, (TPModule, _ReplicatedRows)) or _moe.is_sharded_experts(module):
            # parallelize twice is a no-op
            continue
        if rules is not None:
            pattern, style = rules.style(name)
        else:
            parent = named.get(name.rpartition(".")[0])
            style, pattern = _name_rule(name, module, type(parent).__name__), _NAME_RULES
        if style is None or name in vocab:
            continue
        chosen[name] = _Choice(style, pattern, rules.source if rules is not None else _NAME_RULES)
    return chosen


def _within(name, scope):
    return not scope or name.startswith(scope + ".")


def _partners(chosen, ctx):
    """The name rules' column and row partners agree, or neither is split: a fused QKV of an unknown layout
    stays whole; a row layer stays whole unless a column layer beside it (same parent, else the parent's
    parent) is split; a column ``dense`` stays whole unless a row layer under its parent's parent is split.
    Entries from a plan are kept as the plan says."""
    def rule(n):
        return chosen[n].source == _NAME_RULES

    def bare_params(n):  # a parent with parameters of its own (gpt-oss's per-head sinks) reads them beside
        parent = ctx.model.get_submodule(n.rpartition(".")[0]) if "." in n else ctx.model  # its projections
        return any(True for _ in parent.parameters(recurse=False))

    keep = {n: c for n, c in chosen.items()
            if not (rule(n) and (_last(n) in _FUSED_NAMES - _QKV and _fused_layout(n, ctx) is None
                                 or bare_params(n) or _kept_whole(n, ctx.model)))}
    cols = [n for n, c in keep.items() if _STYLES.get(c.style) is not None and getattr(_STYLES[c.style], "kind", "")
            == "col"]
    rows = [n for n, c in keep.items() if _STYLES.get(c.style) is not None and getattr(_STYLES[c.style], "kind", "")
            == "row"]

    def up(n, k):
        return n.rsplit(".", k)[0] if n.count(".") >= k else ""

    for r in rows:
        parent = ctx.model.get_submodule(up(r, 1)) if up(r, 1) else ctx.model
        alone = not any(_is_linear(m) for n, m in parent.named_children() if n != _last(r))
        scope = up(r, 2) if alone else up(r, 1)
        if rule(r) and not any(c != r and _within(c, scope) for c in cols):
            del keep[r]
    rows = [r for r in rows if r in keep]
    for c in cols:  # a row layer among its cousins (BERT's intermediate.dense -> output.dense), not anywhere
        if rule(c) and _last(c) == "dense" and not any(up(r, 2) == up(c, 2) for r in rows):  # under the root
            del keep[c]
    return keep


# attention modules whose projections the name rules leave whole, and why (named by parallelize when it
# replaces no module): they reshape their output by their input's width, or are not split by heads
_WIDTH = "reshapes its output by its input's width (hidden_states.size()), not by its head count"
_KEEP_WHOLE = {
    "TrOCRAttention": _WIDTH,
    "ProphetNetAttention": _WIDTH,
    "ProphetNetNgramSelfAttention": _WIDTH + ", and its relative position projection holds every head's buckets",
    "JetMoeAttention": "a mixture of attention heads: each token's query heads come from routed experts (3-d "
                       "input_linear / output_linear parameters), which tplinear does not split",
    "XLNetRelativeAttention": "bare [d_model, n_head, d_head] parameters q, k, v, o, r and two-stream relative "
                              "attention, no linear layers to split",
}


def _kept_whole(name, model):
    """The _KEEP_WHOLE reason of the module holding name (a linear layer), else None."""
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return _KEEP_WHOLE.get(type(parent).__name__)


def _kept_whole_note(model):
    """What parallelize's "replaced no module" says about the modules of _KEEP_WHOLE in model (one per class)."""
    seen = {}
    for name, m in model.named_modules():
        seen.setdefault(type(m).__name__, name)
    return "".join(f"; {n} ({cls}) stays whole: {_KEEP_WHOLE[cls]}" for cls, n in seen.items() if cls in _KEEP_WHOLE)


# ------------------------------------------------------------------------------------------ regions kept whole
# (no plan argument: the name rules' and the HF plan's entries) A column layer and the row layer after it are
# split only where the computation between them is exact on a shard: their widths agree (a column of twice the
# row's input is [gate | up], packed), every column feeds a row, one row closes the region, and no module in
# the region holds parameters over the whole sharded width (a norm over it, a convolution over its channels,
# an adapter adding a full-width output). Otherwise the pair stays whole, and the reason is kept for the
# message of a parallelize that replaces nothing. A norm over exactly the row's input width (an RMSNorm or
# LayerNorm, tplinear.torch.norms.norm_kind: BitNet's sub-norms) is split with it instead (norms.ShardedNorm).


def _split_kind(choice):
    """"col" / "row" for an entry that splits the activation between its pair, else None (gathered, split
    input, not a linear style)."""
    style = _STYLES.get(choice.style)
    kind = getattr(style, "kind", None)
    if kind == "col" and style.options.get("gather_output") or kind == "row" and style.options.get(
            "input_is_parallel", True) is False:
        return None
    return kind


def _widths(module):
    """(in_features, out_features) of a linear layer or Conv1D."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if _is_conv1d(module) else (w.shape[1], w.shape[0])


def _scope(name, cols):
    """The module a row layer closes: its parent where a split column layer is inside it, else its parent's
    parent (BERT's attention.output.dense, whose parent holds what comes after it)."""
    parent = name.rpartition(".")[0]
    if any(_within(c, parent) for c in cols):
        return parent
    return parent.rpartition(".")[0]


def _attention_gates(chosen, named, ctx):
    """An attention's output gate (a linear layer named in _ATTN_GATE beside a query projection split by
    heads, of heads or heads x head_dim outputs: LFM-3's g_proj) is split with the heads it gates."""
    out = dict(chosen)
    for name, module in named.items():
        parent = name.rpartition(".")[0]
        if (name in chosen or _last(name) not in _ATTN_GATE or not _is_linear(module) or not _is_attention(name)
                or ctx.heads is None):
            continue
        queries = [n for n, c in chosen.items() if n.rpartition(".")[0] == parent and _last(n) in _Q
                   and _split_kind(c) == "col"]
        h = _own_heads(named[parent], ctx.heads)[0]
        if queries and _widths(module)[1] in (h, h * ctx.heads[2]):
            out[name] = _Choice("colwise", _NAME_RULES, _NAME_RULES)
    return out


def _called_after(name, cols, row, named, strict=False):
    """Whether module name is applied after a column layer of cols (a norm over the hidden width applied to the
    column's output, not to the region's input: BitNet's attn_sub_norm against Megatron-BERT's pre-attention
    ln): in the source of the nearest module above it that holds a column, is the branch holding it called
    after a branch holding a column? True where the source does not tell. strict: called after every column
    and before the row (BitNet's attn_sub_norm, not Blt's k_norm between q_proj and k_proj); False where
    the source does not tell."""
    owner_name, _, branch = name.rpartition(".")
    while True:
        owner = named[owner_name]
        pre = f"{owner_name}." if owner_name else ""
        holders = [n for n, _ in owner.named_children() if n != branch and any(
            c == pre + n or _within(c, pre + n) for c in cols)]
        if holders:
            break
        if not owner_name:
            return not strict
        owner_name, _, branch = owner_name.rpartition(".")
    try:
        src = inspect.getsource(type(owner))
    except (OSError, TypeError):
        return not strict
    at = src.find(f"self.{branch}(")
    firsts = [i for i in (src.find(f"self.{n}(") for n in holders) if i >= 0]
    pre = f"{owner_name}." if owner_name else ""
    rows = [i for i in (src.find(f"self.{n}(") for n, _ in owner.named_children() if row == pre + n
                        or _within(row, pre + n)) if i >= 0]  # (Bart's final_layer_norm comes after fc2)
    if strict:
        return bool(firsts and rows) and max(firsts) < at < min(rows)
    return at < 0 or not firsts or at > min(firsts) and not (rows and at > min(rows))


def _regions(chosen, named, ctx):
    """(the entries that stay, [why a pair stays whole], {norm to split: (its row layer, kind)}); see the
    section's comment."""
    keep, why, norms = _attention_gates(chosen, named, ctx), [], {}

    def split(kind):
        return [n for n, c in keep.items() if _split_kind(c) == kind]

    def whole(scope, reason):
        for n in [n for n in keep if _within(n, scope) and _split_kind(keep[n])]:
            del keep[n]
        why.append(reason)

    def unpaired():  # columns without a row after them, rows without a column before them, stay whole
        while True:
            cols, rows = split("col"), split("row")
            scopes = [_scope(r, cols) for r in rows]
            alone = [c for c in cols if not any(_within(c, s) for s in scopes)]
            alone += [r for r, s in zip(rows, scopes) if not any(_within(c, s) for c in cols)]
            if not alone:
                return
            for n in alone:
                del keep[n]

    unpaired()
    by_scope = collections.defaultdict(list)
    for r in split("row"):
        by_scope[_scope(r, split("col"))].append(r)
    for scope, rows in sorted(by_scope.items(), key=lambda item: -len(item[0])):  # inner regions first
        inner = [s for s in by_scope if s != scope and _within(s, scope)]  # another row's region inside it
        if len(rows) > 1:
            whole(scope, f"{scope or 'the model'} has {len(rows)} row-parallel layers ({', '.join(rows)}): one's "
                         "output feeds the other, which needs it whole")
            continue
        r = rows[0]
        r_in, r_out = _widths(named[r])
        cols = [c for c in split("col") if _within(c, scope) and not any(_within(c, s) for s in inner)]
        attention = _last(r) in _O and (_is_attention(r) or "Attention" in type(named[r.rpartition(".")[0]]).__name__)
        if not attention:  # an MLP: each column's output is the row's input, or [gate | up] of it
            for c in cols:
                c_out = _widths(named[c])[1]
                if c_out == 2 * r_in and keep[c].style == "colwise":
                    keep[c] = keep[c]._replace(style="packed_colwise")
                elif c_out != r_in and not (c_out == 2 * r_in and keep[c].style == "packed_colwise"):
                    whole(scope, f"{c} has {c_out} output features but {r} reads {r_in}: the computation between "
                                 "them changes the width, so a split of one is not the split of the other")
                    break
            if r not in keep:
                continue
        sums = collections.Counter()
        for c in cols:
            sums[c.rpartition(".")[0]] += _widths(named[c])[1]
        full = {r_in, *sums.values(), *(_widths(named[c])[1] for c in cols)}
        after = r.rpartition(".")[0] if scope != r.rpartition(".")[0] else None  # the lone row's parent: after it
        head_dims = {ctx.heads[2]} if ctx.heads else set()
        for mname, m in (named[scope].named_modules() if scope else named[""].named_modules()):
            full_name = f"{scope}.{mname}" if scope and mname else (scope or mname)
            if (full_name in keep or any(full_name.startswith(n + ".") for n in keep) or isinstance(m, TPModule)
                    or any(_within(full_name, s) for s in inner + ([after] if after else []))
                    or _ACT.match(_last(full_name))):
                continue
            params = list(m.parameters(recurse=False))
            if _is_linear(m):  # a linear layer reading the region's input: only its output width counts, where
                params = [m.weight.new_empty(_widths(m)[1])]  # it is not the input's (hidden) width
            if _last(full_name) in _HEAD_NORM and all(p.dim() == 1 and p.numel() in head_dims for p in params):
                continue
            bad = next((p for p in params if set(p.shape) & (full - {r_out})), None)
            parents = {r.rpartition(".")[0]} | {c.rpartition(".")[0] for c in cols}
            if bad is None and not _is_linear(m) and full_name.rpartition(".")[0] in parents:
                bad = next((p for p in params if r_out in p.shape), None)  # the hidden width too, beside the
                # pair's layers where it is applied after a column
                if bad is not None and not _called_after(full_name, cols, r, named):
                    bad = None
            kind = None  # a norm over the row's input (not over the region's input of the same width): split
            if bad is not None and bad.shape == (r_in,) and (  # as that input is
                    r_in != r_out or _called_after(full_name, cols, r, named, strict=True)):
                kind = _norms.norm_kind(m, r_in)
            if kind is not None:
                norms[full_name] = (r, kind)
                continue
            if bad is not None:
                whole(scope, f"{full_name} ({type(m).__name__}) holds a parameter of shape {list(bad.shape)} over "
                             f"the whole width that {', '.join(cols)} / {r} would split (a norm, convolution or "
                             "adapter over the sharded dimension): kept whole")
                break
    unpaired()
    return keep, why, {n: rk for n, rk in norms.items() if rk[0] in keep}


def _check(model, named, chosen, ctx):
    """Every chosen entry's style accepts its module (raises before anything changes)."""
    _check_tied(model, chosen)
    for name, choice in chosen.items():
        style = _STYLES.get(choice.style)
        if style is None:
            _refuse(name, choice.style, choice.pattern, choice.source)
        style.check(name, named[name], choice, ctx)


def _apply(model, named, chosen, ctx, norms):
    """Applies each entry's style; the new modules replace the old ones once their splits are checked to
    agree; each norm of norms (_regions) is split as its row layer's input."""
    built = {}
    for name, choice in chosen.items():
        layer = _STYLES[choice.style].apply(name, named[name], ctx)
        if layer is not None:
            built[name] = layer
    _check_pairs(built)
    for name, layer in built.items():
        parent_name, _, child = name.rpartition(".")
        setattr(named[parent_name] if parent_name else model, child, layer)
    for name, (row, kind) in norms.items():
        parent_name, _, child = name.rpartition(".")
        setattr(named[parent_name] if parent_name else model, child, _norms.ShardedNorm.from_module(
            named[name], ctx.group, built[row].shard_ranges(), kind))
    _update_attention_attributes(model, built, _dealt_heads(ctx.heads, ctx))
    _replicated_kv_attributes(model, built)
    _reduce_region_grads(model, built, ctx)


_ACT = re.compile(r"^(act|act_fn|activation|activation_fn|act_func)$")
_HEAD_NORM = {"q_norm", "k_norm", "query_norm", "key_norm", "q_layernorm", "k_layernorm"}


def _reduce_region_grads(model, built, ctx):
    """Replicated parameters inside a sharded region (between a split column layer and the row layer after
    it, both children of one module) see only this rank's features, so their gradients are summed over
    the group (as style replicated_with_grad_allreduce), whatever the plan says. Applied where that is
    exact: an activation module's parameters applied elementwise (Apertus' xIELU alpha_p / alpha_n), and
    per-head norms (q_norm / k_norm over head_dim) of an attention split by heads."""
    parents = collections.defaultdict(set)
    for name, layer in built.items():
        if isinstance(layer, LinearLayer) and not layer.gather_output:
            parents[name.rpartition(".")[0]].add("col")
        elif isinstance(layer, LinearAllreduce) and layer.input_is_parallel:
            parents[name.rpartition(".")[0]].add("row")
    for pname, kinds in parents.items():
        if kinds != {"col", "row"}:
            continue
        head_dims = {layer.head_dim for n, layer in built.items() if n.rpartition(".")[0] == pname
                     and getattr(layer, "head_dim", None)} | ({ctx.heads[2]} if ctx.heads else set())
        parent = model.get_submodule(pname) if pname else model
        for cname, child in parent.named_children():
            params = [p for p in child.parameters() if p.requires_grad]
            if not params or isinstance(child, TPModule) or _is_linear(child):
                continue
            per_head = cname in _HEAD_NORM and _is_attention(f"{pname}.{cname}") and all(
                p.dim() == 1 and p.numel() in head_dims for p in params)
            if _ACT.match(cname) or per_head:
                for mod in child.modules():
                    _GradAllReduce().apply(cname, mod, ctx)


# ------------------------------------------------------------------------------------------ bare parameters


def _head_query(model, named, chosen, pname):
    """The query projection (name) beside bare parameter pname, chosen column-parallel, else None."""
    owner = pname.rpartition(".")[0]
    for name, choice in chosen.items():
        style = _STYLES.get(choice.style)
        if (name.rpartition(".")[0] == owner and _last(name) in _Q | _QKV and getattr(style, "kind", None) == "col"
                and not style.options):
            return name
    return None


def _check_head_params(model, named, chosen, params, ctx):
    """A bare parameter a plan splits column-wise (attention sinks, a per-head gate bias: transformers'
    ``colwise`` on a parameter, ``local_params`` on its owner) is split by its attention's query heads: its
    first dim must be that attention's head count, and the query projection beside it split by heads."""
    all_params = dict(model.named_parameters())
    for pname, choice in params.items():
        q = _head_query(model, named, chosen, pname)
        heads = None
        if q is not None and _is_attention(pname):
            heads = _STYLES[chosen[q].style]._layer_args(q, named[q], ctx).get("num_heads")
        shape = tuple(all_params[pname].shape)
        if heads is None or not shape or shape[0] != heads:
            raise ValueError(f"{pname}: style {choice.style!r} (from {choice.source}, {choice.pattern!r}) on a bare "
                             f"parameter of shape {list(shape)}: tplinear splits a bare parameter only by the heads "
                             "of the attention it belongs to (its first dim the query heads, the query projection "
                             f"beside it split by heads{'' if q is None else f': {q} has {heads} heads'}); leave it "
                             "out of the plan to keep it replicated")


def _split_head_params(model, params, ctx):
    """Each bare parameter of params stays whole and replicated (checkpoints, optimizers see it as it was);
    its owner reads this rank's rows of it (the rows of its query heads, as the query projection beside it
    has them), and its gradient, which then covers only those rows, is summed over the group."""
    by_owner = collections.defaultdict(dict)
    for pname in params:
        owner_name, _, attr = pname.rpartition(".")
        owner = model.get_submodule(owner_name)
        q = next(m for n, m in owner.named_children() if isinstance(m, LinearLayer) and m.num_heads is not None
                 and _last(n) in _Q | _QKV)
        first, width = q._pieces[q.tp_index][0]
        by_owner[owner_name][attr] = (first // q.head_dim, first // q.head_dim + width // q.head_dim)
        _ops.reduce_grad(owner._parameters[attr], ctx.group)
    for owner_name, rows in by_owner.items():
        owner = model.get_submodule(owner_name)
        cls = type(owner)
        props = {attr: property(lambda self, a=attr, r=r: self._parameters[a][r[0]:r[1]]) for attr, r in rows.items()}
        owner.__class__ = type(cls.__name__, (cls,), {**props, "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__})


def _refuse(name, style, pattern, source):
    later = _STYLES.get(style)
    if isinstance(later, _Later):
        raise NotImplementedError(f"{name}: style {style!r} (from {source}, {pattern!r}) needs {later.needs}, "
                                  "which tplinear does not have yet; leave it out of the plan to keep the module "
                                  "replicated")
    if later is not None:  # a supported style on a bare parameter
        raise ValueError(f"{name}: style {style!r} (from {source}, {pattern!r}) does not apply to a bare parameter "
                         "(colwise splits one by its attention's heads; MoE experts' 3-d parameters take their "
                         "module's split)")
    raise ValueError(f"{name}: unknown tensor-parallel style {style!r} (from {source}, {pattern!r}); "
                     f"tplinear.torch supports {', '.join(STYLES)}")


def _check_tied(model, chosen):
    """A weight shared by two modules (tied embeddings) cannot be sharded in one of them."""
    owners = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    for name, choice in chosen.items():
        if getattr(_STYLES.get(choice.style), "shards", False):
            for pname, p in model.get_submodule(name).named_parameters(recurse=False):
                others = [o for o in owners[id(p)] if o != f"{name}.{pname}"]
                if others:
                    raise ValueError(f"{name}.{pname} is tied to {', '.join(others)}: sharding it would shard "
                                     "them too; keep it replicated (leave it out of the plan) or untie the weights")


def _block_pieces(col, r, n):
    """Column layer col's pieces at rank r of each of its blocks of size n, relative to the block."""
    out, start = [], 0
    blocks = col._split["block_sizes"] or [col.out_features]
    for i, size in enumerate(blocks):
        if size == n:
            off, width = col._pieces[r][i]
            out.append((off - start, width))
        start += size
    return out


def _check_pairs(built):
    """A row layer's input split must be the split of the column outputs that feed it: the column layers
    beside it (same parent module) whose output (or one packed block of it) has its in_features."""
    for rname, row in built.items():
        if not isinstance(row, LinearAllreduce) or not row.input_is_parallel:
            continue
        parent = rname.rpartition(".")[0]
        for cname, col in built.items():
            if not isinstance(col, LinearLayer) or col.gather_output or cname.rpartition(".")[0] != parent:
                continue
            for r in range(row.tp_world_size):
                theirs = _block_pieces(col, r, row.in_features)
                mine = row._pieces[r][0]
                if any(p != mine for p in theirs):
                    raise ValueError(
                        f"the plan splits {cname}'s output and {rname}'s input differently: rank {r} gets "
                        f"{theirs} of {cname}'s output but {mine} of {rname}'s input (offset, size); give both "
                        "the same heads / grain, or keep them replicated")


def _update_attention_attributes(model, built, heads):
    """Per-rank sizes on the attention modules that read them (_local_sizes, as DeepSpeed's
    update_mp_params), from the query projection split by heads (its own head counts and width per head)
    or a fused layout. Gathered column outputs (colwise_gather_output) leave the module's sizes alone."""
    for name, layer in built.items():
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if getattr(layer, "_fused_layout", None) is not None:
            _fused_attributes(parent, *layer._fused_layout, layer.mp_group)
            continue
        if (not isinstance(layer, LinearLayer) or layer.num_heads is None or layer.gather_output
                or _last(name) not in _Q | _QKV):
            continue
        h, kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        first, width = layer._pieces[layer.tp_index][0]
        q0, ql = first // d, width // d
        kvl = ql * kv // h
        _local_sizes(parent, h, kv, d, range(q0, q0 + ql), range(q0 * kv // h, q0 * kv // h + kvl), layer.mp_group)


def tp_modules(model):
    """The tplinear layers of a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TPModule)}
