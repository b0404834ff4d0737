"""Downloads of a set's exports (refusalscope.export.downloads): /export/KIND/SET, where SET is
latent/L-I, stage1|stage2|stage3/PID or core@K and KIND neuronpedia.json, saelens.zip or apply.py.
Bundles are built on first request (the SAE rows of the set are read from its SAEs) and kept."""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from ...errors import UserError
from ...export.downloads import KINDS, download
from ...run.results import RunResults

router = APIRouter()


@lru_cache(maxsize=64)
def _cached(root: str, kind: str, name: str) -> tuple[bytes, str, str]:
    return download(RunResults(root), kind, name)


@router.get("/export/{kind}/{name:path}")
async def export_download(request: Request, kind: str, name: str):
    st = request.app.state.rs
    if kind not in KINDS:
        raise HTTPException(404, f"no download {kind!r}: use one of {', '.join(KINDS)}")
    if name.startswith("latent/") and name.removeprefix("latent/") not in st.index.latents:
        raise HTTPException(404, f"latent {name.removeprefix('latent/')!r} is not in this run")
    try:
        body, media, filename = await run_in_threadpool(_cached, str(st.results.root), kind, name)
    except UserError as err:
        raise HTTPException(404, str(err)) from None
    return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
