"""Every causal-LM family of the installed transformers through ``tplinear.torch.parallelize``: the tiny
configs, the case that runs inside each rank, and the driver that runs worlds of cases and classifies them.
benchmarks/hf_sweep.py (the whole sweep, its tables) and tests/test_hf_families.py (a CI slice) both use it.

A case is (family, mode, p). Every rank builds the family's model from a tiny config with the same seed,
keeps an unsharded float64 deep copy as the reference (float32 with a looser tolerance where the family
does not run in float64), runs ``parallelize(model)`` with no plan, and compares the logits (training mode:
also the loss and every parameter's gradient, gathered; a gradient that is zero in the reference is not
counted). Outcomes:

    exact            every compared tensor within the tolerance
    moe-replicated   exact, but MoE expert parameters stayed replicated (how many)
    nothing          parallelize replaced no module and said nothing
    refused          parallelize raised ValueError / NotImplementedError / TypeError (its message)
    crash            any other exception at parallelize, or any exception in forward / backward (where),
                     or a rank that never finished (a hang: the case's timeout)
    wrong            the largest relative error over the logits, loss and gradients is above the tolerance
    no-build         the tiny model does not build or its unsharded forward fails (not tplinear's doing)

Worlds are reused across cases: a world runs a list of cases, and every rank writes one JSON line per case
to its own file before the next case; the ranks then agree through those files (not through a
collective). A case where the ranks disagree or a rank stops writing ends the world; the driver starts a
new one at the next case. Every case has a hard timeout, after which the world's process group is killed.

Run inside a world: ``python -m tplinear.run --nproc-per-node P tests/hf_families.py world CASES OUTDIR``.
"""
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

TOL = {"float64": 1e-5, "float32": 1e-3}
ZERO_GRAD = {"float64": 1e-12, "float32": 1e-6}  # a gradient below this times the largest one is not compared
SEED = 1234
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, INTER = 128, 8, 4, 16, 2, 128, 256
BATCH, SEQ = 2, 7

# ------------------------------------------------------------------------------------------ tiny configs

_SET = {  # key in the family's config -> tiny value (set only where the config has the key as an int)
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim", "model_dim", "word_embed_proj_dim"), HIDDEN),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_attention_heads_per_layer"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num",
                     "num_key_value_groups"), KV_HEADS),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels"), HEAD_DIM),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "encoder_ffn_dim",
                     "decoder_ffn_dim", "inner_hidden_size", "mlp_dim", "hidden_dim"), INTER),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_ffn_hidden_size", "ffn_hidden_size_moe", "shared_intermediate_size"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
                     "encoder_layers", "num_decoder_layers"), LAYERS),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_selected_experts", "moe_k"), 2),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"), 128),
    "vocab_size": VOCAB,
    # DeepSeek-style: one dense layer, then MoE; one routing group; small MLA ranks
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "kv_lora_rank": 32, "q_lora_rank": 48,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
}
_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
           "cls_token_id", "mask_token_id", "unk_token_id")

# per family: config keyword overrides (applied after the generic shrink), or a reason it is skipped
OVERRIDES = {
    "reformer": {"is_decoder": True},
    "zaya": {"num_experts_per_tok": 1},
    "mamba2": {"head_dim": 32},
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2},
    # BigBird switches a short sequence to full attention by building new attention modules in forward (which
    # would not be the parallelized ones): build it in full attention
    "big_bird": {"attention_type": "original_full"},
    # widths under keys the generic shrink does not know (XLM's 2048 wide; CPM-Ant's dim_ff 10240 and 128 per
    # head, CTRL's dff 8192): seconds per CI case
    "xlm": {"emb_dim": HIDDEN},
    "cpmant": {"dim_ff": INTER, "dim_head": HEAD_DIM},
    "ctrl": {"dff": INTER},
}

# variants of a family (name "family+variant"): the family's tiny config with these overrides, for layouts
# the family's default config does not take (Falcon's new decoder architecture and its multi-head layout,
# GPT-BigCode without multi-query)
VARIANTS = {
    "falcon+new_arch": ("falcon", {"new_decoder_architecture": True, "multi_query": False}),
    "falcon+mha": ("falcon", {"multi_query": False, "num_kv_heads": 8}),
    "gpt_bigcode+mha": ("gpt_bigcode", {"multi_query": False}),
    # the default kv_heads="auto": Llama with 1 KV head, with 2 (replicated at 3 ranks, whole at 2)
    "llama+mqa": ("llama", {"num_key_value_heads": 1}),
    "llama+gqa2": ("llama", {"num_key_value_heads": 2}),
    # the model's plan splits k / v by whole heads (unit_colwise): 1 KV head, fewer than the ranks
    "minicpm5_moe+mqa": ("minicpm5_moe", {"num_key_value_heads": 1}),
    # kv_heads="whole" (PARALLELIZE below): a multi-query fused QKV cannot be split by whole KV heads: refused
    "falcon+kv_whole": ("falcon", {}),
    "gpt_bigcode+kv_whole": ("gpt_bigcode", {}),
    # kv_heads="replicate" (PARALLELIZE below): multi-query fused (Falcon, GPT-BigCode), multi-query and GQA
    # Llama with fewer KV heads than ranks (separate k_proj / v_proj)
    "falcon+kv_replicate": ("falcon", {}),
    "gpt_bigcode+kv_replicate": ("gpt_bigcode", {}),
    "falcon+new_arch+kv_replicate": ("falcon", {"new_decoder_architecture": True, "multi_query": False,
                                                "num_kv_heads": 2}),
    "llama+mqa+kv_replicate": ("llama", {"num_key_value_heads": 1}),
    "llama+gqa2+kv_replicate": ("llama", {"num_key_value_heads": 2}),
}
VARIANTS.update({f"{f}+sp": (f, {}) for f in ("llama", "qwen2", "qwen3", "mistral", "gemma", "mixtral")})
VARIANTS["llama+gqa2+sp"] = ("llama", {"num_key_value_heads": 2})  # with K / V replicated at 3 ranks ("auto")
# keyword arguments of parallelize per family (default: none)
PARALLELIZE = {f: {"kv_heads": "replicate"} for f in VARIANTS if f.endswith("+kv_replicate")}
PARALLELIZE.update({f: {"kv_heads": "whole"} for f in VARIANTS if f.endswith("+kv_whole")})
PARALLELIZE.update({f: {"sequence_parallel": True} for f in VARIANTS if f.endswith("+sp")})


def _base(family):
    return VARIANTS[family][0] if family in VARIANTS else family


def families():
    """[(model_type, class name)] of every causal-LM class in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def _shrink(d, nlayers_default=None):
    """The keyword arguments that make the config dict d tiny (sub-configs shrunk as dicts)."""
    out = {}
    n_default = next((d[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(d.get(k), int)),
                     nlayers_default)
    for key, value in d.items():
        if key in _SET and isinstance(value, int) and not isinstance(value, bool):
            out[key] = _SET[key]
        elif key in _TOKENS and isinstance(value, int) and not isinstance(value, bool) and value >= 3:
            out[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, 2)
        elif key in _TOKENS and isinstance(value, list):
            out[key] = [v if v < 3 else 2 for v in value if isinstance(v, int)] or None
        elif isinstance(value, dict) and key.endswith("_config") and "model_type" in value:
            out[key] = {**value, **_shrink(value)}
        elif isinstance(value, list) and n_default and len(value) == n_default and n_default > LAYERS:
            # per-layer lists (layer_types, ...): the first layer and the first of another kind (hybrids keep
            # an attention layer)
            other = next((v for v in value if v != value[0]), None)
            out[key] = [value[0], other] if other is not None and isinstance(other, str) else value[:LAYERS]
        elif key == "per_layer_config" and isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if str(k).isdigit() and int(k) < LAYERS}
    if isinstance(d.get("kv_lora_rank"), int):  # MLA: every head has its own K and V; rope on head_dim
        out.update({k: HEADS for k in ("num_key_value_heads",) if k in d})
        out.update({k: _SET["qk_rope_head_dim"] for k in ("head_dim",) if k in d})
    if isinstance(d.get("rotary_dim"), int):
        out["rotary_dim"] = HEAD_DIM
    return out


def tiny_config(model_type):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    variant = VARIANTS.get(model_type, (model_type, {}))[1]
    model_type = _base(model_type)
    cfg_cls = CONFIG_MAPPING[model_type]
    own = getattr(model_class(model_type), "config_class", None)
    if isinstance(own, type) and issubclass(own, transformers.PretrainedConfig) and own is not cfg_cls:
        cfg_cls = own  # a text-only class under a composite model type (qwen3_5 -> Qwen3_5TextConfig)
    kwargs = _shrink(cfg_cls().to_dict())
    over = OVERRIDES.get(model_type, {})
    if isinstance(over, str):
        raise _NoBuild(over)
    kwargs.update(over)
    kwargs.update(variant)
    cfg = cfg_cls(**kwargs)
    for c in [cfg] + [getattr(cfg, k) for k in dir(cfg) if k.endswith("_config") and
                      isinstance(getattr(cfg, k, None), transformers.PretrainedConfig)]:
        try:
            c._attn_implementation = "eager"
        except Exception:  # noqa: BLE001 - a config that does not take it keeps its own
            pass
        for k in ("tie_word_embeddings",):
            if hasattr(c, k):
                setattr(c, k, False)
    return cfg


class _NoBuild(Exception):
    pass


def model_class(model_type):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[_base(model_type)])


def build(model_type, dtype=None):
    import torch
    cfg = tiny_config(model_type)
    torch.manual_seed(SEED)
    model = model_class(model_type)(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------ one case (in a rank)


def _where(exc):
    """The innermost frames of exc's traceback in transformers or tplinear, as file:line function."""
    frames = traceback.extract_tb(exc.__traceback__)
    keep = [f for f in frames if "transformers" in f.filename or "tplinear" in f.filename] or frames
    f = keep[-1]
    path = f.filename
    for marker in ("transformers/", "tplinear/"):
        if marker in path:
            path = marker + path.rsplit(marker, 1)[1]
    return f"{path}:{f.lineno} {f.name}"


def _msg(exc, limit=600):
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}"


def is_expert_param(name, dim):
    """A routed expert's weight (not a shared expert's, not down_proj_bias or a post_expert_norm's weight,
    which stay replicated by design, not a 3-d conv weight elsewhere in the model)."""
    last = name.rsplit(".", 1)[-1]
    routed = bool(re.search(r"(^|\.)experts(\.|$)", name)) and "shared" not in name and ".post_expert_norm." not in name
    return routed and last != "down_proj_bias" or dim == 3 and last in ("gate_up_proj", "down_proj", "up_proj")


def _full_grad(param):
    import torch
    layer = getattr(param, "tp_layer", None)
    g = param.grad
    if layer is None:
        return g
    if g is None:  # the gather is collective: take part with zeros
        g = torch.zeros_like(param)
    return layer.full_tensor(param, g)


def _rel(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    den = ref.norm().item()
    return (got - ref).norm().item() / (den if den > 0 else 1.0)


def run_case(family, mode):
    """One case on this rank: a dict with outcome, reason, max_rel, ... (collective over the world)."""
    import torch
    import tplinear as tp
    import tplinear.distributed as dist
    import tplinear.torch as tpt

    res = {"family": family, "mode": mode, "p": dist.get_world_size(), "rank": dist.get_rank()}
    training = mode == "training"
    tp.set_training_mode(training)
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    # -- build, and the unsharded reference (float64 where the family runs in it)
    try:
        model = build(family)
        res["class"] = type(model).__name__
        dtype = torch.float64
        labels = {"labels": ids} if training else {}  # a family whose unsharded loss fails does not build
        try:
            ref = copy.deepcopy(model).to(dtype)
            with torch.no_grad():
                ref(ids, **labels)
        except Exception:  # noqa: BLE001 - some families only run in float32
            dtype = torch.float32
            ref = copy.deepcopy(model)
            with torch.no_grad():
                ref(ids, **labels)
        model = model.to(dtype)
    except Exception as exc:  # noqa: BLE001
        res.update(outcome="no-build", reason=_msg(exc), where=_where(exc))
        return res
    res["dtype"] = str(dtype).replace("torch.", "")
    tol = TOL[res["dtype"]]
    res["tol"] = tol
    experts = {n for n, p in model.named_parameters() if is_expert_param(n, p.dim())}
    # -- parallelize
    try:
        tpt.parallelize(model, **PARALLELIZE.get(family, {}))
    except (ValueError, NotImplementedError, TypeError) as exc:
        res.update(outcome="refused", reason=_msg(exc), where=_where(exc))
        return res
    except Exception as exc:  # noqa: BLE001
        res.update(outcome="crash", stage="parallelize", reason=_msg(exc), where=_where(exc))
        return res
    res["replaced"] = len(tpt.tp_modules(model))
    if PARALLELIZE.get(family, {}).get("sequence_parallel"):  # the rows each decoder layer's output holds
        rows = res["layer_rows"] = []
        for layer in model.get_decoder().layers:
            layer.register_forward_hook(lambda m, a, out: rows.append(int((out[0] if isinstance(out, tuple)
                                                                           else out).shape[1])))
        res["own_rows"] = tp.sequence_ranges(SEQ, dist.get_world_size())[dist.get_rank()][1]
    params = dict(model.named_parameters())
    res["experts_replicated"] = sorted(n for n in experts if n in params and
                                       not getattr(params[n], "tensor_model_parallel", False))
    res["experts_sharded"] = sorted(n for n in experts if n in params and
                                    getattr(params[n], "tensor_model_parallel", False))
    errs = {}
    stage = "forward"
    try:
        if training:
            out = model(ids, labels=ids)
            expect = ref(ids, labels=ids)
            errs["logits"] = _rel(out.logits, expect.logits)
            errs["loss"] = _rel(out.loss.reshape(1), expect.loss.reshape(1))
            stage = "backward"
            out.loss.backward()
            expect.loss.backward()
            stage = "gradients"
            refs = dict(ref.named_parameters())
            norms = {n: (p.grad.double().norm().item() if p.grad is not None else 0.0) for n, p in refs.items()}
            biggest = max(norms.values(), default=0.0)
            zero = 0
            # mathematically zero (a key bias under softmax): rounding noise in the reference, ~1e-16 of the
            # largest gradient in float64, ~1e-8 in float32
            floor = ZERO_GRAD[res["dtype"]] * biggest
            for name, param in model.named_parameters():
                full = _full_grad(param)  # collective for shards: every rank, every parameter, same order
                r = refs[name].grad if name in refs else None
                if r is None or norms.get(name, 0.0) <= floor:
                    zero += 1
                    continue
                layer = getattr(param, "tp_layer", None)
                if layer is not None and getattr(layer, "_conv1d", False) and r.dim() == 2:
                    r = r.t()
                if full is None:
                    errs[f"grad {name}"] = 1.0  # no gradient where the reference has one
                elif tuple(full.shape) != tuple(r.shape):
                    errs[f"grad {name}"] = float("inf")
                else:
                    errs[f"grad {name}"] = _rel(full, r)
            res["zero_grads"] = zero
        else:
            with torch.no_grad():
                out = model(ids)
                expect = ref(ids)
            errs["logits"] = _rel(out.logits, expect.logits)
    except Exception as exc:  # noqa: BLE001
        res.update(outcome="crash", stage=stage, reason=_msg(exc), where=_where(exc))
        return res
    worst = max(errs, key=lambda k: errs[k])
    res["max_rel"], res["worst"] = errs[worst], worst
    res["compared"] = len(errs)
    if not errs[worst] <= tol:
        bad = sorted((k for k in errs if not errs[k] <= tol), key=lambda k: -errs[k])
        res.update(outcome="wrong", reason=f"max rel err {errs[worst]:.2e} at {worst} ({len(bad)} of {len(errs)} "
                                           f"tensors above {tol:g}: {', '.join(bad[:4])})")
    elif res["replaced"] == 0 and not res["experts_sharded"]:
        res.update(outcome="nothing", reason="parallelize replaced no module")
    elif res["experts_replicated"]:
        res.update(outcome="moe-replicated", reason=f"{len(res['experts_replicated'])} expert parameters replicated "
                                                    f"(max rel err {errs[worst]:.1e})")
    else:
        res.update(outcome="exact", reason=f"max rel err {errs[worst]:.1e}")
    return res


def _wait_peers(outdir, index, p, timeout):
    """The ranks' lines for case index, from their files (None for a rank that did not write it in time)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = {}
        for r in range(p):
            try:
                with open(os.path.join(outdir, f"rank{r}.jsonl")) as f:
                    for line in f:
                        d = json.loads(line)
                        if d.get("index") == index:
                            lines[r] = d
            except (OSError, ValueError):
                pass
        if len(lines) == p or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def world_main(cases_path, outdir, agree_timeout=60.0):
    """Runs the cases in cases_path ([{index, family, mode}]) on this rank; one JSON line per case in
    outdir/rank{r}.jsonl. Returns (exits) when a case ends in a way that may leave the ranks out of step."""
    import torch
    import tplinear.distributed as dist

    warnings.filterwarnings("ignore")
    from transformers import logging
    logging.set_verbosity_error()
    dist.init_process_group(timeout=agree_timeout)
    torch.set_num_threads(1)
    rank, p = dist.get_rank(), dist.get_world_size()
    with open(cases_path) as f:
        cases = json.load(f)
    mine = os.path.join(outdir, f"rank{rank}.jsonl")
    for case in cases:
        t0 = time.monotonic()
        try:
            res = run_case(case["family"], case["mode"])
        except Exception as exc:  # noqa: BLE001 - the runner itself: still a line
            res = {"outcome": "crash", "stage": "runner", "reason": _msg(exc), "where": _where(exc)}
        res["index"], res["seconds"] = case["index"], round(time.monotonic() - t0, 2)
        with open(mine, "a") as f:
            f.write(json.dumps(res) + "\n")
        lines = _wait_peers(outdir, case["index"], p, agree_timeout * 1.5)
        if len(lines) < p:
            os._exit(4)  # a peer is stuck: the driver kills the world and goes on
        outcomes = {(d["outcome"], d.get("stage"), d.get("reason", "").split(":")[0]
                     if d["outcome"] in ("crash", "refused") else "") for d in lines.values()}
        if len(outcomes) > 1 or res["outcome"] == "crash" and res.get("stage") != "forward":
            os._exit(5)  # the ranks may be at different points of the collective sequence: a fresh world
        if res["outcome"] in ("crash", "refused"):  # same stage on every rank: check the group still works
            t = torch.ones(4, dtype=torch.float64)
            try:
                dist.all_reduce(t.numpy())
            except Exception:  # noqa: BLE001
                os._exit(6)
            if not torch.equal(t, torch.full((4,), float(p), dtype=torch.float64)):
                os._exit(6)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the driver


def _merge(lines, p):
    """One record for a case from its ranks' lines."""
    if not lines:
        return None
    first = lines[min(lines)]
    rec = {k: v for k, v in first.items() if k not in ("rank", "seconds", "index")}
    rec["seconds"] = max(d.get("seconds", 0) for d in lines.values())
    outcomes = {d["outcome"] for d in lines.values()}
    if len(outcomes) > 1:
        order = ["crash", "wrong", "refused", "no-build", "nothing", "moe-replicated", "exact"]
        worst = min(outcomes, key=order.index)
        pick = next(d for d in lines.values() if d["outcome"] == worst)
        rec.update({k: v for k, v in pick.items() if k not in ("rank", "seconds", "index")})
        rec["reason"] = ("ranks disagree (" + ", ".join(f"{r}: {d['outcome']}" for r, d in sorted(lines.items())) + "); "
                         f"rank {pick['rank']}: {pick.get('reason', '')}")
        rec["outcome"] = "crash" if worst in ("refused", "crash") else worst
    if len(lines) < p:
        missing = sorted(set(range(p)) - set(lines))
        rec["outcome"] = "crash"
        rec["reason"] = f"ranks {missing} never finished the case (hang); rank {min(lines)}: " + rec.get("reason", "")
    rec["max_rel"] = max((d.get("max_rel", 0.0) or 0.0) for d in lines.values()) if "max_rel" in first else None
    return rec


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_cases(cases, p, timeout=180.0, log=None, agree_timeout=60.0):
    """Runs [(family, mode)] at world size p, as few worlds as it can; returns one record per case (in order).
    timeout: seconds one case may take (the world is killed after it and the next case starts a new one)."""
    from tplinear.testing import world_env

    log = log or (lambda *a: None)
    todo = [{"index": i, "family": f, "mode": m} for i, (f, m) in enumerate(cases)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="tplinear-hf-sweep-") as tmp:
        world = 0
        while todo:
            world += 1
            outdir = os.path.join(tmp, f"world{world}")
            os.makedirs(outdir)
            cases_path = os.path.join(outdir, "cases.json")
            with open(cases_path, "w") as f:
                json.dump(todo, f)
            cmd = [sys.executable, "-m", "tplinear.run", "--standalone", "--nproc-per-node", str(p), "--prefix-output",
                   os.path.abspath(__file__), "world", cases_path, outdir, str(agree_timeout)]
            logf = open(os.path.join(outdir, "output.txt"), "wb")
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=world_env({"PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}),
                                    start_new_session=True)
            done_idx = -1
            last_progress = time.monotonic()
            start_grace = 90.0  # importing torch and transformers in p processes on a loaded machine
            try:
                while True:
                    finished = proc.poll() is not None
                    lines = _read_lines(outdir, p)
                    complete = [i for i in sorted(lines) if len(lines[i]) == p]
                    for i in complete:
                        if i not in results:
                            results[i] = _merge(lines[i], p)
                            last_progress = time.monotonic()
                            start_grace = 0.0
                            log(results[i])
                    done_idx = max([done_idx] + complete)
                    if finished:
                        break
                    if time.monotonic() - last_progress > timeout + start_grace:
                        _kill(proc)
                        break
                    time.sleep(0.5)
            finally:
                if proc.poll() is None:
                    _kill(proc)
                else:
                    _kill(proc)  # anything left of its group
                logf.close()
            lines = _read_lines(outdir, p)
            remaining = [c for c in todo if c["index"] not in results]
            if remaining:
                head = remaining[0]
                # the case the world stopped in: what its ranks wrote, else the world's output
                rec = _merge(lines.get(head["index"], {}), p)
                if rec is None and proc.returncode in (4, 5, 6):  # a rank ended the world after the last case
                    todo = remaining
                    continue
                if rec is None:
                    with open(os.path.join(outdir, "output.txt"), "rb") as f:
                        tail = f.read().decode("utf-8", "replace")[-1500:]
                    timed_out = proc.returncode in (-9, 137) or time.monotonic() - last_progress > timeout
                    rec = {"family": head["family"], "mode": head["mode"], "p": p, "outcome": "crash",
                           "stage": "timeout" if timed_out else "process",
                           "reason": (f"no rank finished within {timeout:.0f} s (killed)" if timed_out else
                                      f"the world exited {proc.returncode} before any rank finished the case: "
                                      + " | ".join(tail.strip().splitlines()[-3:]))}
                results[head["index"]] = rec
                log(rec)
                todo = remaining[1:]
            else:
                todo = []
    return [results[i] for i in range(len(cases))]


def _read_lines(outdir, p):
    out = {}
    for r in range(p):
        try:
            with open(os.path.join(outdir, f"rank{r}.jsonl")) as f:
                for line in f:
                    try:
                        d = json.loads(line)
                    except ValueError:
                        continue
                    out.setdefault(d["index"], {})[r] = d
        except OSError:
            pass
    return out


if __name__ == "__main__":
    if sys.argv[1] == "world":
        world_main(sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 60.0)
    elif sys.argv[1] == "build":  # python tests/hf_families.py build [family ...]: which build tiny (one process)
        import torch
        warnings.filterwarnings("ignore")
        from transformers import logging
        logging.set_verbosity_error()
        torch.set_num_threads(1)
        for fam, _ in families():
            if len(sys.argv) > 2 and fam not in sys.argv[2:]:
                continue
            t0 = time.monotonic()
            try:
                m = build(fam)
                with torch.no_grad():
                    m(torch.randint(3, VOCAB, (BATCH, SEQ)))
                n = sum(x.numel() for x in m.parameters())
                print(f"{fam:28s} ok  {n / 1e6:6.2f}M {time.monotonic() - t0:5.1f}s", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"{fam:28s} NO  {_msg(exc, 200)} @ {_where(exc)}", flush=True)
