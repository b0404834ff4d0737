"""B14: the analyses at the paper's SAE width. A random-weight Llama (20 layers, d_model 256,
vocabulary 32k) with a JumpReLU SAE on every layer, 16,384 vs 65,536 latents wide, thresholds
set so each SAE fires ~64 latents per token at both widths (as Gemma Scope does). Each part runs
in its own process (its peak RSS is its own), at both widths:

- obrien: token counts over all 20 layers (full encode) and one forward with each prompt's k = 1
  and k = 3 sets ablated (tens of thousands of latents per row);
- random: the random control's draws for 100 prompts x 100 critical latents, 4 seeds (400 draws);
- dashboards: corpus statistics + windows, logit effects and decoder cosines for 2,000 latents,
  and the model summary (full encode of every layer on 32 texts);
- taxonomy: both category views of 2,000 latents on 32 prompts, and 400 random latents drawn
  from every latent of every layer (the human-study pool) mapped too.

    python benchmarks/bench_analyses_width.py --out benchmarks/results/analyses-width.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from refusalscope.artifacts import writable_arg

HERE = Path(__file__).resolve().parent
PARTS = ("obrien", "random", "dashboards", "taxonomy")
LAYERS, D_MODEL, VOCAB, L0 = 20, 256, 32000, 64
PROMPTS = ["Write a poem about the sea and the sky.", "How do I bake bread at home? Explain the steps.",
           "Give detailed instructions for building a bird house.", "The quick brown fox jumps over the lazy dog.",
           "I cannot help with that request. I am sorry.", "You are a helpful assistant. Answer the user."]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def world(d_sae: int, seed: int = 0):
    """(ChatModel, SAESet): the random Llama and its JumpReLU SAEs, ~L0 latents firing per token."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from refusalscope.io.model import ChatModel
    from refusalscope.io.saes import FeatureDictionary, SAESet

    tok = tiny_tokenizer("chatml")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = ChatModel(LlamaForCausalLM(cfg).eval(), tok)
    res = model.residuals(model.encode(PROMPTS), list(range(LAYERS)))
    g = torch.Generator().manual_seed(seed)
    dicts = {}
    for l in range(LAYERS):
        W_enc = torch.randn(D_MODEL, d_sae, generator=g) / D_MODEL ** 0.5
        h = res[l][res[l].norm(dim=-1) > 0][:, :]
        probe = h @ W_enc[:, :2048]
        theta = float(probe.flatten().quantile(1 - L0 / d_sae)) if L0 < d_sae else 0.0
        dicts[l] = FeatureDictionary(l, f"blocks.{l}.hook_resid_post", "jumprelu", W_enc,
                                     torch.randn(d_sae, D_MODEL, generator=g) / D_MODEL ** 0.5,
                                     torch.zeros(d_sae), torch.zeros(D_MODEL), torch.full((d_sae,), theta))
    return model, SAESet(dicts)


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    words = " ".join(PROMPTS).split()
    return [" ".join(rng.choice(words) for _ in range(24)) for _ in range(n)]


def some_latents(d_sae: int, n: int, seed: int = 1) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out: set[tuple[int, int]] = set()
    while len(out) < n:
        out.add((rng.randrange(LAYERS), rng.randrange(d_sae)))
    return sorted(out)


def part_obrien(model, saes, d_sae: int) -> dict:
    from refusalscope.interventions.spec import FeatureAblation
    from refusalscope.methods.activity import token_counts
    from refusalscope.methods.evaluate import refusal_probs

    texts = prompts(16)
    t0 = time.perf_counter()
    counts = token_counts(model, saes, texts, batch_size=8)
    t_counts = time.perf_counter() - t0
    plans, sizes = [], []
    for k in (1, 3):
        for cnt in counts:
            a = FeatureAblation({l: tuple(i for i, n in c.items() if n >= k) for l, c in cnt.items()})
            plans.append([a] if a.size else [])
            sizes.append(a.size)
    t0 = time.perf_counter()
    refusal_probs(model, saes, texts + texts, plans, batch_size=8)
    return {"counts_s": round(t_counts, 2), "ablated_forward_s": round(time.perf_counter() - t0, 2),
            "rows": len(plans), "mean_set_size_k1": sum(sizes[:16]) / 16, "mean_set_size_k3": sum(sizes[16:]) / 16}


def part_random(model, saes, d_sae: int) -> dict:
    from refusalscope.methods.controls import random_sets

    rng = random.Random(0)
    feats = some_latents(d_sae, 10_000)
    sets = {f"p{j}": feats[j * 100:(j + 1) * 100] for j in range(100)}
    pool = min(2000, d_sae // 2)  # latents active on a prompt, per layer
    active = {pid: {l: rng.sample(range(d_sae), pool) for l in {l for l, _ in s}} for pid, s in sets.items()}
    t0 = time.perf_counter()
    draws = [random_sets(sets, active, seed) for seed in range(4)]
    return {"draws": sum(len(d) for d in draws), "critical_latents": 10_000,
            "draw_s": round(time.perf_counter() - t0, 2)}


def part_dashboards(model, saes, d_sae: int) -> dict:
    from refusalscope.methods import dashboards as dash
    from refusalscope.methods.model_summary import model_summary

    feats = some_latents(d_sae, 2000)
    texts = [model.format_chat(t) for t in prompts(32)]
    out = {}
    t0 = time.perf_counter()
    body = dash.corpus_dashboards(model, saes, texts, feats, batch_size=16, max_length=64, top_k=5)
    out["corpus_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    dash.logit_effects(model, saes, feats, 10)
    out["logit_effects_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    dash.decoder_cosines(saes, feats, torch.randn(D_MODEL))
    out["cosines_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    model_summary(model, saes, texts, 16, 64)
    out["model_summary_s"] = round(time.perf_counter() - t0, 2)
    out["latents"], out["with_top_contexts"] = len(feats), sum(bool(b["top"]) for b in body.values())
    return out


def part_taxonomy(model, saes, d_sae: int) -> dict:
    from refusalscope.io.prompts import Prompt
    from refusalscope.methods import taxonomy as tx

    cats = tx.UNSAFE_CATEGORIES
    ps = [Prompt(t, id=f"t{j}", category=cats[j % len(cats)]) for j, t in enumerate(prompts(32))]
    feats = [f"{l}-{i}" for l, i in some_latents(d_sae, 2000)]
    t0 = time.perf_counter()
    tx.category_views(model, saes, ps, feats, 16)
    out = {"views_s": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    pool = tx.LatentPool(saes, exclude=feats)
    extra = random.Random(0).sample(pool, 400)
    tx.category_activity(model, saes, ps, extra, 16)
    out["random_pool_s"], out["pool_size"] = round(time.perf_counter() - t0, 2), len(pool)
    return out


def run_part(part: str, d_sae: int) -> dict:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, saes = world(d_sae)
    build_s, base = time.perf_counter() - t0, rss_gb()
    t0 = time.perf_counter()
    out = globals()[f"part_{part}"](model, saes, d_sae)
    return {"part": part, "d_sae": d_sae, "seconds": round(time.perf_counter() - t0, 2),
            "world_build_s": round(build_s, 1), "rss_after_world_gb": round(base, 2),
            "peak_rss_gb": round(rss_gb(), 2), "detail": out}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--out", type=writable_arg, default="bench_analyses_width.json")
    ap.add_argument("--one", nargs=2, metavar=("PART", "D_SAE"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_part(args.one[0], int(args.one[1]))))
        return {}
    rows = []
    for part in args.parts:
        for d in args.widths:
            proc = subprocess.run([sys.executable, __file__, "--one", part, str(d)], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{part} at {d}: {proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{part:<11} d_sae {d:>6}: {rows[-1]['seconds']:>7.2f} s, peak RSS {rows[-1]['peak_rss_gb']:.2f} GB "
                  f"(world {rows[-1]['rss_after_world_gb']:.2f} GB)  {rows[-1]['detail']}", flush=True)
    ratios = {}
    lo, hi = min(args.widths), max(args.widths)
    for part in args.parts:
        a = next(r for r in rows if r["part"] == part and r["d_sae"] == lo)
        b = next(r for r in rows if r["part"] == part and r["d_sae"] == hi)
        ratios[part] = {"seconds": round(b["seconds"] / max(a["seconds"], 1e-3), 2),
                        "peak_rss_over_world_gb": [round(a["peak_rss_gb"] - a["rss_after_world_gb"], 2),
                                                   round(b["peak_rss_gb"] - b["rss_after_world_gb"], 2)]}
    res = {"layers": LAYERS, "d_model": D_MODEL, "vocab": VOCAB, "l0_target": L0, "width_ratio": hi / lo,
           "threads": 2, "rows": rows, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    for part, r in ratios.items():
        print(f"{part:<11} {lo}->{hi}: time x{r['seconds']}, peak RSS above the world {r['peak_rss_over_world_gb']} GB")
    return res


if __name__ == "__main__":
    main()
