"""B15: the dashboards stage's corpus passes, one per layer (as before 2026-12-06) against layers
grouped into shared passes (`stage_dashboards.passes`), on a finished run's latents and corpus.

Each variant runs in its own process (its peak RSS is its own) over the same latents and texts;
the dashboards both produce must be identical, since a latent's dashboard may not depend on which
layers share its pass. Reports seconds, model forward passes and peak RSS per variant.

    python benchmarks/bench_dashboards.py --run runs/demo [--out bench_dashboards.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from refusalscope.artifacts import writable_arg


def _variant(run: Path, grouped: bool) -> dict:
    """One variant in this process: every layer's dashboards body (the corpus part)."""
    from refusalscope.interventions.features import FeatureSet
    from refusalscope.run import stage_dashboards as sd
    from refusalscope.run.pipeline import Context
    from refusalscope.run.results import RunResults

    r = RunResults(run)
    ctx = Context(r.config(), store=r.store, quiet=True, log=lambda *_: None)  # reads only
    feats = FeatureSet(list(r.dashboards())).sorted()
    texts = sd.corpus(ctx)
    _ = ctx.model, ctx.saes  # loaded before the clock starts
    forwards = []
    real = ctx.model.residuals

    def counted(*a, **k):
        forwards.append(1)
        return real(*a, **k)

    ctx.model.residuals = counted
    by_layer = feats.by_layer()
    groups = sd.passes(by_layer) if grouped else [[layer] for layer in by_layer]
    t0 = time.perf_counter()
    body = {}
    for group in groups:
        body.update(sd.corpus_body(ctx, texts, FeatureSet.from_layers({layer: by_layer[layer] for layer in group})))
    seconds = time.perf_counter() - t0
    text = json.dumps({f.id: {**b, "top": [w.to_json() for w in b["top"]],
                              "quantiles": [{**q, "samples": [w.to_json() for w in q["samples"]]}
                                            for q in b["quantiles"]]} for f, b in sorted(body.items())},
                      sort_keys=True)
    return {"variant": "grouped" if grouped else "per-layer", "passes": len(groups), "forward_calls": len(forwards),
            "latents": len(feats), "layers": len(by_layer), "texts": len(texts), "seconds": round(seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "digest": hashlib.sha256(text.encode()).hexdigest()[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished run with dashboards")
    ap.add_argument("--out", type=writable_arg, default=None)
    ap.add_argument("--variant", choices=["per-layer", "grouped"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:  # the child process: one variant, its row as JSON on stdout's last line
        print(json.dumps(_variant(a.run, a.variant == "grouped")))
        return
    if not (a.run / "dashboards" / "dashboards.jsonl").is_file():
        sys.exit(f"{a.run} has no dashboards: run `refusalscope demo` (or analyze dashboards) first")
    rows = []
    for v in ("per-layer", "grouped"):
        p = subprocess.run([sys.executable, __file__, "--run", str(a.run), "--variant", v],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    out = {"rows": rows, "identical": rows[0]["digest"] == rows[1]["digest"],
           "speedup": round(rows[0]["seconds"] / max(rows[1]["seconds"], 1e-9), 2)}
    print(f"identical dashboards: {out['identical']}; grouped passes {out['speedup']}x faster")
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
