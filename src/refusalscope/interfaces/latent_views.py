"""Per-latent and per-prompt views of a run: the rows of the latent browser, what a latent page
and a prompt page show, and the per-prompt cards of the report. Built once per run from
`RunResults` (the web app keeps one `RunIndex` per process) and read-only afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..interventions.features import Feature
from ..run.dashboard_store import NoDashboards
from ..run.results import RunResults


@dataclass
class LatentRow:
    """One latent of the browser: where it is critical and what is known about it."""

    id: str
    layer: int
    index: int
    stages: list[str] = field(default_factory=list)  # "1", "2", "3"
    prompts: dict[str, list[str]] = field(default_factory=dict)  # stage -> prompt ids
    inactive_on: list[str] = field(default_factory=list)  # prompts where it is in the Stage 2 set but silent
    woken: dict[str, list[str]] = field(default_factory=dict)  # prompt -> regions it woke up in
    categories: list[str] = field(default_factory=list)
    explanation: str | None = None
    cos: float | None = None
    density: float | None = None
    sink: bool = False

    @property
    def n_prompts(self) -> int:
        """Prompts it is critical for (in their Stage 2 or Stage 3 set)."""
        return len(set(self.prompts.get("2", [])) | set(self.prompts.get("3", [])))

    @property
    def woken_where(self) -> list[str]:
        """bos / system / elsewhere, over the prompts where it woke up."""
        regions = {r for rs in self.woken.values() for r in rs}
        out = [r for r in ("bos", "system") if r in regions]
        return out + (["elsewhere"] if regions - {"bos", "system"} else [])


def _try(fn, default):
    try:
        return fn()
    except UserError:
        return default


class RunIndex:
    """Everything the browser, latent and prompt pages need, indexed by latent and prompt id."""

    def __init__(self, results: RunResults):
        self.results = r = results
        self.prompts = {p.id: p for p in _try(r.kept_prompts, [])}
        self.baseline = _try(r.baseline_replies, {})
        self.stage1 = _try(r.stage1, {}) if r.done("stage1") else {}
        self.stage2 = _try(r.stage2, {}) if r.done("stage2") else {}
        self.stage3 = _try(r.stage3, {}) if r.done("stage3") else {}
        self.sets = {"1": _try(r.stage1_sets, {}) if r.done("stage1") else {},
                     "2": {pid: rec.set for pid, rec in self.stage2.items() if rec.set is not None},
                     "3": _try(r.stage3_sets, {}) if r.done("stage3") else {}}
        self.wake = _try(r.wake_up, {"records": []}) if r.done("hydra") else {"records": []}
        self.hydra = {x["id"]: x for x in (_try(r.inactive_critical, {"records": []})["records"]
                                           if r.done("hydra") else [])}
        self.explanations = _try(r.explanations, {}) if r.done("semantics") else {}
        self.categories = _try(r.category_activity, {}) if r.done("taxonomy") else {}
        # read lazily by offset: a wide run has 10^4-10^5 dashboards (hundreds of MB)
        self.dashboards = _try(r.dashboard_store, NoDashboards()) if r.done("dashboards") else NoDashboards()
        self.tokens = _try(r.prompt_tokens, {}) if r.done("dashboards") else {}
        self.latents = self._rows()
        # per prompt, what its pages need, built once (a page never scans every latent)
        self.woken_on: dict[str, list[str]] = {}
        for fid, row in self.latents.items():
            for pid in row.woken:
                self.woken_on.setdefault(pid, []).append(fid)
        self.wake_of = {rec["id"]: rec for rec in self.wake["records"]}
        self._facets: dict | None = None

    # ----------------------------------------------------------------- latents
    def _rows(self) -> dict[str, LatentRow]:
        rows: dict[str, LatentRow] = {}

        def row(f) -> LatentRow:
            f = Feature.of(f)
            return rows.setdefault(f.id, LatentRow(f.id, f.layer, f.index))
        for stage, sets in self.sets.items():
            for pid, s in sets.items():
                for f in s:
                    r = row(f)
                    if stage not in r.stages:
                        r.stages.append(stage)
                    r.prompts.setdefault(stage, []).append(pid)
        for pid, rec in self.stage2.items():
            for f in rec.inactive or ():
                row(f).inactive_on.append(pid)
        for rec in self.wake["records"]:
            for w in rec["woken"]:
                row(w["feature"]).woken[rec["id"]] = sorted({h["region"] for h in w["firings"]})
        for fid, r in rows.items():
            r.stages.sort()
            r.categories = [c for c, n in self.categories.get(fid, {}).items() if n > 0]
            r.explanation = self.explanations.get(fid)
            d = self.dashboards.meta.get(fid)
            if d is not None:
                r.cos, r.density, r.sink = d.cos, d.density, d.sink
                r.explanation = r.explanation or d.explanation  # the dashboard's, for latents semantics skipped
        return dict(sorted(rows.items(), key=lambda kv: Feature.of(kv[0])))

    def latent(self, fid: str) -> LatentRow:
        """The row of latent `fid`; UserError when the id is malformed or not in this run."""
        key = Feature.of(fid).id
        if key in self.latents:
            return self.latents[key]
        d = self.dashboards.meta.get(key)
        if d is None:
            raise UserError(f"latent {key} is not in any Stage 1-3 set of this run: pick one from the latent browser")
        f = Feature.of(key)  # a latent with a dashboard but no set: one of the human study's random latents
        cats = [c for c, n in self.categories.get(key, {}).items() if n > 0]
        return LatentRow(key, f.layer, f.index, categories=cats,
                         explanation=d.explanation, cos=d.cos, density=d.density, sink=d.sink)

    def filter(self, stage: str | None = None, layer: int | None = None, category: str | None = None,
               prompt: str | None = None, activity: str | None = None, q: str | None = None,
               sort: str = "prompts") -> list[LatentRow]:
        """Latents matching every given filter; activity is active / inactive / woken / sink."""
        rows = list(self.latents.values())
        if stage:
            rows = [r for r in rows if stage in r.stages]
        if layer is not None:
            rows = [r for r in rows if r.layer == layer]
        if category:
            rows = [r for r in rows if category in r.categories]
        if prompt:
            rows = [r for r in rows if any(prompt in ps for ps in r.prompts.values())]
        if activity == "inactive":
            rows = [r for r in rows if r.inactive_on]
        elif activity == "active":
            rows = [r for r in rows if not r.inactive_on]
        elif activity == "woken":
            rows = [r for r in rows if r.woken]
        elif activity == "sink":
            rows = [r for r in rows if r.sink]
        if q:
            ql = q.lower()
            rows = [r for r in rows if ql in r.id or ql in (r.explanation or "").lower()]
        keys = {"prompts": lambda r: (-r.n_prompts, r.layer, r.index), "layer": lambda r: (r.layer, r.index),
                "cos": lambda r: (-(r.cos if r.cos is not None else -2), r.layer, r.index),
                "density": lambda r: (-(r.density or 0.0), r.layer, r.index)}
        return sorted(rows, key=keys.get(sort, keys["prompts"]))

    def facets(self) -> dict:
        """The values each browser filter can take (computed once)."""
        if self._facets is None:
            cats = sorted({c for r in self.latents.values() for c in r.categories})
            self._facets = {"stages": [s for s in ("1", "2", "3") if self.sets[s]],
                            "layers": sorted({r.layer for r in self.latents.values()}), "categories": cats,
                            "prompts": list(self.prompts)}
        return self._facets

    def known(self, fid) -> bool:
        """Whether latent `fid` has a page (a set latent, or one with a dashboard)."""
        key = str(fid)
        return key in self.latents or key in self.dashboards

    # ----------------------------------------------------------------- prompts
    def prompt(self, pid: str) -> dict:
        """Everything the prompt page shows; UserError for an unknown id."""
        if pid not in self.prompts:
            raise UserError(f"prompt {pid!r} is not among this run's refused prompts: pick one from the prompt list")
        p = self.prompts[pid]
        s1, s2, s3 = self.stage1.get(pid), self.stage2.get(pid), self.stage3.get(pid)
        woken = self.wake_of.get(pid)
        tokens = self.tokens.get(pid)
        marks: dict[int, list[str]] = {}
        for w in (woken or {}).get("woken", []):
            for h in w["firings"]:
                marks.setdefault(h["position"], []).append(f"{w['feature']} ({h['value']:.3g})")
        base = self.baseline.get(pid, {})
        return {
            "id": pid, "text": p.text, "category": p.category, "baseline": base.get("reply"),
            "baseline_refused": base.get("refused"),
            "stage1": None if s1 is None else {"k": s1.k, "reply": s1.completion,
                                               "size": len(self.sets["1"].get(pid, ())),
                                               "ids": self.sets["1"].get(pid, None)},
            "stage2": None if s2 is None else {
                "set": s2.set, "tau": s2.tau, "reply": s2.completion, "inactive": set(s2.inactive or ()),
                "per_tau": [{"tau": t.tau, "size": t.size, "jailbroken": t.jailbroken, "reply": t.completion}
                            for t in s2.per_tau]},
            "stage3": None if s3 is None else {"k": s3.k, "reply": s3.completion, "ids": self.sets["3"].get(pid)},
            "hydra": self.hydra.get(pid),
            "woken": [{"id": w["feature"], "regions": sorted({h["region"] for h in w["firings"]}),
                       "firings": w["firings"]} for w in (woken or {}).get("woken", [])],
            "tokens": [{"text": t, "region": g, "marks": marks.get(i, [])}
                       for i, (t, g) in enumerate(zip(tokens["tokens"], tokens["regions"]))] if tokens else None,
        }

    def prompt_rows(self) -> list[dict]:
        """One line per refused prompt for the prompt list."""
        out = []
        for pid, p in self.prompts.items():
            s1, s2, s3 = self.stage1.get(pid), self.stage2.get(pid), self.stage3.get(pid)
            out.append({"id": pid, "text": p.text, "category": p.category,
                        "k1": s1.k if s1 else None, "n2": len(s2.set) if s2 and s2.set is not None else None,
                        "inactive": len(s2.inactive or ()) if s2 else None, "k3": s3.k if s3 else None,
                        "woken": len(self.woken_on.get(pid, ()))})
        return out
