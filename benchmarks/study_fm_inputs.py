"""Study: FM test accuracy under the input choices the paper does not describe.

The paper records SAE activations "on the last 4 tokens" and trains an FM on them; it does not
say whether a prompt is one row (pooled over its tokens) or four, nor how activations of tens to
hundreds are fed in. This reads the per-token activations a run's Stage 3 stored
(`stage3/acts_*.safetensors`, `stage3.mode: tokens`), derives the pooled rows from them, and
trains the FM of that run's config on each (rows × scale) and at each embedding size the paper
compares (5, 20, 50): test accuracy per row and per prompt, and the embedding collapse.

    python benchmarks/study_fm_inputs.py runs/new [--out runs/bench/fm_inputs.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from refusalscope.artifacts import writable_arg
from refusalscope.methods.fm import embedding_collapse, train_fm
from refusalscope.methods.fm_data import FeatureMatrix, fm_dataset
from refusalscope.run.config import load_config
from refusalscope.run.results import RunResults

EMBEDDING_SIZES = (5, 20, 50)  # the FM sizes the paper compares


def study(run_dir: str, sizes=EMBEDDING_SIZES) -> list[dict]:
    res = RunResults(run_dir)
    cfg = load_config(Path(run_dir) / "config.yaml")
    sc = cfg.stage3
    acts = [FeatureMatrix.load(res.path("stage3", f"acts_{label}.safetensors")) for label in ("harmful", "harmless")]
    if acts[0].mode != "tokens":
        raise SystemExit(f"{run_dir} stored pooled activations: run Stage 3 with stage3.mode: tokens")
    rows = []
    for mode in ("tokens", "pooled"):
        pair = acts if mode == "tokens" else [a.pooled() for a in acts]
        data = fm_dataset(pair[0], pair[1], cfg.seed)
        for scale in ("max_abs", "none"):
            for k in sizes:
                t0 = time.perf_counter()
                fm = train_fm(data.train, data.val, data.test, k=k, lr=sc.lr, epochs=sc.epochs,
                              batch_size=sc.batch_size, seed=cfg.seed, scale=scale)
                rows.append({"rows": mode, "scale": scale, "k": k, "n_train_rows": len(data.train),
                             "columns": len(data.columns), "best_epoch": fm.best_epoch,
                             "val_acc": round(fm.val_acc, 4), "test_acc": round(fm.test_acc, 4),
                             "test_prompt_acc": round(fm.prompt_accuracy(data.test), 4),
                             "collapse": round(embedding_collapse(fm, seed=cfg.seed), 4),
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory whose Stage 3 ran with stage3.mode: tokens")
    ap.add_argument("--out", type=writable_arg, default="runs/bench/fm_inputs.json")
    args = ap.parse_args()
    rows = study(args.run)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": args.run, "rows": rows}, indent=1))
    print("| rows | scale | k | test acc (rows) | test acc (prompts) | collapse |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']} | {r['scale']} | {r['k']} | {r['test_acc']} | {r['test_prompt_acc']} | {r['collapse']} |")


if __name__ == "__main__":
    main()
