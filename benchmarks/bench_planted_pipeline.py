"""B6: the whole pipeline on a planted world (benchmarks/planted_world.py), measured end to end.

Runs what `refusalscope run` runs (`run.runner.run_pipeline`, in this process so that GPU memory
and rows can be read) with the gemma-2-2b-it preset's ladders on the world, and
reports per stage: wall seconds, seconds per refused prompt, forward and generated rows (counted at
`ChatModel`), forward rows per second of forward time, and peak GPU memory. Model and SAE loading
are timed apart. `--compile` compiles the decoder layers (`ChatModel.compile`) and reports the
time spent compiling. Scaled to the paper's 521 prompts: stages whose work is per prompt
linearly, the others as measured (each row says which). Results are written after every stage,
so a run stopped by a time limit still reports the stages it finished.

    python benchmarks/bench_planted_pipeline.py --world DIR [--prompts 16] [--compile] [--out f.json]
    python benchmarks/bench_planted_pipeline.py --small     # tiny world on the CPU (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from refusalscope.artifacts import writable_arg

sys.path.insert(0, str(Path(__file__).resolve().parent))

# stages whose work grows with the number of refused prompts (stage 3 also trains the FM once:
# scaling it linearly is an upper bound); the rest are fixed costs of a run
PER_PROMPT = {"filter", "stage1", "stage2", "stage3", "hydra", "stage3_only", "controls", "ce_loss"}
PAPER_PROMPTS = 521
# --small: the preset's ladders, smaller prompt sets so a CPU finishes in CI time
SMALL_OVERRIDES = {"direction": {"n_train": 48, "n_val": 16}, "stage3": {"n_per_class": 48, "epochs": 3},
                   "analyses": {"ce_texts": 8, "explain_texts": 24}, "generation": {"max_new_tokens": 8}}


class Counter:
    """Counts forward / generated rows and tokens at ChatModel and the time spent in forwards."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.c = dict(fwd_rows=0, fwd_tokens=0, fwd_s=0.0, gen_rows=0, gen_tokens=0)

    @contextmanager
    def installed(self):
        from refusalscope.io.model import ChatModel

        fwd, gen = ChatModel._forward, ChatModel.generate_full

        def _forward(model, sub, keep):
            t0 = time.perf_counter()
            try:  # residual reads end the pass early by raising
                return fwd(model, sub, keep)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.c["fwd_s"] += time.perf_counter() - t0
                self.c["fwd_rows"] += len(sub)
                self.c["fwd_tokens"] += int(sub.attention_mask.sum())

        def generate_full(model, batch, max_new_tokens=64, *a, **k):
            self.c["gen_rows"] += len(batch)
            self.c["gen_tokens"] += len(batch) * max_new_tokens
            return gen(model, batch, max_new_tokens, *a, **k)

        ChatModel._forward, ChatModel.generate_full = _forward, generate_full
        try:
            yield
        finally:
            ChatModel._forward, ChatModel.generate_full = fwd, gen


def _patch_stages(record):
    """Wrap every stage the runner chains so each reports its time and counters."""
    from refusalscope.run import runner

    def wrap(name, fn):
        def timed(ctx):
            record("start", name)
            out = fn(ctx)
            record("end", name)
            return out
        return timed

    from dataclasses import replace

    for name, stage in list(runner.STAGES.items()):
        runner.STAGES[name] = replace(stage, run=wrap(name, stage.run))


def _patch_loading(loads: dict, compile_model: bool):
    """Time model and SAE loading apart from the stage that triggers them; compile on request."""
    from refusalscope.run import pipeline, resolve

    load_model, load_saes = pipeline.load_model, resolve.load_saes

    def model(cfg, **kw):
        t0 = time.perf_counter()
        m = load_model(cfg, **kw)
        loads["model_s"] = time.perf_counter() - t0
        loads["model"] = m
        return m.compile() if compile_model else m

    def saes(cfg, m, **kw):
        t0 = time.perf_counter()
        s = load_saes(cfg, m, **kw)
        loads["saes_s"] = time.perf_counter() - t0
        return s

    pipeline.load_model, resolve.load_saes = model, saes


def run(config: Path, run_dir: Path, out: Path | None, compile_model: bool = False, note: str = "") -> dict:
    from refusalscope.run.runner import open_context, run_pipeline

    cuda = torch.cuda.is_available() and yaml.safe_load(config.read_text())["model"].get("device") != "cpu"
    counter, loads, rows, marks = Counter(cuda), {}, [], {}
    res = {"config": str(config), "device": torch.cuda.get_device_name() if cuda else "cpu",
           "compile": compile_model, "note": note, "stages": rows}

    def record(event, name):
        now = time.perf_counter()
        if event == "start":
            marks[name] = (now, dict(counter.c), loads.get("model_s", 0) + loads.get("saes_s", 0))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            return
        t0, c0, l0 = marks[name]
        load = loads.get("model_s", 0) + loads.get("saes_s", 0) - l0
        d = {k: counter.c[k] - c0[k] for k in c0}
        manifest = json.loads((run_dir / "manifest.json").read_text())["stages"].get(name, {})
        rows.append({"stage": name, "seconds": round(now - t0 - load, 2), "load_s_inside": round(load, 1),
                     "summary": manifest.get("summary", {}), **{k: round(v, 3) for k, v in d.items()},
                     "fwd_rows_per_s": round(d["fwd_rows"] / d["fwd_s"], 1) if d["fwd_s"] else None,
                     "peak_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None})
        _finish(res, rows, loads, run_dir, out)

    _patch_stages(record)
    _patch_loading(loads, compile_model)
    t0 = time.perf_counter()
    with counter.installed():
        run_pipeline(open_context(str(config), run_dir, quiet=True))
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return _finish(res, rows, loads, run_dir, out)


def _finish(res: dict, rows: list[dict], loads: dict, run_dir: Path, out: Path | None) -> dict:
    """Per-prompt and scaled figures from the rows so far; written to `out` each time."""
    kept = next((r["summary"].get("n_kept") for r in rows if r["stage"] == "filter"), None)
    judged = next((r["summary"].get("n_in") for r in rows if r["stage"] == "filter"), None)
    for r in rows:
        n = judged if r["stage"] == "filter" else kept
        r["per_prompt"] = r["stage"] in PER_PROMPT
        r["s_per_prompt"] = round(r["seconds"] / n, 3) if r["per_prompt"] and n else None
        r["scaled_521_s"] = round(r["s_per_prompt"] * PAPER_PROMPTS if r["s_per_prompt"] else r["seconds"], 1)
    model = loads.get("model")
    res.update({"prompts_judged": judged, "prompts_refused": kept,
                "load_s": {k: round(v, 1) for k, v in loads.items() if k.endswith("_s")},
                "compile_s": round(model.compile_seconds, 1) if model is not None else 0.0,
                "stage_total_s": round(sum(r["seconds"] for r in rows), 1),
                "scaled_521_h": round(sum(r["scaled_521_s"] for r in rows) / 3600, 3),
                "fwd_rows_per_s": round(sum(r["fwd_rows"] for r in rows)
                                        / max(1e-9, sum(r["fwd_s"] for r in rows)), 1)})
    if out is not None:
        out.write_text(json.dumps(res, indent=1, default=str))
    return res


def print_table(res: dict) -> None:
    print(f"planted pipeline on {res['device']} (compile {res['compile']}): {res['prompts_refused']} refused "
          f"of {res['prompts_judged']} prompts; load {res['load_s']}, compile {res['compile_s']} s")
    print(f"{'stage':<12}{'s':>8}{'s/prompt':>9}{'fwd rows':>9}{'rows/s':>8}{'gen rows':>9}{'peak GB':>8}{'521: s':>9}")
    for r in res["stages"]:
        print(f"{r['stage']:<12}{r['seconds']:>8.1f}{r['s_per_prompt'] or '-':>9}{r['fwd_rows']:>9}"
              f"{r['fwd_rows_per_s'] or '-':>8}{r['gen_rows']:>9}{r['peak_gb'] or '-':>8}{r['scaled_521_s']:>9.0f}")
    print(f"total {res['stage_total_s']} s measured; {res['scaled_521_h']} h scaled to {PAPER_PROMPTS} prompts")


def prepare_config(world: Path, run_dir: Path, prompts: int, small: bool, analyses: list[str] | None = None) -> Path:
    """The world's config with max_prompts (and, for --small, smaller sets) written beside the run."""
    from refusalscope.run.config import _merge

    cfg = yaml.safe_load((world / "config.yaml").read_text())
    cfg = _merge(cfg, {"data": {"max_prompts": prompts}, **(SMALL_OVERRIDES if small else {})})
    if analyses is not None:
        cfg = _merge(cfg, {"analyses": {"run": analyses}})
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=None, help="a planted world folder (built if missing)")
    ap.add_argument("--small", action="store_true", help="tiny world on the CPU")
    ap.add_argument("--prompts", type=int, default=16, help="harmful test prompts judged (data.max_prompts)")
    ap.add_argument("--compile", action="store_true", help="compile the decoder layers")
    ap.add_argument("--analyses", nargs="*", default=None, help="analyses to run (default: the config's)")
    ap.add_argument("--run", type=Path, default=Path("runs/bench/planted"))
    ap.add_argument("--out", type=writable_arg, default=Path("runs/bench/planted_pipeline.json"))
    a = ap.parse_args(argv)
    world = a.world or Path("runs/bench/planted-world" + ("-small" if a.small else ""))
    if not (world / "config.yaml").exists():
        from planted_world import build_world

        build_world(world, small=a.small, device="cpu" if a.small else ("cuda" if torch.cuda.is_available() else "cpu"),
                    dtype="float32" if a.small or not torch.cuda.is_available() else "bfloat16")
    shutil.rmtree(a.run, ignore_errors=True)
    config = prepare_config(world, a.run, a.prompts, a.small, a.analyses)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res = run(config, a.run, a.out, a.compile, note=json.loads((world / "world.json").read_text())["arch"])
    print_table(res)
    return res


if __name__ == "__main__":
    main()
