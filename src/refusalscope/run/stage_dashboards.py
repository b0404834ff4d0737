"""Pipeline stage `dashboards`: per latent a run found (Stage 1 candidates, Stage 2 and Stage 3
sets), the data of its feature dashboard, so the report and the web app read files and never
load the model (the playground aside). Runs after the analyses; reads whichever of them ran."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from ..artifacts import atomic_write, atomic_write_text
from ..interventions.features import Feature, FeatureSet
from ..methods import dashboards as dash
from ..methods import latent_effects as le
from ..methods.model_summary import model_summary
from .backend import fan_out
from .dashboard_store import index_json
from .pipeline import Context, stage_hash
from .resolve import load_prompt_set, take
from .stage_spec import Stage, StageInputs


def critical_sets(ctx: Context) -> tuple[dict, dict, dict]:
    """({prompt: Stage 1 set}, {prompt: Stage 2 set}, {prompt: Stage 3 set}) of this run."""
    r = ctx.results
    s1 = r.stage1_sets() if ctx.cfg.dashboards.stage1 else {}
    s3 = r.stage3_sets() if r.done("stage3") else {}
    return s1, r.stage2_sets(), s3


def corpus(ctx: Context) -> list[str]:
    """Refused prompts (chat-formatted, up to half the budget) then the configured corpus."""
    dc = ctx.cfg.dashboards
    prompts = [ctx.model.format_chat(p.text) for p in ctx.results.kept_prompts()][: dc.texts // 2]
    general = [p.text for spec in dc.corpus for p in load_prompt_set(spec, ctx.cfg.data.text_field)]
    return prompts + take(general, dc.texts - len(prompts), ctx.cfg.seed)


def explanations(ctx: Context, feats: FeatureSet) -> dict[str, tuple[str, str]]:
    """Per latent (explanation, source) where one exists: the semantics stage's, else
    Neuronpedia's (when the config names a Neuronpedia id). The rest are explained from their
    top contexts on the corpus (`_boards`)."""
    out = {}
    if ctx.results.done("semantics"):
        src = ctx.results.explanation_source()
        out = {f: (e, src) for f, e in ctx.results.explanations().items()}
    missing = [f for f in feats if f.id not in out]
    if missing and ctx.cfg.analyses.neuronpedia_bundle:
        from ..methods.np_bundle import read_explanations

        found_in_bundle = read_explanations(ctx.cfg.analyses.neuronpedia_bundle, missing, ctx.cfg.saes.neuronpedia_id)
        out.update({f: (e, "neuronpedia") for f, e in found_in_bundle.items()})
        missing = [f for f in missing if f.id not in out]
    if missing and ctx.cfg.saes.neuronpedia_id:
        from ..demo.recipe import cache_root
        from ..methods.semantics import NeuronpediaClient

        client = NeuronpediaClient(ctx.cfg.analyses.neuronpedia_cache or cache_root() / "neuronpedia",
                                   ctx.cfg.saes.neuronpedia_id, base_url=ctx.cfg.analyses.neuronpedia_url)
        with warnings.catch_warnings():  # said once below, as one line of the run's log
            warnings.simplefilter("ignore")
            found, gone = client.explain(missing, quiet=ctx.quiet)
        if client.offline_reason and gone:
            ctx.log(f"dashboards: {client.offline_reason}: {len(gone)} of {len(missing)} latents have no cached "
                    "Neuronpedia explanation; they are explained by their top contexts")
        out.update({f: (e, "neuronpedia") for f, e in found.items()})
    return out


LATENTS_PER_PASS = 16_384  # one corpus pass's tables: texts x latents x 24 B (79 MB at 200 texts)


def passes(by_layer: dict[int, list[int]], cap: int = LATENTS_PER_PASS) -> list[list[int]]:
    """Layers grouped, in order, into corpus passes of at most `cap` latents (a wider layer alone):
    each pass runs the model once over the corpus for all its layers, and memory holds one pass's
    tables and windows however many latents the run found."""
    out: list[list[int]] = []
    size = 0
    for layer, ix in by_layer.items():
        if not out or size + len(ix) > cap:
            out.append([])
            size = 0
        out[-1].append(layer)
        size += len(ix)
    return out


def corpus_body(ctx: Context, texts: list[str], feats: FeatureSet) -> dict:
    """One corpus pass over `feats` with the run's dashboard settings (`dash.corpus_dashboards`)."""
    dc = ctx.cfg.dashboards
    return dash.corpus_dashboards(ctx.model, ctx.saes, texts, feats, batch_size=ctx.cfg.model.batch_size,
                                  max_length=dc.max_length, top_k=dc.top_k, bands=dc.quantile_bands,
                                  per_band=dc.per_band, left=dc.context_left, right=dc.context_right,
                                  bins=dc.bins, sink_ratio=dc.sink_ratio, seed=ctx.cfg.seed, quiet=ctx.quiet)


def _boards(ctx: Context, texts: list[str], feats: FeatureSet, known: dict, by_latent: dict,
            near: dict) -> list[dash.LatentDashboard]:
    """The dashboards of one pass's latents (`passes`): what each holds is the same whichever
    layers share its pass."""
    dc, model, saes = ctx.cfg.dashboards, ctx.model, ctx.saes
    body = corpus_body(ctx, texts, feats)
    logits = dash.logit_effects(model, saes, feats, dc.logit_tokens)
    cos = dash.decoder_cosines(saes, feats, ctx.results.direction()[0])
    out = []
    for f in feats:
        expl, src = known.get(f.id) or (dash.window_explanation(body[f]["top"]), "activations")
        out.append(dash.LatentDashboard(f.id, **body[f], logits_top=logits[f][0], logits_bottom=logits[f][1],
                                        cos_direction=cos[f], fm_neighbours=near.get(f, []),
                                        effects=by_latent.get(f.id, []), explanation=expl, explanation_source=src))
    return out


def _layer_files(ctx: Context, st, feats: FeatureSet, texts: list[str], known: dict, by_latent: dict,
                 near: dict) -> list[Path]:
    """Each layer's dashboards as JSON lines in `layer-L.partial.jsonl`, written whole once its
    corpus pass is done; a file left by an interrupted run is taken as it is (the resume point),
    and only the layers without one are grouped into passes again."""
    by_layer = feats.by_layer()
    path = {layer: st.store.path(st.stage, f"layer-{layer:04d}.partial.jsonl") for layer in by_layer}
    todo = {layer: ix for layer, ix in by_layer.items() if not path[layer].exists()}
    for group in passes(todo):
        lines: dict[int, list[str]] = {layer: [] for layer in group}
        for b in _boards(ctx, texts, FeatureSet.from_layers({layer: todo[layer] for layer in group}), known,
                         by_latent, near):
            lines[Feature.of(b.feature).layer].append(json.dumps(b.to_json()) + "\n")
        for layer in group:
            atomic_write_text(path[layer], "".join(lines[layer]))
    return list(path.values())


def run_dashboards(ctx: Context) -> dict:
    name = "dashboards"
    h = stage_hash(ctx, name)
    if ctx.store.is_done(name, h):
        return ctx.results.summary(name) or {}
    dc, model, saes = ctx.cfg.dashboards, ctx.model, ctx.saes
    with ctx.store.stage(name, h) as st:
        t0 = time.perf_counter()
        s1, s2, s3 = critical_sets(ctx)
        texts = corpus(ctx)
        kept = [(p.id, p.text) for p in ctx.results.kept_prompts()]
        st.jsonl("prompt_tokens.jsonl", dash.prompt_tokens(model, kept))
        st.json("model.json", model_summary(model, saes, texts[:64], ctx.cfg.model.batch_size, dc.max_length,
                                            dc.sink_ratio))
        study = [it["feature"] for it in ctx.results.study_items()] if ctx.results.done("taxonomy") else []
        feats = FeatureSet([*(f for sets in (s2, s3, s1) for s in sets.values() for f in s), *study]).sorted()
        if not feats:
            path = st.jsonl("dashboards.jsonl", [])
            st.json("dashboards_index.json", index_json(path))
            st.summary = {"n_latents": 0, "note": "no prompt was jailbroken: no latent to show"}
            return st.summary
        ctx.log(f"dashboards: {len(feats)} latents ({len({f for s in s2.values() for f in s})} in Stage 2 sets)")
        # per prompt, P("I") with each Stage 2/3 latent ablated alone: the driver writes, shards compute
        critical = {pid: FeatureSet([*s2.get(pid, ()), *s3.get(pid, ())]) for pid in set(s2) | set(s3)}
        pairs = le.effect_pairs(critical, dc.effect_prompts, ctx.cfg.seed)
        prompts = [(pid, text) for pid, text in kept if pid in pairs]
        ck = st.checkpoint("effects", key="id")
        fan_out(ctx, "latent_effects", prompts, {"pairs": pairs, "sets": s2}, ck, "dashboards (ΔP per latent)")
        stage_of = {pid: {**{f.id: "3" for f in s3.get(pid, ())}, **{f.id: "2" for f in s2.get(pid, ())}}
                    for pid in critical}
        by_latent = le.effects_by_latent([ck.records[pid] for pid, _ in prompts], stage_of)
        near = {}
        if ctx.results.done("stage3"):
            columns, V = ctx.results.fm_embeddings()
            near = dash.fm_neighbours(V, columns, feats, dc.fm_neighbours)
        known = explanations(ctx, feats)
        n = {"latents": 0, "effects": 0, "sink": 0, "texts": 0}
        layers = _layer_files(ctx, st, feats, texts, known, by_latent, near)

        def write(tmp: str) -> None:  # the layers' files joined in order, a line at a time
            with open(tmp, "w", encoding="utf-8") as fh:
                for part in layers:
                    with open(part, encoding="utf-8") as lines:
                        for line in lines:
                            fh.write(line)
                            b = json.loads(line)
                            n["latents"] += 1
                            n["effects"] += bool(b["effects"])
                            n["sink"] += dash.sink_flagged(b["bos_texts"], b["sink_share"])
                            n["texts"] = b["n_texts"]
        path = atomic_write(st.file("dashboards.jsonl"), write)
        for part in layers:  # joined above: the layers' files are not kept
            part.unlink()
        st.json("dashboards_index.json", index_json(path))  # readers look latents up by offset
        st.summary = {"n_latents": n["latents"], "n_with_effects": n["effects"], "n_sink_flagged": n["sink"],
                      "n_fm_columns": len(near), "corpus_texts": n["texts"],
                      "seconds": round(time.perf_counter() - t0, 1)}
    ctx.log(f"dashboards: {n['latents']} latent dashboards ({n['sink']} flagged at sinks/BOS)")
    return st.summary


def latent_effects_task(ctx, items, p) -> list[dict]:
    """P("I") with each critical latent ablated alone (and left out of its Stage 2 set)."""
    return le.latent_effects(ctx.model, ctx.saes, items, p["pairs"], p["sets"], ctx.cfg.model.batch_size)


STAGE = Stage("dashboards", "last", StageInputs(
    ("dashboards", "model.batch_size", "data.text_field", "saes.neuronpedia_id", "analyses.neuronpedia_cache", "seed"),
    ("dashboards.corpus",), ("stage2",), ("stage3", "hydra", "taxonomy", "semantics"),
    bundles=("analyses.neuronpedia_bundle",)), run_dashboards, {"latent_effects": latent_effects_task})
