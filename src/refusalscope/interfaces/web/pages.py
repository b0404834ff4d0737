"""Read-only pages (overview, latent browser, latent page, prompt list and page) and the
playground. An id that is not in the run is a 404 with a message; a bad query value is a 422."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from ...errors import UserError
from ..figures import activation_histogram, data_uri
from .playground import PlayRequest

router = APIRouter()
PAGE = 200  # browser rows per page


def _state(request: Request):
    return request.app.state.rs


@router.get("/")
def overview(request: Request):
    st = _state(request)
    idx = st.index
    return st.page("overview.html", request, sections=st.sections, n_latents=len(idx.latents),
                   n_prompts=len(idx.prompts), facets=idx.facets())


@router.get("/latents")
def latents(request: Request, stage: Literal["", "1", "2", "3"] = "", layer: str = Query("", pattern=r"^\d{0,5}$"),
            category: str = Query("", max_length=100), prompt: str = Query("", max_length=200),
            activity: Literal["", "active", "inactive", "woken", "sink"] = "",
            q: str = Query("", max_length=200), sort: Literal["prompts", "layer", "cos", "density"] = "prompts",
            page: int = Query(1, ge=1, le=100000)):
    st = _state(request)
    rows = st.index.filter(
        stage or None,
        int(layer) if layer else None,
        category or None,
        prompt or None,
        activity or None,
        q.strip() or None,
        sort,
    )
    pages = max(1, -(-len(rows) // PAGE))
    shown = rows[(page - 1) * PAGE: page * PAGE]
    args = {"stage": stage, "layer": int(layer) if layer else "", "category": category, "prompt": prompt,
            "activity": activity, "q": q, "sort": sort}
    return st.page("latents.html", request, rows=shown, total=len(rows), page=page, pages=pages, args=args,
                   facets=st.index.facets(), n_all=len(st.index.latents))


@lru_cache(maxsize=512)
def _histogram(root: str, fid: str, edges: tuple, counts: tuple) -> str:
    return data_uri(activation_histogram({"edges": list(edges), "counts": list(counts)}, fid))


@router.get("/latents/{fid}")
def latent(request: Request, fid: str):
    st = _state(request)
    try:
        row = st.index.latent(fid)
    except UserError as err:
        raise HTTPException(404, str(err)) from None
    board = st.index.dashboards.get(row.id)
    hist = None
    if board is not None and board.histogram.get("counts"):
        hist = _histogram(str(st.results.root), row.id, tuple(board.histogram["edges"]),
                          tuple(board.histogram["counts"]))
    effects = {e["prompt"]: e for e in (board.effects if board else [])}
    critical = []
    for pid in sorted({p for s in ("2", "3") for p in row.prompts.get(s, [])}):
        critical.append({"id": pid, "stages": [s for s in ("2", "3") if pid in row.prompts.get(s, [])],
                         "inactive": pid in row.inactive_on, "woken": row.woken.get(pid), "effect": effects.get(pid)})
    counts = st.index.categories.get(row.id, {})
    return st.page("latent.html", request, row=row, board=board, hist=hist, critical=critical,
                   stage1_prompts=row.prompts.get("1", []), categories=counts,
                   known=st.index.latents)


@router.get("/prompts")
def prompts(request: Request):
    st = _state(request)
    return st.page("prompts.html", request, rows=st.index.prompt_rows())


@router.get("/prompts/{pid}")
def prompt(request: Request, pid: str):
    st = _state(request)
    try:
        p = st.index.prompt(pid)
    except UserError as err:
        raise HTTPException(404, str(err)) from None
    return st.page("prompt.html", request, p=p, known=st.index.latents)


@router.get("/playground")
def playground(request: Request, prompt: str = Query("", max_length=200)):
    st = _state(request)
    idx = st.index
    if prompt and prompt not in idx.prompts:
        raise HTTPException(404, f"prompt {prompt!r} is not among this run's refused prompts")
    presets = {pid: {"text": p.text} for pid, p in idx.prompts.items()}  # sets: /api/playground/preset/{pid}
    return st.page("playground.html", request, presets=presets, chosen=prompt,
                   has_direction=st.results.done("direction"), engine=st.playground.status())


@router.get("/api/playground/preset/{pid}")
def play_preset(request: Request, pid: str):
    """A run prompt's Stage 2 / Stage 3 / woken sets, fetched when the playground picks it."""
    idx = _state(request).index
    if pid not in idx.prompts:
        raise HTTPException(404, f"prompt {pid!r} is not among this run's refused prompts")
    return {"stage2": [f.id for f in idx.sets["2"].get(pid, ())], "stage3": [f.id for f in idx.sets["3"].get(pid, ())],
            "woken": idx.woken_on.get(pid, [])}


@router.post("/api/playground")
async def play(request: Request, body: PlayRequest):
    st = _state(request)
    return await run_in_threadpool(st.playground.run, body)


@router.get("/api/playground/status")
def play_status(request: Request):
    return _state(request).playground.status()
