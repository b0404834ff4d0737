"""Rich tables for the terminal: one generic printer plus the demo world's two quality tables."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

console = Console()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


fmt = _fmt  # the number format of every table, terminal and HTML alike


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    if not rows:
        console.print(f"[bold]{title}[/bold]: (empty)")
        return
    columns = list(columns or rows[0].keys())
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(str(c), justify="right" if isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        table.add_row(*[_fmt(r.get(c, "")) for c in columns])
    console.print(table)


def print_quality(quality: dict) -> None:
    rows = [{"set": r["set"], "n": r["n"], "refused %": round(100 * r["refused"], 1),
             "degenerate %": round(100 * r["degenerate"], 1), "mean P(I)": r["mean_p_I"]}
            for r in quality["rows"]]
    print_table(f"Demo model refusal rates ({quality['judge']} judge, greedy, "
                f"{quality['max_new_tokens']} tokens)", rows)


def print_examples(examples: list[dict], per_set: int = 2) -> None:
    """A few replies per quality set, so coherence can be judged by eye."""
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for e in examples:
        if seen.get(e["set"], 0) < per_set:
            seen[e["set"]] = seen.get(e["set"], 0) + 1
            rows.append({"set": e["set"], "prompt": e["prompt"][:50], "reply": e["reply"][:90].replace("\n", " "),
                         "refused": e["refused"]})
    print_table("Example replies of the demo model", rows)


def print_sae_quality(sae_quality: dict) -> None:
    rows = [{"layer": int(l), "explained var": q["explained_variance"], "L0": q["l0"],
             "dead %": round(100 * q["dead_fraction"], 2), "CE base": q["ce_base"],
             "CE spliced": q["ce_spliced"], "CE +": q["ce_increase"]}
            for l, q in sorted(sae_quality["layers"].items(), key=lambda kv: int(kv[0]))]
    print_table(f"Demo SAEs (JumpReLU, {sae_quality.get('d_sae')} latents, trained on "
                f"{sae_quality.get('train_tokens')} tokens)", rows)


def print_stage_summaries(result: dict) -> None:
    """One table per pipeline stage that ran, in pipeline order."""
    for tables in summary_tables(result).values():
        for title, rows in tables:
            print_table(title, rows)
    if "run" in result:
        console.print(f"run directory: {result['run']}")


def summary_tables(result: dict) -> dict[str, list[tuple[str, list[dict]]]]:
    """Per stage in `result` ({stage: summary}), its tables as (title, rows) in pipeline order:
    what the terminal prints and what the HTML report and web app show."""
    out: dict[str, list[tuple[str, list[dict]]]] = {}
    if "filter" in result:
        f = result["filter"]
        out["filter"] = [("Refusal filter (harmful test prompts)",
                          [{"judge": f["judge"], "prompts": f["n_in"], "refused (kept)": f["n_kept"],
                            "dropped": f["n_dropped"], "held out": f.get("n_heldout", 0),
                            "decided by": " ".join(f"{k}:{n}" for k, n in f.get("decided_by", {}).items()) or "-"}])]
    if "direction" in result:
        d = result["direction"]
        out["direction"] = [("Refusal direction", [{
            "l*": d["layer"], "ASR before": d["asr_before_all_test"],
            "ASR ablated": d["asr_after_ablation"], "degenerate": d["degenerate_after_ablation"],
            "harmless refused": d["refusal_harmless_plain"], "refused w/ ActAdd": d["refusal_harmless_actadd"],
            "ASR random dir": ", ".join(str(x) for x in d["asr_random_direction"]) or "-"}])]
    if "stage1" in result:
        s = result["stage1"]
        out["stage1"] = [("Stage 1 (top-K aligned latents per layer)", [{
            "prompts": s["prompts"], "jailbroken": s["jailbroken"], "share": s["jailbroken_share"],
            "mean K": s["k_mean"], "K histogram": " ".join(f"{k}:{n}" for k, n in s["k_histogram"].items())}])]
    if "stage2" in result:
        t = result["stage2"]
        fp = t["forward_passes"]
        out["stage2"] = [("Table 1: jailbreak statistics after Stage 2", [{
            "unique latents": t["unique_latents"], "jailbroken / refused": f"{t['jailbroken']} / {t['refused']}",
            "mean set size": t["mean_set_size"], "inactive share": t["inactive_share"]}]),
            ("Stage 2 forward passes (all prompts)", [{
                "literal (sequential)": fp["literal_sequential"], "batched (sequential)": fp["batched_sequential"],
                "batched rows": fp["batched_rows"], "seconds": t["seconds"]}])]
    out.update(analysis_tables(result))
    return out


def print_analysis_summaries(result: dict) -> None:
    """Stage 3 and the analyses, in the paper's table layouts where it has one."""
    for tables in analysis_tables(result).values():
        for title, rows in tables:
            print_table(title, rows)


def analysis_tables(result: dict) -> dict[str, list[tuple[str, list[dict]]]]:
    """Stage 3 and the analyses as (title, rows) per stage."""
    out: dict[str, list[tuple[str, list[dict]]]] = {}
    if "stage3" in result:
        s = result["stage3"]
        fm, t2 = s["fm"], s["table2"]
        out["stage3"] = [("Stage 3: factorization machine", [{
            "rows": fm["rows"], "latent columns": fm["columns"], "best epoch": fm["best_epoch"],
            "rows are": fm.get("mode", "pooled"), "FM test acc": fm["test_acc"],
            "per prompt": fm.get("test_prompt_acc", "-"), "probe test acc": s["probe"]["test_acc"],
            "collapse (mean cos)": ", ".join(f"k={k}: {v}" for k, v in fm["collapse"].items())}]),
            ("Table 2: jailbreaks with Stage 2 + top-K Stage 3 latents", [{
                "ranking": "{mode} ({aggregate} cosine)".format(
                    **s.get("ranking", {"mode": "global", "aggregate": "max"})),
                "jailbroken / refused": f"{t2['jailbroken']} / {t2['refused']}", "mean K": t2["mean_k"],
                "unique Stage 3 latents": t2["unique_stage3_latents"],
                "K histogram": " ".join(f"{k}:{n}" for k, n in t2["k_histogram"].items())}]),
            ("FM vs linear probe (jailbroken prompts per K)", s["probe_vs_fm"])]
    if "hydra" in result:
        c, w = result["hydra"]["inactive_critical"], result["hydra"]["wake_up"]
        out["hydra"] = [("Inactive critical latents (Stage 2 sets)", [{
            "prompts": c["n_prompts"], "with inactive": c["n_with_inactive"],
            "inactive latents": c["n_inactive_latents"], "jailbroken (full set)": c["jailbroken_full"],
            "active only": c["jailbroken_active_only"], "inactive only": c["jailbroken_inactive_only"],
            "lost w/o inactive": c["lost_without_inactive"]}]),
            ("Hydra wake-up (dormant latents after ablating the active set)", [{
                "prompts picked by": _hydra_rule(w), "prompts kept": w["n_kept"],
                "dormant": w["n_redundant"], "woken": w["n_woken"],
                "on system tokens": w["system_share"], "BOS of those": w["bos_share_of_system"],
                "top tokens": ", ".join(repr(t) for t, _ in (w["top_tokens"] or [])[:5])}])]
    if "stage3_only" in result:
        s = result["stage3_only"]
        out["stage3_only"] = [("Ablating Stage 3 latents only", [{k: s.get(k) for k in
                               ("jailbroken", "deactivated_mean", "deactivated_max", "drop_mean", "n_still_active")}])]
    if "controls" in result:
        c = result["controls"]
        out["controls"] = [(f"Random-latent control ({c['random']['n_prompts']} prompts)", c["random"]["per_seed"]),
                           ("O'Brien-style baseline (latents active on >= k tokens)", c["obrien"])]
    if "ce_loss" in result:
        out["ce_loss"] = [("Table 9: cross-entropy loss", [
            {k: r[k] for k in ("dataset", "setting", "mean", "std", "n_texts")} for r in result["ce_loss"]["rows"]])]
    if "taxonomy" in result:
        t = result["taxonomy"]
        views = t.get("histograms") or {"every_token": t["histogram"]}
        out["taxonomy"] = [("Fig 3: critical latents by unsafe categories they fire on", [
            {"tokens": {"every_token": "all (paper)", "sinks_skipped": "no sinks"}.get(v, v),
             **{f"only {c}": n for c, n in h["single"].items()},
             **{f"{k} types": n for k, n in h["by_count"].items() if k != "1"}, "none": h["none"]}
            for v, h in views.items()])]
    if "clamping" in result:
        rows = result["clamping"]["rows"]
        out["clamping"] = [("Tables 5/6: clamping woken latents at BOS", [
            {"prompt": r["prompt"][:40], "clamp": r["clamp"], "response": r["response"][:60]} for r in rows]
            if rows else [{"note": result["clamping"].get("note", "")}])]
    if "semantics" in result:
        s = result["semantics"]
        out["semantics"] = [(f"Feature semantics ({s['source']} explanations, {s['n_features']} latents)", [
            {"stage": k, **g} for k, g in s["groups"].items()])]
        if "table4" in s:
            out["semantics"].append(("Table 4: most frequent terms in Stage 1 latents' explanations",
                                     [{"term": t, "count": n} for t, n in s["table4"]]
                                     or [{"note": "no content words in the Stage 1 explanations"}]))
    if "dashboards" in result and result["dashboards"].get("n_latents"):
        d = result["dashboards"]
        out["dashboards"] = [("Latent dashboards", [{
            "latents": d["n_latents"], "with ΔP('I')": d["n_with_effects"], "flagged at sinks/BOS": d["n_sink_flagged"],
            "FM columns": d["n_fm_columns"], "corpus texts": d["corpus_texts"]}])]
    return out


def print_eval(summary: dict) -> None:
    """The eval matrix in two tables: per intervention, the rate per dataset part (harmful parts:
    jailbroken, others: refused), then the side effects (degenerate share over all prompts, KL on
    harmless prompts, change in CE on general text)."""
    rows = summary["rows"]
    if not rows:
        console.print("eval: no interventions")
        return
    from rich.markup import escape

    side = ("degenerate", "kl harmless", "ce delta")
    rates = [k for k in rows[0] if k not in ("intervention", "latents", "same_as", *side)]
    name = lambda r: escape(r["intervention"] + (f" = {r['same_as']}" if r.get("same_as") else ""))  # noqa: E731
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    sets = ", ".join(f"{k} ({v})" for k, v in summary["datasets"].items())
    t = Table(title=f"Eval: refusal per dataset part [{sets}]", title_justify="left")
    t.add_column("intervention", no_wrap=True)
    t.add_column("latents", justify="right")
    for k in rates:
        t.add_column(k.replace(" ", "\n"), justify="right")
    for r in rows:
        t.add_row(name(r), str(r["latents"]), *[pct(r.get(k)) for k in rates])
    console.print(t)
    ce = f", CE on {summary['ce_texts']} general texts" if summary.get("ce_texts") else ""
    t = Table(title=f"Eval: side effects (KL on harmless prompts{ce})", title_justify="left")
    for k in ("intervention", "degenerate", "KL harmless (nats)", "ΔCE (nats/token)"):
        t.add_column(k, no_wrap=k == "intervention", justify="left" if k == "intervention" else "right")
    for r in rows:
        t.add_row(name(r), pct(r["degenerate"]), *["-" if r[k] is None else f"{r[k]:.4g}"
                                                             for k in ("kl harmless", "ce delta")])
    console.print(t)
    if summary.get("harmless_judge"):
        console.print(f"replies to harmless prompts judged by {summary['harmless_judge']}")
    for note in summary.get("notes", []):
        console.print(f"note: {escape(note)}")


def _hydra_rule(wake: dict) -> str:
    """Which rule chose the wake-up prompts (docs/paper-fidelity.md#the-hydra-criterion-and-its-fallback)."""
    if wake.get("impact") == "ids":
        return "jailbreak lost without the inactive latents"
    return f"fallback: P('I') moves >= {wake.get('threshold', 0.1):g} (relative) when they are added"
