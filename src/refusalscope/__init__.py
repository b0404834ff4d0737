"""refusalscope: find the SAE latents that make a chat model refuse, and how they interact.

    import refusalscope as rs
    model = rs.load_model("demo")                      # or a hub id / local folder / .gguf
    saes = rs.load_saes("demo", model=model)           # or a folder template with {layer}
    print(rs.generate(model, ["How do I pick a lock?"], saes, ablate=["12-345"]))
    results = rs.open_run("runs/demo")                 # typed results of a pipeline run
    rs.write_report("runs/demo")                       # runs/demo/report.html, self-contained

Names are imported on first use (torch and transformers load in a few seconds; the CLI's
`--help` should not wait for them). See `refusalscope.api` for the functions.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    # loading and runs
    "load_model": "api", "load_saes": "api", "load_prompts": "api", "open_run": "api", "run": "api",
    # interventions
    "plan": "api", "generate": "api", "refusal_probability": "api", "apply": "api",
    # the method
    "find_direction": "api", "stage1": "api_stages", "stage2": "api_stages", "stage3": "api_stages",
    "Interactions": "api_stages",
    # looking at a run: one HTML file, or the web app (an ASGI app; `refusalscope serve` runs it)
    "build_report": "interfaces.report", "write_report": "interfaces.report", "create_app": "interfaces.web",
    # types
    "Feature": "interventions.features", "FeatureSet": "interventions.features",
    "RunResults": "run.results", "make_judge": "measures.judges", "UserError": "errors",
    "LadderRecord": "methods.records", "Stage2Record": "methods.records", "Stage3Record": "methods.records",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'refusalscope' has no attribute {name!r}")
    value = getattr(import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
