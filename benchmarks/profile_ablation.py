"""Profile one sparse-ablation forward (torch.profiler): where the time goes, by operator.

    python benchmarks/profile_ablation.py --arch gemma-2-2b --d-sae 16384 [--size 50] [--small]

Prints the top operators by device time (CPU time on a CPU) and writes a Chrome trace when
--trace is given. Uses bench_shapes' random-weight models at the real shapes.
"""

from __future__ import annotations

import argparse

import torch
from bench_shapes import build  # also puts tests/ (tiny tokenizers) on the path
from torch.profiler import ProfilerActivity, profile

from refusalscope.interventions.engine import intervene
from refusalscope.interventions.spec import FeatureAblation
from refusalscope.io.prompts import load_bundled


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="gemma-2-2b")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--size", type=int, default=50, help="|S| latents ablated per layer")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--trace", default=None)
    args = ap.parse_args(argv)
    model, saes = build(args.arch, args.small, args.d_sae, getattr(torch, args.dtype), args.device)
    batch = model.encode([p.text for p in load_bundled("harmful", split="test")][: args.batch])
    abl = FeatureAblation({l: list(range(0, 2 * args.size, 2)) for l in saes})

    def step():
        with intervene(model, saes, [abl]):
            model.logits(batch)

    step()
    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    print(table)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return table


if __name__ == "__main__":
    main()
