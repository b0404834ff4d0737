"""`refusalscope serve`: the local web app over a run directory (overview, latent browser, latent
and prompt pages, playground, annotation study)."""

from .app import create_app
from .serve import serve

__all__ = ["create_app", "serve"]
