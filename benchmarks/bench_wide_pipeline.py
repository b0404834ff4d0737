"""B11: the whole pipeline through the CLI on the wide planted world, one process per stage.

What a user runs, in order, each command its own `refusalscope` process under `/usr/bin/time -v`
(wall time and peak RSS of that process, model and SAE loading included): filter, direction,
stage1, stage2, stage3, `analyze NAME` for every analysis the gemma-2-2b-it preset runs (and
dashboards), `eval`, `report`, then `serve` with a few pages fetched over HTTP (each page's time;
the slowest is reported). Per stage also: prompts per second (the stage's per-prompt rows / wall
seconds), the FM's rows x columns and the stored activations' non-zeros (Stage 3), the report's
size, and the planted latents each stage recovered (benchmarks/planted_recovery.py). A stage that
fails is recorded with its last output line and the rest still run where they can.

Results for one SAE width go into `--out` under its d_sae (other widths in the file are kept):
keys d_sae, n_layers, n_prompts, stages {name: {seconds, peak_rss_gb, ...}}, stages_finished.

    python benchmarks/bench_wide_pipeline.py --world runs/wide/world-16k --run runs/wide/run-16k \
        --out benchmarks/results/wide-cpu/pipeline.json [--prompts 24] [--cpu-sized]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from refusalscope.artifacts import writable_arg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_recovery import planted_recovery  # noqa: E402

CORE = ["filter", "direction", "stage1", "stage2", "stage3"]
# on a shared 2-core CPU: the preset's ladders and algorithms, smaller prompt and text sets
CPU_SIZED = {"direction": {"n_train": 64, "n_val": 16}, "stage3": {"n_per_class": 64, "epochs": 3},
             "analyses": {"ce_texts": 8, "explain_texts": 24}, "generation": {"max_new_tokens": 8},
             "dashboards": {"texts": 48}, "eval": {"datasets": ["heldout", "harmless"]}}
RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)")


def _seconds(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; wall seconds, peak RSS (GB), exit code, last line."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    tail = text[text.rfind("$ "):]
    rss, wall = RSS.findall(tail), WALL.findall(tail)
    lines = [l for l in tail.splitlines() if l.strip() and not l.startswith("\t")]
    return {"seconds": round(_seconds(wall[-1]), 1) if wall else None, "load_1min": round(os.getloadavg()[0], 2),
            "peak_rss_gb": round(int(rss[-1]) / 2 ** 20, 2) if rss else None,
            "exit": proc.returncode, **({"error": lines[-1][-300:]} if proc.returncode and lines else {})}


def fm_shape(run: Path) -> dict:
    """The FM's rows x columns (Stage 3 summary) and the non-zeros of the stored activations."""
    from safetensors import safe_open

    from refusalscope.run.results import RunResults

    res = RunResults(run)
    fm = (res.summary("stage3") or {}).get("fm", {})
    nnz = 0
    for label in ("harmful", "harmless"):
        path = run / "stage3" / f"acts_{label}.safetensors"
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    nnz += int((t != 0).sum()) if t.is_floating_point() else 0
    return {"fm_rows": fm.get("rows"), "fm_columns": fm.get("columns"), "acts_nnz": nnz}


def serve_pages(run: Path, log: Path, exe: str) -> dict:
    """`refusalscope serve` under /usr/bin/time: seconds per fetched page, then stopped."""
    from refusalscope.run.results import RunResults

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = open(log, "a")
    proc = subprocess.Popen(["/usr/bin/time", "-v", exe, "serve", str(run), "--port", str(port)],
                            stdout=f, stderr=subprocess.STDOUT)
    base, pages = f"http://127.0.0.1:{port}", {}
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/api/playground/status", timeout=5)
                break
            except OSError:
                time.sleep(1)
        res = RunResults(run)
        first = next(iter(res.stage2_sets().items()), (None, []))
        paths = ["/", "/latents", "/latents?page=2", "/latents?sort=density", "/prompts"]
        if first[0] is not None:
            paths += [f"/prompts/{first[0]}", *[f"/latents/{f.id}" for f in list(first[1])[:2]]]
        for p in paths:
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(base + p, timeout=600) as r:
                    size = len(r.read())
                pages[p] = {"seconds": round(time.perf_counter() - t0, 3), "bytes": size}
            except OSError as err:
                pages[p] = {"error": str(err)[:200]}
    finally:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")  # the server, under time
        for pid in (children.read_text().split() if children.is_file() else []):
            os.kill(int(pid), signal.SIGINT)
        proc.wait(timeout=60)
        f.close()
    tail = log.read_text()
    rss = RSS.findall(tail[tail.rfind("serve"):])
    ok = {p: v["seconds"] for p, v in pages.items() if "seconds" in v}
    slowest = max(ok, key=lambda k: ok[k]) if ok else None
    return {"pages": pages, "slowest_page": slowest, "slowest_page_s": ok.get(slowest) if slowest else None,
            "peak_rss_gb": round(int(rss[-1]) / 2 ** 20, 2) if rss else None, "seconds": round(sum(ok.values()), 2),
            "exit": 0 if ok and len(ok) == len(pages) else 1}


def prepare(world: Path, run: Path, prompts: int | None, cpu_sized: bool,
            same_as: Path | None = None) -> tuple[Path, dict]:
    """The world's config with the benchmark's overrides, written beside the run. `same_as`: another
    width's world (same model bytes): its model folder and judge threshold, so that filter and
    direction, which read no SAE, hash the same at both widths and are reused."""
    from refusalscope.run.config import _merge

    cfg = yaml.safe_load((world / "config.yaml").read_text())
    cfg = _merge(cfg, {**({"data": {"max_prompts": prompts}} if prompts else {}), **(CPU_SIZED if cpu_sized else {})})
    if same_as is not None:
        other = yaml.safe_load((same_as / "config.yaml").read_text())
        cfg = _merge(cfg, {"model": {"source": other["model"]["source"]}, "judge": other["judge"]})
    run.parent.mkdir(parents=True, exist_ok=True)
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg


def reuse_stages(src: Path, run: Path, names=("filter", "direction")) -> list[str]:
    """Copy finished stages that read no SAE from another width's run (same model and prompts)."""
    manifest = json.loads((src / "manifest.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    mine = {**manifest, "stages": {}}
    done = [n for n in names if manifest["stages"].get(n, {}).get("status") == "done"]
    for n in done:
        shutil.copytree(src / n, run / n, dirs_exist_ok=True)
        mine["stages"][n] = manifest["stages"][n]
    (run / "manifest.json").write_text(json.dumps(mine, indent=1))
    return done


def bench(world: Path, run: Path, out: Path | None, prompts: int | None, cpu_sized: bool, fresh: bool,
          same_as: Path | None = None, reuse: Path | None = None, note: str = "") -> dict:
    exe = str(Path(sys.executable).with_name("refusalscope"))
    if fresh:
        shutil.rmtree(run, ignore_errors=True)
    config, cfg = prepare(world, run, prompts, cpu_sized, same_as)
    reused = reuse_stages(reuse, run) if reuse is not None else []
    info = json.loads((world / "world.json").read_text())
    log = run.parent / f"{run.name}.log"
    from refusalscope.run.config import load_config

    c = load_config(str(config))
    analyses = [*c.analyses.run, *(["dashboards"] if c.dashboards.run else [])]
    res = {"d_sae": info["d_sae"], "n_layers": info["layers"], "d_model": info.get("d_model"),
           "world": str(world), "n_prompts": None, "n_refused": None, "stages": {}, "stages_finished": [],
           "note": note or f"{os.cpu_count()}-core CPU; each stage's 1-minute load average at its end is "
                           "recorded (load_1min): above the core count, other jobs shared the machine",
           "reused": {n: f"from {reuse} (reads no SAE; same model and prompts)" for n in reused}}
    steps = [(s, [s]) for s in CORE] + [(a, ["analyze", a]) for a in analyses] + [("eval", ["eval"])]
    for name, args in steps:
        if name in reused:
            res["stages"][name] = {"exit": 0, "reused": True, "seconds": None, "peak_rss_gb": None}
            _annotate(res, name, run)
            continue
        r = timed([exe, *args, "-c", str(config), "-r", str(run), "-q"], log)
        res["stages"][name] = r
        _annotate(res, name, run)
        _save(res, out)
    r = timed([exe, "report", str(run), "-q"], log)
    report = run / "report.html"
    r["report_mb"] = round(report.stat().st_size / 1e6, 2) if report.is_file() else None
    res["stages"]["report"] = r
    if r["exit"] == 0:
        res["stages_finished"].append("report")
    res["stages"]["serve"] = serve_pages(run, log, exe)
    if res["stages"]["serve"]["exit"] == 0:
        res["stages_finished"].append("serve")
    res["planted_recovery"] = planted_recovery(run, world)
    _save(res, out)
    return res


def _annotate(res: dict, name: str, run: Path) -> None:
    """Finished-stage bookkeeping: prompts, prompts per second, FM shape."""
    from refusalscope.run.results import RunResults

    r, rr = res["stages"][name], RunResults(run)
    if r["exit"] != 0 or not rr.done(name):
        return
    res["stages_finished"].append(name)
    if name == "filter":
        s = rr.summary("filter") or {}
        res["n_prompts"], res["n_refused"] = s.get("n_in"), s.get("n_search")
    n = res["n_prompts"] if name == "filter" else res["n_refused"]
    if n and r["seconds"]:
        r["prompts_per_s"] = round(n / r["seconds"], 3)
    if name == "stage3":
        r.update(fm_shape(run))


def _save(res: dict, out: Path | None) -> None:
    """Write this width's entry into `out` and the table of every width into README.md beside it."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    table["runs"][str(res["d_sae"])] = res
    out.write_text(json.dumps(table, indent=1, default=str))
    (out.parent / "README.md").write_text(readme(table))


def readme(table: dict) -> str:
    """The per-stage table: seconds and peak RSS at each width, and the ratio of the widest to
    the narrowest (the SAE width grows 4x from 16k to 65k)."""
    runs = sorted(table["runs"].values(), key=lambda r: r["d_sae"])
    names = list(dict.fromkeys(n for r in runs for n in r["stages"]))
    head = "| stage | " + " | ".join(f"{r['d_sae']:,}: s | RSS GB" for r in runs)
    head += " | ratio |" if len(runs) > 1 else " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(runs) + (len(runs) > 1))]
    for n in names:
        cells, secs = [], []
        for r in runs:
            st = r["stages"].get(n, {})
            ok = n in r["stages_finished"]
            sec = st.get("seconds") if ok else None
            secs.append(sec)
            gone = "reused" if st.get("reused") else "failed" if st else "not run"
            cells += [f"{sec:.0f}" if sec is not None else gone,
                      f"{st['peak_rss_gb']:.2f}" if st.get("peak_rss_gb") is not None else "-"]
        ratio = f"{secs[-1] / secs[0]:.2f}" if len(runs) > 1 and secs[0] and secs[-1] else "-"
        lines.append(f"| {n} | " + " | ".join(cells) + (f" | {ratio} |" if len(runs) > 1 else " |"))
    info = [f"- d_sae {r['d_sae']:,}: {r['n_layers']} layers, d_model {r.get('d_model')}, {r['n_prompts']} harmful "
            f"prompts judged, {r['n_refused']} dissected; FM "
            f"{r['stages'].get('stage3', {}).get('fm_rows')} rows x {r['stages'].get('stage3', {}).get('fm_columns')} "
            f"columns, {r['stages'].get('stage3', {}).get('acts_nnz')} non-zeros; report "
            f"{r['stages'].get('report', {}).get('report_mb')} MB; slowest page "
            f"{r['stages'].get('serve', {}).get('slowest_page')} "
            f"({r['stages'].get('serve', {}).get('slowest_page_s')} s);"
            f" planted recovery {json.dumps(r.get('planted_recovery', {}))}" for r in runs]
    commentary = table.get("commentary", "")  # hand-written analysis, kept when a width is rerun
    return ("# B11: the wide planted world through the CLI, per stage (CPU)\n\n"
            "Each stage is its own `refusalscope` process under `/usr/bin/time -v` (seconds: wall clock, "
            "model and SAE loading included; RSS: the process's peak). Written by "
            "`benchmarks/bench_wide_pipeline.py`; numbers in `pipeline.json`. "
            f"{runs[0].get('note', '')}.\n\n" + "\n".join(lines) + "\n\n" + "\n".join(info) + "\n"
            + (f"\n{commentary.strip()}\n" if commentary else ""))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True, help="a world from planted_world.py --wide")
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=writable_arg, default=None)
    ap.add_argument("--prompts", type=int, default=None, help="data.max_prompts (default: all harmful test prompts)")
    ap.add_argument("--cpu-sized", action="store_true", help="smaller prompt/text sets (see CPU_SIZED)")
    ap.add_argument("--resume", action="store_true", help="keep the run directory (finished stages skip)")
    ap.add_argument("--same-as", type=Path, default=None, help="the other width's world: its model and judge")
    ap.add_argument("--reuse", type=Path, default=None, help="the other width's run: copy filter and direction")
    ap.add_argument("--note", default="", help="how the machine was shared (goes into the table)")
    a = ap.parse_args(argv)
    res = bench(a.world, a.run, a.out, a.prompts, a.cpu_sized, not a.resume, a.same_as, a.reuse, a.note)
    print(json.dumps({k: v for k, v in res.items() if k != "stages"}, indent=1, default=str))
    for name, r in res["stages"].items():
        print(f"{name:<12}{r.get('seconds') or '-':>9}{r.get('peak_rss_gb') or '-':>7}  exit {r.get('exit')}")
    return res


if __name__ == "__main__":
    main()
