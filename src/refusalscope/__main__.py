"""`python -m refusalscope` runs the CLI."""

from .interfaces.cli import app

app(prog_name="refusalscope")
