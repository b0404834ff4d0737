"""The `refusalscope` command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import json
import signal
import sys
from functools import wraps
from pathlib import Path
from typing import Any

import click
import typer
import typer.core as typer_core
from typer import rich_utils

from ..errors import Terminated, UserError
from .tables import print_examples, print_quality, print_sae_quality, print_table

app = typer.Typer(help="Find the SAE latents that make a chat model refuse, and how they interact.",
                  no_args_is_help=True, add_completion=False)
world_app = typer.Typer(help="The embedded demo world (safety-tuned SmolLM2-135M + SAEs).",
                        no_args_is_help=True)
config_app = typer.Typer(help="Configs and presets.", no_args_is_help=True)
app.add_typer(world_app, name="demo-world")
app.add_typer(config_app, name="config")

def _usage_error(err, file=None) -> None:
    """A wrong command line (unknown option, missing argument, bad value) is one line too, like every
    other mistake, rather than click's usage block and framed panel; asking for help still shows it."""
    if type(err).__name__ == "NoArgsIsHelpError":
        return next(show for cls, show in _SHOW.items() if isinstance(err, cls))(err, file)
    ctx = getattr(err, "ctx", None)
    see = f": see `{ctx.command_path} --help`" if ctx is not None else ": see `refusalscope --help`"
    click.echo(f"error: {' '.join(err.format_message().split()).rstrip('.')}{see}", err=True)


# typer vendors its own click: patch the exception class of both, and typer's rich printer
_CLICK_EXCEPTIONS: set[Any] = {click.ClickException, typer_core._click.exceptions.ClickException}
_SHOW = {cls: cls.show for cls in _CLICK_EXCEPTIONS}
for _cls in _CLICK_EXCEPTIONS:
    _cls.show = _usage_error
rich_utils.rich_format_error = _usage_error  # type: ignore[assignment]  # typer's printer when rich is installed

QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines.")
JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
CONFIG = typer.Option(None, "--config", "-c", help=(
    "YAML config file or preset name (default: the run directory's own config.yaml, else demo)."))
RUN = typer.Option(None, "--run", "-r", help="Run directory (default: runs/<config name>).")
BACKEND = typer.Option(None, "--backend", help="local (default) or ray: fan per-prompt work out over Ray workers.")
ADDRESS = typer.Option(
    None, "--address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local one."
)
WORKERS = typer.Option(None, "--workers", min=1, help="Ray workers (default: one per GPU, else one per CPU).")
ACCEPT = typer.Option(
    False,
    "--accept-version",
    help="Continue a run directory written by another refusalscope release, keeping its finished stages.",
)
NO_DEPS = typer.Option(False, "--no-deps",
                       help="Run only this stage: the stages it needs must have finished already (with this config).")


def _terminate(signum, frame):
    raise Terminated()


def friendly(fn):
    """Print UserError as one line and exit 2 instead of a traceback; Ctrl-C (SIGINT) and SIGTERM
    end in one line saying how to resume, exit 130 / 143 (128 + the signal), after the cleanup
    that every interrupted write and stage does (temp files removed, stage marked failed, lock
    released)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread (an embedding app): leave its handlers alone
            previous = None
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as err:
            name, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("SIGINT", 130)
            typer.echo(f"error: interrupted ({name}): run the same command again to resume (finished work "
                       "is kept)", err=True)
            raise typer.Exit(code) from None
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:
            from ..artifacts import disk_full

            if not disk_full(err):
                raise
            typer.echo(f"error: no space left on the disk ({err.filename or err}): free space and run the same "
                       "command again (finished work is kept)", err=True)
            raise typer.Exit(2) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return wrapper


def _log(quiet: bool, as_json: bool):
    from ..run.runner import printer

    return printer(quiet, sys.stderr if as_json else sys.stdout)


def _execution(backend: str | None, address: str | None, workers: int | None) -> dict:
    if backend not in (None, "local", "ray"):
        raise UserError(f"unknown backend {backend!r}: use local or ray")
    if address and backend == "local":
        raise UserError("--address is for --backend ray: drop it or add --backend ray")
    ex = {"backend": backend or ("ray" if address else None), "address": address, "workers": workers}
    return {"execution": {k: v for k, v in ex.items() if v is not None}}


def _context(config: str | None, run: Path | None, quiet: bool, as_json: bool,
             execution: dict | None = None, accept_version: bool = False, unrecorded: dict | None = None):
    from ..run.runner import open_context

    return open_context(config, run, execution, quiet, _log(quiet, as_json), accept_version=accept_version,
                        unrecorded=unrecorded)


def _print_examples(info: dict) -> None:
    from ..run.store import read_jsonl

    path = Path(info.get("model_path", info["path"])) / "quality_examples.jsonl"
    if path.exists():
        print_examples(read_jsonl(path))


@app.command()
@friendly
def demo(run: Path | None = RUN, quiet: bool = QUIET, as_json: bool = JSON,
         backend: str | None = BACKEND, address: str | None = ADDRESS,
         workers: int | None = WORKERS, accept_version: bool = ACCEPT):
    """The main job on the embedded demo world: build it (once), then run the whole pipeline."""
    from ..demo.world import build_world

    log = _log(quiet, as_json)
    info = build_world(quiet=quiet, log=log)
    result: dict[str, Any] = {"world": {k: info[k] for k in ("path", "hash", "build_seconds", "quality",
                                                             "sae_quality")}}
    ex = _execution(backend, address, workers)
    result.update(_run_stages("demo", run, quiet, as_json, "analyses", execution=ex,
                              accept_version=accept_version))
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    print_quality(info["quality"])
    print_sae_quality(info["sae_quality"])
    _print_examples(info)
    _report(result, False)
    from .report import write_report

    path = write_report(result["run"])
    print(f"report: {path.resolve()}  (open it in a browser; `refusalscope serve {result['run']}` to explore)")


def _run_stages(config, run, quiet, as_json, upto: str, only: list[str] | None = None,
                execution: dict | None = None, accept_version: bool = False, no_deps: bool = False,
                unrecorded: dict | None = None) -> dict:
    """Run the pipeline's stages in order up to `upto` (each skipped when already done); the
    analyses are the ones `analyses.run` lists, or `only`. Every input is checked first."""
    from ..run.runner import check_analyses, run_pipeline

    check_analyses(only)
    return run_pipeline(_context(config, run, quiet, as_json, execution, accept_version, unrecorded), upto, only,
                        no_deps)


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    from .tables import print_stage_summaries

    print_stage_summaries(result)


@app.command()
@friendly
def direction(config: str | None = CONFIG, run: Path | None = RUN, quiet: bool = QUIET,
              as_json: bool = JSON, backend: str | None = BACKEND,
              address: str | None = ADDRESS, workers: int | None = WORKERS,
              accept_version: bool = ACCEPT, no_deps: bool = NO_DEPS):
    """Derive the refusal direction and pick l* by attack success rate (runs `filter` first)."""
    ex = _execution(backend, address, workers)
    _report(_run_stages(config, run, quiet, as_json, "direction", execution=ex,
                        accept_version=accept_version, no_deps=no_deps), as_json)


@app.command()
@friendly
def stage1(config: str | None = CONFIG, run: Path | None = RUN, quiet: bool = QUIET,
           as_json: bool = JSON, backend: str | None = BACKEND,
           address: str | None = ADDRESS, workers: int | None = WORKERS,
           accept_version: bool = ACCEPT, no_deps: bool = NO_DEPS):
    """Stage 1: smallest top-K-per-layer ablation that jailbreaks each refused prompt."""
    ex = _execution(backend, address, workers)
    _report(_run_stages(config, run, quiet, as_json, "stage1", execution=ex,
                        accept_version=accept_version, no_deps=no_deps), as_json)


@app.command()
@friendly
def stage2(config: str | None = CONFIG, run: Path | None = RUN, quiet: bool = QUIET,
           as_json: bool = JSON, backend: str | None = BACKEND,
           address: str | None = ADDRESS, workers: int | None = WORKERS,
           accept_version: bool = ACCEPT, no_deps: bool = NO_DEPS):
    """Stage 2: Algorithm 1 over the τ sweep and three seeds; prints the paper's Table 1."""
    ex = _execution(backend, address, workers)
    _report(_run_stages(config, run, quiet, as_json, "stage2", execution=ex,
                        accept_version=accept_version, no_deps=no_deps), as_json)


@app.command()
@friendly
def stage3(config: str | None = CONFIG, run: Path | None = RUN, quiet: bool = QUIET,
           as_json: bool = JSON, backend: str | None = BACKEND,
           address: str | None = ADDRESS, workers: int | None = WORKERS,
           accept_version: bool = ACCEPT, no_deps: bool = NO_DEPS):
    """Stage 3: factorization machine, ranked interacting latents, Table 2, FM vs linear probe."""
    ex = _execution(backend, address, workers)
    _report(_run_stages(config, run, quiet, as_json, "stage3", execution=ex,
                        accept_version=accept_version, no_deps=no_deps), as_json)


@app.command()
@friendly
def analyze(names: list[str] | None = typer.Argument(
                None, help="hydra stage3_only controls ce_loss taxonomy clamping semantics dashboards (default: all)"),
            config: str | None = CONFIG, run: Path | None = RUN, quiet: bool = QUIET,
            as_json: bool = JSON, backend: str | None = BACKEND,
            address: str | None = ADDRESS, workers: int | None = WORKERS,
            accept_version: bool = ACCEPT, no_deps: bool = NO_DEPS):
    """The paper's analyses (runs the earlier stages first when needed)."""
    ex = _execution(backend, address, workers)
    _report(_run_stages(config, run, quiet, as_json, "analyses", names or None, execution=ex,
                        accept_version=accept_version, no_deps=no_deps), as_json)


@app.command("run")
@friendly
def run_all(config: str | None = CONFIG, run: Path | None = RUN, quiet: bool = QUIET,
            as_json: bool = JSON, backend: str | None = BACKEND,
            address: str | None = ADDRESS, workers: int | None = WORKERS,
            accept_version: bool = ACCEPT):
    """The whole pipeline on a config: stages 1–3 and the analyses (resumes where it stopped)."""
    ex = _execution(backend, address, workers)
    _report(_run_stages(config, run, quiet, as_json, "analyses", execution=ex, accept_version=accept_version),
            as_json)


@app.command("eval")
@friendly
def eval_cmd(config: str | None = CONFIG, run: Path | None = RUN,
             datasets: list[str] | None = typer.Option(
                 None, "--datasets", help="heldout, search, harmless, general, bundled:NAME, a file or "
                 "NAME=PATH (comma-separated or repeated; default: eval.datasets)"),
             interventions: list[str] | None = typer.Option(
                 None, "--interventions", help="none direction actadd core core_category stage2_union "
                 "critical_union random bos_clamp (comma-separated or repeated; default: all)"),
             quiet: bool = QUIET, as_json: bool = JSON, backend: str | None = BACKEND,
             address: str | None = ADDRESS, workers: int | None = WORKERS):
    """Evaluate interventions on benchmarks: refusal, over-refusal and side effects (runs Stages 1-3 first)."""
    from .tables import print_eval

    ev = {k: [x.strip() for v in vals for x in v.split(",") if x.strip()]
          for k, vals in (("datasets", datasets), ("interventions", interventions)) if vals}
    result = _run_stages(config, run, quiet, as_json, "eval", execution=_execution(backend, address, workers),
                         unrecorded={"eval": ev} if ev else None)  # the choice is recorded in eval/, not config.yaml
    if as_json:
        print(json.dumps({"eval": result["eval"], "run": result["run"]}, indent=2, default=str))
        return
    print_eval(result["eval"])
    print(f"run directory: {result['run']} (table: eval/cells.parquet, figures: eval/*.png)")


@app.command("filter")
@friendly
def filter_cmd(config: str | None = CONFIG, run: Path | None = RUN, quiet: bool = QUIET,
               as_json: bool = JSON, accept_version: bool = ACCEPT):
    """Judge the harmful test prompts and keep those the model refuses (paper: D_harmful filter)."""
    summary = _run_stages(config, run, quiet, as_json, "filter", accept_version=accept_version)["filter"]
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_table("Refusal filter", [summary])


@app.command("compare")
@friendly
def compare_cmd(a: Path = typer.Argument(..., help="A run directory."),
                b: Path = typer.Argument(..., help="Another run directory.")):
    """Whether two runs hold the same results (artifacts byte for byte, manifests minus timings);
    exit 1 and one line per difference when they do not."""
    from ..run.compare import compare_runs
    from ..run.store import RunStore

    for root in (a, b):
        RunStore(root, create=False).verify_all()
    diffs = compare_runs(a, b)
    for d in diffs:
        print(d)
    if diffs:
        raise typer.Exit(1)
    print(f"same results in {a} and {b}")


@app.command("report")
@friendly
def report_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory (written by `refusalscope run`)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)."),
    quiet: bool = QUIET,
):
    """Write the run as one self-contained HTML file (inlined CSS and figures; opens offline)."""
    from .report import write_report

    path = write_report(run_dir, out)
    if not quiet:
        print(f"report: {path.resolve()} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("serve")
@friendly
def serve_cmd(run_dir: Path = typer.Argument(..., help="Run directory (written by `refusalscope run`)."),
              host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
              port: int = typer.Option(8000, help="TCP port (0: any free one)."),
              annotations: Path | None = typer.Option(
                  None, "--annotations", help="SQLite file of the study (default: RUN_DIR/annotations.sqlite).")):
    """The local web app: overview, latent browser and pages, prompt pages, playground, annotation study."""
    from .web import serve

    serve(run_dir, host=host, port=port, annotations=annotations)


@world_app.command("build")
@friendly
def world_build(force: bool = typer.Option(False, help="Rebuild from scratch."), quiet: bool = QUIET,
                as_json: bool = JSON):
    """Build the demo world (cached; resumes an interrupted build)."""
    from ..demo.world import build_world

    info = build_world(quiet=quiet, force=force, log=_log(quiet, as_json))
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print_quality(info["quality"])
        _print_examples(info)
        print_sae_quality(info["sae_quality"])
        print(f"built in {info['build_seconds']} s at {info['path']}")


@world_app.command("info")
@friendly
def world_info_cmd(as_json: bool = JSON, overrefusal: bool = typer.Option(
        True, help="Report the demo model on the bundled over-refusal set (measured once, then cached).")):
    """Show the demo world's build record (status, timings, quality, over-refusal)."""
    from ..demo.overrefusal import overrefusal_rates
    from ..demo.world import world_dir, world_info

    info = world_info()
    if not info:
        raise UserError(f"the demo world is not built (would live at {world_dir()}): run "
                        "`refusalscope demo-world build`")
    over = overrefusal_rates(log=_log(False, as_json)) if overrefusal else None
    if as_json:
        print(json.dumps({**info, **({"overrefusal": {k: v for k, v in over.items() if k != "examples"}}
                                     if over else {})}, indent=2))
        return
    print_table("Demo world", [{"status": info["status"], "hash": info["hash"], "path": info["path"],
                                "model": info.get("model_path", "-"),
                                "build seconds": info.get("build_seconds", "-")}])
    print_table("Build timings (s)", [info["timings"]])
    if "quality" in info:
        print_quality(info["quality"])
        _print_examples(info)
        print_sae_quality(info["sae_quality"])
    if over:
        print_table(f"Demo model on the over-refusal set ({over['judge']} judge, greedy, "
                    f"{over['max_new_tokens']} tokens; refused on safe prompts = over-refusal)",
                    [{"set": r["set"], "n": r["n"], "refused %": round(100 * r["refused"], 1),
                      "degenerate %": round(100 * r["degenerate"], 1), "mean P(I)": r["mean_p_I"]}
                     for r in over["rows"] + over["by_kind"]])


@world_app.command("path")
@friendly
def world_path():
    """Print the demo world's cache folder (set REFUSALSCOPE_CACHE to move it)."""
    from ..demo.world import world_dir

    print(world_dir())


@config_app.command("show")
@friendly
def config_show(preset: str = typer.Argument("demo", help="Preset name or YAML file.")):
    """Print a preset (or file) with every default filled in, as YAML."""
    from ..run.config import dump_config, load_config

    print(dump_config(load_config(preset)), end="")


@config_app.command("presets")
def config_presets():
    """List the presets."""
    from ..run.config import preset_names

    print("\n".join(preset_names()))


@config_app.command("validate")
@friendly
def config_validate(path: str):
    """Check a config file; prints 'ok' or the one problem to fix."""
    from ..run.config import load_config

    load_config(path)
    print("ok")


def main() -> None:  # pragma: no cover
    app()


from . import cli_export  # noqa: E402, F401  (registers `export`; cli.py is near its size limit)
