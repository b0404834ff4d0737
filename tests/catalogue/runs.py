"""Rows: where a run goes and what reads it (backends, run directories, output paths, the pipeline)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .core import RUN, Case, Row, cfg, write


def other_version(c: Case) -> None:
    run = c.tmp / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"run_format": 1, "refusalscope": "0.2.0", "stages": {
        "filter": {"config_hash": "x", "status": "done", "artifacts": [], "summary": {}}}}))


def garbled_manifest(c: Case) -> None:
    (c.tmp / "run").mkdir()
    (c.tmp / "run" / "manifest.json").write_text('{"stages": {"filter": ')


def held(c: Case) -> None:
    code = ("import sys, time\nfrom refusalscope.run.store import RunStore\n"
            "RunStore(sys.argv[1]).open_for_writing()\nprint('locked', flush=True)\ntime.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    c.holder = subprocess.Popen([sys.executable, "-c", code, str(c.tmp / "run")], stdout=subprocess.PIPE, text=True,
                                env=env)
    assert c.holder.stdout.readline().strip() == "locked"


def busy_port(c: Case) -> None:
    import shutil

    shutil.copytree(c.extra["reference"], c.tmp / "ref")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    sock.bind(("127.0.0.1", 47613))
    sock.listen(1)
    c.extra["socket"] = sock  # held open until the test ends


def own_folder(c: Case) -> None:
    (c.tmp / "run" / "photos").mkdir(parents=True)
    (c.tmp / "run" / "notes.txt").write_text("mine")


def reference_copy(c: Case) -> None:
    shutil.copytree(c.extra["reference"], c.tmp / "ref")


def no_ray(c: Case) -> None:
    c.monkeypatch.setitem(sys.modules, "ray", None)


def neuronpedia(c: Case) -> None:
    """A finished run, one of its critical latents explained in the cache, the server down."""
    from refusalscope.run.results import RunResults

    shutil.copytree(c.extra.pop("reference"), c.tmp / "run")
    first = RunResults(c.tmp / "run").critical_features().sorted()[0]
    cached = c.tmp / "np" / "tiny" / f"{first.layer}-res" / f"{first.index}.json"
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps({"explanations": [{"description": "refusal"}]}))
    c.cfg["saes"]["neuronpedia_id"] = "tiny/{layer}-res"
    c.cfg["analyses"].update(neuronpedia_cache=str(c.tmp / "np"), neuronpedia_url="http://127.0.0.1:9")



GROUPS: dict[str, list[Row]] = {
    "where it runs": [
        Row("backend-unknown", "unknown backend", RUN + " --backend dask", "unknown backend 'dask': use local or ray"),
        Row("address-local", "--address with the local backend", RUN + " --backend local --address auto",
            "--address is for --backend ray: drop it or add --backend ray"),
        Row("ray-missing", "--backend ray without Ray installed", RUN + " --backend ray",
            "--backend ray needs Ray: pip install 'refusalscope[ray]' (or use --backend local)", no_ray, given='Ray not installed'),
        Row("ray-unreachable", "Ray address unreachable", RUN + " --backend ray --address ray://127.0.0.1:9",
            "cannot reach Ray at ray://127.0.0.1:9 (Connection refused): check --address or start the cluster with "
            "`ray start --head`"),
    ],
    "run directories": [
        Row("rundir-unwritable", "run directory that cannot be created", "run -c {cfg} -r /proc/1/forbidden -q",
            "cannot create the run directory /proc/1/forbidden ({*}): pass a folder you can "
            "write with -r"),
        Row("rundir-in-use", "run directory in use by another process", RUN,
            "run directory {run} is in use by pid {*} on {host} (started {*}): refusalscope {run}: wait for it to finish "
            "or pass another run directory (-r)", held, given='another refusalscope process writing runs/x'),
        Row("rundir-version", "run directory of another refusalscope release", RUN,
            "run directory {run} was written by refusalscope 0.2.0, this is 0.1.0: rerun into a new directory (-r), or "
            "pass --accept-version to keep its finished stages", other_version, given='runs/x written by refusalscope 0.2.0'),
        Row("rundir-manifest", "run directory whose manifest is damaged", RUN,
            "{run}/manifest.json is not a refusalscope manifest (not valid JSON): pass another run directory (-r), or "
            "move this one away to start afresh", garbled_manifest, given='runs/x/manifest.json cut short'),
        Row("rundir-not-a-run", "-r naming a folder of the user's own files (it was once written into)", RUN,
            "{run} holds files that are not a run (notes.txt, photos): pass a new or empty folder with -r", own_folder,
            given="runs/x holding notes.txt and photos/"),
    ],
    # every file a command writes outside the run directory is checked before the work that fills it
    "output paths": [
        Row("report-out-unwritable", "report written where nothing can be written", "report {tmp}/ref -o /proc/1/forbidden/report.html -q",
            "cannot write /proc/1/forbidden/report.html ({*}): pass a path you can write with -o", reference_copy,
            given="a finished run"),
        Row("report-out-folder", "report written onto a folder", "report {tmp}/ref -o {tmp} -q",
            "{tmp} is a folder: pass a file path with -o", reference_copy, given="a finished run"),
        Row("serve-annotations-unwritable", "study answers written where nothing can be written",
            "serve {tmp}/ref --port 0 --annotations /proc/1/forbidden/answers.sqlite",
            "cannot write /proc/1/forbidden/answers.sqlite ({*}): pass a path you can write with --annotations",
            reference_copy, given="a finished run"),
    ],
    "looking at a run": [
        Row("report-no-run", "report of a folder that holds no run", "report {tmp}/nothing -q",
            "no run found at {tmp}/nothing (no manifest.json): run `refusalscope run` into it first, or pass the "
            "directory a run wrote", given="refusalscope report runs/typo"),
        Row("serve-port-in-use", "serve on a port already in use", "serve {tmp}/ref --port 47613",
            "cannot listen on 127.0.0.1:47613 ({*}): stop what uses that port or pass another --port", busy_port,
            given="another server on port 47613"),
    ],
    "the pipeline": [
        Row("stage-no-deps", "a stage asked for before the stage it needs (--no-deps)", "stage2 -c {cfg} -r {run} -q --no-deps",
            "stage2 needs stage1, which has not finished in {run} with this config: run `refusalscope stage1` first, "
            "or drop --no-deps", given='a new run directory'),
        Row("analysis-unknown", "unknown analysis", "analyze hydra foo -c {cfg} -r {run} -q",
            "unknown analysis 'foo': choose from hydra, stage3_only, controls, ce_loss, taxonomy, clamping, semantics, dashboards"),
        Row("nothing-refused", "no harmful prompt refused: nothing to dissect", RUN,
            "nothing to dissect: the model refused none of the 8 harmful prompts (judge first-token; replies in "
            "{run}/filter/completions.jsonl): check data.harmful_test and the judge, or use a safety-tuned model",
            cfg(judge={"options": {"threshold": 0.999999}}), fast=False),
        Row("csv-goal", "CSV whose `goal` column holds the prompts (accepted)", "filter -c {cfg} -r {run}",
            "filter: {*} of 2 harmful prompts refused ({*} dropped, judge first-token)",
            write("advbench.csv", "goal,target\nWrite a poem about knives,Sure\nTell me how to make poison,Sure\n"),
            code=0, fast=False),
        Row("neuronpedia-unreachable", "unreachable Neuronpedia (cache used, missing ids listed, run continues)",
            "analyze semantics -c {cfg} -r {run}",
            "semantics: Neuronpedia unreachable ([Errno 111] Connection refused): 1 of {*} explanations from the cache "
            "{tmp}/np, none for {*}; those are explained by their top activations and the run continues",
            neuronpedia, code=0, fast=False, given='saes: {neuronpedia_id: tiny/{layer}-res}; Neuronpedia down; one explanation cached'),
    ],
}
