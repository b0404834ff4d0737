"""B1: plain forward vs sparse feature ablation vs the reference full-SAE hook.

Batch of 16 chat prompts, |S| latents ablated per layer at every SAE layer, all positions.
Uses the demo world's model and SAEs when built, else the base GGUF model with random JumpReLU
SAEs of the demo shape (2048 latents) at every layer. Prints a table and writes JSON.

    python benchmarks/bench_ablation.py [--sizes 10 50 200] [--repeats 3] [--out bench_ablation.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from refusalscope.artifacts import writable_arg
from refusalscope.interventions.engine import intervene
from refusalscope.interventions.spec import FeatureAblation
from refusalscope.io.prompts import load_bundled


def load_world(d_sae: int):
    from refusalscope.demo.world import is_built, load_demo_model, sae_dir
    from refusalscope.io.sae_loading import load_sae_set

    if is_built():
        model = load_demo_model()
        saes = load_sae_set({l: str(sae_dir(l)) for l in range(model.n_layers)}, quiet=True)
        return model, saes, "demo world (tuned SmolLM2-135M + trained SAEs)"
    from refusalscope.demo.recipe import base_gguf_path
    from refusalscope.io.model import load_chat_model
    from refusalscope.io.saes import FeatureDictionary, SAESet, make_jumprelu_sae

    model = load_chat_model(base_gguf_path(), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    d = model.d_model
    saes = {}
    for l in range(model.n_layers):
        saes[l] = make_jumprelu_sae(torch.randn(d, d_sae, generator=g) / d ** 0.5,
                                    torch.randn(d_sae, d, generator=g) / d ** 0.5, torch.zeros(d_sae),
                                    torch.zeros(d), torch.full((d_sae,), 0.5),
                                    hook_name=f"blocks.{l}.hook_resid_post")
    return model, SAESet({l: FeatureDictionary.from_sae(s, l) for l, s in saes.items()}, saes=saes), \
        "base SmolLM2-135M + random JumpReLU SAEs"


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Median seconds of `repeats` calls after one warm-up (`sync` waits for a GPU)."""
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def ablation_rows(model, saes, batch, sizes, repeats: int, sync=lambda: None) -> list[dict]:
    """Plain forward, then sparse and reference ablation of |S| latents per layer at every SAE
    layer, for each size: median seconds and ratios (shared by B1 and the GPU-shaped B4)."""
    plain = timed(lambda: model.logits(batch), repeats, sync)
    rows = [{"mode": "plain", "S_per_layer": 0, "median_s": plain, "ratio_to_plain": 1.0}]
    for size in sizes:
        abl = FeatureAblation({l: list(range(0, 2 * size, 2)) for l in saes})
        got = {}
        for mode in ("sparse", "reference"):
            def run(mode=mode, abl=abl):
                with intervene(model, saes, [abl], mode=mode):
                    model.logits(batch)
            got[mode] = timed(run, repeats, sync)
            rows.append({"mode": mode, "S_per_layer": size, "median_s": got[mode],
                         "ratio_to_plain": got[mode] / plain})
        rows[-1]["reference_over_sparse"] = got["reference"] / got["sparse"]
    return rows


def generation_rows(model, saes, batch, size: int, new_tokens: int, repeats: int,
                    sync=lambda: None) -> list[dict]:
    """Greedy generation of `new_tokens` for the whole batch (KV cache), plain and with |S|
    latents per layer sparsely ablated at every SAE layer: what Stages 1-3 spend most time on."""
    abl = FeatureAblation({l: list(range(0, 2 * size, 2)) for l in saes})
    plain = timed(lambda: model.generate(batch, max_new_tokens=new_tokens), repeats, sync)

    def run():
        with intervene(model, saes, [abl]):
            model.generate(batch, max_new_tokens=new_tokens)
    sparse = timed(run, repeats, sync)
    return [{"mode": "generate", "S_per_layer": 0, "median_s": plain, "ratio_to_plain": 1.0},
            {"mode": "generate+sparse", "S_per_layer": size, "median_s": sparse,
             "ratio_to_plain": sparse / plain}]


def print_rows(rows: list[dict]) -> None:
    print(f"{'mode':<20}{'|S|/layer':>10}{'median s':>10}{'x plain':>9}{'ref/sparse':>11}")
    for r in rows:
        extra = f"{r['reference_over_sparse']:>11.2f}" if "reference_over_sparse" in r else ""
        mode = r["mode"] + (f" b{r['batch']}" if "batch" in r else "")
        print(f"{mode:<20}{r['S_per_layer']:>10}{r['median_s']:>10.3f}{r['ratio_to_plain']:>9.2f}{extra}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--out", type=writable_arg, default="bench_ablation.json")
    args = ap.parse_args()
    model, saes, world = load_world(args.d_sae)
    prompts = [p.text for p in load_bundled("harmful", split="test")][: args.batch]
    batch = model.encode(prompts)
    rows = ablation_rows(model, saes, batch, args.sizes, args.repeats)
    result = {"world": world, "batch": args.batch, "tokens": int(batch.attention_mask.sum()),
              "threads": torch.get_num_threads(), "sae_layers": len(saes), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{world}; batch {args.batch}, {len(saes)} SAE layers, {torch.get_num_threads()} threads")
    print_rows(rows)


if __name__ == "__main__":
    main()
