"""Every causal-LM family of the installed transformers through ``tplinear.torch.parallelize(model)`` (no
plan), against the unsharded model: family x mode (training / inference) x p -> exact / refused (why) /
crash (where) / wrong (max rel err) / nothing replaced / MoE experts replicated / does not build tiny.

The cases, the tiny configs and the world driver are tests/hf_families.py (tests/test_hf_families.py runs
a slice of them in CI). Writes benchmarks/results/hf_sweep.json and .md (``--out`` for another name).

    python benchmarks/hf_sweep.py                          # every family, p=2, training and inference
    python benchmarks/hf_sweep.py --p 2 3 --families llama gpt2 mixtral
    python benchmarks/hf_sweep.py --from-exact results/hf_sweep.json --p 3   # p=3 of the families exact at p=2
    python benchmarks/hf_sweep.py --coverage results/hf_sweep_p2.json results/hf_sweep_p3.json   # docs' table
"""
import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import hf_families as hf  # noqa: E402

OUTCOMES = ["exact", "moe-replicated", "refused", "crash", "wrong", "nothing", "no-build"]
LABEL = {"exact": "exact", "moe-replicated": "exact, MoE experts replicated", "refused": "refused at parallelize",
         "crash": "crash (forward / backward / foreign exception / hang)", "wrong": "silently wrong",
         "nothing": "nothing replaced, no word said", "no-build": "does not build tiny"}


def totals(records):
    cols = sorted({(r["p"], r["mode"]) for r in records}, key=lambda c: (c[0], c[1] != "training"))
    table = {c: {o: 0 for o in OUTCOMES} for c in cols}
    for r in records:
        table[(r["p"], r["mode"])][r["outcome"]] += 1
    return cols, table


def markdown(records, meta):
    cols, table = totals(records)
    lines = [f"# parallelize over every causal-LM family (transformers {meta['transformers']})", "",
             f"{meta['families']} families, tiny configs (hidden {hf.HIDDEN}, {hf.HEADS} query / {hf.KV_HEADS} KV "
             f"heads, head dim {hf.HEAD_DIM}, {hf.LAYERS} layers, vocab {hf.VOCAB}, eager attention), "
             f"`parallelize(model)` with no plan, against the unsharded model in float64 (tolerance "
             f"{hf.TOL['float64']:g} relative; float32 and {hf.TOL['float32']:g} where a family does not run in "
             f"float64). Wall time {meta['seconds'] / 60:.1f} min on {meta['machine']}.", "",
             "| outcome | " + " | ".join(f"p = {p} {m}" for p, m in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for o in OUTCOMES:
        lines.append(f"| {LABEL[o]} | " + " | ".join(str(table[c][o]) for c in cols) + " |")
    lines.append("| total | " + " | ".join(str(sum(table[c].values())) for c in cols) + " |")
    lines += ["", "| family | class | mode | p | outcome | why |", "|---|---|---|---:|---|---|"]
    for r in sorted(records, key=lambda r: (r["family"], r["p"], r["mode"] != "training")):
        why = r.get("reason", "")
        if r.get("where") and r["outcome"] in ("crash", "refused", "no-build"):
            why += f" (at {r['where']})"
        why = why.replace("|", "\\|").replace("\n", " ")[:260]
        lines.append(f"| {r['family']} | {r.get('class', '')} | {r['mode']} | {r['p']} | {r['outcome']} | {why} |")
    return "\n".join(lines) + "\n"


def reclassify(path):
    """Re-applies hf_families.is_expert_param to a stored result (its records keep the expert parameters
    that stayed replicated): a case whose only "experts" were conv weights or down_proj_bias is exact."""
    with open(path) as f:
        data = json.load(f)
    changed = 0
    for r in data["records"]:
        if "experts_replicated" not in r:
            continue
        keep = [n for n in r["experts_replicated"] if hf.is_expert_param(n, 3)]
        if keep == r["experts_replicated"]:
            continue
        r["experts_replicated"] = keep
        if r["outcome"] == "moe-replicated" and not keep:
            changed += 1
            err = r.get("max_rel") or 0.0
            if r.get("replaced", 0) == 0 and not r.get("experts_sharded"):
                r.update(outcome="nothing", reason="parallelize replaced no module")
            else:
                r.update(outcome="exact", reason=f"max rel err {err:.1e}")
        elif r["outcome"] == "moe-replicated":
            r["reason"] = f"{len(keep)} expert parameters replicated (max rel err {r.get('max_rel') or 0.0:.1e})"
    data["meta"]["reclassified"] = "expert parameters: hf_families.is_expert_param"
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    with open(path[:-5] + ".md", "w") as f:
        f.write(markdown(data["records"], data["meta"]))
    print(f"{path}: {changed} cases reclassified")


def _short(r):
    """One cell of the coverage table: exact, or the outcome and a short why."""
    if r["outcome"] == "exact":
        return "exact"
    why = " ".join(r.get("reason", "").split())
    why = why.split(" (at ")[0].replace("|", "\\|")
    return f"{r['outcome']}: {why[:90]}{'…' if len(why) > 90 else ''}"


def coverage(paths):
    """The docs' coverage table from sweep results: one row per family, a column per (p, mode)."""
    records = []
    for path in paths:
        with open(path) as f:
            records += json.load(f)["records"]
    cols = sorted({(r["p"], r["mode"]) for r in records}, key=lambda c: (c[0], c[1] != "training"))
    cells = {(r["family"], r["p"], r["mode"]): _short(r) for r in records}
    lines = ["| family | " + " | ".join(f"p = {p} {m}" for p, m in cols) + " |", "|---|" + "---|" * len(cols)]
    for fam in sorted({r["family"] for r in records}):
        lines.append(f"| {fam} | " + " | ".join(cells.get((fam, p, m), "—") for p, m in cols) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", help="model types (default: every causal-LM family)")
    ap.add_argument("--p", nargs="*", type=int, default=[2], help="world sizes (default: 2)")
    ap.add_argument("--modes", nargs="*", default=["training", "inference"], choices=["training", "inference"])
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one case may take (default: 120)")
    ap.add_argument("--from-exact", metavar="JSON", help="only the families exact in this earlier result")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "hf_sweep"), help="output path without suffix")
    ap.add_argument("--reclassify", metavar="JSON", help="re-apply the expert-parameter rule to a stored result")
    ap.add_argument("--coverage", nargs="+", metavar="JSON", help="print the docs' coverage table of these results")
    args = ap.parse_args()
    if args.coverage:
        return print(coverage(args.coverage), end="")
    if args.reclassify:
        return reclassify(args.reclassify)
    import transformers

    fams = [f for f, _ in hf.families()]
    if args.families:
        fams += sorted(hf.VARIANTS)  # "family+variant": a family's config with overrides (tests/hf_families.py)
        unknown = set(args.families) - set(fams)
        if unknown:
            ap.error(f"not causal-LM families of transformers {transformers.__version__}: {sorted(unknown)}")
        fams = [f for f in fams if f in args.families]
    if args.from_exact:
        with open(args.from_exact) as f:
            prev = json.load(f)["records"]
        ok = {r["family"] for r in prev if r["outcome"] == "exact"}
        bad = {r["family"] for r in prev if r["outcome"] != "exact"}
        fams = [f for f in fams if f in ok and f not in bad]
    t0 = time.monotonic()
    records = []
    meta = {"transformers": transformers.__version__, "families": len(fams), "p": args.p, "modes": args.modes,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": " ".join(sys.argv),
            "tplinear": os.path.dirname(os.path.abspath(__import__("tplinear").__file__))}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def save(done):  # after every case: an interrupted sweep keeps what it has
        meta["seconds"], meta["complete"] = round(time.monotonic() - t0, 1), done
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)

    for p in args.p:
        cases = [(f, m) for f in fams for m in args.modes]

        def log(r, p=p):
            records.append(r)
            save(False)
            print(f"[{time.monotonic() - t0:7.1f}s] p={p} {r['family']:26s} {r['mode']:9s} {r['outcome']:14s} "
                  f"{r.get('reason', '')[:150]}", flush=True)
        hf.run_cases(cases, p, timeout=args.timeout, log=log)
    save(True)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(records, meta))
    cols, table = totals(records)
    for c in cols:
        print(f"p={c[0]} {c[1]}: " + ", ".join(f"{o} {table[c][o]}" for o in OUTCOMES))
    print(f"wrote {args.out}.json and .md in {meta['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
