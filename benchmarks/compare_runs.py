"""Study: the headline numbers of several run directories side by side (markdown tables), for
comparing configs that differ in a few fields (e.g. old vs new defaults, or a copy of a run with
one Stage 3 field changed).

    python benchmarks/compare_runs.py runs/old runs/new [--out runs/bench/compare.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refusalscope.artifacts import writable_arg
from refusalscope.run.results import RunResults


def numbers(run_dir: str) -> dict:
    r = RunResults(run_dir)
    out: dict = {"run": run_dir}
    if (d := r.summary("direction")):
        out["direction"] = {k: d.get(k) for k in ("layer", "asr_after_ablation", "refusal_harmless_actadd",
                                                   "n_train_harmful", "n_train_harmful_given")}
    if (s1 := r.summary("stage1")):
        out["stage1"] = {"layers": f"{s1['layers'][0]}..{s1['layers'][-1]} ({len(s1['layers'])})",
                         "jailbroken": f"{s1['jailbroken']} / {s1['prompts']}", "mean K": s1["k_mean"],
                         "latents": len(r.stage1_features())}
    if (t1 := r.summary("stage2")):
        out["stage2"] = {"jailbroken": f"{t1['jailbroken']} / {t1['refused']}", "unique latents": t1["unique_latents"],
                         "mean set size": t1["mean_set_size"], "inactive share": t1["inactive_share"]}
        sets = r.stage2_sets()
        out["stage2"]["layers used"] = sorted({f.layer for s in sets.values() for f in s})
    if (s3 := r.summary("stage3")):
        t2, fm = s3["table2"], s3["fm"]
        rk = s3.get("ranking", {"mode": "global", "aggregate": "max"})
        vs = {row["k"]: row for row in s3["probe_vs_fm"]}
        out["stage3"] = {
            "ranking": f"{rk['mode']}/{rk['aggregate']}",
            "rows": fm.get("mode", "pooled"),
            "FM test acc": round(fm["test_acc"], 4),
            "FM test acc (prompts)": fm.get("test_prompt_acc"),
            "probe test acc": round(s3["probe"]["test_acc"], 4),
            "jailbroken": f"{t2['jailbroken']} / {t2['refused']}",
            "mean K": t2["mean_k"],
            "unique latents": t2["unique_stage3_latents"],
            "FM any K (probe Ks)": vs.get("any", {}).get("fm"),
            "probe any K": vs.get("any", {}).get("probe"),
            "collapse": fm["collapse"],
        }
        if r.has("stage3", "rankings.parquet") or r.has("stage3", "ranking.parquet"):
            ranked = r.stage3_rankings()
            tops = [[s for _, s in v[:100]] for v in ranked.values() if v]
            if tops:
                out["stage3"]["score@1 / @100 (mean over prompts)"] = (
                    round(sum(t[0] for t in tops) / len(tops), 4), round(sum(t[-1] for t in tops) / len(tops), 4))
    if (tx := r.summary("taxonomy")):
        hists = tx.get("histograms") or {"every_token": tx["histogram"]}
        out["taxonomy"] = {v: {"by_count": h["by_count"], "none": h["none"], "single": h["single"]}
                           for v, h in hists.items()}
    for name in ("hydra", "controls", "stage3_only"):
        if (s := r.summary(name)):
            out[name] = s
    return out


def table(runs: list[dict], stage: str) -> str:
    keys = list(dict.fromkeys(k for r in runs for k in r.get(stage, {})))
    if not keys:
        return ""
    lines = [f"| {stage} | " + " | ".join(Path(r["run"]).name for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(r.get(stage, {}).get(k, "-")) for r in runs) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", type=writable_arg, default=None)
    args = ap.parse_args()
    runs = [numbers(r) for r in args.runs]
    for stage in ("direction", "stage1", "stage2", "stage3", "taxonomy"):
        t = table(runs, stage)
        if t:
            print(t + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
