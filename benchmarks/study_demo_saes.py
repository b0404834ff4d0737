"""What better demo SAEs would cost (issue 20): one layer of the cached demo model, SAEs trained
with the build's own recipe code at several widths and token counts; explained variance, L0,
dead share, CE increase when the stream is replaced by the reconstruction, and seconds to train.

The issue asks for SAEs at least 8,192 wide trained on at least 100k tokens (EV >= 0.85, CE
increase <= 0.5 nats, dead <= 10 %) without breaking the 30-minute `make demo`. The build trains
every layer the same way, so one layer's time times the layers gives the build's SAE time.

    python benchmarks/study_demo_saes.py --layer 12 --out benchmarks/results/demo-saes/layer12.json \
        [--refat-prob 0.5] [--configs 2048:12000,2048:100000,8192:100000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from refusalscope.artifacts import writable_arg
from refusalscope.demo.build_steps import _ce, sae_corpus
from refusalscope.demo.corpus import collect
from refusalscope.demo.recipe import DemoRecipe, FinetuneRecipe
from refusalscope.demo.sae_train import finetune_jumprelu, ordinary_tokens, quality, to_jumprelu, train_topk
from refusalscope.demo.world import load_demo_model, model_dir


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--out", type=writable_arg, default=None)
    ap.add_argument("--refat-prob", type=float, default=0.0, help="which cached demo model (its recipe)")
    ap.add_argument("--configs", default="2048:12000,2048:100000,8192:100000",
                    help="d_sae:train_tokens[:k[:epochs]],... (k and epochs default to the recipe's)")
    a = ap.parse_args(argv)
    recipe = DemoRecipe(finetune=FinetuneRecipe(refat_prob=a.refat_prob))
    r = recipe.sae
    configs = [[int(x) for x in c.split(":")] for c in a.configs.split(",")]
    configs = [(c[0], c[1], c[2] if len(c) > 2 else r.k, c[3] if len(c) > 3 else r.topk_epochs) for c in configs]
    model = load_demo_model(recipe)
    t0 = time.perf_counter()
    texts, ce_texts = sae_corpus(model, recipe, model_dir(recipe))
    most = max(c[1] for c in configs)
    acts = collect(model, texts, [a.layer], most + r.eval_tokens, recipe.seed, quiet=True)[a.layer]
    collect_s = time.perf_counter() - t0
    perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed(recipe.seed))
    ev = acts[perm[: r.eval_tokens]]
    ev = ev[ordinary_tokens(ev)]
    ce_batch = model.encode_texts([(model.tokenizer.bos_token or "") + t for t in ce_texts], max_length=256)
    base = _ce(model, ce_batch)
    res = {"layer": a.layer, "refat_prob": a.refat_prob, "corpus_tokens": len(acts), "collect_seconds":
           round(collect_s, 1), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_1min_start": round(os.getloadavg()[0], 2), "ce_base": round(base, 4), "runs": []}
    for d_sae, tokens, k, epochs in configs:
        tr = acts[perm[r.eval_tokens: r.eval_tokens + tokens]]
        tr = tr[ordinary_tokens(tr)]
        t1 = time.perf_counter()
        topk, freq = train_topk(tr, d_sae, k, epochs, r.topk_lr, r.batch_size, recipe.seed + a.layer, quiet=True)
        sample = tr[: min(len(tr), 10_000)]
        w = finetune_jumprelu(to_jumprelu(topk, sample, freq), tr, k, epochs, r.jumprelu_lr,
                              r.batch_size, recipe.seed + a.layer, quiet=True)
        secs = time.perf_counter() - t1
        q = quality(w, ev, sample)
        ce = _ce(model, ce_batch, a.layer, w)
        row = {"d_sae": d_sae, "train_tokens": len(tr), "k": k, "epochs": epochs, "seconds": round(secs, 1), **q,
               "ce_increase": round(ce - base, 4)}
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
    res["load_1min_end"] = round(os.getloadavg()[0], 2)
    if a.out is not None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
