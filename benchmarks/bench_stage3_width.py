"""B13: Stage 3's CPU/GPU-side cost at the paper's SAE widths, on synthetic sparse activations.

Per width (default 16,384 and 65,536 latents per layer, 20 layers), rows are the last 4 tokens of
harmful and harmless prompts with about `--l0` latents firing per token and layer, drawn from a
Zipf-like popularity (a few latents fire often, most rarely, as in real SAEs); harmful rows also
get a few planted latents so the FM has something to learn. Timed: the FM dataset (split, column
index), the FM fit (k = 20), the per-prompt ranking, the linear probe and the collapse check.
Each width runs in its own process so its peak RSS is its own.

    python benchmarks/bench_stage3_width.py [--widths 16384 65536] [--layers 20] [--prompts 500]
        [--epochs 3] [--device cpu] [--out bench_stage3_width.json] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import scipy.sparse as sp

from refusalscope.artifacts import writable_arg


def synth(d_sae: int, layers: int, n_prompts: int, tokens: int, l0: int, alpha: float, seed: int,
          harmful: bool):
    """A "tokens"-mode FeatureMatrix of one label."""
    from refusalscope.interventions.features import Feature
    from refusalscope.methods.fm_data import FeatureMatrix

    rng = np.random.default_rng(seed + (1 if harmful else 0))
    n_rows = n_prompts * tokens
    pop = 1.0 / np.arange(1, d_sae + 1) ** alpha
    pop /= pop.sum()
    cols = []
    for layer in range(layers):
        perm = np.random.default_rng(1000 + layer).permutation(d_sae)  # the same popular latents in both labels
        cols.append(layer * d_sae + perm[rng.choice(d_sae, size=(n_rows, l0), p=pop)])
    if harmful:  # planted: 8 latents of layer 0 fire on most harmful rows
        cols.append(np.where(rng.random((n_rows, 8)) < 0.9, np.arange(8)[None, :], -1))
    g = np.concatenate(cols, 1)
    r = np.repeat(np.arange(n_rows), g.shape[1])
    g = g.ravel()
    keep = g >= 0
    X = sp.csr_matrix((rng.exponential(5.0, keep.sum()).astype(np.float32), (r[keep], g[keep])),
                      shape=(n_rows, layers * d_sae))
    X.sum_duplicates()
    used = np.flatnonzero(X.getnnz(axis=0))
    columns = [Feature(int(u // d_sae), int(u % d_sae)) for u in used]
    rows = np.stack([np.repeat(np.arange(n_prompts), tokens), np.tile(np.arange(tokens), n_prompts)], 1)
    return FeatureMatrix(columns, X[:, used].tocsr(), rows.astype(np.int64), "tokens", tokens)


def one(a) -> dict:
    """Every timed phase at one width, in this process."""
    import torch

    from refusalscope.methods.fm import embedding_collapse, rank_per_prompt, train_fm
    from refusalscope.methods.fm_data import fm_dataset
    from refusalscope.methods.probe import rank_by_weight, train_probe

    torch.set_num_threads(a.threads) if a.threads else None
    out: dict = {"d_sae": a.one, "layers": a.layers, "prompts_per_label": a.prompts, "tokens": a.tokens,
                 "l0_per_layer": a.l0, "epochs": a.epochs, "lr": a.lr, "device": a.device,
                 "load_avg_1min_at_start": round(os.getloadavg()[0], 1)}
    t = time.perf_counter()
    h = synth(a.one, a.layers, a.prompts, a.tokens, a.l0, a.alpha, a.seed, True)
    s = synth(a.one, a.layers, a.prompts, a.tokens, a.l0, a.alpha, a.seed, False)
    out["synthesize_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    data = fm_dataset(h, s, a.seed)
    del h, s
    out["dataset_s"] = round(time.perf_counter() - t, 2)
    out.update(rows=len(data.train) + len(data.val) + len(data.test), train_rows=len(data.train),
               nnz=int(data.train.X.nnz + data.val.X.nnz + data.test.X.nnz), fm_columns=len(data.columns),
               latents_seen=data.n_seen)
    t = time.perf_counter()
    res = train_fm(data.train, data.val, data.test, k=20, epochs=a.epochs, batch_size=64, lr=a.lr, seed=a.seed,
                   device=a.device)
    out["fm_fit_s"] = round(time.perf_counter() - t, 2)
    out["fm_s_per_epoch"] = round(out["fm_fit_s"] / a.epochs, 2)
    out["fm_test_acc"] = round(float(res.test_acc or 0.0), 4)
    t = time.perf_counter()
    rng = np.random.default_rng(a.seed)
    sets = {f"p{i}": [data.columns[j] for j in rng.choice(len(data.columns), a.set_size, replace=False)]
            for i in range(a.ranked_prompts)}
    ranked = rank_per_prompt(res.model, data.columns, sets, a.depth, rankable=data.support >= 1)
    out["rank_s"] = round(time.perf_counter() - t, 2)
    out["ranked_prompts"], out["depth"] = len(ranked), a.depth
    t = time.perf_counter()
    probe = train_probe(data.train, data.test, data.val, seed=a.seed)
    rank_by_weight(probe, data.columns)
    out["probe_s"] = round(time.perf_counter() - t, 2)
    out["probe_test_acc"] = round(float(probe.test_acc or 0.0), 4)
    t = time.perf_counter()
    embedding_collapse(res.model, seed=a.seed)
    out["collapse_s"] = round(time.perf_counter() - t, 2)
    out["stage3_cpu_side_s"] = round(sum(out[k] for k in ("dataset_s", "fm_fit_s", "rank_s", "probe_s",
                                                          "collapse_s")), 2)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--prompts", type=int, default=500, help="per label (rows = 2 × prompts × tokens)")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--l0", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.8, help="Zipf exponent of latent popularity")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-2, help="FM learning rate (the stage's default is 1e-3 over 20 "
                                                          "epochs; fewer epochs here, so a larger step)")
    p.add_argument("--ranked-prompts", type=int, default=100)
    p.add_argument("--set-size", type=int, default=20)
    p.add_argument("--depth", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="CI-sized: 2 widths of 512, 3 layers, 20 prompts")
    p.add_argument("--out", type=writable_arg, default=None)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.small:
        a.widths, a.layers, a.prompts, a.l0, a.epochs, a.ranked_prompts, a.depth = [256, 512], 3, 20, 8, 1, 5, 50
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    if a.one is not None:
        return one(a)
    rows = []
    for w in a.widths:
        args = [*(argv if argv is not None else sys.argv[1:]), "--one", str(w)]
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"width {w} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    res: dict = {"benchmark": "B13 stage3 width", "rows": rows}
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        res["ratios"] = {"width": hi["d_sae"] / lo["d_sae"], **{
            k: round(hi[k] / lo[k], 2) if lo[k] else None
            for k in ("nnz", "fm_columns", "dataset_s", "fm_fit_s", "rank_s", "probe_s", "stage3_cpu_side_s",
                      "peak_rss_gb")}}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    print(json.dumps(main()))
