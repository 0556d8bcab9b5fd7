"""A CI slice of benchmarks/hf_sweep.py: parallelize(model) with no plan on a few representative Hugging Face
families (tiny configs, tests/hf_families.py), training and inference mode, against the unsharded model
(float64): Llama (the HF plan, GQA), GPT-2 (Conv1D, fused c_attn, name rules), Mixtral (fused MoE experts),
Qwen2-MoE (experts beside a shared expert), Llama-4 (its plan's expert styles: packed_rowwise / colwise on the
3-d parameters, moe_tp_experts), MiniCPM5-MoE with 1 KV head (its plan's unit_colwise k / v, K / V
replicated), the fused QKV layouts (Phi-3's [q | k | v] with GQA under colwise_gather_output, CodeGen's
mp_num interleave, GPT-NeoX / Bloom per-head [q k v] with ALiBi, Falcon's
new decoder architecture [q .. q k v] per KV head) at 2 and 3 ranks, BERT (an unpaired ``dense`` stays whole),
Apertus (xIELU's alpha_p / alpha_n gradients reduced over the group), heads from the attention's own sizes
(DeepSeek-V3's MLA: q_b_proj / kv_b_proj / o_proj of their own widths per head; Qwen3-Next's gated q_proj;
MiMo-V2-Flash's doubled KV heads on sliding layers), bare parameters split by heads (MiMo's attention sinks,
Beam's gate_bias beside its gate_proj), per-rank attention sizes (XGLM's embed_dim), kv_heads="replicate"
(multi-query Falcon / GPT-BigCode fused QKV, Falcon's grouped layout with 2 KV heads at 3 ranks, Llama with 1 KV
head and with 2 KV heads at 3 ranks: query heads split, K / V replicated, their gradients summed), and the
refusals (a multi-query fused QKV cannot be split by whole KV heads; the message names kv_heads="replicate"),
sequence_parallel=True (Llama, Qwen2, Qwen3, Mistral, Gemma at 2 and 3 ranks over 7 tokens: uneven shards;
Mixtral's experts refused), the families the name rules missed (CTRL, CPM-Ant with its per-head relative
position bias, XLM, ProphetNet's and XLNet's feed-forward with their attentions kept whole, TrOCR's attention
kept whole, ModernBERT-decoder's Wo / packed Wi, Electra's unpaired generator dense; JetMoE refused naming
its mixture-of-heads attention) and the default kv_heads="auto" (multi-query Falcon / GPT-BigCode exact by
default; kv_heads="whole" refuses them), BitNet's sub-norms over the sharded width split with it (uneven at 3
ranks), Mamba / FalconMamba mixers split along their channels (tplinear.torch.ssm; 3 ranks in
tests/test_torch_ssm.py). Each group and p runs in as few worlds as it needs (one when none hangs)."""
import pytest

pytest.importorskip("torch", reason="tplinear.torch needs the torch extra: pip install '.[torch]'")
pytest.importorskip("transformers", reason="the model-level tests need transformers (the test extra)")

import hf_families as hf  # noqa: E402

MODES = ("training", "inference")
# (group of cases) -> {p: families}; each group runs in worlds of its own, so that each stays within the test timeout
EXACT = {
    "families": {2: ["llama", "gpt2", "mixtral", "qwen2_moe", "phi3", "codegen", "bert", "apertus", "falcon+new_arch",
                     "electra", "modernbert-decoder", "trocr", "ctrl", "cpmant", "moshi", "doge", "bitnet",
                     "llama4_text", "minicpm5_moe+mqa", "falcon_mamba", "jamba"],
                 3: ["codegen", "bloom", "gpt_neox", "falcon+new_arch", "gpt_bigcode+mha", "apertus", "xlm",
                     "prophetnet", "xlnet", "bitnet", "minicpm5_moe+mqa"]},
    "heads": {2: ["qwen3_next", "xglm"], 3: ["deepseek_v3", "mimo_v2_flash", "beam"]},
    "kv_heads": {2: ["falcon", "gpt_bigcode", "llama+mqa"],
                 3: ["falcon", "gpt_bigcode", "llama+gqa2", "falcon+new_arch+kv_replicate"]},
    "sequence": {p: ["llama+sp", "qwen2+sp", "qwen3+sp", "mistral+sp", "gemma+sp"] for p in (2, 3)},
}
REFUSED = {
    "families": {2: {"falcon+kv_whole": ("transformer.h.0.self_attention.query_key_value", "multi-query",
                                         "1 key/value head", 'kv_heads="replicate"', 'kv_heads="auto"'),
                     "gpt_bigcode+kv_whole": ("transformer.h.0.attn.c_attn", "multi-query", "over 2 ranks",
                                              'kv_heads="replicate"'),
                     "jetmoe": ("replaced no module", "model.layers.0.self_attention (JetMoeAttention) stays whole",
                                "mixture of attention heads")}},
    "sequence": {2: {"mixtral+sp": ("model.layers.0.mlp", "MoE experts", "sequence_parallel")}},
}
KNOWN = {}  # family: why it is not exact today (xfail(strict=True), so each flips when fixed)
_RUNS = {}


def _results(group, p):
    """{(family, mode): record} of a group's cases at p, run once per session."""
    if (group, p) not in _RUNS:
        cases = [(f, m) for f in EXACT.get(group, {}).get(p, []) + sorted(REFUSED.get(group, {}).get(p, {}))
                 for m in MODES]
        _RUNS[(group, p)] = {(r["family"], r["mode"]): r for r in hf.run_cases(cases, p, timeout=120)}
    return _RUNS[(group, p)]


@pytest.mark.parametrize("group,family,mode,p", [
    pytest.param(g, f, m, p, marks=[pytest.mark.xfail(strict=True, reason=KNOWN[f])] if f in KNOWN else [])
    for g in EXACT for p in sorted(EXACT[g]) for f in EXACT[g][p] for m in MODES])
def test_family_is_exact(group, family, mode, p):
    r = _results(group, p)[(family, mode)]
    assert r["outcome"] == "exact", f"{family} {mode} p={p}: {r['outcome']}: {r.get('reason')} {r.get('where', '')}"
    assert r["replaced"] > 0 or r.get("experts_sharded")
    if group == "sequence":  # every decoder layer's output held this rank's rows of the sequence only
        assert r["layer_rows"] and set(r["layer_rows"]) == {r["own_rows"]} and r["own_rows"] < hf.SEQ, r


@pytest.mark.parametrize("group,family,mode,p", [(g, f, m, p) for g in REFUSED for p in sorted(REFUSED[g])
                                                 for f in REFUSED[g][p] for m in MODES])
def test_family_is_refused_with_the_module_and_sizes(group, family, mode, p):
    r = _results(group, p)[(family, mode)]
    assert r["outcome"] == "refused", f"{family} {mode} p={p}: {r['outcome']}: {r.get('reason')}"
    for part in REFUSED[group][p][family]:
        assert part in r["reason"], (part, r["reason"])
