"""Per-prompt records of Stages 1–3, as the methods return them and the run store keeps them.

One dataclass per record, each with one `to_json` / `from_json` pair: the pipeline writes these,
and the backends, the report, the web app and the Python API read them back the same way.
Latent sets are `FeatureSet`s in memory and lists of "layer-index" strings in JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..interventions.features import FeatureSet


@dataclass(frozen=True)
class Verdict:
    """The judge's call on one generation. `jailbroken` = not refused and not degenerate
    (unless the run counts degenerate replies as jailbreaks); `judge` names who decided."""

    refused: bool
    degenerate: bool
    jailbroken: bool
    judge: str | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"refused": self.refused, "degenerate": self.degenerate,
                               "jailbroken": self.jailbroken}
        if self.judge is not None:
            out["judge"] = self.judge
        return out

    @classmethod
    def from_json(cls, d: dict) -> Verdict:
        return cls(bool(d["refused"]), bool(d["degenerate"]), bool(d["jailbroken"]), d.get("judge"))


@dataclass
class LadderRecord:
    """One prompt's K ladder (Stage 1: top-K per layer; Stage 3: Stage 2 + top-K ranked):
    `k` is the smallest jailbreaking K (None: none up to the last rung); `tried` the rungs up to
    it; per tried K, the reply and its verdict."""

    id: str
    k: int | None = None
    tried: list[int] = field(default_factory=list)
    completions: dict[int, str] = field(default_factory=dict)
    verdicts: dict[int, Verdict] = field(default_factory=dict)

    @property
    def jailbroken(self) -> bool:
        return self.k is not None

    @property
    def completion(self) -> str | None:
        """The reply at the jailbreaking K."""
        return self.completions.get(self.k) if self.k is not None else None

    def to_json(self) -> dict:
        return {"id": self.id, "k": self.k, "tried": list(self.tried),
                "completions": {str(k): v for k, v in self.completions.items()},
                "verdicts": {str(k): v.to_json() for k, v in self.verdicts.items()}}

    @classmethod
    def from_json(cls, d: dict) -> LadderRecord:
        return cls(d["id"], d["k"], [int(k) for k in d["tried"]],
                   {int(k): v for k, v in d.get("completions", {}).items()},
                   {int(k): Verdict.from_json(v) for k, v in d.get("verdicts", {}).items()})


@dataclass
class Stage3Record(LadderRecord):
    """A Stage 3 ladder plus the prompt's active Stage 2 latents that every rung ablated too."""

    active_stage2: FeatureSet = field(default_factory=FeatureSet)

    def to_json(self) -> dict:
        return {**super().to_json(), "active_stage2": self.active_stage2.ids()}

    @classmethod
    def from_json(cls, d: dict) -> Stage3Record:
        base = LadderRecord.from_json(d)
        return cls(base.id, base.k, base.tried, base.completions, base.verdicts,
                   FeatureSet(d.get("active_stage2", ())))


@dataclass(frozen=True)
class TauOutcome:
    """Algorithm 1's consensus set at one threshold τ, whether ablating it jailbreaks, and the
    judge that decided (a cascade's first pass or its final judge)."""

    tau: float
    features: FeatureSet
    jailbroken: bool
    completion: str | None = None
    judge: str | None = None

    @property
    def size(self) -> int:
        return len(self.features)

    def to_json(self) -> dict:
        out = {"tau": self.tau, "size": self.size, "jailbroken": self.jailbroken,
               "completion": self.completion, "features": self.features.ids()}
        if self.judge is not None:
            out["judge"] = self.judge
        return out

    @classmethod
    def from_json(cls, d: dict) -> TauOutcome:
        return cls(float(d["tau"]), FeatureSet(d["features"]), bool(d["jailbroken"]), d.get("completion"),
                   d.get("judge"))


@dataclass
class Stage2Record:
    """Algorithm 1 on one prompt: the outcome per τ (consensus over seeds), Δ per block per
    seed, and the chosen set (the smallest jailbreaking one; larger τ on ties). `active` /
    `inactive` split the chosen set by whether each latent fires on the plain prompt."""

    id: str
    candidates: int
    per_tau: list[TauOutcome]
    deltas: dict[int, list[float]]
    passes: dict[str, int]
    set: FeatureSet | None = None
    tau: float | None = None
    active: FeatureSet | None = None
    inactive: FeatureSet | None = None

    @property
    def jailbroken(self) -> bool:
        return self.set is not None

    @property
    def completion(self) -> str | None:
        """The reply with the chosen set ablated."""
        return next((t.completion for t in self.per_tau if t.tau == self.tau), None)

    def to_json(self) -> dict:
        ids = lambda s: None if s is None else s.ids()  # noqa: E731
        return {"id": self.id, "candidates": self.candidates,
                "per_tau": [t.to_json() for t in self.per_tau],
                "deltas": {str(k): v for k, v in self.deltas.items()}, "passes": dict(self.passes),
                "set": ids(self.set), "tau": self.tau, "active": ids(self.active),
                "inactive": ids(self.inactive)}

    @classmethod
    def from_json(cls, d: dict) -> Stage2Record:
        opt = lambda v: None if v is None else FeatureSet(v)  # noqa: E731
        return cls(d["id"], int(d["candidates"]), [TauOutcome.from_json(t) for t in d["per_tau"]],
                   {int(k): list(v) for k, v in d["deltas"].items()}, dict(d["passes"]),
                   opt(d.get("set")), d.get("tau"), opt(d.get("active")), opt(d.get("inactive")))


@dataclass(frozen=True)
class Activity:
    """Which latents of a prompt's set fire on the plain prompt (max over its tokens > 0)."""

    id: str
    active: FeatureSet
    inactive: FeatureSet

    def to_json(self) -> dict:
        return {"id": self.id, "active": self.active.ids(), "inactive": self.inactive.ids()}

    @classmethod
    def from_json(cls, d: dict) -> Activity:
        return cls(d["id"], FeatureSet(d["active"]), FeatureSet(d["inactive"]))
