"""B4c: the host overhead of GPU passes, eager vs compiled (`ChatModel.compile`), one process.

Random weights at the real shapes (bench_shapes.build: Gemma-2-2B or Llama-3.1-8B with 16k / 32k
JumpReLU SAEs at every layer), B4's prompts (bundled harmful test, ~75 tokens each). For batch 16
and 64: the plain forward (`logits`, next-token logits copied to the host, as B4 timed it), the
pipeline's P("I") pass (`next_token_probs` with the softmax on the device, one column copied), and
sparse ablation of |S| latents at every layer; then greedy generation plain and ablated. Eager
first, then compiled, in the same process; compile time is reported apart (first pass of each
graph). `--small`: tiny dimensions on a CPU (CI smoke test).

    python benchmarks/bench_compile.py [--arch gemma-2-2b] [--d-sae 16384] [--small] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from refusalscope.artifacts import writable_arg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ablation import timed  # noqa: E402
from bench_shapes import build  # noqa: E402  (also puts tests/ on the path)

from refusalscope.interventions.engine import intervene  # noqa: E402
from refusalscope.interventions.spec import FeatureAblation  # noqa: E402
from refusalscope.io.prompts import load_bundled  # noqa: E402


def passes(model, saes, batches: dict, size: int, gen_batch, gen_tokens: int, repeats: int, sync) -> dict:
    """Median seconds of each pass kind (the keys name them)."""
    abl = FeatureAblation({l: list(range(0, 2 * size, 2)) for l in saes})
    cols = model.refusal_token_ids
    out = {}
    for b, batch in batches.items():
        out[f"plain_b{b}"] = timed(lambda batch=batch: model.logits(batch), repeats, sync)
        out[f"probs_b{b}"] = timed(lambda batch=batch: model.next_token_probs(batch, columns=cols), repeats, sync)

        def sparse(batch=batch):
            with intervene(model, saes, [abl]):
                model.next_token_probs(batch, columns=cols)
        out[f"sparse{size}_b{b}"] = timed(sparse, repeats, sync)
    if gen_batch is not None:
        out[f"generate_b{len(gen_batch)}"] = timed(lambda: model.generate(gen_batch, gen_tokens), 1, sync)

        def gen_sparse():
            with intervene(model, saes, [abl]):
                model.generate(gen_batch, gen_tokens)
        out[f"generate_sparse{size}_b{len(gen_batch)}"] = timed(gen_sparse, 1, sync)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="gemma-2-2b")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--size", type=int, default=200, help="|S| latents ablated per layer")
    ap.add_argument("--gen-batch", type=int, default=64, help="0: skip generation")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=writable_arg, default=None)
    a = ap.parse_args(argv)
    model, saes = build(a.arch, a.small, a.d_sae, getattr(torch, a.dtype), a.device)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    harmful = [p.text for p in load_bundled("harmful", split="test")]
    batches = {b: model.encode((harmful * (1 + b // len(harmful)))[:b]) for b in a.batches}
    gen = model.encode((harmful * 2)[: a.gen_batch]) if a.gen_batch else None
    res = {"arch": a.arch, "small": a.small, "d_sae": a.d_sae, "dtype": a.dtype, "layers": len(saes),
           "device": torch.cuda.get_device_name() if cuda else "cpu", "size": a.size,
           "tokens_per_prompt": round(float(batches[a.batches[0]].lengths.float().mean()), 1)}
    res["eager"] = passes(model, saes, batches, a.size, gen, a.gen_tokens, a.repeats, sync)
    t0 = time.perf_counter()
    model.compile()
    model.logits(batches[a.batches[0]])
    sync()
    res["compile_first_pass_s"] = round(time.perf_counter() - t0, 1)
    res["compiled"] = passes(model, saes, batches, a.size, gen, a.gen_tokens, a.repeats, sync)
    res["compile_s"] = round(model.compile_seconds, 1)
    e, c = res["eager"], res["compiled"]
    res["speedup"] = {k: round(e[k] / c[k], 2) for k in e}
    res["sparse_over_plain"] = {mode: {b: round(d[f"sparse{a.size}_b{b}"] / d[f"probs_b{b}"], 3) for b in a.batches}
                                for mode, d in (("eager", e), ("compiled", c))}
    if cuda:
        res["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"{a.arch} x {a.d_sae}, {res['layers']} layers, {a.dtype} on {res['device']}; "
          f"compile {res['compile_s']} s (first pass {res['compile_first_pass_s']} s)")
    print(f"{'pass':<24}{'eager ms':>10}{'compiled ms':>12}{'speed-up':>9}")
    for k in e:
        print(f"{k:<24}{e[k] * 1e3:>10.1f}{c[k] * 1e3:>12.1f}{res['speedup'][k]:>9.2f}")
    print("sparse / plain (P(I) pass):", res["sparse_over_plain"])
    return res


if __name__ == "__main__":
    main()
