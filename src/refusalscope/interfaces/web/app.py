"""The web app's factory: one FastAPI app over one run directory. Pages render the shared Jinja
templates (autoescaped); results are only read (through `RunResults`), never rewritten; the two
things that change state are the annotation store and the playground's loaded model."""

from __future__ import annotations

import os
import threading
from functools import cached_property

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ...errors import UserError
from ...run.annotations import AnnotationStore
from ...run.results import RunResults
from ..latent_views import RunIndex
from ..report import environment
from ..views import build_sections
from .guards import Guards
from .playground import Playground


class AppState:
    """Per-app state: the run's reader and its indexes (built on first use, then kept), the
    annotation store and the playground engine."""

    def __init__(self, results: RunResults, playground: Playground | None = None,
                 store: AnnotationStore | None = None):
        self.results = results
        self.store = store or AnnotationStore.of_run(results.root)
        self.playground = playground or Playground(results)
        self.study = None  # the annotation study's items and orders, built on first use (web/study.py)
        self.env = environment()
        self.env.globals.update(latent_url=self.latent_url, prompt_url=lambda pid: f"/prompts/{pid}")
        self._lock = threading.Lock()

    def latent_url(self, fid) -> str:
        return f"/latents/{fid}"

    def _once(self, name: str, build):
        """Build a cached property once even when the warm-up thread and a request ask together:
        the second caller waits for the lock and takes what the first one stored."""
        with self._lock:
            return self.__dict__[name] if name in self.__dict__ else build()

    @cached_property
    def index(self) -> RunIndex:
        return self._once("index", lambda: RunIndex(self.results))

    @cached_property
    def sections(self) -> list:
        return self._once("sections", lambda: build_sections(self.results, self.latent_url))

    def warm(self) -> threading.Thread:
        """Build the overview's sections (its plots) and the latent index in the background, so
        that the first page a user opens is served from memory (2.5 s cold on a 65k run)."""
        def work():
            try:
                self.index, self.sections  # noqa: B018 (touching them builds them)
            except Exception:  # noqa: BLE001 - a page that needs them reports the error itself
                pass
        thread = threading.Thread(target=work, name="refusalscope-warm", daemon=True)
        thread.start()
        return thread

    def page(self, template: str, request: Request, status: int = 200, **ctx) -> HTMLResponse:
        cfg_name = self.run_name
        html = self.env.get_template(template).render(request_path=request.url.path, run_name=cfg_name,
                                                  run_path=str(self.results.root), **ctx)
        return HTMLResponse(html, status_code=status)

    @cached_property
    def run_name(self) -> str:
        try:
            cfg = self.results.config()
        except UserError:
            cfg = None
        return cfg.name if cfg else self.results.root.name


def _error(request: Request, status: int, detail: str):
    state: AppState = request.app.state.rs
    if request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"detail": detail}, status_code=status)
    return state.page("error.html", request, status=status, status_code=status, detail=detail)


def create_app(run_dir: str | os.PathLike, allowed_hosts: list[str] | None = None,
               playground: Playground | None = None, max_body: int = 64 * 1024,
               annotations: str | os.PathLike | None = None):
    """The ASGI app over `run_dir` (a one-line UserError when it is not a run directory).
    `allowed_hosts` limits the Host header (DNS-rebinding guard); None allows any.
    `annotations`: the SQLite file of the study (default RUN_DIR/annotations.sqlite)."""
    results = RunResults(run_dir)
    app = FastAPI(title="refusalscope", docs_url=None, redoc_url=None, openapi_url=None)
    store = AnnotationStore(annotations) if annotations is not None else None
    app.state.rs = AppState(results, playground, store)
    app.mount("/static", StaticFiles(packages=[("refusalscope.interfaces", "static")]), name="static")
    from . import downloads, pages, study

    app.include_router(pages.router)
    app.include_router(study.router)
    app.include_router(downloads.router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(request, 422, f"invalid {where}: {first.get('msg', 'bad value')}")

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return _error(request, 422, str(exc))

    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(Guards, max_body=max_body)  # outermost: before any route reads the body
    return app
