"""The playground's engine: any prompt, with latents ablated or clamped (or r̂ ablated), against
the plain model, side by side. The same hook engine as the pipeline; the run's model and SAEs
are loaded on first use and kept (one copy per server), and a lock queues requests so two users
never run the model at once."""

from __future__ import annotations

import threading
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...errors import UserError
from ...interventions.engine import intervene
from ...interventions.features import Feature, FeatureSet
from ...interventions.spec import DirectionAblation, Intervention, Positions
from ...run.results import RunResults

POSITIONS: dict[str, Positions] = {"all": "all", "prompt": "prompt", "bos": (0,)}


class PlayRequest(BaseModel):
    """What the playground runs; anything else in the body is a 422."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=4000)
    latents: list[str] = Field(default_factory=list, max_length=4096)
    mode: Literal["ablate", "clamp"] = "ablate"
    value: float = Field(5.0, ge=-1000, le=1000, description="clamp value")
    positions: Literal["all", "prompt", "bos"] = "all"
    direction: bool = False
    max_new_tokens: int | None = Field(None, ge=1, le=256)

    @field_validator("latents")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        out = []
        for x in v:
            try:
                out.append(Feature.of(x).id)
            except UserError as err:
                raise ValueError(str(err)) from None
        return out


class Playground:
    """Loads the run's model and SAEs lazily; `run` is serialised by one lock (the queue)."""

    def __init__(self, results: RunResults, quiet: bool = True):
        self.results, self.quiet = results, quiet
        self._ctx = None
        self._lock = threading.Lock()
        self._waiting = 0
        self._count = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._ctx is not None

    def status(self) -> dict:
        return {"loaded": self.loaded, "busy": self._lock.locked(), "waiting": self._waiting}

    def _context(self):
        if self._ctx is None:
            from ...run.pipeline import Context

            cfg = self.results.config()
            if cfg is None:
                raise UserError(f"{self.results.root} has no config.yaml: the playground needs the run's config "
                                "to load its model")
            ctx = Context(cfg, store=None, quiet=True, log=lambda *_: None)
            ctx.model, ctx.saes  # noqa: B018  (load both now, inside the lock)
            self._ctx = ctx
        return self._ctx

    def run(self, req: PlayRequest) -> dict:
        """Replies and P(refusal token) plain and under the request's intervention."""
        with self._count:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._count:
                self._waiting -= 1
        try:
            return self._run(req)
        finally:
            self._lock.release()

    def _run(self, req: PlayRequest) -> dict:
        t0 = time.perf_counter()
        ctx = self._context()
        model, saes = ctx.model, ctx.saes
        plan: list[Intervention] = []
        what: list[str] = []
        if req.latents:
            fs = FeatureSet(req.latents).checked(saes)
            pos = POSITIONS[req.positions]
            plan.append(fs.ablation(pos) if req.mode == "ablate" else fs.clamp(req.value, pos))
            what.append(f"{len(fs)} latent(s) {'ablated' if req.mode == 'ablate' else f'clamped to {req.value:g}'}"
                        f" at {req.positions} positions")
        if req.direction:
            if not self.results.done("direction"):
                raise UserError("this run has no refusal direction yet: run the `direction` stage or untick it")
            plan.append(DirectionAblation(self.results.direction()[0]))
            what.append("r̂ ablated at every layer")
        if not plan:
            raise UserError("nothing to change: pick latents (or a set) to ablate or clamp, or tick the direction")
        n_new = req.max_new_tokens or ctx.cfg.generation.max_new_tokens
        with intervene(model, saes, rows=[[], plan]):
            gen = model.generate_full(model.encode([req.prompt, req.prompt]), max_new_tokens=n_new)
        verdicts: list[bool | None] = [None, None]
        judge = ctx.judge
        if not judge.needs_model:  # a judge that reads the model would need the rows' plans again
            v = judge.judge([req.prompt] * 2, gen.texts if judge.needs_completions else None)
            verdicts = [bool(r) for r in v.refused]
        token = "+".join(ctx.cfg.model.refusal_tokens)
        return {"intervention": "; ".join(what), "refusal_token": token, "max_new_tokens": n_new,
                "plain": {"reply": gen.texts[0], "p_refusal": float(gen.p_refusal[0]), "refused": verdicts[0]},
                "intervened": {"reply": gen.texts[1], "p_refusal": float(gen.p_refusal[1]), "refused": verdicts[1]},
                "judge": ctx.cfg.judge.name if verdicts[0] is not None else None,
                "seconds": round(time.perf_counter() - t0, 2)}
