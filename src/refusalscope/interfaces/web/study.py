"""The annotation study (paper appendix "Human Study", Fig 7): each annotator labels the run's
study sample in their own seeded order, seeing a latent's explanation and its top five
activating samples, never where the item came from (pipeline / random active / random
inactive). Answers go to the run's SQLite store; the results page merges them by majority,
scores the activation-based labels with the paper's partial credit per source, and reports
inter-annotator agreement."""

from __future__ import annotations

import csv
import io
import random
import re

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from ...errors import UserError
from ...methods.human_study import NONE, agreement, majority_labels, partial_credit, study_score
from ...methods.taxonomy import UNSAFE_CATEGORIES

router = APIRouter(prefix="/study")
NAME = re.compile(r"^\w[\w .'-]{0,39}$")


def _state(request: Request):
    return request.app.state.rs


def _name(name: str) -> str:
    name = name.strip()
    if not NAME.fullmatch(name):
        raise HTTPException(422, "annotator name must be 1-40 letters, digits, spaces or . ' - _ "
                                 "(starting with a letter or digit): choose another")
    return name


class Study:
    """The run's study sample, taxonomy and per-annotator orders."""

    def __init__(self, state):
        r = state.results
        if not r.done("taxonomy"):
            raise HTTPException(404, "this run has no study sample: run the `taxonomy` stage "
                                     f"(refusalscope analyze taxonomy -r {r.root})")
        self.items = r.study_items()
        seen = {c for counts in r.category_activity().values() for c in counts}
        seen |= {c for it in self.items for c in it["activation_labels"]}
        self.categories = [c for c in UNSAFE_CATEGORIES if c in seen] + sorted(seen - set(UNSAFE_CATEGORIES))
        cfg = r.config()
        self.seed = cfg.seed if cfg else 0
        self.index = state.index

    def order(self, name: str) -> list[dict]:
        items = list(self.items)
        random.Random(f"{self.seed}:{name}").shuffle(items)
        return items

    def view(self, item: dict) -> dict:
        board = self.index.dashboards.get(item["feature"])
        explanation = (board.explanation if board and board.explanation else
                       self.index.explanations.get(item["feature"]))
        return {"explanation": explanation or "(no explanation available)",
                "samples": board.top[:5] if board else [], "max": board.max_activation if board else 0.0}


def _study(request: Request) -> Study:
    """The run's study (built on first use and kept: results are never rewritten while serving)."""
    st = _state(request)
    if getattr(st, "study", None) is None:
        st.study = Study(st)
    return st.study


@router.get("")
def start_page(request: Request):
    st = _state(request)
    try:
        study = _study(request)
    except HTTPException as err:
        return st.page("study_start.html", request, note=err.detail, annotators={}, n_items=0)
    return st.page("study_start.html", request, note=None, annotators=st.store.annotators(), n_items=len(study.items))


@router.get("/start")
def start(name: str = ""):
    return RedirectResponse(f"/study/a/{_name(name)}", status_code=303)


@router.get("/a/{name}")
def next_item(request: Request, name: str):
    name, study, st = _name(name), _study(request), _state(request)
    done = set(st.store.latest(name))
    for n, it in enumerate(study.order(name), start=1):
        if it["feature"] not in done:
            return RedirectResponse(f"/study/a/{name}/{n}", status_code=303)
    return st.page("study_done.html", request, name=name, n_items=len(study.items))


def _item(study: Study, name: str, n: int) -> dict:
    order = study.order(name)
    if not 1 <= n <= len(order):
        raise HTTPException(404, f"item {n} does not exist: the study has items 1 to {len(order)}")
    return order[n - 1]


@router.get("/a/{name}/{n}")
def item_page(request: Request, name: str, n: int):
    name, study, st = _name(name), _study(request), _state(request)
    item = _item(study, name, n)
    mine = st.store.latest(name)
    return st.page("study_item.html", request, name=name, n=n, total=len(study.items), view=study.view(item),
                   categories=study.categories, none=NONE,
                   previous=mine.get(item["feature"], {}).get(name, []),  # latest(): {feature: {annotator: labels}}
                   answered=len(set(mine) & {it["feature"] for it in study.items}))


@router.post("/a/{name}/{n}")
def answer(request: Request, name: str, n: int, labels: list[str] = Form(default=[])):
    name, study, st = _name(name), _study(request), _state(request)
    item = _item(study, name, n)
    allowed = set(study.categories) | {NONE}
    bad = [l for l in labels if l not in allowed]
    if bad or not labels or (NONE in labels and len(labels) > 1):
        raise HTTPException(422, "tick one or more categories of this run's taxonomy, or only \"None\""
                                 + (f" (unknown: {bad[0][:40]!r})" if bad else ""))
    st.store.add(name, item["feature"], list(dict.fromkeys(labels)))
    nxt = n + 1 if n < len(study.items) else None
    return RedirectResponse(f"/study/a/{name}/{nxt}" if nxt else f"/study/a/{name}", status_code=303)


def results(request: Request) -> dict:
    """Majority labels, partial-credit scores per source and agreement over the latest answers."""
    study, st = _study(request), _state(request)
    latest = st.store.latest()
    majority = {f: majority_labels({f: list(per.values())}, min_agree=len(per) // 2 + 1)[f]
                for f, per in latest.items()}
    wanted = {it["feature"] for it in study.items}
    score = study_score({f: m for f, m in majority.items() if f in wanted}, study.items)
    rows = []
    for it in study.items:
        f, per = it["feature"], latest.get(it["feature"], {})
        rows.append({"feature": f, "source": it["source"], "activation_labels": it["activation_labels"],
                     "answers": len(per), "majority": majority.get(f),
                     "credit": partial_credit(majority[f], it["activation_labels"]) if per else None})
    return {"rows": rows, "score": score, "agreement": agreement(latest, study.categories),
            "annotators": st.store.annotators(), "n_items": len(study.items), "n_answers": st.store.count()}


@router.get("/results")
def results_page(request: Request):
    st = _state(request)
    try:
        res = results(request)
    except UserError as err:
        raise HTTPException(422, str(err)) from None
    return st.page("study_results.html", request, **res)


def _csv(rows: list[list], filename: str) -> Response:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/answers.csv")
def answers_csv(request: Request):
    _study(request)
    rows = [["id", "annotator", "feature", "labels", "created"]]
    rows += [[a["id"], a["annotator"], a["feature"], ";".join(a["labels"]), a["created"]]
             for a in _state(request).store.answers()]
    return _csv(rows, "answers.csv")


@router.get("/results.csv")
def results_csv(request: Request):
    res = results(request)
    rows = [["feature", "source", "activation_labels", "majority_labels", "annotators", "partial_credit"]]
    rows += [[r["feature"], r["source"], ";".join(r["activation_labels"]), ";".join(r["majority"] or []),
              r["answers"], "" if r["credit"] is None else round(r["credit"], 4)] for r in res["rows"]]
    return _csv(rows, "results.csv")
