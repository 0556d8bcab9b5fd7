"""A CI slice of benchmarks/hf_sweep.py: parallelize(model) with no plan on a few representative Hugging Face
families (tiny configs, tests/hf_families.py), training and inference mode, against the unsharded model
(float64): Llama (the HF plan, GQA), GPT-2 (Conv1D, fused c_attn, name rules), Mixtral (fused MoE experts),
Qwen2-MoE (experts beside a shared expert), the fused QKV layouts (Phi-3's [q | k | v] with GQA under
colwise_gather_output, CodeGen's mp_num interleave, GPT-NeoX / Bloom per-head [q k v] with ALiBi, Falcon's
new decoder architecture [q .. q k v] per KV head) at 2 and 3 ranks, BERT (an unpaired ``dense`` stays whole),
Apertus (xIELU's alpha_p / alpha_n gradients reduced over the group), heads from the attention's own sizes
(DeepSeek-V3's MLA: q_b_proj / kv_b_proj / o_proj of their own widths per head; Qwen3-Next's gated q_proj;
MiMo-V2-Flash's doubled KV heads on sliding layers), bare parameters split by heads (MiMo's attention sinks,
Beam's gate_bias beside its gate_proj), per-rank attention sizes (XGLM's embed_dim), and the refusals (a
multi-query fused QKV cannot be split by whole KV heads). Each (p) runs in as few worlds as it needs (one when none hangs)."""
import pytest

pytest.importorskip("torch", reason="tplinear.torch needs the torch extra: pip install '.[torch]'")
pytest.importorskip("transformers", reason="the model-level tests need transformers (the test extra)")

import hf_families as hf  # noqa: E402

MODES = ("training", "inference")
EXACT = {2: ["llama", "gpt2", "mixtral", "qwen2_moe", "phi3", "codegen", "bert", "apertus", "falcon+new_arch",
             "qwen3_next", "xglm"],
         3: ["codegen", "bloom", "gpt_neox", "falcon+new_arch", "gpt_bigcode+mha", "apertus", "deepseek_v3",
             "mimo_v2_flash", "beam"]}
REFUSED = {2: {"falcon": ("transformer.h.0.self_attention.query_key_value", "multi-query", "1 key/value head"),
               "gpt_bigcode": ("transformer.h.0.attn.c_attn", "multi-query", "over 2 ranks")}}
KNOWN = {}  # family: why it is not exact today (xfail(strict=True), so each flips when fixed)


def _cases(p):
    return [(f, m) for f in EXACT.get(p, []) + sorted(REFUSED.get(p, {})) for m in MODES]


@pytest.fixture(scope="module")
def results():
    out = {}
    for p in sorted(EXACT):
        for r in hf.run_cases(_cases(p), p, timeout=120):
            out[(r["family"], r["mode"], p)] = r
    return out


@pytest.mark.parametrize("family,mode,p", [
    pytest.param(f, m, p, marks=[pytest.mark.xfail(strict=True, reason=KNOWN[f])] if f in KNOWN else [])
    for p in sorted(EXACT) for f in EXACT[p] for m in MODES])
def test_family_is_exact(results, family, mode, p):
    r = results[(family, mode, p)]
    assert r["outcome"] == "exact", f"{family} {mode} p={p}: {r['outcome']}: {r.get('reason')} {r.get('where', '')}"
    assert r["replaced"] > 0 or r.get("experts_sharded")


@pytest.mark.parametrize("family,mode,p", [(f, m, p) for p in sorted(REFUSED) for f in REFUSED[p] for m in MODES])
def test_family_is_refused_with_the_module_and_sizes(results, family, mode, p):
    r = results[(family, mode, p)]
    assert r["outcome"] == "refused", f"{family} {mode} p={p}: {r['outcome']}: {r.get('reason')}"
    for part in REFUSED[p][family]:
        assert part in r["reason"], (part, r["reason"])
