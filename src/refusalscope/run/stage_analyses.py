"""The paper's analyses as pipeline stages, one per analysis, each resumable and hashed:
hydra (inactive critical latents and where they wake up), stage3_only, controls (random and
O'Brien-style), ce_loss (Table 9), taxonomy (Fig 3 + human-study sample), clamping (Tables 5/6),
semantics (explanations, top terms, concept groups)."""

from __future__ import annotations

import warnings

from ..methods import ce_loss, clamping, controls, human_study, hydra, semantics, taxonomy
from ..methods.records import Activity
from .backend import fan_out
from .pipeline import Context, generation_args, stage_hash
from .resolve import load_prompt_set, take
from .stage_spec import Stage, StageInputs


def _prompts(ctx: Context, ids) -> list[tuple[str, str]]:
    return [(p.id, p.text) for p in ctx.results.kept_prompts() if p.id in ids]


def _stage(ctx: Context, name: str, compute) -> dict:
    h = stage_hash(ctx, name)
    if ctx.store.is_done(name, h):
        return ctx.store.recorded(name)["summary"]
    with ctx.store.stage(name, h) as st:
        st.summary = compute(st)
    ctx.log(f"{name}: done")
    return st.summary


def run_hydra(ctx: Context) -> dict:
    def compute(st):
        sets = ctx.results.stage2_sets()
        prompts = _prompts(ctx, sets)
        act = {pid: Activity(pid, r.active, r.inactive) for pid, r in ctx.results.stage2().items()
               if r.set is not None}
        ck = st.checkpoint("inactive_critical", key="id")
        fan_out(ctx, "inactive_critical", prompts, {"sets": sets, "activity": act}, ck, "hydra (active / inactive)")
        records = [ck.records[pid] for pid, _ in prompts]
        crit = {"counts": hydra.critical_counts(records), "records": records}
        # the paper's step 2: prompts whose jailbreak fails once the inactive latents are left out
        lost = [r["id"] for r in crit["records"]
                if r["jailbroken"].get("full") and r["jailbroken"].get("active") is False]
        wake = hydra.wake_up(ctx.model, ctx.saes, prompts, act, ctx.cfg.model.batch_size,
                             threshold=ctx.cfg.analyses.wake_threshold, ids=lost or None)
        st.json("inactive_critical.json", crit)
        st.json("wake_up.json", wake)
        return {"inactive_critical": crit["counts"], "wake_up": wake["summary"]}
    return _stage(ctx, "hydra", compute)


def run_stage3_only(ctx: Context) -> dict:
    def compute(st):
        active2 = ctx.results.active_stage2()
        # the paper's question is about prompts with a Stage 2 set (Stage 3 also ranks for the rest)
        s3 = {pid: s for pid, s in ctx.results.stage3_sets().items() if pid in active2}
        prompts = _prompts(ctx, s3)
        ck = st.checkpoint("stage3_only", key="id")
        fan_out(ctx, "stage3_only", prompts, {"stage3_sets": s3, "active_stage2": active2}, ck,
                "stage-3-only ablation")
        records = [ck.records[pid] for pid, _ in prompts]
        out = {"summary": controls.stage3_only_summary(records), "records": records}
        st.json("stage3_only.json", out)
        return out["summary"]
    return _stage(ctx, "stage3_only", compute)


def run_controls(ctx: Context) -> dict:
    def compute(st):
        sets = ctx.results.stage2_sets()
        a = ctx.cfg.analyses
        prompts = _prompts(ctx, sets)
        ck = st.checkpoint("random_control", key="id")
        fan_out(ctx, "random_control", prompts, {"sets": sets, "seeds": a.random_seeds}, ck, "random control")
        rows = [r for pid, _ in prompts for r in ck.records[pid]["rows"]]
        rnd = {**controls.random_summary(rows, a.random_seeds, len(prompts)), "records": rows}
        refused = [(p.id, p.text) for p in ctx.results.kept_prompts()]
        ck = st.checkpoint("obrien", key="id")
        fan_out(ctx, "obrien", refused, {"ks": a.obrien_ks}, ck, "O'Brien baseline")
        rows = [r for pid, _ in refused for r in ck.records[pid]["rows"]]
        obr = {"per_k": controls.obrien_summary(rows, a.obrien_ks), "records": rows}
        st.json("random_control.json", rnd)
        st.json("obrien.json", obr)
        from . import plots

        plots.obrien_curve(obr["per_k"], st.file("obrien.png"))
        return {"random": {"per_seed": [{k: r[k] for k in ("seed", "jailbroken", "asr")} for r in rnd["per_seed"]],
                           "n_prompts": len(sets)},
                "obrien": [{k: r[k] for k in ("k", "jailbroken", "asr", "mean_set_size")} for r in obr["per_k"]]}
    return _stage(ctx, "controls", compute)


def run_ce_loss(ctx: Context) -> dict:
    def compute(st):
        a = ctx.cfg.analyses
        tf = ctx.cfg.data.text_field
        instr = take([p.text for p in load_prompt_set(a.ce_instructions, tf)], a.ce_texts, ctx.cfg.seed)
        general = take([p.text for p in load_prompt_set(a.ce_general, tf)], a.ce_texts, ctx.cfg.seed)
        direction, _ = ctx.results.direction()
        sets = ctx.results.stage2_sets()
        n_total = len(sets)
        if a.ce_sets and len(sets) > a.ce_sets:  # a seeded sample of the per-prompt sets
            import random

            keep = random.Random(ctx.cfg.seed).sample(sorted(sets), a.ce_sets)
            sets = {k: sets[k] for k in sorted(keep)}
        rows = ce_loss.ce_table(ctx.model, ctx.saes, [ce_loss.TextSet("instructions", instr, chat=True),
                                                      ce_loss.TextSet("general", general)],
                                direction, sets, batch_size=ctx.cfg.model.batch_size, quiet=ctx.quiet,
                                checkpoint=st.checkpoint("losses", key="key"))
        for r in rows:
            r["n_sets_total"] = n_total if r["setting"] == "features" else None
        st.json("table9.json", rows)
        return {"rows": rows, "sets": {"evaluated": len(sets), "of": n_total, "cap": a.ce_sets}}
    return _stage(ctx, "ce_loss", compute)


def run_taxonomy(ctx: Context) -> dict:
    """Figure 3 as the paper counts (a latent is active on a category if non-zero on any token,
    BOS included), the same histogram with sink positions left out beside it, and the human-study
    sample drawn from the view `analyses.taxonomy_sinks` picks. Both passes over the prompts are
    checkpointed per chunk (`views.partial.jsonl`, `candidates.partial.jsonl`): a killed stage
    resumes from its last finished chunk."""
    def compute(st):
        a = ctx.cfg.analyses
        prompts = taxonomy.taxonomy_prompts([p for s in a.taxonomy_prompts
                                             for p in load_prompt_set(s, ctx.cfg.data.text_field)],
                                            a.taxonomy_field, a.taxonomy_only)
        feats = ctx.results.critical_features().ids()
        bs = ctx.cfg.model.batch_size
        every, no_sinks = taxonomy.category_views(ctx.model, ctx.saes, prompts, feats, bs, quiet=ctx.quiet,
                                                  checkpoint=st.checkpoint("views", key="start"))
        hists = {}
        for view, act in (("every_token", every), ("sinks_skipped", no_sinks)):
            hists[view] = taxonomy.category_histogram(taxonomy.category_map(act))
        taxonomy.plot_category_histogram(hists["every_token"], st.file("categories.png"),
                                         f"Features by harm type, any token incl. BOS (paper; {len(feats)} features)")
        taxonomy.plot_category_histogram(hists["sinks_skipped"], st.file("categories_sinks_skipped.png"),
                                         f"Features by harm type, sink positions skipped ({len(feats)} features)")
        main = every if a.taxonomy_sinks == "keep" else no_sinks
        import random

        pool = taxonomy.LatentPool(ctx.saes, exclude=feats)  # lazy: every latent of every layer
        extra = random.Random(ctx.cfg.seed).sample(pool, min(len(pool), 400))
        cand = taxonomy.category_activity(ctx.model, ctx.saes, prompts, extra, bs,
                                          sink_ratio=None if a.taxonomy_sinks == "keep" else 4.0,
                                          checkpoint=st.checkpoint("candidates", key="start"))
        study = human_study.sample_study(taxonomy.category_map(main), cand, seed=ctx.cfg.seed)
        st.json("category_activity.json", every)
        st.json("category_activity_sinks_skipped.json", no_sinks)
        st.json("study_items.json", study)
        main_view = "every_token" if a.taxonomy_sinks == "keep" else "sinks_skipped"
        return {"histogram": hists[main_view], "view": main_view, "histograms": hists,
                "study": human_study.study_breakdown(study), "n_features": len(feats), "n_prompts": len(prompts)}
    return _stage(ctx, "taxonomy", compute)


def run_clamping(ctx: Context) -> dict:
    def compute(st):
        a = ctx.cfg.analyses
        feats = ctx.results.woken_at_bos()
        if not feats:
            return {"features": [], "rows": [], "note": "no dormant latent woke up on BOS"}
        rows = clamping.bos_clamp(ctx.model, ctx.saes, feats, a.clamp_prompts or clamping.BENIGN_PROMPTS,
                                  a.clamp_values, a.clamp_tokens, ctx.cfg.generation.batch_size)
        st.json("clamping.json", rows)
        return {"features": feats.ids(), "rows": rows}
    return _stage(ctx, "clamping", compute)


def run_semantics(ctx: Context) -> dict:
    """Explanations of every Stage 1, 2 and 3 latent; top terms per stage (Table 4 is Stage 1's)
    and concept groups (Tables 7/8/10/11; Stage 3 = latents found at neither Stage 1 nor 2). The
    corpus pass is checkpointed per chunk (`top_activations.partial.jsonl`)."""
    def compute(st):
        a = ctx.cfg.analyses
        crit = ctx.results.critical_features()
        s1 = ctx.results.stage1_features()
        feats = (crit | s1).sorted().ids()
        s2 = {f.id for s in ctx.results.stage2_sets().values() for f in s}
        s1_ids = set(s1.ids())
        expl, missing, source = {}, [], "activations"
        if a.neuronpedia_bundle:
            from ..methods.np_bundle import read_explanations

            expl = read_explanations(a.neuronpedia_bundle, feats, ctx.cfg.saes.neuronpedia_id)
            source = "neuronpedia"
            ctx.log(f"semantics: {len(expl)} of {len(feats)} explanations from the Neuronpedia bundle "
                    f"{a.neuronpedia_bundle}")
        asked = [f for f in feats if f not in expl]
        missing = asked if a.neuronpedia_bundle else []
        if ctx.cfg.saes.neuronpedia_id and asked:
            from ..demo.recipe import cache_root

            cache = a.neuronpedia_cache or cache_root() / "neuronpedia"
            client = semantics.NeuronpediaClient(cache, ctx.cfg.saes.neuronpedia_id, base_url=a.neuronpedia_url)
            with warnings.catch_warnings():  # said once below, as one line of the run's log
                warnings.simplefilter("ignore")
                found, missing = client.explain(asked)
            expl.update(found)
            source = "neuronpedia"
            if client.offline_reason:
                ctx.log(f"semantics: {client.offline_reason}: {len(expl)} of {len(feats)} explanations from the "
                        f"cache {cache}, none for {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
                        "those are explained by their top activations and the run continues")
        texts = [p.text for p in load_prompt_set("bundled:general")]
        texts += [ctx.model.format_chat(p.text) for p in ctx.results.kept_prompts()]
        top = semantics.top_activations(ctx.model, ctx.saes, texts[: a.explain_texts], feats,
                                        batch_size=ctx.cfg.model.batch_size, quiet=ctx.quiet,
                                        checkpoint=st.checkpoint("top_activations", key="start"))
        for f in feats:
            expl.setdefault(f, semantics.activation_explanation(top.get(f, [])))
        st.json("explanations.json", {"source": source, "missing_from_neuronpedia": missing,
                                      "explanations": expl, "top_activations": top})
        by_stage = {"stage1": sorted(s1_ids), "stage2": sorted(s2),
                    "stage3": [f for f in crit.ids() if f not in s2 and f not in s1_ids]}
        groups = {name: semantics.group_by_concepts({f: expl[f] for f in fs}) for name, fs in by_stage.items()}
        terms = semantics.top_terms({f: expl[f] for f in crit.ids()})
        stage_terms = {name: semantics.top_terms({f: expl[f] for f in fs}) for name, fs in by_stage.items()}
        st.json("concepts.json", {"groups": groups, "top_terms": terms, "top_terms_by_stage": stage_terms})
        st.json("table4.json", {"stage": "stage1", "n_features": len(s1_ids), "top_terms": stage_terms["stage1"]})
        return {"source": source, "n_features": len(feats), "missing": len(missing), "top_terms": terms[:15],
                "table4": stage_terms["stage1"][:15], "n_by_stage": {k: len(v) for k, v in by_stage.items()},
                "groups": {k: {c: len(v) for c, v in g.items()} for k, g in groups.items()}}
    return _stage(ctx, "semantics", compute)


def inactive_critical_task(ctx, items, p) -> list[dict]:
    return hydra.inactive_critical(ctx.model, ctx.saes, items, p["sets"], p["activity"], ctx.judge,
                                   **generation_args(ctx))["records"]


def _by_prompt(items, rows) -> list[dict]:
    return [{"id": pid, "rows": [r for r in rows if r["id"] == pid]} for pid, _ in items]


def random_control_task(ctx, items, p) -> list[dict]:
    rows = controls.random_control(ctx.model, ctx.saes, items, p["sets"], ctx.judge, seeds=p["seeds"],
                                   **generation_args(ctx))["records"]
    return _by_prompt(items, rows)


def obrien_task(ctx, items, p) -> list[dict]:
    rows = controls.obrien_baseline(ctx.model, ctx.saes, items, ctx.judge, ks=p["ks"],
                                    **generation_args(ctx))["records"]
    return _by_prompt(items, rows)


def stage3_only_task(ctx, items, p) -> list[dict]:
    return controls.stage3_only(ctx.model, ctx.saes, items, p["stage3_sets"], p["active_stage2"], ctx.judge,
                                **generation_args(ctx))["records"]


STAGES = (
    Stage("hydra", "analysis", StageInputs(
        ("model.batch_size", "judge", "generation", "analyses.wake_threshold", "seed"), (), ("stage2",)),
        run_hydra, {"inactive_critical": inactive_critical_task}),
    Stage("stage3_only", "analysis", StageInputs(("judge", "generation", "seed"), (), ("stage3",)),
          run_stage3_only, {"stage3_only": stage3_only_task}),
    Stage("controls", "analysis", StageInputs(
        ("judge", "generation", "analyses.random_seeds", "analyses.obrien_ks", "seed"), (), ("stage2",)),
        run_controls, {"random_control": random_control_task, "obrien": obrien_task}),
    Stage("ce_loss", "analysis", StageInputs(
        ("model.batch_size", "data.text_field", "analyses.ce_instructions", "analyses.ce_general",
         "analyses.ce_texts", "analyses.ce_sets", "seed"),
        ("analyses.ce_instructions", "analyses.ce_general"), ("stage2", "direction")), run_ce_loss),
    Stage("taxonomy", "analysis", StageInputs(
        ("model.batch_size", "data.text_field", "analyses.taxonomy_prompts", "analyses.taxonomy_field",
         "analyses.taxonomy_only", "analyses.taxonomy_sinks", "seed"),
        ("analyses.taxonomy_prompts",), ("stage3",)), run_taxonomy),
    Stage("clamping", "analysis", StageInputs(
        ("generation", "analyses.clamp_values", "analyses.clamp_prompts", "analyses.clamp_tokens"), (), ("hydra",)),
        run_clamping),
    Stage("semantics", "analysis", StageInputs(
        ("model.batch_size", "analyses.explain_texts", "analyses.neuronpedia_cache", "analyses.neuronpedia_url",
         "saes.neuronpedia_id"), (), ("stage3",), bundles=("analyses.neuronpedia_bundle",)), run_semantics),
)
