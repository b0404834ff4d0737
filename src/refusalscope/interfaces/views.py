"""What the report and the web app's overview show, section by section in pipeline order: the
paper's tables (the rows `tables.py` prints in the terminal), its figures (the stages' PNGs, or
drawn here from the numbers) and one sentence per section on what it shows. A stage that did
not run, or whose artifacts are missing, gives a section that says so instead of failing.

Everything is read through `RunResults`; nothing here touches JSON or the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UserError
from ..run.results import RunResults
from . import figures
from .tables import summary_tables


@dataclass
class Section:
    id: str
    title: str
    caption: str
    tables: list[tuple[str, list[dict]]] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)  # {"src": data URI, "alt": ..., "caption": ...}
    note: str | None = None  # set when the section has nothing to show, and why
    extra: dict = field(default_factory=dict)  # section-specific data for its template part


SECTIONS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("config", "Run configuration", (),
     "The config this run used, every default filled in, and how long each stage took."),
    ("model", "Model and SAEs", ("dashboards",),
     "The chat model dissected and the SAE on each residual layer: width, mean L0 on the run's corpus (BOS and other "
     "attention sinks left out) and the share of latents that never fired there."),
    ("direction", "Refusal direction", ("direction",),
     "The difference-in-means direction r̂(l*): attack success rate (ASR) when it is ablated from every layer, the "
     "refusal ActAdd induces on harmless prompts, a random-direction control, and its alignment per layer (Figs 4/5)."),
    ("stage1", "Stage 1: top-K aligned latents", ("stage1",),
     "Per refused prompt, the smallest K such that ablating the K latents per layer whose decoders align best with "
     "r̂ jailbreaks it."),
    ("stage2", "Stage 2: minimal faithful sets (Table 1)", ("stage2",),
     "Algorithm 1 prunes each Stage 1 set to the smallest set that still jailbreaks, over the τ sweep and three "
     "seeds; Table 1 counts the latents and the share inactive on their own prompt."),
    ("stage3", "Stage 3: interaction discovery (Table 2)", ("stage3",),
     "A factorization machine over SAE activations ranks new latents by embedding similarity to the Stage 2 "
     "sets; ablating the active Stage 2 latents plus the top K jailbreaks the prompts in Table 2, compared with a "
     "linear probe's top K."),
    ("hydra", "Hydra latents: inactive yet critical", ("hydra",),
     "Stage 2 latents that are silent on their prompt yet needed for its jailbreak, and where they wake up once "
     "the active part of the set is ablated (BOS, system tokens or elsewhere)."),
    ("stage3_only", "Stage 3 latents alone", ("stage3_only",),
     "Whether ablating only the Stage 3 latents jailbreaks, and how many active Stage 2 latents it switches off."),
    ("controls", "Controls: random latents and the O'Brien baseline", ("controls",),
     "Jailbreaks by as many random active latents as each Stage 2 set (per seed), and by ablating every latent "
     "active on at least k prompt tokens (O'Brien-style, Fig 6)."),
    ("ce_loss", "Cross-entropy cost of the ablations (Table 9)", ("ce_loss",),
     "Mean next-token cross-entropy on instruction and general texts, plain, with r̂ ablated and with a Stage 2 "
     "set ablated: what the ablations cost the model elsewhere."),
    ("taxonomy", "Unsafe taxonomy (Fig 3)", ("taxonomy",),
     "How many critical latents fire on prompts of one unsafe category or of several, and the sample drawn for "
     "the human study."),
    ("clamping", "Clamping woken latents at BOS (Tables 5/6)", ("clamping",),
     "Benign prompts answered with the woken hydra latents clamped to fixed values on the BOS token."),
    ("semantics", "What the latents mean (Tables 4, 7, 8)", ("semantics",),
     "The most frequent words in the latents' explanations and the latents grouped by concept, for Stage 2 and "
     "Stage 3 separately."),
    ("eval", "Beyond one prompt: interventions on held-out and benchmark sets", ("eval",),
     "The latents most often critical (core sets of N), matched random latents, the unions and the direction, "
     "each applied to every prompt of the held-out split and the benchmarks: jailbreak or refusal rate per "
     "dataset part, and the cost (degenerate replies, KL on harmless prompts, ΔCE on general text)."),
]


def _missing(stage: str, results: RunResults) -> str:
    cmd = stage if stage in ("filter", "direction", "stage1", "stage2", "stage3", "eval") else f"analyze {stage}"
    also = "; it is not part of `refusalscope run`" if stage == "eval" else " (or `refusalscope run`)"
    return (f"The `{stage}` stage did not run for this run directory: "
            f"run `refusalscope {cmd} -r {results.root}`{also} to fill this section.")


def _summary(results: RunResults, stage: str) -> dict:
    """A finished stage's summary (the section was built only because the stage is done)."""
    return results.summary(stage) or {}


def _figure(results: RunResults, stage: str, name: str, alt: str) -> list[dict]:
    p = results.figure(stage, name)
    return [{"src": figures.data_uri(p), "alt": alt}] if p else []


def _drawn(draw: Callable[[], bytes], alt: str) -> list[dict]:
    return [{"src": figures.data_uri(draw()), "alt": alt}]


def _fmt_rows(frame, cols: list[str]) -> list[dict]:
    return [{c: r[c] for c in cols if c in r} for r in frame.to_dict(orient="records")]


def build_sections(results: RunResults, latent_url: Callable[[str], str]) -> list[Section]:
    """Every section of the report, in pipeline order."""
    summaries = {s: results.summary(s) for s in results.stages() if results.done(s)}
    tables = summary_tables(summaries)
    out = []
    for sid, title, needs, caption in SECTIONS:
        sec = Section(sid, title, caption)
        missing = [s for s in needs if not results.done(s)]
        if missing:
            sec.note = _missing(missing[0], results)
        else:
            try:
                sec.tables = list(tables.get(sid, []))
                FILLERS.get(sid, lambda *_: None)(sec, results, latent_url)
            except (UserError, KeyError, ValueError) as err:  # a damaged or partial artifact
                sec.tables, sec.figures = [], []
                sec.note = f"This section could not be read: {err}"
        out.append(sec)
    return out


# ----------------------------------------------------------------- section fillers
def _config(sec: Section, results: RunResults, _) -> None:
    rows = [{"stage": name, "status": s.get("status"), "seconds": s.get("seconds"),
             "backend": ", ".join(sorted({e.get("backend", "") for e in s.get("executed", {}).values()})) or "-"}
            for name, s in results.stages().items()]
    sec.tables = [("Stages", rows)]
    sec.extra = {"config": results.config_text() or "(no config.yaml in the run directory)"}


def _model(sec: Section, results: RunResults, _) -> None:
    m = results.model_summary()
    sec.tables = [("Model", [m["model"]]),
                  (f"SAEs ({len(m['saes'])} layers; L0 and dead share on {m['n_texts']} corpus texts)",
                   [{"layer": s["layer"], "width": s["d_sae"], "architecture": s["architecture"], "L0": s["l0"],
                     "dead share": s["dead_share"], "hook": s["hook"]} for s in m["saes"]])]


def _direction(sec: Section, results: RunResults, _) -> None:
    t = results.direction_candidates()
    cols = [c for c in ("position", "layer", "p_refusal_ablated", "kl_harmless", "asr_val", "selected") if c in t]
    sec.tables.append(("Candidate layers", _fmt_rows(t.sort_values("layer"), cols)))
    sec.figures = (_figure(results, "direction", "candidates.png", "ASR, P(refusal) and KL per candidate layer")
                   + _figure(results, "direction", "cosine.png", "cosine of the last-token stream with r̂ per layer"))


def _stage1(sec: Section, results: RunResults, _) -> None:
    sec.figures = _figure(results, "stage1", "k_distribution.png", "smallest jailbreaking K per prompt")


def _stage2(sec: Section, results: RunResults, _) -> None:
    t = results.per_tau()
    if len(t):
        g = t.groupby("tau").agg(mean_size=("size", "mean"), jailbroken=("jailbroken", "sum"),
                                 prompts=("id", "count")).reset_index()
        sec.tables.append(("Per τ (consensus over seeds)", [
            {"τ": r["tau"], "mean set size": round(r["mean_size"], 2), "jailbroken": int(r["jailbroken"]),
             "prompts": int(r["prompts"])} for r in g.to_dict(orient="records")]))
    sec.figures = _figure(results, "stage2", "tau_sweep.png", "set size and jailbroken share per τ")


def _stage3(sec: Section, results: RunResults, _) -> None:
    rows = _summary(results, "stage3")["probe_vs_fm"]
    sec.figures = _drawn(lambda: figures.probe_vs_fm(rows), "jailbroken prompts per K, FM vs linear probe")


def _hydra(sec: Section, results: RunResults, latent_url) -> None:
    w = _summary(results, "hydra")["wake_up"]
    if w["n_woken"]:
        sec.figures = _drawn(lambda: figures.wake_regions(w["firing_shares"], w["n_woken"]),
                             "share of woken-latent firings per prompt region")
    wake = results.wake_up()
    sec.extra = {"woken": [{"prompt": r["id"], "latents": [
        {"id": x["feature"], "regions": sorted({h["region"] for h in x["firings"]}),
         "tokens": [h["token"] for h in x["firings"]][:6]} for x in r["woken"]]}
        for r in wake["records"] if r["woken"]]}


def _controls(sec: Section, results: RunResults, _) -> None:
    s, s2 = _summary(results, "controls"), results.summary("stage2")
    if s2 and s["random"]["per_seed"]:
        sec.figures = _drawn(lambda: figures.random_vs_critical(s["random"]["per_seed"], s2["jailbroken"],
                                                                s["random"]["n_prompts"]),
                             "jailbreaks by Stage 2 sets vs random latents")
    sec.figures += _figure(results, "controls", "obrien.png", "ASR of the O'Brien-style baseline per k")


def _ce(sec: Section, results: RunResults, _) -> None:
    rows = results.ce_table()
    sec.figures = _drawn(lambda: figures.ce_loss(rows), "CE loss per dataset and setting")


def _taxonomy(sec: Section, results: RunResults, _) -> None:
    study = _summary(results, "taxonomy").get("study", {})
    sec.tables.append(("Human-study sample: items by source and number of activated categories",
                       [{"source": src, **{f"{k} categories": n for k, n in c.items()}} for src, c in study.items()]))
    sec.figures = _figure(results, "taxonomy", "categories.png", "critical latents per unsafe category")


def _clamping(sec: Section, results: RunResults, _) -> None:
    rows = results.clamping()
    if rows:
        sec.tables = [("Tables 5/6: replies with the woken latents clamped at BOS",
                       [{"prompt": r["prompt"], "clamp": r["clamp"], "reply": r["response"]} for r in rows])]
    else:
        sec.note = _summary(results, "clamping").get("note") or "No latent to clamp."


def _semantics(sec: Section, results: RunResults, latent_url) -> None:
    c = results.concepts()
    sec.tables.insert(0, ("Table 4: most frequent words in the explanations",
                          [{"word": w, "latents": n} for w, n in c["top_terms"][:20]]))
    sec.extra = {"groups": c["groups"], "source": results.explanation_source()}


def _eval(sec: Section, results: RunResults, _) -> None:
    s = _summary(results, "eval")
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    side = ("degenerate", "kl harmless", "ce delta")
    sec.tables = [("Per intervention: rates per dataset part (harmful parts: jailbroken, others: refused)", [
        {"intervention": r["intervention"] + (f" = {r['same_as']}" if r.get("same_as") else ""),
         "latents": r["latents"], **{k: pct(v) for k, v in r.items()
                                     if k not in ("intervention", "latents", "same_as", *side)},
         "degenerate": pct(r["degenerate"]), "KL harmless (nats)": r["kl harmless"],
         "ΔCE (nats/token)": r["ce delta"]} for r in s.get("rows", [])])]
    if s.get("notes"):
        sec.tables.append(("Left out", [{"note": n} for n in s["notes"]]))
    names = {"core_curve": "held-out jailbreak rate of the core set as N grows, against random latents and r̂",
             "heatmap": "rate per intervention and dataset part", "tradeoff": "jailbreak rate against KL and ΔCE"}
    sec.figures = [f for n, alt in names.items() for f in _figure(results, "eval", f"{n}.png", alt)]


FILLERS = {"config": _config, "model": _model, "direction": _direction, "stage1": _stage1, "stage2": _stage2,
           "stage3": _stage3, "hydra": _hydra, "controls": _controls, "ce_loss": _ce, "taxonomy": _taxonomy,
           "clamping": _clamping, "semantics": _semantics, "eval": _eval}
