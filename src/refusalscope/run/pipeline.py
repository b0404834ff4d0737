"""Stages chained over one run store. Each stage hashes the config sections it reads (plus the
hashes of the stages it depends on), skips itself when that hash is already done, and otherwise
recomputes, resuming per-prompt work from its checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UserError
from ..io.model import ChatModel
from ..io.prompts import filter_refused, heldout_split
from ..measures.cascade import refusal_judge
from ..measures.judges import make_cascade, make_judge
from ..methods.evaluate import generate_judged
from .config import Config
from .inputs import stage_hashes
from .resolve import load_model, load_prompt_set, take
from .results import RunResults
from .stage_spec import Stage, StageInputs
from .store import RunStore

if TYPE_CHECKING:
    from ..io.sae_lazy import LazySAESet
    from .backend import LocalBackend, RayBackend


@dataclass
class Context:
    """What stages share within one process: config, store, and lazily loaded heavy objects."""

    cfg: Config
    store: RunStore
    quiet: bool = False
    log: Callable = print
    _model: ChatModel | None = None
    _saes: LazySAESet | None = None
    _judge: object = None
    _backend: LocalBackend | RayBackend | None = None
    hashes: dict = field(default_factory=dict)
    stages: Mapping[str, Stage] = field(default_factory=dict)  # every stage's declaration, for hashes (stages.STAGES)
    record: str | None = None  # the config.yaml this run is to keep (see runner.save_record)

    @property
    def backend(self):
        """Where per-prompt work runs (`execution.backend`), started on first use."""
        if self._backend is None:
            from .backend import make_backend

            self._backend = make_backend(self)
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if self.store is not None:
            self.store.close()

    @property
    def results(self) -> RunResults:
        """Typed reads of what earlier stages wrote."""
        return RunResults(self.store)

    @property
    def model(self) -> ChatModel:
        if self._model is None:
            self._model = load_model(self.cfg, quiet=self.quiet, log=self.log)
        return self._model

    @property
    def judge(self):
        """Built once per process (driver or Ray worker) and reused by every stage and shard."""
        if self._judge is None:
            jc = self.cfg.judge
            final = make_judge(jc.name, jc.degenerate_is_jailbreak, **jc.options)
            self._judge = make_cascade(final, jc.first_pass, jc.first_pass_options, jc.first_pass_tokens)
        return self._judge

    @property
    def refusal_judge(self):
        """What measures refusal on harmless prompts (a harm classifier cannot: `refusal_judge`)."""
        return refusal_judge(self.judge)

    @property
    def saes(self):
        if self._saes is None:
            from .resolve import load_saes

            self._saes = load_saes(self.cfg, self.model, quiet=self.quiet)
        return self._saes


def stage_hash(ctx: Context, name: str) -> str:
    """The stage's hash over what it reads (its `StageInputs`): its config fields, prompt files and
    the hashes of the stages it depends on."""
    if name not in ctx.hashes:
        if name not in ctx.stages:
            raise RuntimeError(f"this Context knows no stage {name!r}: create it with stages=stages.STAGES")
        ctx.hashes.update(stage_hashes(ctx.cfg, ctx.stages))
    return ctx.hashes[name]


def generation_args(ctx: Context) -> dict:
    """The generation settings every judged search passes on (reply length, batch)."""
    g = ctx.cfg.generation
    return {"max_new_tokens": g.max_new_tokens, "batch_size": g.batch_size}


def run_filter(ctx: Context) -> dict:
    """Generate on the harmful test prompts, judge, and keep the ones the model refuses."""
    name = "filter"
    h = stage_hash(ctx, name)
    if ctx.store.is_done(name, h):
        return ctx.store.recorded(name)["summary"]
    cfg = ctx.cfg
    prompts = load_prompt_set(cfg.data.harmful_test, cfg.data.text_field, label="harmful")
    prompts = take(prompts, cfg.data.max_prompts, cfg.seed)
    with ctx.store.stage(name, h) as st:
        model = ctx.model
        ck = st.checkpoint("completions", key="id")
        size = cfg.generation.batch_size
        judge = ctx.judge
        from tqdm.auto import tqdm

        # chunks are cut from all prompts, so a resumed run pads each prompt as an uninterrupted one does
        chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        for chunk in tqdm([c for c in chunks if any(p.id not in ck for p in c)], desc="judge harmful prompts",
                          disable=ctx.quiet):
            texts = [p.text for p in chunk]
            j = generate_judged(model, None, texts, None, judge, cfg.generation.max_new_tokens, size)
            for p, rec in zip(chunk, j.records(texts)):
                ck.add({"id": p.id, "category": p.category, **rec})
        records = [ck.records[p.id] for p in prompts]
        refused, report = filter_refused(prompts, [r["refused"] for r in records])
        kept, heldout = heldout_split(refused, cfg.data.heldout_fraction, cfg.seed)
        if refused and not kept:
            raise UserError(f"data.heldout_fraction {cfg.data.heldout_fraction} holds out all {len(refused)} "
                            "refused prompts: lower it so Stages 1-3 have prompts to dissect")
        st.jsonl("completions.jsonl", records)
        rows = lambda ps: [{"id": p.id, "text": p.text, "category": p.category} for p in ps]  # noqa: E731
        st.json("kept.json", rows(kept))  # the search split: what Stages 1-3 dissect
        st.json("heldout.json", rows(heldout))  # only evaluated (`refusalscope eval`)
        st.summary = {**report, "n_search": len(kept), "n_heldout": len(heldout), "judge": judge.name,
                      "decided_by": _counts(r.get("decided_by") for r in records)}
    held = f"; {len(heldout)} held out for eval" if heldout else ""
    ctx.log(f"filter: {report['n_kept']} of {report['n_in']} harmful prompts refused "
            f"({report['n_dropped']} dropped, judge {judge.name}{held})")
    return st.summary


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


FILTER = Stage("filter", "core", StageInputs(
    ("model", "data.harmful_test", "data.text_field", "data.max_prompts", "data.heldout_fraction", "judge",
     "generation", "seed"), ("data.harmful_test",)), run_filter)
