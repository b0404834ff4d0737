"""Stage `eval` (`refusalscope eval`, not part of `run`): interventions (rows) × datasets
(columns). Per-prompt work fans out as (intervention, dataset, chunk) items; each item is cached
by what it depends on (the config, the row's latents or direction, the chunk's prompts), so
adding a dataset or an intervention later runs only what is new, and a killed eval resumes."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd

from ..artifacts import Checkpoint, config_hash
from ..errors import UserError
from ..interventions.features import FeatureSet
from ..io.prompts import Prompt
from ..measures.judges import make_judge
from ..methods import eval_matrix as em
from ..methods.ce_loss import TextSet, loss_sum
from .backend import fan_out
from .pipeline import Context, stage_hash
from .resolve import load_prompt_set, take
from .stage_spec import Stage, StageInputs

RUN_SETS = ("heldout", "search")


# ----------------------------------------------------------------- what to evaluate
def resolve_datasets(ctx: Context) -> tuple[dict[str, list[Prompt]], list[str] | None, list[str]]:
    """The prompt datasets by name (each a seeded draw of at most eval.max_prompts), the general
    texts for CE (None when not selected), and notes on datasets left out."""
    cfg, ec = ctx.cfg, ctx.cfg.eval
    tf = cfg.data.text_field
    prompts: dict[str, list[Prompt]] = {}
    texts, notes = None, []
    for spec in ec.datasets:
        if spec == "general":
            texts = take([p.text for p in load_prompt_set(ec.general_text, tf)], ec.ce_texts, cfg.seed)
            continue
        name, ps = _dataset(ctx, spec)
        if name in prompts or (name == "general" and spec != "general"):
            raise UserError(f"eval dataset name {name!r} is used twice: name one of them NAME=PATH")
        if not ps:
            notes.append("heldout: the run holds no prompts out (data.heldout_fraction = 0): set it to "
                         "measure transfer to prompts the sets were not found on" if spec == "heldout"
                         else f"{name}: no prompts")
            continue
        prompts[name] = take(ps, ec.max_prompts, cfg.seed)
    return prompts, texts, notes


def _dataset(ctx: Context, spec: str) -> tuple[str, list[Prompt]]:
    if spec == "heldout":
        return spec, ctx.results.heldout_prompts()
    if spec == "search":
        return spec, ctx.results.kept_prompts()
    tf = ctx.cfg.data.text_field
    if spec == "harmless":
        return spec, load_prompt_set(ctx.cfg.data.harmless_test, tf, label="harmless")
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).exists():
        path = spec
        name = spec.split(":")[1] if spec.startswith("bundled:") else Path(spec).stem.split("::")[0]
    if not name or name in RUN_SETS + ("harmless",):
        raise UserError(f"eval dataset {spec!r} needs another name: write NAME=PATH")
    return name, load_prompt_set(path, tf)


def chunks(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    """Prompts sorted by length (less padding per batch) and cut into near-equal chunks of at
    most `size`."""
    ordered = sorted(prompts, key=lambda p: len(p.text))
    n = math.ceil(len(ordered) / size)
    step = math.ceil(len(ordered) / n) if n else 1
    return [ordered[i:i + step] for i in range(0, len(ordered), step)]


def _digest(parts) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:10]


def interventions(ctx: Context) -> tuple[list[em.EvalIntervention], list[str]]:
    """The selected rows and notes on rows left out."""
    ec, r = ctx.cfg.eval, ctx.results
    kinds = list(ec.interventions)
    stage2 = r.stage2_sets()
    notes = []
    latent_kinds = {"core", "core_category", "stage2_union", "critical_union", "random"}
    if not stage2 and latent_kinds & set(kinds):
        notes.append("no Stage 2 set jailbroke any prompt: the latent rows are left out")
        kinds = [k for k in kinds if k not in latent_kinds]
    critical = woken = pool = None
    if "critical_union" in kinds and r.done("stage3"):
        critical = r.critical_features()
    if "bos_clamp" in kinds and r.done("hydra"):
        woken = r.woken_at_bos()
    if "random" in kinds:
        layers = sorted({f.layer for f in FeatureSet(f for s in stage2.values() for f in s)})
        pool = em.active_pool(ctx.model, ctx.saes, [p.text for p in r.kept_prompts()], layers,
                              ctx.cfg.model.batch_size)
    cats = {p.id: p.category for p in r.kept_prompts()}
    rows, more = em.build_interventions(kinds, stage2, cats, ec.core_sizes, ec.category_core_size,
                                        ec.category_min_sets, ec.random_seeds, pool, critical, woken,
                                        ec.clamp_values)
    return rows, notes + more


def _harmless_judge(ctx: Context) -> str | None:
    ec = ctx.cfg.eval
    if ec.harmless_judge is not None:
        return None if ec.harmless_judge == ctx.cfg.judge.name else ec.harmless_judge
    return "substring" if getattr(ctx.judge, "judges_harm", False) else None


# ----------------------------------------------------------------- the stage
def run_eval(ctx: Context) -> dict:
    name, ec = "eval", ctx.cfg.eval
    selection = {"interventions": ec.interventions, "datasets": ec.datasets}
    rest = {k: v for k, v in ec.model_dump().items() if k not in selection}
    base = {"stage": name, "cfg": ctx.cfg.section("model", "saes", "judge", "generation", "seed"), "eval": rest}
    h = stage_hash(ctx, name)
    if ctx.store.is_done(name, h):
        return ctx.store.recorded(name)["summary"]
    prompts, texts, dnotes = resolve_datasets(ctx)
    rows, notes = interventions(ctx)
    direction, layer = ctx.results.direction()
    vector = ctx.results.direction_vector()
    payload = {"interventions": {r.name: r for r in rows}, "direction": direction, "layer": layer,
               "vector": vector, "positions": ec.positions, "harmless_judge": _harmless_judge(ctx),
               "max_new_tokens": ec.max_new_tokens or ctx.cfg.generation.max_new_tokens}
    # cached rows are keyed by what they depend on: the config (file name), the row's latents or
    # direction, and the chunk's prompts; a rerun of an earlier stage only redoes rows it changed
    cache = f"cache-{config_hash(base)}.jsonl"
    rkey = {r.name: _row_digest(r, direction, vector, layer) for r in rows}
    with ctx.store.stage(name, h) as st:
        for old in (ctx.store.root / name).glob("cache-*.jsonl"):
            if old.name != cache:
                old.unlink()
        ck = Checkpoint(ctx.store.path(name, cache), key="id", owner=st)
        run_rows = [r for r in rows if r.same_as is None]
        ctx.log(f"eval: {len(rows)} interventions × {len(prompts)} prompt sets"
                f"{' + general text' if texts else ''} ({sum(map(len, prompts.values()))} prompts)")
        cut = {ds: chunks(ps, ctx.cfg.generation.batch_size) for ds, ps in prompts.items()}
        parts = {(ds, ci): part for ds, c in cut.items() for ci, part in enumerate(c)}
        pkey = {k: _digest([f"{p.id}\x1e{p.text}\x1e{p.label}" for p in part]) for k, part in parts.items()}
        items = [(f"{r.name}|{rkey[r.name]}|{ds}|{ci}|{pkey[(ds, ci)]}", r.name, ds, ci)
                 for r in run_rows for (ds, ci) in parts]
        fan_out(ctx, "eval_prompts", items, {**payload, "chunks": parts}, ck, "eval (interventions × prompts)")
        ce_items = []
        if texts:
            tkey = _digest(texts)
            ce_items = [(f"{r.name}|{rkey[r.name]}|general|{tkey}", r.name) for r in run_rows]
            fan_out(ctx, "eval_ce", ce_items, {**payload, "texts": texts}, ck, "eval (cross-entropy)")
        target = {r.name: r.same_as or r.name for r in rows}
        records = [{"intervention": r.name, "dataset": ds, **row} for r in rows
                   for key, iv, ds, _ in items if iv == target[r.name] for row in ck.records[key]["rows"]]
        ce = {r.name: (ck.records[k]["sum"], ck.records[k]["tokens"]) for r in rows
              for k, iv in ce_items if iv == target[r.name]}
        st.summary = _write(ctx, st, rows, prompts, records, ce, notes + dnotes, len(texts or ()))
    ctx.log(f"eval: done; table in {ctx.store.path(name, 'cells.parquet')}")
    return st.summary


def _row_digest(r: em.EvalIntervention, direction, vector, layer: int) -> str:
    spec = [r.kind, ",".join(r.features.ids()), repr(r.clamp)]
    if r.kind in ("direction", "actadd"):
        t = direction if r.kind == "direction" else vector
        spec += [str(layer), hashlib.sha1(t.float().numpy().tobytes()).hexdigest()]
    return _digest(spec)


def _write(ctx: Context, st, rows, prompts, records, ce, notes, n_texts: int) -> dict:
    from . import eval_plots

    cells = em.prompt_cells(records) + em.ce_cells(ce)
    order = {r.name: i for i, r in enumerate(rows)}
    where = {ds: i for i, ds in enumerate([*prompts, "general"])}
    cells.sort(key=lambda c: (order[c["intervention"]], where[c["dataset"]], c["part"]))
    table = pd.DataFrame(cells)
    kinds = {r.name: r.kind for r in rows}
    sizes = {r.name: r.size for r in rows}
    table.insert(1, "kind", table["intervention"].map(kinds))
    table.insert(2, "latents", table["intervention"].map(sizes))
    st.table("cells.parquet", table)
    st.json("cells.json", cells)
    st.json("interventions.json", {"rows": [r.to_json() for r in rows], "notes": notes,
                                   "asked": {"datasets": ctx.cfg.eval.datasets,
                                             "interventions": ctx.cfg.eval.interventions},
                                   "datasets": {ds: {"n": len(ps), "labels": sorted({p.label or "all" for p in ps})}
                                                for ds, ps in prompts.items()}})
    st.jsonl("completions.jsonl", records)
    st.json("by_category.json", em.by_category(records))
    wide = summary_rows(table, rows)
    eval_plots.heatmap(table, rows, st.file("heatmap.png"))
    eval_plots.tradeoff(table, rows, st.file("tradeoff.png"))
    if any(r.kind == "core" for r in rows):
        eval_plots.core_curve(table, rows, st.file("core_curve.png"))
    return {"rows": wide, "notes": notes, "datasets": {ds: len(ps) for ds, ps in prompts.items()},
            "ce_texts": n_texts, "harmless_judge": _harmless_judge(ctx)}


def summary_rows(table: pd.DataFrame, rows) -> list[dict]:
    """Per intervention, the numbers people compare: refusal or jailbreak rate per dataset part,
    degenerate share over every prompt, KL on harmless prompts, change in CE on general text."""
    out = []
    for r in rows:
        t = table[table["intervention"] == r.name]
        prompt = t[t["part"] != "text"]
        row = {"intervention": r.name, "latents": r.size, "same_as": r.same_as}
        for _, c in prompt.iterrows():
            what = "jailbroken" if c["part"] == "harmful" else "refused"
            row[f"{c['dataset']}{'' if c['part'] == 'all' else ' ' + c['part']} {what}"] = round(
                c["jailbreak_rate" if what == "jailbroken" else "refusal_rate"], 4)
        n = prompt["n"].sum()
        row["degenerate"] = round(float((prompt["degenerate_rate"] * prompt["n"]).sum() / n), 4) if n else None
        safe = prompt[prompt["part"] == "harmless"]
        row["kl harmless"] = round(float((safe["kl"] * safe["n"]).sum() / safe["n"].sum()), 4) if len(safe) else None
        ce = t[t["part"] == "text"]
        row["ce delta"] = round(float(ce["ce_delta"].iloc[0]), 4) if len(ce) and ce["ce_delta"].notna().all() else None
        out.append(row)
    return out


def _plan(p, name: str):
    return p["interventions"][name].plan(p["direction"], p["vector"], p["layer"], p["positions"])


def _judge_named(ctx, name: str | None):
    """A second judge for harmless prompts, built once per process like `ctx.judge`."""
    if name is None:
        return None
    cache = ctx.__dict__.setdefault("_eval_judges", {})
    if name not in cache:
        cache[name] = make_judge(name, ctx.cfg.judge.degenerate_is_jailbreak)
    return cache[name]


def eval_prompts_task(ctx, items, p) -> list[dict]:
    """One (intervention, dataset, chunk) per item: per prompt, the reply, verdict, P(I) and KL."""
    return [{"id": key, "rows": em.evaluate_prompts(ctx.model, ctx.saes, p["chunks"][(ds, ci)], _plan(p, iv),
                                                    ctx.judge, _judge_named(ctx, p["harmless_judge"]),
                                                    p["max_new_tokens"], ctx.cfg.generation.batch_size)}
            for key, iv, ds, ci in items]


def eval_ce_task(ctx, items, p) -> list[dict]:
    """One intervention per item: summed CE over the general texts and the token count."""
    out = []
    for key, iv in items:
        s, n = loss_sum(ctx.model, ctx.saes, TextSet("general", p["texts"]), _plan(p, iv), ctx.cfg.model.batch_size)
        out.append({"id": key, "sum": s, "tokens": n})
    return out


STAGE = Stage("eval", "last", StageInputs(
    ("model.batch_size", "data", "judge", "generation", "eval", "seed"), ("eval.datasets", "eval.general_text"),
    ("filter", "direction", "stage2", "stage3"), ("hydra",)),
    run_eval, {"eval_prompts": eval_prompts_task, "eval_ce": eval_ce_task})
